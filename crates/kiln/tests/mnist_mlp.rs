//! The MNIST example runs in the test suite on a reduced budget (3 epochs instead of 20):
//! the training loss falls and the held-out accuracy clears 90%.

#[allow(dead_code)]
#[path = "../../../examples/mnist_mlp.rs"]
mod mnist_mlp;

#[test]
fn mnist_mlp_learns_on_a_reduced_budget() {
    let cfg = mnist_mlp::Config {
        epochs: 3,
        progress: false,
        verbose: false,
        ..Default::default()
    };
    let r = mnist_mlp::run(&cfg).expect("MNIST 5k loads (fetched by scripts/fetch_data.sh)");
    eprintln!(
        "mnist_mlp (3 epochs): train loss {:?}, held-out accuracy {:?}, {:.2} s",
        r.train_loss, r.test_accuracy, r.seconds
    );
    assert_eq!(r.sizes, (4000, 1000));
    assert_eq!(r.train_loss.len(), 3);
    assert!(
        r.train_loss[2] < r.train_loss[1] && r.train_loss[1] < r.train_loss[0],
        "train loss {:?}",
        r.train_loss
    );
    let acc = r.test_accuracy[2];
    assert!(acc >= 0.90, "held-out accuracy {acc} after 3 epochs");
}

#[test]
fn the_model_maps_images_to_ten_logits() {
    let cfg = mnist_mlp::Config::default();
    let net = mnist_mlp::model(&cfg);
    use kiln::prelude::*;
    assert_eq!(
        net.num_parameters(),
        784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    );
    net.eval();
    let logits = net.forward(&Tensor::zeros([3, 1, 28, 28]));
    assert_eq!(logits.dims(), &[3, 10]);
    let labels = Tensor::from_vec(vec![0i64, 1, 2], [3]);
    let picked = Tensor::from_vec(
        vec![
            1f32, 0., 0., 0., 0., 0., 0., 0., 0., 0., //
            0., 0., 3., 0., 0., 0., 0., 0., 0., 0., //
            0., 0., 5., 0., 0., 0., 0., 0., 0., 0.,
        ],
        [3, 10],
    );
    assert!((mnist_mlp::accuracy(&picked, &labels) - 2.0 / 3.0).abs() < 1e-12);
}
