//! The define-by-run autograd engine.
//!
//! An op whose input tracks gradients (and grad mode is on) records a [`Node`]: its backward
//! rule (a [`GradFn`]) and its inputs. `backward()` sorts the graph reachable from the loss in
//! reverse topological order without recursion, runs each rule once with the summed gradient of
//! its output, drops that gradient as soon as it has been used, and **accumulates into the
//! `grad` slot of each leaf** (so several backward calls add up, for gradient accumulation;
//! `zero_grad` clears). Backward rules run with grad mode off: no higher-order gradients.
//!
//! Users extend the graph with their own ops through [`CustomOp`] and [`Tensor::apply_op`].

use crate::tensor::{Tensor, TensorId};
use smallvec::SmallVec;
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The backward rule of a recorded op.
pub trait GradFn: Send + Sync {
    /// Name of the op, for error messages and `grad_fn_name`.
    fn name(&self) -> &'static str;

    /// Gradients with respect to each input, given the gradient of the output. `inputs` and
    /// `output` are the op's forward values. Return `None` for inputs that get no gradient
    /// (integer indices, masks); each `Some` must have the shape and dtype of its input.
    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad_output: &Tensor,
    ) -> Vec<Option<Tensor>>;

    /// Whether `backward` reads the values of input `index` (default: yes). When it reads only
    /// that input's shape and dtype, the node keeps a value-free handle in its place, so the
    /// input's buffer is freed as soon as nothing else needs it (PyTorch saves only the
    /// tensors a backward formula uses, for the same reason).
    fn reads_input(&self, _index: usize) -> bool {
        true
    }

    /// Whether `backward` reads the values of `output` (default: yes). Only outputs that their
    /// own rule does not read can be held value-free by the nodes that consume them.
    fn reads_output(&self) -> bool {
        true
    }
}

impl<G: GradFn + ?Sized> GradFn for Box<G> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad_output: &Tensor,
    ) -> Vec<Option<Tensor>> {
        (**self).backward(inputs, output, grad_output)
    }
    fn reads_input(&self, index: usize) -> bool {
        (**self).reads_input(index)
    }
    fn reads_output(&self) -> bool {
        (**self).reads_output()
    }
}

/// A node of the graph: the inputs of the op that recorded it and its backward rule, in one
/// allocation (the rule is stored inline, unsized behind the `Arc`).
pub struct Node<G: ?Sized = dyn GradFn> {
    inputs: SmallVec<[Tensor; 2]>,
    grad_fn: G,
}

impl Node {
    pub(crate) fn new_shared<G: GradFn + 'static>(grad_fn: G, inputs: &[&Tensor]) -> Arc<Node> {
        let inputs = inputs
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                // An input nobody's backward reads (neither this rule nor the rule that made
                // it) is kept as a graph edge without its values.
                let value_free = !grad_fn.reads_input(i)
                    && t.0.node.as_ref().is_some_and(|n| !n.grad_fn.reads_output());
                if value_free {
                    t.value_free_handle()
                } else {
                    t.clone()
                }
            })
            .collect();
        Arc::new(Node { inputs, grad_fn })
    }

    /// Name of the op that recorded this node.
    pub fn name(&self) -> &'static str {
        self.grad_fn.name()
    }
}

/// Drops a graph without recursion: a chain of a million ops would otherwise overflow the stack
/// through nested `Drop` calls.
pub(crate) fn drop_node_iteratively(node: Arc<Node>) {
    // The stack only allocates when a dropped node owns the last handle to another node.
    let mut stack = Vec::new();
    let mut next = Some(node);
    while let Some(mut node) = next.take().or_else(|| stack.pop()) {
        // Only the last handle empties the node; the Arc then drops shallowly.
        if let Some(node) = Arc::get_mut(&mut node) {
            for input in node.inputs.drain(..) {
                if let Some(mut inner) = Arc::into_inner(input.0) {
                    if let Some(child) = inner.node.take() {
                        stack.push(child);
                    }
                }
            }
        }
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// True when ops on this thread record graph nodes.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Restores the previous grad mode when dropped.
#[must_use = "grad mode is restored when the guard is dropped"]
pub struct GradModeGuard {
    previous: bool,
}

impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

fn set_grad_mode(on: bool) -> GradModeGuard {
    GradModeGuard {
        previous: GRAD_ENABLED.with(|g| g.replace(on)),
    }
}

/// Turns graph recording off on this thread until the guard is dropped (inference, updates).
pub fn no_grad() -> GradModeGuard {
    set_grad_mode(false)
}

/// Turns graph recording back on until the guard is dropped.
pub fn enable_grad() -> GradModeGuard {
    set_grad_mode(true)
}

/// Runs `f` with graph recording off.
pub fn with_no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = no_grad();
    f()
}

impl Tensor {
    /// Back-propagates from this one-element tensor (a loss), accumulating `d self / d leaf` into
    /// the `grad` of every leaf that requires grad.
    pub fn backward(&self) {
        assert_eq!(
            self.elem_count(),
            1,
            "backward: called on a tensor of shape {} (use backward_with_grad for non-scalars)",
            self.shape()
        );
        self.backward_with_grad(&self.ones_like());
    }

    /// Back-propagates `grad` (the gradient of some scalar with respect to this tensor).
    pub fn backward_with_grad(&self, grad: &Tensor) {
        assert!(
            self.tracks_grad(),
            "backward: tensor of shape {} does not require grad (no input of its graph requires grad, or it was computed under no_grad)",
            self.shape()
        );
        assert_eq!(
            grad.shape(),
            self.shape(),
            "backward: gradient shape {} differs from tensor shape {}",
            grad.shape(),
            self.shape()
        );
        let _guard = no_grad();
        let grad = grad.to_dtype(self.dtype());
        if self.is_leaf() {
            accumulate_leaf(self, grad);
            return;
        }

        let order = reverse_topological_order(self);
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        let mut leaf_grads: HashMap<TensorId, (Tensor, Tensor)> = HashMap::new();
        grads.insert(self.id(), grad);
        for tensor in order {
            // Used exactly once: remove so it is freed as soon as its rule has run.
            let Some(grad_out) = grads.remove(&tensor.id()) else {
                continue;
            };
            let node = tensor.0.node.as_ref().expect("non-leaf in graph order");
            let input_grads = node.grad_fn.backward(&node.inputs, &tensor, &grad_out);
            drop(grad_out);
            assert_eq!(
                input_grads.len(),
                node.inputs.len(),
                "backward of `{}` returned {} gradients for {} inputs",
                node.name(),
                input_grads.len(),
                node.inputs.len()
            );
            for (input, g) in node.inputs.iter().zip(input_grads) {
                let Some(g) = g else { continue };
                if !input.tracks_grad() {
                    continue;
                }
                assert_eq!(
                    g.shape(),
                    input.shape(),
                    "backward of `{}` returned a gradient of shape {} for an input of shape {}",
                    node.name(),
                    g.shape(),
                    input.shape()
                );
                if input.is_leaf() {
                    match leaf_grads.get_mut(&input.id()) {
                        Some((_, acc)) => *acc = acc.add(&g),
                        None => {
                            leaf_grads.insert(input.id(), (input.clone(), g));
                        }
                    }
                } else {
                    match grads.get_mut(&input.id()) {
                        Some(acc) => *acc = acc.add(&g),
                        None => {
                            grads.insert(input.id(), g);
                        }
                    }
                }
            }
        }
        for (_, (leaf, g)) in leaf_grads {
            accumulate_leaf(&leaf, g);
        }
    }
}

fn accumulate_leaf(leaf: &Tensor, g: Tensor) {
    let g = g.to_dtype(leaf.dtype());
    let mut slot = leaf.0.grad.lock().unwrap();
    *slot = Some(match slot.take() {
        Some(prev) => prev.add(&g),
        None => g.contiguous(),
    });
}

/// Non-leaf tensors reachable from `root`, each after every tensor that consumes it.
fn reverse_topological_order(root: &Tensor) -> Vec<Tensor> {
    let mut post_order = Vec::new();
    let mut visited = HashSet::new();
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            post_order.push(t);
            continue;
        }
        if !visited.insert(t.id()) {
            continue;
        }
        let node = t.0.node.clone().expect("only non-leaf tensors are pushed");
        stack.push((t, true));
        for input in &node.inputs {
            if input.0.node.is_some() && !visited.contains(&input.id()) {
                stack.push((input.clone(), false));
            }
        }
    }
    post_order.reverse();
    post_order
}

/// Backward of a value-preserving copy (`contiguous`): passes the gradient through.
pub(crate) struct Identity;

impl GradFn for Identity {
    fn name(&self) -> &'static str {
        "contiguous"
    }
    fn reads_input(&self, _index: usize) -> bool {
        false
    }
    fn reads_output(&self) -> bool {
        false
    }
    fn backward(
        &self,
        _inputs: &[Tensor],
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> Vec<Option<Tensor>> {
        vec![Some(grad_output.clone())]
    }
}

/// Backward of a float dtype conversion: converts the gradient back.
pub(crate) struct Cast {
    pub(crate) to: crate::DType,
}

impl GradFn for Cast {
    fn name(&self) -> &'static str {
        "to_dtype"
    }
    fn reads_input(&self, _index: usize) -> bool {
        false
    }
    fn reads_output(&self) -> bool {
        false
    }
    fn backward(
        &self,
        _inputs: &[Tensor],
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> Vec<Option<Tensor>> {
        vec![Some(grad_output.to_dtype(self.to))]
    }
}

/// A user-defined differentiable op: the plugin point of the autograd engine.
///
/// `forward` computes the result from the inputs (with any tensor ops; it runs with grad mode
/// off), and `backward` returns the gradient for each input given the gradient of the output.
/// [`Tensor::apply_op`] runs it and records it in the graph exactly like a built-in op.
pub trait CustomOp: Send + Sync + 'static {
    /// Name shown in errors and `grad_fn_name`.
    fn name(&self) -> &'static str;
    /// The op's value.
    fn forward(&self, inputs: &[Tensor]) -> Tensor;
    /// Gradients for each input (`None` for inputs without one).
    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad_output: &Tensor,
    ) -> Vec<Option<Tensor>>;
}

struct CustomGradFn<O: CustomOp>(Arc<O>);

impl<O: CustomOp> GradFn for CustomGradFn<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad_output: &Tensor,
    ) -> Vec<Option<Tensor>> {
        self.0.backward(inputs, output, grad_output)
    }
}

impl Tensor {
    /// Applies a user-defined op to `inputs`, recording it in the graph when an input tracks
    /// gradients.
    pub fn apply_op<O: CustomOp>(op: O, inputs: &[&Tensor]) -> Tensor {
        let values: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
        let out = with_no_grad(|| op.forward(&values));
        let layout = out.layout().clone();
        let op = Arc::new(op);
        Tensor::from_op_parts(out.0.storage.clone(), layout, inputs, move || {
            Box::new(CustomGradFn(op))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, randn_f64};

    #[test]
    fn records_only_when_an_input_requires_grad_and_grad_mode_is_on() {
        let a = Tensor::ones([2]);
        let w = Tensor::ones([2]).requires_grad();
        assert!(a.add(&a).is_leaf());
        assert_eq!(a.add(&w).grad_fn_name(), Some("add"));
        {
            let _g = no_grad();
            assert!(a.add(&w).is_leaf());
            let _inner = enable_grad();
            assert!(!a.add(&w).is_leaf());
        }
        assert!(is_grad_enabled());
        assert!(w.detach().mul(&a).is_leaf());
    }

    #[test]
    fn shared_subexpressions_sum_their_gradients() {
        let x = Tensor::from_slice(&[1.5f64, -2.0], [2]).requires_grad();
        let y = x.mul(&x).add(&x); // dy/dx = 2x + 1
        y.sum_all().backward();
        assert_eq!(x.grad().unwrap().to_vec::<f64>(), vec![4.0, -3.0]);
    }

    #[test]
    fn gradients_accumulate_across_backward_calls_until_zeroed() {
        let x = Tensor::from_slice(&[2f32], [1]).requires_grad();
        x.mul_scalar(3.0).sum_all().backward();
        x.mul_scalar(3.0).sum_all().backward();
        assert_eq!(x.grad().unwrap().to_vec::<f32>(), vec![6.0]);
        x.zero_grad();
        assert!(x.grad().is_none());
        // Frozen leaves get nothing.
        let frozen = Tensor::ones([1]).requires_grad();
        frozen.set_requires_grad(false);
        x.mul(&frozen).sum_all().backward();
        assert!(frozen.grad().is_none());
        assert_eq!(x.grad().unwrap().to_vec::<f32>(), vec![1.0]);
    }

    #[test]
    fn a_chain_of_a_million_ops_neither_overflows_backward_nor_drop() {
        // Run on a thread with a small stack: recursion anywhere would overflow it.
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let x = Tensor::from_slice(&[1f64], [1]).requires_grad();
                let mut y = x.clone();
                for _ in 0..1_000_000 {
                    y = y.mul_scalar(1.000_001);
                }
                y.backward_with_grad(&Tensor::from_slice(&[1f64], [1]));
                let g = x.grad().unwrap().item();
                let want = 1.000_001f64.powi(1_000_000);
                assert!((g - want).abs() < 1e-9 * want, "{g} vs {want}");
                drop(y);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    #[should_panic(expected = "backward: tensor of shape [1] does not require grad")]
    fn backward_without_grad_panics() {
        Tensor::ones([1]).backward();
    }

    #[test]
    fn inputs_that_no_rule_reads_are_kept_without_their_values() {
        let x = randn_f64(&[4, 3], 1).requires_grad();
        let w = randn_f64(&[3, 5], 2).requires_grad();
        let b = randn_f64(&[5], 3).requires_grad();
        // matmul does not read its output and add does not read its operands: once the caller
        // drops the product, nothing holds its buffer.
        let y = x.matmul(&w);
        let product = Arc::downgrade(&y.0.storage);
        let z = y.add(&b);
        drop(y);
        assert!(
            product.upgrade().is_none(),
            "the graph kept the product's values"
        );
        // softmax reads its output: the values stay while the graph lives.
        let p = z.softmax(-1);
        let probs = Arc::downgrade(&p.0.storage);
        let q = p.dropout(0.5, true, &mut crate::Rng::new(1));
        drop(p);
        assert!(
            probs.upgrade().is_some(),
            "softmax's backward needs its output"
        );
        // mul reads its operands: the square keeps `z` while `add` holds only its shape.
        let z_values = Arc::downgrade(&z.0.storage);
        let r = q.mul(&z);
        drop(z);
        assert!(
            z_values.upgrade().is_some(),
            "mul's backward needs its operands"
        );
        r.sum_all().backward();
        assert!(x.grad().is_some() && w.grad().is_some() && b.grad().is_some());
    }

    #[test]
    fn gradients_through_value_free_edges_are_exact() {
        let inputs = [
            randn_f64(&[4, 3], 4).requires_grad(),
            randn_f64(&[3, 6], 5).requires_grad(),
            randn_f64(&[6], 6).requires_grad(),
        ];
        gradcheck(
            |t| {
                // Each intermediate feeds a rule that reads only its shape, and some feed a
                // second rule that reads their values.
                let y = t[0].matmul(&t[1]);
                let z = y.add(&t[2]).sub(&t[2].mul_scalar(0.5));
                let v = z.reshape([4, 2, 3]).permute(&[1, 0, 2]).contiguous();
                let s = v.softmax(-1).add_scalar(1.0).narrow(2, 0, 2);
                s.mul(&v.narrow(2, 1, 2))
                    .add(&y.reshape([2, 4, 3]).narrow(2, 0, 2))
            },
            &inputs,
        )
        .unwrap();
    }

    /// A user-defined op: `x³` with its own backward.
    struct Cube;

    impl CustomOp for Cube {
        fn name(&self) -> &'static str {
            "cube"
        }
        fn forward(&self, inputs: &[Tensor]) -> Tensor {
            inputs[0].mul(&inputs[0]).mul(&inputs[0])
        }
        fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
            let x = &inputs[0];
            vec![Some(g.mul(&x.mul(x)).mul_scalar(3.0))]
        }
    }

    #[test]
    fn custom_ops_join_the_graph_like_built_ins() {
        let x = Tensor::from_slice(&[2f64, -1.0], [2]).requires_grad();
        let y = Tensor::apply_op(Cube, &[&x]);
        assert_eq!(y.grad_fn_name(), Some("cube"));
        assert_eq!(y.to_vec::<f64>(), vec![8.0, -1.0]);
        y.add_scalar(1.0).sum_all().backward();
        assert_eq!(x.grad().unwrap().to_vec::<f64>(), vec![12.0, 3.0]);
        let x = randn_f64(&[3, 2], 9).requires_grad();
        gradcheck(|x| Tensor::apply_op(Cube, &[&x[0].t()]), &[x]).unwrap();
        // Without an input that requires grad, nothing is recorded.
        assert!(Tensor::apply_op(Cube, &[&Tensor::ones([2])]).is_leaf());
    }
}
