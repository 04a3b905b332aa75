//! The adapter hook of [`Linear`](crate::Linear): a [`LinearAdapter`] (LoRA and its kin) set in
//! a layer's [`AdapterSlot`] sees the layer's input and base output and returns the adapted
//! output. Its parameters are named under the layer's path (`query.lora_A.weight`), so they
//! appear in `named_parameters()`/`state_dict()` and train like any other parameter.

use crate::error::NnError;
use crate::module::{Module, Visit, Visitor};
use kiln_core::Tensor;
use std::any::Any;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// Something attached to a [`Linear`](crate::Linear) that changes its output: given the
/// input `x` and the base output `y = x Wᵀ + b`, [`LinearAdapter::adapt`] returns the adapted
/// output. Its parameters, buffers and flags are visited under the layer's name.
pub trait LinearAdapter: Module + Debug + Send + Sync + Any {
    /// The adapted output for input `x` `[.., in]` and base output `base` `[.., out]`.
    fn adapt(&self, x: &Tensor, base: Tensor) -> Tensor;

    /// The adapted output of the layer (`weight` `[out, in]`, `bias`) for `x`, computed with the
    /// base output in one op, when the adapter has such a path; `None` (the default) has the
    /// layer compute `x·weightᵀ + bias` and call [`LinearAdapter::adapt`] on it.
    fn forward_with_base(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Option<Tensor> {
        let _ = (x, weight, bias);
        None
    }

    /// Folds the adapter into the layer's `weight` `[out, in]` in place, so that the base layer
    /// alone computes the adapted output (and `adapt` must then return `base` unchanged).
    /// Adapters that cannot be merged keep this default, which returns an error.
    fn merge_into(&self, weight: &Tensor) -> Result<(), NnError> {
        let _ = weight;
        Err(NnError::Config(format!(
            "{}: merging into the base weight is not supported",
            self.type_name()
        )))
    }

    /// Undoes [`LinearAdapter::merge_into`] on `weight`. The default returns an error.
    fn unmerge_from(&self, weight: &Tensor) -> Result<(), NnError> {
        let _ = weight;
        Err(NnError::Config(format!(
            "{}: unmerging from the base weight is not supported",
            self.type_name()
        )))
    }

    /// True while the adapter is merged into the base weight.
    fn is_merged(&self) -> bool {
        false
    }
}

#[derive(Default)]
struct SlotInner {
    set: AtomicBool,
    adapter: RwLock<Option<Arc<dyn LinearAdapter>>>,
}

/// The place in a [`Linear`](crate::Linear) where an adapter can be set. Clones share the
/// slot (setting an adapter through one is seen by all), so code outside the layer can hold
/// it (see [`ModuleExt::adapter_slots`](crate::ModuleExt::adapter_slots)). An empty slot costs
/// the layer one atomic load per forward.
#[derive(Clone, Default)]
pub struct AdapterSlot(Arc<SlotInner>);

impl AdapterSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The adapter, if one is set.
    pub fn get(&self) -> Option<Arc<dyn LinearAdapter>> {
        if !self.0.set.load(Ordering::Acquire) {
            return None;
        }
        self.0
            .adapter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when no adapter is set.
    pub fn is_empty(&self) -> bool {
        !self.0.set.load(Ordering::Acquire)
    }

    /// Sets `adapter`, returning the one it replaces.
    pub fn set(&self, adapter: Arc<dyn LinearAdapter>) -> Option<Arc<dyn LinearAdapter>> {
        let mut guard = self.0.adapter.write().unwrap_or_else(|e| e.into_inner());
        let old = guard.replace(adapter);
        self.0.set.store(true, Ordering::Release);
        old
    }

    /// Removes and returns the adapter.
    pub fn take(&self) -> Option<Arc<dyn LinearAdapter>> {
        let mut guard = self.0.adapter.write().unwrap_or_else(|e| e.into_inner());
        self.0.set.store(false, Ordering::Release);
        guard.take()
    }

    /// True when `self` and `other` are the same slot (clones of one another).
    pub fn same_slot(&self, other: &AdapterSlot) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Debug for AdapterSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.get() {
            Some(a) => write!(f, "AdapterSlot({a:?})"),
            None => write!(f, "AdapterSlot(empty)"),
        }
    }
}

impl Visit for AdapterSlot {
    /// Reports the slot under the owning layer's path, then the adapter's items (if any) under
    /// that same path: the field name is not part of the names.
    fn visit_named(&self, _name: &str, visitor: &mut Visitor) {
        visitor.adapter(self);
        if let Some(a) = self.get() {
            a.visit(visitor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{gradcheck_module, Linear};
    use crate::{Forward, LoadMode, Module, ModuleExt, Param};
    use kiln_core::{with_no_grad, DType};

    /// A minimal LoRA for the tests: `y + s · (x Aᵀ) Bᵀ`.
    #[derive(Module, Debug)]
    struct TestLora {
        #[module(rename = "lora_A")]
        a: Factor,
        #[module(rename = "lora_B")]
        b: Factor,
        #[module(skip)]
        scale: f64,
        #[module(skip)]
        merged: AtomicBool,
    }

    #[derive(Module, Debug)]
    struct Factor {
        weight: Param,
    }

    impl TestLora {
        fn new(a: Tensor, b: Tensor, scale: f64) -> Arc<Self> {
            Arc::new(TestLora {
                a: Factor {
                    weight: Param::new(a),
                },
                b: Factor {
                    weight: Param::new(b),
                },
                scale,
                merged: AtomicBool::new(false),
            })
        }

        fn delta(&self) -> Tensor {
            with_no_grad(|| self.b.weight.matmul(&self.a.weight).mul_scalar(self.scale))
        }
    }

    impl LinearAdapter for TestLora {
        fn adapt(&self, x: &Tensor, base: Tensor) -> Tensor {
            if self.is_merged() {
                return base;
            }
            let low = x.matmul(&self.a.weight.t()).mul_scalar(self.scale);
            base.add(&low.matmul(&self.b.weight.t()))
        }
        fn merge_into(&self, weight: &Tensor) -> Result<(), NnError> {
            weight.assign(&weight.detach().add(&self.delta()));
            self.merged.store(true, Ordering::Relaxed);
            Ok(())
        }
        fn unmerge_from(&self, weight: &Tensor) -> Result<(), NnError> {
            weight.assign(&weight.detach().sub(&self.delta()));
            self.merged.store(false, Ordering::Relaxed);
            Ok(())
        }
        fn is_merged(&self) -> bool {
            self.merged.load(Ordering::Relaxed)
        }
    }

    /// An adapter that keeps the unsupported merge defaults.
    #[derive(Module, Debug)]
    struct Shift {
        #[module(skip)]
        by: f64,
    }

    impl LinearAdapter for Shift {
        fn adapt(&self, _x: &Tensor, base: Tensor) -> Tensor {
            base.add_scalar(self.by)
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        a.to_dtype(DType::F64)
            .to_vec::<f64>()
            .iter()
            .zip(b.to_dtype(DType::F64).to_vec::<f64>())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn adapter_changes_output_and_trains_empty_slot_is_exact() {
        let w = Tensor::randn([3, 4], 1);
        let b = Tensor::randn([3], 2);
        let l = Linear::from_weights(w.clone(), Some(b.clone()));
        let x = Tensor::randn([2, 4], 3);
        let before = l.forward(&x).to_vec::<f32>();
        // Independent reference for the empty slot: x Wᵀ + b element by element.
        let (xv, wv, bv) = (x.to_vec::<f32>(), w.to_vec::<f32>(), b.to_vec::<f32>());
        for i in 0..2 {
            for o in 0..3 {
                let r: f32 = (0..4).map(|k| xv[i * 4 + k] * wv[o * 4 + k]).sum::<f32>() + bv[o];
                assert!((before[i * 3 + o] - r).abs() < 1e-5);
            }
        }
        assert!(l.adapter.is_empty());

        let lora = TestLora::new(Tensor::randn([2, 4], 4), Tensor::randn([3, 2], 5), 0.5);
        assert!(l.adapter.set(lora.clone()).is_none());
        assert!(!l.adapter.is_empty());
        let y = l.forward(&x);
        let expect = x.matmul(&w.t()).add(&b).add(
            &x.matmul(&lora.a.weight.t())
                .matmul(&lora.b.weight.t())
                .mul_scalar(0.5),
        );
        assert!(max_diff(&y, &expect) < 1e-5);
        assert!(max_diff(&y, &Tensor::from_vec(before.clone(), [2, 3])) > 1e-3);

        // Frozen base: only the adapter's parameters get gradients.
        l.weight.set_requires_grad(false);
        l.bias.as_ref().unwrap().set_requires_grad(false);
        l.forward(&x).sum_all().backward();
        assert!(l.weight.grad().is_none());
        assert!(lora.a.weight.grad().is_some() && lora.b.weight.grad().is_some());

        // A clone shares the slot; taking the adapter restores the exact old output.
        let c = l.clone();
        assert!(c.adapter.same_slot(&l.adapter));
        assert!(c.adapter.take().is_some());
        assert!(l.adapter.is_empty());
        assert_eq!(l.forward(&x).to_vec::<f32>(), before);
    }

    #[test]
    fn adapter_params_are_named_under_the_layer_and_slots_are_found() {
        #[derive(Module)]
        struct Block {
            query: Linear,
            value: Linear,
        }
        let block = Block {
            query: Linear::new(4, 3, &mut kiln_core::Rng::new(0)),
            value: Linear::new(4, 3, &mut kiln_core::Rng::new(1)),
        };
        let sd_before = block.state_dict();
        let slots = block.adapter_slots();
        let names: Vec<&str> = slots.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["query", "value"]);
        slots[0].1.set(TestLora::new(
            Tensor::zeros([2, 4]),
            Tensor::zeros([3, 2]),
            1.0,
        ));
        let names: Vec<(String, Vec<usize>)> = block
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.dims().to_vec()))
            .collect();
        assert_eq!(
            names,
            [
                ("query.weight".to_string(), vec![3, 4]),
                ("query.bias".to_string(), vec![3]),
                ("query.lora_A.weight".to_string(), vec![2, 4]),
                ("query.lora_B.weight".to_string(), vec![3, 2]),
                ("value.weight".to_string(), vec![3, 4]),
                ("value.bias".to_string(), vec![3]),
            ]
        );
        assert!(block.summary().contains("query.lora_A"));
        // A state dict without adapters still loads strictly into a model without adapters.
        block.query.adapter.take();
        let r = block.load_state_dict(&sd_before, LoadMode::Strict).unwrap();
        assert_eq!(r.loaded.len(), 4);
    }

    #[test]
    fn merge_defaults_are_errors_and_merge_roundtrips() {
        let l = Linear::from_weights(Tensor::randn([3, 4], 1), None);
        let shift: Arc<dyn LinearAdapter> = Arc::new(Shift { by: 1.0 });
        let err = shift.merge_into(&l.weight).unwrap_err().to_string();
        assert!(err.contains("Shift: merging"), "{err}");
        assert!(shift.unmerge_from(&l.weight).is_err());
        assert!(!shift.is_merged());

        let x = Tensor::randn([5, 4], 2);
        let w0 = l.weight.to_vec::<f32>();
        let lora = TestLora::new(Tensor::randn([2, 4], 3), Tensor::randn([3, 2], 4), 2.0);
        l.adapter.set(lora.clone());
        let adapted = l.forward(&x);
        lora.merge_into(&l.weight).unwrap();
        assert!(max_diff(&l.forward(&x), &adapted) < 1e-5);
        lora.unmerge_from(&l.weight).unwrap();
        assert!(max_diff(&l.weight, &Tensor::from_vec(w0, [3, 4])) < 1e-6);
    }

    #[test]
    fn gradcheck_linear_with_lora() {
        let l = Linear::from_weights(
            Tensor::randn_f64([3, 4], 1),
            Some(Tensor::randn_f64([3], 2)),
        );
        l.adapter.set(TestLora::new(
            Tensor::randn_f64([2, 4], 3),
            Tensor::randn_f64([3, 2], 4),
            0.75,
        ));
        // Input, weight, bias, lora_A, lora_B.
        assert_eq!(l.named_parameters().len(), 4);
        gradcheck_module(&l, &Tensor::randn_f64([2, 3, 4], 5).requires_grad()).unwrap();
        // Non-contiguous input.
        let xt = Tensor::randn_f64([4, 3], 6).t().detach().requires_grad();
        assert!(!xt.is_contiguous());
        gradcheck_module(&l, &xt).unwrap();
    }
}
