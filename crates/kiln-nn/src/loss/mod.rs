//! Loss functions with PyTorch's semantics (`torch.nn.functional`): each is a function and a
//! small config struct with a `forward(&input, &target)` method, like PyTorch's loss modules.
//!
//! - Class losses ([`cross_entropy`], [`nll_loss`]): input `[C]`, `[N, C]` or
//!   `[N, C, d1, ...]` (classes along dim 1), class-index targets (i64 or u32) with
//!   `ignore_index` and per-class weights; cross-entropy also takes class-probability targets
//!   and label smoothing. Cross-entropy on class indices is one fused kernel: log-softmax and
//!   NLL in one pass forward, `softmax − one-hot` in one pass backward.
//! - Elementwise losses ([`mse_loss`], [`l1_loss`], [`huber_loss`], [`smooth_l1_loss`],
//!   [`binary_cross_entropy`], [`binary_cross_entropy_with_logits`], [`kl_div`]): target of
//!   the input's shape and dtype; one fused kernel each way, differentiable in the input and the
//!   target.
//!
//! Class weights, BCE weights and `pos_weight` are constants: they get no gradient. Bad inputs
//! (target shape or dtype, class index out of range, weight shape) panic with the loss's name
//! and the shapes involved.
#![deny(missing_docs)]

mod class;
mod pointwise;
#[cfg(test)]
mod tests;

pub use class::{cross_entropy, nll_loss, CrossEntropyLoss, NllLoss};
pub use pointwise::{
    binary_cross_entropy, binary_cross_entropy_with_logits, huber_loss, kl_div, l1_loss, mse_loss,
    smooth_l1_loss, BceLoss, BceWithLogitsLoss, HuberLoss, KlDivLoss, L1Loss, MseLoss,
    SmoothL1Loss,
};

use kiln_core::parallel::{for_chunk_pairs, for_chunks, num_threads, PARALLEL_THRESHOLD};
use kiln_core::{Float, Tensor};
use std::ops::Range;

/// How a loss combines its per-element (or per-sample) values, as PyTorch's `reduction`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// The mean (for class losses with weights or `ignore_index`: the weighted mean over the
    /// samples that count). A rank-0 tensor.
    #[default]
    Mean,
    /// The sum. A rank-0 tensor.
    Sum,
    /// No reduction: one value per element (per sample for class losses).
    None,
}

/// The reductions of [`kl_div`]: [`Reduction`]'s and `BatchMean` (the sum divided by the size
/// of dim 0, the mathematically correct KL divergence per sample).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KlReduction {
    /// Mean over every element (PyTorch's default, though not the KL divergence per sample).
    #[default]
    Mean,
    /// Sum over every element.
    Sum,
    /// No reduction.
    None,
    /// Sum divided by the batch size (dim 0; 1 for a rank-0 input).
    BatchMean,
}

impl From<Reduction> for KlReduction {
    fn from(r: Reduction) -> Self {
        match r {
            Reduction::Mean => KlReduction::Mean,
            Reduction::Sum => KlReduction::Sum,
            Reduction::None => KlReduction::None,
        }
    }
}

/// A loss as an object: what the config structs ([`CrossEntropyLoss`], [`MseLoss`], ...)
/// share, for code generic over the loss.
pub trait Loss {
    /// The loss of `input` against `target`.
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor;
}

// ---------------------------------------------------------------------- shared helpers

/// Float types with a slice exponential (the vectorised `vmath::exp` for f32).
pub(crate) trait LossFloat: Float {
    /// `dst[i] = exp(src[i])`.
    fn exp_slice(src: &[Self], dst: &mut [Self]);
}

impl LossFloat for f32 {
    fn exp_slice(src: &[f32], dst: &mut [f32]) {
        kiln_core::vmath::exp(src, dst)
    }
}

impl LossFloat for f64 {
    fn exp_slice(src: &[f64], dst: &mut [f64]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x.exp();
        }
    }
}

/// Number of tasks to split `n` items costing `cost` elements each into.
fn task_count(n: usize, cost: usize) -> usize {
    let threads = num_threads();
    if threads <= 1 || n < 2 || n.saturating_mul(cost.max(1)) < PARALLEL_THRESHOLD {
        1
    } else {
        threads.min(n)
    }
}

/// `Σ f(range)` over a split of `0..n` into ranges, on several threads when `n · cost` is
/// large. The split depends only on `n` and the thread count, so results are reproducible.
pub(crate) fn par_sum(n: usize, cost: usize, f: impl Fn(Range<usize>) -> f64 + Sync) -> f64 {
    let tasks = task_count(n, cost);
    if tasks == 1 {
        return f(0..n);
    }
    let per = n.div_ceil(tasks);
    let mut sums = vec![0.0; n.div_ceil(per)];
    for_chunks(&mut sums, 1, true, |i, s| {
        s[0] = f(i * per..((i + 1) * per).min(n))
    });
    // Added in part order: the result does not depend on which thread ran what.
    sums.iter().sum()
}

/// Runs `f(start, a_chunk, b_chunk)` over matching chunks of `a` and `b` (equal lengths, one
/// entry per item of cost `cost`), on several threads when the work is large.
pub(crate) fn par_chunks2<A: Send, B: Send>(
    a: &mut [A],
    b: &mut [B],
    cost: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let n = a.len();
    debug_assert_eq!(n, b.len());
    let tasks = task_count(n, cost);
    if tasks == 1 {
        return f(0, a, b);
    }
    let per = n.div_ceil(tasks);
    for_chunk_pairs(a, per, b, per, true, |i, ca, cb| f(i * per, ca, cb));
}

/// Runs `f(first_block, chunk)` over chunks of `out` made of whole blocks of `block`
/// elements, on several threads when `out` is large.
pub(crate) fn par_blocks<T: Send>(out: &mut [T], block: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if block == 0 || out.is_empty() {
        return;
    }
    let blocks = out.len() / block;
    let tasks = task_count(blocks, block);
    let per = blocks.div_ceil(tasks);
    if tasks == 1 {
        return f(0, out);
    }
    for_chunks(out, per * block, true, |i, chunk| f(i * per, chunk));
}

/// The elements of a contiguous tensor of dtype `T`.
pub(crate) fn contiguous_slice<'a, T: kiln_core::Element>(
    guard: &'a kiln_core::Storage,
    t: &Tensor,
    op: &str,
) -> &'a [T] {
    let all = T::slice(guard)
        .unwrap_or_else(|| panic!("{op}: expected dtype {}, got {}", T::DTYPE, guard.dtype()));
    &all[t
        .layout()
        .contiguous_range()
        .expect("contiguous tensor expected")]
}
