//! A user model written against `kiln::prelude` alone: derive, names, freezing, a training step.

use kiln::prelude::*;

#[derive(Module)]
struct Classifier {
    encoder: Sequential,
    #[module(rename = "classifier")]
    head: Linear,
}

impl Forward for Classifier {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.head.forward(&self.encoder.forward(x).relu())
    }
}

fn model() -> Classifier {
    let mut rng = Rng::new(0);
    Classifier {
        encoder: seq![
            Linear::new(4, 8, &mut rng),
            Relu,
            Linear::new(8, 8, &mut rng)
        ],
        head: Linear::new(8, 3, &mut rng),
    }
}

#[test]
fn derived_names_line_up_and_training_reduces_the_loss() {
    let m = model();
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "encoder.0.weight",
            "encoder.0.bias",
            "encoder.2.weight",
            "encoder.2.bias",
            "classifier.weight",
            "classifier.bias"
        ]
    );
    assert_eq!(m.num_parameters(), 4 * 8 + 8 + 8 * 8 + 8 + 8 * 3 + 3);

    let x = Tensor::randn([16, 4], 1);
    let y = Tensor::from_vec((0..16).map(|i| (i % 3) as i64).collect::<Vec<_>>(), [16]);
    let mut opt = Adam::new(m.parameters(), 1e-2).unwrap();
    let loss_of =
        |m: &Classifier| loss::cross_entropy(&m.forward(&x), &y, None, -100, Reduction::Mean, 0.0);
    let first = loss_of(&m).item();
    for _ in 0..300 {
        opt.zero_grad();
        loss_of(&m).backward();
        opt.step();
    }
    let last = loss_of(&m).item();
    assert!(last < 0.2 * first, "loss {first} -> {last}");

    m.freeze("encoder.*").unwrap();
    assert_eq!(m.num_trainable_parameters(), 8 * 3 + 3);
}
