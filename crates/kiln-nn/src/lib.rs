//! kiln-nn: modules and the things built from them.
//!
//! A model is a struct of parameters and sub-modules with `#[derive(Module)]`; its names follow
//! the field names so they line up with checkpoint keys (`layers.3.attn.q_proj.weight`).

pub mod error;
pub mod init;
pub mod layers;
pub mod loss;
pub mod module;
pub mod optim;
pub mod registry;
pub mod safetensors_io;
pub mod scheduler;

pub use error::NnError;
pub use kiln_derive::Module;
pub use layers::*;
pub use loss::{KlReduction, Loss, Reduction};
pub use module::{
    Buffer, Forward, LoadMode, LoadReport, Module, ModuleExt, Param, RandomState, StateDict,
    TrainFlag, Visit, Visited, Visitor,
};
pub use optim::{
    clip_grad_norm_, clip_grad_value_, Adagrad, Adam, AdamW, Optimizer, OptimizerState, ParamGroup,
    RmsProp, Sgd,
};
pub use registry::{registry, BuildContext, Registry, TrainSpec, Training};
pub use scheduler::{
    CosineAnnealingLR, ExponentialLR, LinearWarmupDecayLR, MultiStepLR, OneCycleLR,
    ReduceLROnPlateau, Scheduler, SchedulerState, StepLR,
};

#[cfg(test)]
mod tests {
    use crate::{Forward, LoadMode, Module, ModuleExt, Param, StateDict, TrainFlag};
    use kiln_core::Tensor;

    #[derive(Module)]
    struct Affine {
        weight: Param,
        bias: Option<Param>,
    }

    impl Forward for Affine {
        fn forward(&self, x: &Tensor) -> Tensor {
            let y = x.mul(&self.weight);
            match &self.bias {
                Some(b) => y.add(b),
                None => y,
            }
        }
    }

    #[derive(Module)]
    struct Net {
        #[module(rename = "encoder")]
        layers: Vec<Affine>,
        head: Affine,
        training: TrainFlag,
        #[module(skip)]
        _scale: f64,
    }

    fn affine(n: usize, bias: bool) -> Affine {
        Affine {
            weight: Param::new(Tensor::ones([n])),
            bias: bias.then(|| Param::new(Tensor::zeros([n]))),
        }
    }

    fn net() -> Net {
        Net {
            layers: vec![affine(3, true), affine(3, false)],
            head: affine(3, true),
            training: TrainFlag::default(),
            _scale: 1.0,
        }
    }

    #[test]
    fn names_follow_fields_renames_and_list_indices() {
        let names: Vec<String> = net()
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "encoder.0.weight",
                "encoder.0.bias",
                "encoder.1.weight",
                "head.weight",
                "head.bias"
            ]
        );
        assert_eq!(net().num_parameters(), 15);
    }

    #[test]
    fn freeze_by_glob_and_report_typos() {
        let n = net();
        assert_eq!(n.freeze("encoder.*").unwrap(), 3);
        assert_eq!(n.num_trainable_parameters(), 6);
        assert!(n.summary().contains("(frozen)"));
        assert_eq!(n.unfreeze("*.bias").unwrap(), 2);
        assert_eq!(n.num_trainable_parameters(), 9);
        let err = n.freeze("encodr.*").unwrap_err().to_string();
        assert!(err.contains("matches no parameter"), "{err}");
        // Frozen parameters receive no gradient.
        n.freeze("head.*").unwrap();
        let x = Tensor::ones([3]);
        n.head
            .forward(&n.layers[0].forward(&x))
            .sum_all()
            .backward();
        assert!(n.head.weight.grad().is_none());
        assert!(n.layers[0].weight.grad().is_none());
        assert!(n.layers[0].bias.as_ref().unwrap().grad().is_some());
    }

    #[test]
    fn train_eval_flip_every_flag() {
        let n = net();
        assert!(n.training.is_training());
        n.eval();
        assert!(!n.training.is_training());
        n.train();
        assert!(n.training.is_training());
    }

    #[test]
    fn state_dict_round_trips_through_safetensors_and_checks_shapes() {
        let a = net();
        a.head
            .weight
            .assign(&Tensor::from_slice(&[1f32, 2.0, 3.0], [3]));
        let dir = std::env::temp_dir().join(format!("kiln-nn-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net.safetensors");
        a.save_safetensors(&path).unwrap();
        let b = net();
        let report = b.load_safetensors(&path, LoadMode::Strict).unwrap();
        assert_eq!(report.loaded.len(), 5);
        assert_eq!(b.head.weight.to_vec::<f32>(), vec![1.0, 2.0, 3.0]);

        // Missing/unexpected keys: strict fails and changes nothing; non-strict reports.
        let mut partial = StateDict::new();
        partial.insert("head.weight", Tensor::full([3], 9f32));
        partial.insert("extra", Tensor::zeros([1]));
        let err = b
            .load_state_dict(&partial, LoadMode::Strict)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing") && err.contains("unexpected: extra"),
            "{err}"
        );
        assert_eq!(b.head.weight.to_vec::<f32>(), vec![1.0, 2.0, 3.0]);
        let r = b.load_state_dict(&partial, LoadMode::NonStrict).unwrap();
        assert_eq!(
            (r.loaded.len(), r.missing.len(), r.unexpected.len()),
            (1, 4, 1)
        );
        assert_eq!(b.head.weight.to_vec::<f32>(), vec![9.0; 3]);

        let mut wrong = StateDict::new();
        wrong.insert("head.weight", Tensor::zeros([4]));
        let err = b
            .load_state_dict(&wrong, LoadMode::NonStrict)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shape mismatch for head.weight: module [3], state dict [4]"),
            "{err}"
        );

        std::fs::write(dir.join("bad.safetensors"), b"not a safetensors file").unwrap();
        let err = b
            .load_safetensors(dir.join("bad.safetensors"), LoadMode::Strict)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("not a valid safetensors file"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
