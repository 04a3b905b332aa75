//! Fused scaled dot-product attention for training and prompts: `softmax(q kᵀ / √E + mask) v`
//! with optional dropout on the weights, one (batch, head) matrix and a block of query rows at
//! a time. The scores of a block are made, scaled, masked, normalised, dropped out and
//! multiplied by `v` while they are in cache, instead of going through memory once per op; the
//! operands are read in place through their strides (a head-split view needs no copy), and the
//! output and gradients are laid out like their inputs, so the view back to `[B, L, H·D]` is
//! free.
//!
//! Backward keeps only the softmax weights (before dropout) and the dropout bits. With `P` the
//! weights, `Pd` the dropped-out weights, `G` the output gradient and `A = G vᵀ`:
//! `dv = Pdᵀ G`, `dS = scale · (Pd ⊙ A − P ⊙ rowsum(Pd ⊙ A))` (the softmax rule, through the
//! mask), `dq = dS k`, `dk = dSᵀ q`.
//!
//! The dropout mask is the one [`Tensor::dropout`] draws for the weights tensor from the same
//! [`Rng`], so the fused and the composed paths drop the same weights.

use crate::alloc::Buffer;
use crate::autograd::{is_grad_enabled, GradFn};
use crate::dispatch_float;
use crate::dtype::{Element, Float};
use crate::layout::Layout;
use crate::ops::dropout::{apply_mask, keep_mask};
use crate::ops::matmul::{batch_offset, gemm_raw};
use crate::ops::reduce_extrema::extreme_slice;
use crate::ops::softmax::{dot, exp_shifted, ExpSlice};
use crate::parallel::{self, PARALLEL_THRESHOLD};
use crate::shape::{DimVec, Shape};
use crate::tensor::Tensor;
use crate::vmath::{run_wide, WideKernel};
use crate::Rng;
use gemm::Parallelism;

const OP: &str = "scaled_dot_product_attention";

/// Score elements per block of query rows (a block's scores, weights and dropped-out weights
/// stay in the L2 cache).
const BLOCK_ELEMS: usize = 1 << 16;
/// Fewest query rows per block: each block's products pack the keys again, so short blocks
/// would pay that more often on long key sequences.
const MIN_BLOCK_ROWS: usize = 64;

/// Shapes, scale and masking of one call.
struct Plan {
    /// Matrices (product of the batch dims).
    count: usize,
    /// Query rows, key rows, query/key width, value width.
    l: usize,
    s: usize,
    e: usize,
    ev: usize,
    /// Query rows per block.
    block: usize,
    scale: f64,
    causal: bool,
}

impl Plan {
    fn blocks(&self) -> usize {
        self.l.div_ceil(self.block)
    }

    /// Query rows `i0..i1` of block `b`, and how many keys any of them sees.
    fn rows(&self, b: usize) -> (usize, usize, usize) {
        let i0 = b * self.block;
        let i1 = (i0 + self.block).min(self.l);
        let cols = if self.causal { i1.min(self.s) } else { self.s };
        (i0, i1, cols)
    }

    /// Keys that query row `i` sees.
    fn valid(&self, i: usize) -> usize {
        if self.causal {
            (i + 1).min(self.s)
        } else {
            self.s
        }
    }
}

/// A matrix operand: storage offset of each batch matrix, row and column strides.
struct Operand {
    offsets: Vec<usize>,
    rs: usize,
    cs: usize,
}

impl Operand {
    fn new(layout: &Layout, count: usize) -> Self {
        let r = layout.dims().len();
        let (dims, strides) = (&layout.dims()[..r - 2], &layout.strides()[..r - 2]);
        let offsets = (0..count)
            .map(|t| batch_offset(t, dims, strides, layout.offset()))
            .collect();
        Operand {
            offsets,
            rs: layout.strides()[r - 2],
            cs: layout.strides()[r - 1],
        }
    }
}

/// A dense layout of `dims` ordered in memory as `like`'s dims are (by decreasing stride), so
/// that a permuted view's result permutes back to a contiguous tensor; contiguous when `like`'s
/// last dim is not its innermost.
fn dense_like(like: &Layout, dims: &[usize]) -> Layout {
    let r = dims.len();
    let key = |d: usize| {
        if like.dims()[d] == 1 {
            usize::MAX
        } else {
            like.strides()[d]
        }
    };
    let mut order: Vec<usize> = (0..r).collect();
    order.sort_by_key(|&d| std::cmp::Reverse(key(d)));
    if order[r - 1] != r - 1 {
        return Layout::contiguous(Shape::from(dims.to_vec()));
    }
    let mut strides = DimVec::from_elem(0, r);
    let mut size = 1;
    for &d in order.iter().rev() {
        strides[d] = size;
        size *= dims[d];
    }
    Layout::new(Shape::from(dims.to_vec()), strides, 0)
}

/// A raw pointer shared by the tasks of one call, which write disjoint parts through it.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: the tasks holding it address disjoint elements (see each use).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Runs `run(task, scratch)` for every task, in parallel when `work` is large; each
/// group of tasks reuses one zeroed scratch of `scratch_len` elements.
fn for_each_task<T: Float>(
    tasks: usize,
    work: usize,
    scratch_len: usize,
    run: impl Fn(usize, &mut [T]) + Sync,
) {
    if tasks <= 1 || work < PARALLEL_THRESHOLD || parallel::num_threads() == 1 {
        let mut scratch = vec![T::zero(); scratch_len];
        for t in 0..tasks {
            run(t, &mut scratch);
        }
        return;
    }
    // A few groups of tasks per thread, each with its own scratch.
    let per = tasks.div_ceil(parallel::num_threads() * 8);
    parallel::run_parts(tasks.div_ceil(per), &|g| {
        let mut scratch = vec![T::zero(); scratch_len];
        for t in g * per..((g + 1) * per).min(tasks) {
            run(t, &mut scratch);
        }
    });
}

/// Element type of the fused kernel.
trait AttnFloat: Float + ExpSlice {}
impl<T: Float + ExpSlice> AttnFloat for T {}

/// `out[k] = p[k] · scale` where the dropout bit of global element `base + k` keeps it, else
/// `p[k] · 0` (as [`Tensor::dropout`]).
fn drop_out<T: Float>(p: &[T], bits: &[u64], base: usize, scale: T, out: &mut [T]) {
    if base.is_multiple_of(64) {
        return apply_mask(p, &bits[base / 64..], scale, out);
    }
    for (k, (o, &x)) in out.iter_mut().zip(p).enumerate() {
        let i = base + k;
        let keep = (bits[i / 64] >> (i % 64)) & 1 != 0;
        *o = x * if keep { scale } else { T::zero() };
    }
}

/// The weights `p` after dropout (written to `buf`), or `p` itself without dropout.
fn dropped<'a, T: Float>(
    p: &'a [T],
    keep: Option<(&[u64], T)>,
    base: usize,
    buf: &'a mut [T],
) -> &'a [T] {
    match keep {
        Some((bits, scale)) => {
            let pd = &mut buf[..p.len()];
            drop_out(p, bits, base, scale, pd);
            pd
        }
        None => p,
    }
}

/// The mask as the kernel reads it: row offsets of each batch matrix, row and column strides.
struct MaskRows<'a, T> {
    data: &'a [T],
    at: Operand,
}

/// Softmax of one block's score rows (compiled wide by [`run_wide`]): scales (and masks) the
/// scores `sc` of query rows `i0..` of matrix `t` and writes their weights to `p`, whose length
/// (`rows × s`) sets the rows.
struct SoftmaxRows<'a, 'b, T> {
    plan: &'a Plan,
    mask: Option<&'a MaskRows<'a, T>>,
    scale: T,
    t: usize,
    i0: usize,
    sc: &'b mut [T],
    p: &'b mut [T],
}

impl<T: AttnFloat> WideKernel for SoftmaxRows<'_, '_, T> {
    #[inline(always)]
    fn run(&mut self) {
        let (plan, s, scale) = (self.plan, self.plan.s, self.scale);
        for r in 0..self.p.len() / s {
            let i = self.i0 + r;
            let valid = plan.valid(i);
            let x = &mut self.sc[r * s..r * s + valid];
            match self.mask {
                Some(m) => {
                    let at = m.at.offsets[self.t] + i * m.at.rs;
                    for (j, x) in x.iter_mut().enumerate() {
                        *x = *x * scale + m.data[at + j * m.at.cs];
                    }
                }
                None => x.iter_mut().for_each(|x| *x *= scale),
            }
            let p_row = &mut self.p[r * s..(r + 1) * s];
            p_row[valid..].fill(T::zero());
            let max = if valid == 0 {
                T::neg_infinity()
            } else {
                extreme_slice::<T, true>(x)
            };
            if max == T::neg_infinity() {
                // No key takes part: zero weights (and so zero output and gradients).
                p_row.fill(T::zero());
                continue;
            }
            let sum = exp_shifted(x, max, &mut p_row[..valid]);
            let inv = T::one() / T::from_f64(sum);
            p_row[..valid].iter_mut().for_each(|w| *w *= inv);
        }
    }
}

/// The softmax's backward over one block's rows (compiled wide by [`run_wide`]): turns `a`
/// (`g·vᵀ` of query rows `i0..`, `rows × s`) into the scores' gradient, given the weights `p`
/// and the weights after dropout `pd`.
struct SoftmaxGradRows<'a, 'b, T> {
    plan: &'a Plan,
    scale: T,
    i0: usize,
    cols: usize,
    a: &'b mut [T],
    pd: &'b [T],
    p: &'b [T],
}

impl<T: AttnFloat> WideKernel for SoftmaxGradRows<'_, '_, T> {
    #[inline(always)]
    fn run(&mut self) {
        let (s, scale) = (self.plan.s, self.scale);
        for r in 0..self.a.len() / s {
            let valid = self.plan.valid(self.i0 + r);
            let at = r * s;
            let (a_row, pd, p) = (
                &mut self.a[at..at + valid],
                &self.pd[at..at + valid],
                &self.p[at..at + valid],
            );
            let d = dot(a_row, pd);
            for ((a, &pd), &p) in a_row.iter_mut().zip(pd).zip(p) {
                *a = scale * (pd * *a - p * d);
            }
            // Keys this row does not see (causal) take no gradient from it.
            self.a[at + valid..at + self.cols].fill(T::zero());
        }
    }
}

/// The forward pass: writes the output through `out` (laid out as its operand says) and, when
/// given, the weights through `probs` (`[count, l, s]`, contiguous).
#[allow(clippy::too_many_arguments)]
fn forward<T: AttnFloat>(
    plan: &Plan,
    (q, qo): (&[T], &Operand),
    (k, ko): (&[T], &Operand),
    (v, vo): (&[T], &Operand),
    mask: Option<&MaskRows<'_, T>>,
    keep: Option<(&[u64], T)>,
    probs: Option<Shared<T>>,
    (out, oo): (Shared<T>, &Operand),
) {
    let (l, s, e, ev) = (plan.l, plan.s, plan.e, plan.ev);
    let span = plan.block * s;
    let scale = T::from_f64(plan.scale);
    let blocks = plan.blocks();
    // Scores, weights (when not kept) and dropped-out weights of one block.
    let scratch_len = span * (1 + usize::from(probs.is_none()) + usize::from(keep.is_some()));
    let work = plan.count * l * s * (e + ev);
    for_each_task::<T>(plan.count * blocks, work, scratch_len, |task, scratch| {
        let (t, b) = (task / blocks, task % blocks);
        let (i0, i1, cols) = plan.rows(b);
        let rows = i1 - i0;
        let (sc, rest) = scratch.split_at_mut(span);
        let base = t * l * s + i0 * s;
        let (p, rest): (&mut [T], &mut [T]) = match probs {
            // SAFETY: block `b` of matrix `t` owns rows `i0..i1` of the weights buffer.
            Some(pr) => (
                unsafe { std::slice::from_raw_parts_mut(pr.get().add(base), rows * s) },
                rest,
            ),
            None => {
                let (p, rest) = rest.split_at_mut(span);
                (&mut p[..rows * s], rest)
            }
        };
        // SAFETY: the operand offsets and strides address matrix `t` inside each storage
        // (checked when the tensors were built); `sc` holds `rows × s` elements.
        unsafe {
            gemm_raw(
                (rows, cols, e),
                (sc.as_mut_ptr(), s),
                false,
                q.as_ptr().add(qo.offsets[t] + i0 * qo.rs),
                (qo.rs, qo.cs),
                k.as_ptr().add(ko.offsets[t]),
                (ko.cs, ko.rs),
                Parallelism::None,
            );
        }
        run_wide(&mut SoftmaxRows {
            plan,
            mask,
            scale,
            t,
            i0,
            sc,
            p,
        });
        let pd = dropped(p, keep, base, rest);
        // SAFETY: as above; block `b` of matrix `t` owns output rows `i0..i1`.
        unsafe {
            gemm_raw(
                (rows, ev, cols),
                (out.get().add(oo.offsets[t] + i0 * oo.rs), oo.rs),
                false,
                pd.as_ptr(),
                (s, 1),
                v.as_ptr().add(vo.offsets[t]),
                (vo.rs, vo.cs),
                Parallelism::None,
            );
        }
    });
}

/// What backward keeps: the weights before dropout and the dropout bits and scale.
struct AttentionBackward<T: Copy> {
    plan: Plan,
    probs: Buffer<T>,
    keep: Option<(Buffer<u64>, f64)>,
}

impl<T: AttnFloat> AttentionBackward<T> {
    /// Gradients for those of `q`, `k`, `v` that track gradients, given the output gradient `g`.
    fn grads(&self, inputs: &[Tensor], g: &Tensor) -> Vec<Option<Tensor>> {
        let plan = &self.plan;
        let (l, s, e, ev) = (plan.l, plan.s, plan.e, plan.ev);
        let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
        let layouts = [
            dense_like(q.layout(), q.dims()),
            dense_like(k.layout(), k.dims()),
            dense_like(v.layout(), v.dims()),
        ];
        // dq is written whole; dk and dv are sums over query blocks.
        let mut bufs: Vec<Option<Buffer<T>>> = (0..3)
            .map(|i| {
                inputs[i].tracks_grad().then(|| {
                    let n = layouts[i].elem_count();
                    if i == 0 {
                        Buffer::uninit(n)
                    } else {
                        Buffer::filled(n, T::zero())
                    }
                })
            })
            .collect();
        let opers: Vec<Operand> = layouts
            .iter()
            .map(|lay| Operand::new(lay, plan.count))
            .collect();
        let ptrs: Vec<Option<Shared<T>>> = bufs
            .iter_mut()
            .map(|b| b.as_mut().map(|b| Shared(b.as_mut_ptr())))
            .collect();
        let guards = Guards::new(&[q, k, v, g]);
        let [sq, sk, sv, sg] = [0, 1, 2, 3].map(|i| guards.slice::<T>(i));
        let (qo, ko, vo, go) = (
            Operand::new(q.layout(), plan.count),
            Operand::new(k.layout(), plan.count),
            Operand::new(v.layout(), plan.count),
            Operand::new(g.layout(), plan.count),
        );
        let scale = T::from_f64(plan.scale);
        let keep = self
            .keep
            .as_ref()
            .map(|(bits, c)| (&bits[..], T::from_f64(*c)));
        let span = plan.block * s;
        let scratch_len = span * (1 + usize::from(keep.is_some()));
        let work = plan.count * l * s * (2 * e + 2 * ev);
        for_each_task::<T>(plan.count, work, scratch_len, |t, scratch| {
            let (a, pd_buf) = scratch.split_at_mut(span);
            for b in 0..plan.blocks() {
                let (i0, i1, cols) = plan.rows(b);
                let rows = i1 - i0;
                let base = t * l * s + i0 * s;
                let p = &self.probs[base..base + rows * s];
                let g_rows = sg[go.offsets[t] + i0 * go.rs..].as_ptr();
                // SAFETY (every product below): operand offsets and strides address matrix
                // `t` inside its storage; the gradient buffers are dense in `layouts`, and
                // matrix `t` of each is written by this task only.
                unsafe {
                    gemm_raw(
                        (rows, cols, ev),
                        (a.as_mut_ptr(), s),
                        false,
                        g_rows,
                        (go.rs, go.cs),
                        sv.as_ptr().add(vo.offsets[t]),
                        (vo.cs, vo.rs),
                        Parallelism::None,
                    );
                }
                let pd = dropped(p, keep, base, pd_buf);
                if let Some(dv) = ptrs[2] {
                    let dvo = &opers[2];
                    unsafe {
                        gemm_raw(
                            (cols, ev, rows),
                            (dv.get().add(dvo.offsets[t]), dvo.rs),
                            true,
                            pd.as_ptr(),
                            (1, s),
                            g_rows,
                            (go.rs, go.cs),
                            Parallelism::None,
                        );
                    }
                }
                if ptrs[0].is_none() && ptrs[1].is_none() {
                    continue;
                }
                run_wide(&mut SoftmaxGradRows {
                    plan,
                    scale,
                    i0,
                    cols,
                    a: &mut a[..rows * s],
                    pd,
                    p,
                });
                if let Some(dq) = ptrs[0] {
                    let dqo = &opers[0];
                    unsafe {
                        gemm_raw(
                            (rows, e, cols),
                            (dq.get().add(dqo.offsets[t] + i0 * dqo.rs), dqo.rs),
                            false,
                            a.as_ptr(),
                            (s, 1),
                            sk.as_ptr().add(ko.offsets[t]),
                            (ko.rs, ko.cs),
                            Parallelism::None,
                        );
                    }
                }
                if let Some(dk) = ptrs[1] {
                    let dko = &opers[1];
                    unsafe {
                        gemm_raw(
                            (cols, e, rows),
                            (dk.get().add(dko.offsets[t]), dko.rs),
                            true,
                            a.as_ptr(),
                            (1, s),
                            sq.as_ptr().add(qo.offsets[t] + i0 * qo.rs),
                            (qo.rs, qo.cs),
                            Parallelism::None,
                        );
                    }
                }
            }
        });
        drop(guards);
        bufs.into_iter()
            .zip(layouts)
            .map(|(b, lay)| b.map(|b| Tensor::from_storage(<T as Element>::into_storage(b), lay)))
            .collect()
    }
}

/// Read guards on the storages of several tensors, one per distinct storage.
struct Guards<'a> {
    guards: Vec<std::sync::RwLockReadGuard<'a, crate::Storage>>,
    /// Which guard each tensor reads.
    which: Vec<usize>,
}

impl<'a> Guards<'a> {
    fn new(tensors: &[&'a Tensor]) -> Self {
        let mut guards = Vec::new();
        let mut firsts: Vec<&Tensor> = Vec::new();
        let which = tensors
            .iter()
            .map(|t| match firsts.iter().position(|f| f.same_storage(t)) {
                Some(i) => i,
                None => {
                    firsts.push(t);
                    guards.push(t.storage());
                    guards.len() - 1
                }
            })
            .collect();
        Guards { guards, which }
    }

    fn slice<T: Element>(&self, i: usize) -> &[T] {
        crate::typed_slice!(self.guards[self.which[i]], T, OP)
    }
}

impl<T: AttnFloat> GradFn for AttentionBackward<T> {
    fn name(&self) -> &'static str {
        OP
    }

    fn reads_output(&self) -> bool {
        false
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        self.grads(inputs, g)
    }
}

/// Whether the fused kernel takes these inputs: equal batch dims, one float dtype, nonempty
/// matrices, and a float mask that does not track gradients and broadcasts to the scores.
fn fits(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> bool {
    let r = q.rank();
    let float = q.dtype().is_float() && q.dtype() == k.dtype() && k.dtype() == v.dtype();
    let shapes = r >= 2
        && k.rank() == r
        && v.rank() == r
        && q.dims()[..r - 2] == k.dims()[..r - 2]
        && q.dims()[..r - 2] == v.dims()[..r - 2]
        && q.dim(-1) == k.dim(-1)
        && k.dim(-2) == v.dim(-2)
        && [q.dim(-2), q.dim(-1), k.dim(-2), v.dim(-1)]
            .iter()
            .all(|&d| d > 0);
    let mask_ok = mask.is_none_or(|m| {
        let mut scores = q.dims()[..r - 1].to_vec();
        scores.push(k.dim(-2));
        m.dtype() == q.dtype()
            && !m.tracks_grad()
            && m.rank() <= r
            && m.dims()
                .iter()
                .rev()
                .zip(scores.iter().rev())
                .all(|(&f, &t)| f == t || f == 1)
    });
    float && shapes && mask_ok
}

/// `softmax(q kᵀ / √E + mask) v` on `q [.., L, E]`, `k [.., S, E]`, `v [.., S, Ev]` as one
/// fused op, or `None` when the inputs need the general path (batch dims that differ or
/// broadcast, an empty matrix, mixed dtypes, or a mask that is not a float tensor of the
/// inputs' dtype broadcasting to `[.., L, S]`, or that tracks gradients).
///
/// `mask` is added to the scaled scores; `is_causal` leaves out keys after the query position
/// (`j > i`). A row with no key left (every score `-inf`) gets zero weights. `dropout`, when
/// given, drops weights with its probability, drawing the same mask as
/// [`Tensor::dropout`] would on the weights tensor.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    is_causal: bool,
    dropout: Option<(f64, &mut Rng)>,
) -> Option<Tensor> {
    if !fits(q, k, v, mask) {
        return None;
    }
    Some(dispatch_float!(q.dtype(), OP, |T| run::<T>(
        q, k, v, mask, is_causal, dropout
    )))
}

fn run<T: AttnFloat>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    dropout: Option<(f64, &mut Rng)>,
) -> Tensor {
    let r = q.rank();
    let batch = &q.dims()[..r - 2];
    let (l, e, s, ev) = (q.dim(-2), q.dim(-1), k.dim(-2), v.dim(-1));
    let plan = Plan {
        count: batch.iter().product(),
        l,
        s,
        e,
        ev,
        block: (BLOCK_ELEMS / s)
            .clamp(MIN_BLOCK_ROWS, l.max(MIN_BLOCK_ROWS))
            .min(l),
        scale: 1.0 / (e as f64).sqrt(),
        causal,
    };
    let keep = dropout.map(|(p, rng)| keep_mask(plan.count * l * s, p, rng));
    let record = is_grad_enabled() && [q, k, v].iter().any(|t| t.tracks_grad());
    let mut probs = record.then(|| Buffer::<T>::uninit(plan.count * l * s));

    let mut out_dims = q.dims().to_vec();
    out_dims[r - 1] = ev;
    let out_layout = dense_like(q.layout(), &out_dims);
    let mut out = Buffer::<T>::uninit(out_layout.elem_count());
    {
        let mut tensors = vec![q, k, v];
        tensors.extend(mask);
        let guards = Guards::new(&tensors);
        let mask_rows = mask.map(|m| {
            let mut scores = batch.to_vec();
            scores.extend([l, s]);
            let at = m.layout().broadcast_as(&Shape::from(scores), OP);
            MaskRows {
                data: guards.slice::<T>(3),
                at: Operand::new(&at, plan.count),
            }
        });
        forward(
            &plan,
            (guards.slice(0), &Operand::new(q.layout(), plan.count)),
            (guards.slice(1), &Operand::new(k.layout(), plan.count)),
            (guards.slice(2), &Operand::new(v.layout(), plan.count)),
            mask_rows.as_ref(),
            keep.as_ref().map(|(bits, c)| (&bits[..], T::from_f64(*c))),
            probs.as_mut().map(|p| Shared(p.as_mut_ptr())),
            (
                Shared(out.as_mut_ptr()),
                &Operand::new(&out_layout, plan.count),
            ),
        );
    }
    let storage = std::sync::Arc::new(std::sync::RwLock::new(<T as Element>::into_storage(out)));
    Tensor::from_op_parts(storage, out_layout, &[q, k, v], move || AttentionBackward {
        plan,
        probs: probs.expect("weights are kept whenever the graph records"),
        keep,
    })
}

#[cfg(test)]
mod tests {
    use super::fused_attention;
    use crate::gradcheck::{gradcheck, randn_f64};
    use crate::{DType, Rng, Tensor};

    /// The attention as separate ops: the reference.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        dropout: Option<(f64, u64)>,
    ) -> Tensor {
        let scale = 1.0 / (q.dim(-1) as f64).sqrt();
        let mut scores = q.matmul(&k.transpose(-2, -1)).mul_scalar(scale);
        if let Some(m) = mask {
            scores = scores.add(m);
        }
        if causal {
            let (l, s) = (q.dim(-2), k.dim(-2));
            let above: Vec<u32> = (0..l * s).map(|i| u32::from(i % s > i / s)).collect();
            scores = scores.masked_fill(&Tensor::from_vec(above, [l, s]), f64::NEG_INFINITY);
        }
        let mut w = scores.softmax(-1);
        if let Some((p, seed)) = dropout {
            w = w.dropout(p, true, &mut Rng::new(seed));
        }
        w.matmul(v)
    }

    fn fused(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        dropout: Option<(f64, u64)>,
    ) -> Tensor {
        let mut rng = dropout.map(|(_, seed)| Rng::new(seed));
        let dropout = dropout.map(|(p, _)| (p, rng.as_mut().unwrap()));
        fused_attention(q, k, v, mask, causal, dropout).expect("the fused kernel takes these")
    }

    fn leaf(t: Tensor) -> Tensor {
        t.requires_grad()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.shape(), b.shape());
        a.to_f64_vec()
            .iter()
            .zip(b.to_f64_vec())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Values and gradients of `q`, `k`, `v` from both paths (gradients of `Σ out ⊙ w`).
    fn check(
        what: &str,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        dropout: Option<(f64, u64)>,
        tol: f64,
    ) {
        let run = |f: &dyn Fn() -> Tensor| {
            for t in [q, k, v] {
                t.zero_grad();
            }
            let out = f();
            let w = randn_f64(out.dims(), 99).to_dtype(out.dtype());
            out.mul(&w).sum_all().backward();
            let grads: Vec<Tensor> = [q, k, v].iter().map(|t| t.grad().unwrap()).collect();
            (out.detach(), grads)
        };
        let (want, want_g) = run(&|| composed(q, k, v, mask, causal, dropout));
        let (got, got_g) = run(&|| fused(q, k, v, mask, causal, dropout));
        let d = max_diff(&got, &want);
        assert!(d <= tol, "{what}: output differs by {d}");
        for (name, (g, w)) in ["q", "k", "v"].iter().zip(got_g.iter().zip(&want_g)) {
            let d = max_diff(g, w);
            assert!(d <= tol, "{what}: d{name} differs by {d}");
        }
    }

    fn qkv(b: &[usize], l: usize, s: usize, e: usize, ev: usize, seed: u64) -> [Tensor; 3] {
        let dims = |rows: usize, width: usize| [b, &[rows, width]].concat();
        [
            leaf(randn_f64(&dims(l, e), seed)),
            leaf(randn_f64(&dims(s, e), seed + 1)),
            leaf(randn_f64(&dims(s, ev), seed + 2)),
        ]
    }

    #[test]
    fn values_and_gradients_equal_the_composed_ops() {
        let [q, k, v] = qkv(&[2, 3], 5, 6, 4, 3, 1);
        let ins = (&q, &k, &v);
        check("plain", ins, None, false, None, 1e-12);
        let mask = randn_f64(&[2, 1, 1, 6], 7);
        check("mask [B,1,1,S]", ins, Some(&mask), false, None, 1e-12);
        let mask = randn_f64(&[5, 6], 8);
        check("mask [L,S]", ins, Some(&mask), false, None, 1e-12);
        check("causal", ins, None, true, None, 1e-12);
        // Rows of 6 keys start inside mask words: the scalar dropout path.
        check("dropout", ins, None, false, Some((0.3, 5)), 1e-12);
        check(
            "causal dropout",
            ins,
            Some(&mask),
            true,
            Some((0.5, 6)),
            1e-12,
        );

        // Several query blocks (65,536 / 1,024 = 64 rows each), key rows a multiple of 64.
        let [q, k, v] = qkv(&[2], 150, 1024, 8, 5, 11);
        let ins = (&q, &k, &v);
        check("blocks", ins, None, false, Some((0.1, 3)), 1e-12);
        check("blocks causal", ins, None, true, Some((0.1, 4)), 1e-12);
        let [q, k, v] = qkv(&[], 7, 300, 3, 2, 21);
        check(
            "unbatched, more keys than rows",
            (&q, &k, &v),
            None,
            true,
            None,
            1e-12,
        );
    }

    #[test]
    fn head_split_views_are_read_in_place_and_results_permute_back() {
        // Leaves `[B, L, H, D]` viewed as `[B, H, L, D]`, as attention layers split heads.
        let bases: Vec<Tensor> = (0..3)
            .map(|i| leaf(randn_f64(&[2, 5, 3, 4], 31 + i)))
            .collect();
        let heads = |t: &Tensor| t.permute(&[0, 2, 1, 3]);
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
            bases.iter().for_each(|b| b.zero_grad());
            let out = f(&heads(&bases[0]), &heads(&bases[1]), &heads(&bases[2]));
            let back = out.permute(&[0, 2, 1, 3]);
            back.mul(&randn_f64(back.dims(), 35)).sum_all().backward();
            let grads: Vec<Tensor> = bases.iter().map(|b| b.grad().unwrap()).collect();
            (out.detach(), back.is_contiguous(), grads)
        };
        let (got, got_back, got_g) = run(&|q, k, v| fused(q, k, v, None, false, Some((0.2, 9))));
        let (want, _, want_g) = run(&|q, k, v| composed(q, k, v, None, false, Some((0.2, 9))));
        assert_eq!(got.dims(), &[2, 3, 5, 4]);
        assert!(got_back, "the output permutes back to a contiguous tensor");
        assert!(max_diff(&got, &want) <= 1e-12);
        for (g, w) in got_g.iter().zip(&want_g) {
            assert!(max_diff(g, w) <= 1e-12);
        }
    }

    #[test]
    fn rows_without_keys_give_zero_output_and_gradients() {
        let [q, k, v] = qkv(&[2], 3, 4, 2, 2, 41);
        // Row 1 of batch 0 sees no key; every other row sees some.
        let mut m = vec![0.0; 2 * 3 * 4];
        m[4..8].fill(f64::NEG_INFINITY);
        m[2 * 4 + 3] = f64::NEG_INFINITY;
        let mask = Tensor::from_vec(m, [2, 3, 4]);
        let out = fused(&q, &k, &v, Some(&mask), false, None);
        out.sum_all().backward();
        let vals = out.to_f64_vec();
        assert!(vals[2..4].iter().all(|&x| x == 0.0), "{vals:?}");
        assert!(vals.iter().all(|x| x.is_finite()));
        assert!(q.grad().unwrap().to_f64_vec()[2..4]
            .iter()
            .all(|&x| x == 0.0));
        // The other rows equal the composed ops.
        let want = composed(&q, &k, &v, Some(&mask), false, None).to_f64_vec();
        for (i, (g, w)) in vals.iter().zip(&want).enumerate() {
            if !(2..4).contains(&i) {
                assert!((g - w).abs() < 1e-12, "element {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn gradcheck_with_mask_causal_and_dropout() {
        let [q, k, v] = qkv(&[2], 4, 5, 3, 2, 51);
        let mask = randn_f64(&[2, 1, 5], 52);
        gradcheck(
            |x| fused(&x[0], &x[1], &x[2], Some(&mask), true, Some((0.25, 8))),
            &[q, k, v],
        )
        .unwrap();
    }

    #[test]
    fn f32_matches_f64_and_takes_the_vector_dropout_path() {
        let [q, k, v] = qkv(&[2, 2], 64, 128, 16, 16, 61);
        let to32 = |t: &Tensor| leaf(t.detach().to_dtype(DType::F32));
        let (q32, k32, v32) = (to32(&q), to32(&k), to32(&v));
        let want = fused(&q, &k, &v, None, false, Some((0.1, 2)));
        let got = fused(&q32, &k32, &v32, None, false, Some((0.1, 2)));
        assert_eq!(got.dtype(), DType::F32);
        assert!(max_diff(&got, &want) < 1e-5);
        check("f32", (&q32, &k32, &v32), None, true, Some((0.1, 3)), 1e-5);
    }

    #[test]
    fn inputs_for_the_general_path_are_declined() {
        let [q, k, v] = qkv(&[2], 3, 4, 2, 2, 71);
        let one = randn_f64(&[1, 4, 2], 72);
        assert!(fused_attention(&q, &one, &v, None, false, None).is_none());
        let tracked = leaf(randn_f64(&[3, 4], 73));
        assert!(fused_attention(&q, &k, &v, Some(&tracked), false, None).is_none());
        let wide = randn_f64(&[2, 3, 5], 74);
        assert!(fused_attention(&q, &k, &v, Some(&wide), false, None).is_none());
        let f32_mask = randn_f64(&[3, 4], 75).to_dtype(DType::F32);
        assert!(fused_attention(&q, &k, &v, Some(&f32_mask), false, None).is_none());
        let empty = randn_f64(&[2, 0, 2], 76);
        assert!(fused_attention(&q, &empty, &empty, None, false, None).is_none());
    }
}
