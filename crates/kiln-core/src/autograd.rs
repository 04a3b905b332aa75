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
}

/// A node of the graph: a backward rule and the inputs of the op that recorded it.
pub struct Node {
    grad_fn: Box<dyn GradFn>,
    inputs: Vec<Tensor>,
}

impl Node {
    pub(crate) fn new(grad_fn: Box<dyn GradFn>, inputs: Vec<Tensor>) -> Self {
        Node { grad_fn, inputs }
    }

    /// Name of the op that recorded this node.
    pub fn name(&self) -> &'static str {
        self.grad_fn.name()
    }
}

/// Drops a graph without recursion: a chain of a million ops would otherwise overflow the stack
/// through nested `Drop` calls.
pub(crate) fn drop_node_iteratively(node: Arc<Node>) {
    let mut stack = vec![node];
    while let Some(node) = stack.pop() {
        if let Some(mut node) = Arc::into_inner(node) {
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
