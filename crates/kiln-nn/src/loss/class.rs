//! Class losses: `cross_entropy` (a fused log-softmax + NLL kernel for class-index targets,
//! composed ops for class-probability targets) and `nll_loss`.

use super::{contiguous_slice, par_blocks, par_chunks2, Loss, LossFloat, Reduction};
use kiln_core::alloc::Buffer;
use kiln_core::parallel::for_each_chunk;
use kiln_core::{DType, Element, GradFn, Layout, Shape, Storage, Tensor};

/// Marks a position whose target is `ignore_index`.
const IGNORED: usize = usize::MAX;

/// Columns per tile when the class dim is strided (inputs with spatial dims).
const TILE: usize = 256;

/// An input with a class dim viewed as `[n, c, s]`: batch, classes, spatial positions.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    c: usize,
    s: usize,
}

impl Geom {
    /// Number of (sample, spatial position) pairs: one target and one loss each.
    fn positions(&self) -> usize {
        self.n * self.s
    }

    /// The `[n, c, s]` view of `input` (`[C]`, `[N, C]` or `[N, C, d1, ...]`) and the shape of
    /// its class-index targets (and of the unreduced loss).
    fn of(name: &str, input: &Tensor) -> (Geom, Shape) {
        let d = input.dims();
        let (g, target_shape) = match d.len() {
            0 => panic!(
                "{name}: input must have a class dim ([C], [N, C] or [N, C, d1, ...]), got shape {}",
                input.shape()
            ),
            1 => (
                Geom {
                    n: 1,
                    c: d[0],
                    s: 1,
                },
                Shape::scalar(),
            ),
            _ => {
                let mut t = vec![d[0]];
                t.extend_from_slice(&d[2..]);
                (
                    Geom {
                        n: d[0],
                        c: d[1],
                        s: d[2..].iter().product(),
                    },
                    Shape::from(t),
                )
            }
        };
        assert!(
            g.c > 0,
            "{name}: input of shape {} has no classes",
            input.shape()
        );
        (g, target_shape)
    }

    /// Flat index of `(n, c, s)` for the position `p = n·s_len + s`.
    #[inline(always)]
    fn at(&self, p: usize, c: usize) -> usize {
        let (n, s) = (p / self.s, p % self.s);
        (n * self.c + c) * self.s + s
    }
}

/// The class-index targets, one per position (`IGNORED` for `ignore_index`), each checked.
fn read_targets(
    name: &str,
    input: &Tensor,
    target: &Tensor,
    g: Geom,
    target_shape: &Shape,
    ignore_index: i64,
) -> Vec<usize> {
    let raw: Vec<i64> = match target.dtype() {
        DType::I64 => target.to_vec::<i64>(),
        DType::U32 => target.to_vec::<u32>().into_iter().map(i64::from).collect(),
        other => panic!(
            "{name}: class-index targets must be i64 or u32, got {other} (input shape {}, target shape {})",
            input.shape(),
            target.shape()
        ),
    };
    assert!(
        target.shape() == target_shape,
        "{name}: target shape {} does not match input shape {} (class-index targets must have shape {})",
        target.shape(),
        input.shape(),
        target_shape
    );
    raw.into_iter()
        .map(|t| {
            if t == ignore_index {
                IGNORED
            } else if t >= 0 && (t as u64) < g.c as u64 {
                t as usize
            } else {
                panic!(
                    "{name}: target class {t} out of range for {} classes (ignore_index {ignore_index}; input shape {}, target shape {})",
                    g.c,
                    input.shape(),
                    target.shape()
                )
            }
        })
        .collect()
}

/// The per-class weights as f64, checked to be a float `[C]` tensor.
fn read_weight(name: &str, weight: Option<&Tensor>, input: &Tensor, c: usize) -> Option<Vec<f64>> {
    weight.map(|w| {
        assert!(
            w.dtype().is_float() && w.dims() == [c],
            "{name}: weight must be a float tensor of shape [{c}] (one per class), got {} of shape {} (input shape {})",
            w.dtype(),
            w.shape(),
            input.shape()
        );
        w.to_f64_vec()
    })
}

/// Sum of the target weights over the positions that count (the denominator of `Mean`).
fn total_weight(y: &[usize], w: Option<&[f64]>) -> f64 {
    y.iter()
        .filter(|&&t| t != IGNORED)
        .map(|&t| w.map_or(1.0, |w| w[t]))
        .sum()
}

/// The reduced loss from per-position losses (0 at ignored positions).
fn reduce_positions<T: Element>(
    losses: &[f64],
    reduction: Reduction,
    denom: f64,
    target_shape: &Shape,
) -> (Storage, Shape) {
    match reduction {
        Reduction::None => (
            T::into_storage(Buffer::from_fn(losses.len(), |i| T::from_f64(losses[i]))),
            target_shape.clone(),
        ),
        Reduction::Sum | Reduction::Mean => {
            let mut total: f64 = losses.iter().sum();
            if reduction == Reduction::Mean {
                total /= denom;
            }
            (
                T::into_storage(Buffer::filled(1, T::from_f64(total))),
                Shape::scalar(),
            )
        }
    }
}

/// The gradient scale of each position: the upstream gradient of its loss (per position for
/// `None`, shared otherwise, divided by the total weight for `Mean`), 0 where ignored.
fn position_scales(y: &[usize], g: &Tensor, reduction: Reduction, denom: f64) -> Vec<f64> {
    let gv = g.to_f64_vec();
    y.iter()
        .enumerate()
        .map(|(p, &t)| {
            if t == IGNORED {
                0.0
            } else {
                match reduction {
                    Reduction::None => gv[p],
                    Reduction::Sum => gv[0],
                    Reduction::Mean => gv[0] / denom,
                }
            }
        })
        .collect()
}

// ---------------------------------------------------------------------- fused cross-entropy

/// What the fused cross-entropy kernel needs besides the logits.
struct CeParams<'a, T> {
    g: Geom,
    y: &'a [usize],
    /// Class weights in f64 (loss terms) and in `T` (the smoothing dot product).
    w: Option<&'a [f64]>,
    wt: Option<&'a [T]>,
    /// `Σ_c w_c` (C without weights).
    w_sum: f64,
    eps: f64,
}

impl<T> CeParams<'_, T> {
    #[inline(always)]
    fn weight(&self, c: usize) -> f64 {
        self.w.map_or(1.0, |w| w[c])
    }

    /// The loss of one position from its log-sum-exp, its target's logit and (for label
    /// smoothing) `Σ_c w_c·x_c`: `(1−ε)·w_y·(lse − x_y) + ε/C·(W·lse − Σ_c w_c·x_c)`, which is
    /// `ε/C·Σ_c w_c·(lse − x_c)` for the smoothing term.
    #[inline(always)]
    fn loss(&self, y: usize, lse: f64, x_y: f64, wx: f64) -> f64 {
        if y == IGNORED {
            return 0.0;
        }
        let mut loss = (1.0 - self.eps) * self.weight(y) * (lse - x_y);
        if self.eps > 0.0 {
            loss += self.eps / self.g.c as f64 * (self.w_sum * lse - wx);
        }
        loss
    }
}

/// Largest element (NaN never wins: a NaN row still gives a NaN log-sum-exp), eight lanes.
fn max_slice<T: LossFloat>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let chunks = x.chunks_exact(8);
    let mut m = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    for a in acc {
        if a > m {
            m = a;
        }
    }
    m
}

/// `Σ x_i·w_i` (or `Σ x_i` without `w`), eight lanes.
fn dot_slice<T: LossFloat>(x: &[T], w: Option<&[T]>) -> T {
    let mut acc = [T::zero(); 8];
    let mut tail = T::zero();
    match w {
        None => {
            let chunks = x.chunks_exact(8);
            tail = chunks.remainder().iter().fold(tail, |s, &v| s + v);
            for c in chunks {
                for i in 0..8 {
                    acc[i] += c[i];
                }
            }
        }
        Some(w) => {
            let (cx, cw) = (x.chunks_exact(8), w.chunks_exact(8));
            for (&v, &u) in cx.remainder().iter().zip(cw.remainder()) {
                tail += v * u;
            }
            for (c, u) in cx.zip(cw) {
                for i in 0..8 {
                    acc[i] += c[i] * u[i];
                }
            }
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `(ln Σ exp(row), Σ w_c·row_c)` in f64; the dot product only when `want_dot`.
fn row_stats<T: LossFloat>(row: &[T], w: Option<&[T]>, want_dot: bool) -> (f64, f64) {
    let m = max_slice(row);
    let (mut tmp, mut e) = ([T::zero(); TILE], [T::zero(); TILE]);
    let (mut sum, mut dot) = (0.0, 0.0);
    for (i, chunk) in row.chunks(TILE).enumerate() {
        let (t, e) = (&mut tmp[..chunk.len()], &mut e[..chunk.len()]);
        for (t, &v) in t.iter_mut().zip(chunk) {
            *t = v - m;
        }
        T::exp_slice(t, e);
        sum += Element::to_f64(dot_slice(e, None));
        if want_dot {
            let wc = w.map(|w| &w[i * TILE..i * TILE + chunk.len()]);
            dot += Element::to_f64(dot_slice(chunk, wc));
        }
    }
    (Element::to_f64(m) + sum.ln(), dot)
}

/// Forward over positions `p0..p0 + loss.len()`: each position's loss and log-sum-exp.
fn ce_forward_range<T: LossFloat>(
    x: &[T],
    p: &CeParams<T>,
    p0: usize,
    loss: &mut [f64],
    lse: &mut [T],
) {
    let Geom { c, s, .. } = p.g;
    let smooth = p.eps > 0.0;
    if s == 1 {
        for (j, (l, ls)) in loss.iter_mut().zip(lse.iter_mut()).enumerate() {
            let pos = p0 + j;
            let row = &x[pos * c..(pos + 1) * c];
            let (v, wx) = row_stats(row, p.wt, smooth);
            *ls = T::from_f64(v);
            let y = p.y[pos];
            let x_y = if y == IGNORED {
                0.0
            } else {
                Element::to_f64(row[y])
            };
            *l = p.loss(y, v, x_y, wx);
        }
        return;
    }
    // Strided classes: a tile of spatial columns of one sample at a time, rows over classes.
    let end = p0 + loss.len();
    let mut pos = p0;
    let (mut m, mut tmp, mut e) = ([T::zero(); TILE], [T::zero(); TILE], [T::zero(); TILE]);
    let (mut sum, mut wx) = ([0f64; TILE], [0f64; TILE]);
    while pos < end {
        let (n, s0) = (pos / s, pos % s);
        let tw = (s - s0).min(end - pos).min(TILE);
        let base = n * c * s + s0;
        let row = |k: usize| &x[base + k * s..base + k * s + tw];
        let (m, sum, wx) = (&mut m[..tw], &mut sum[..tw], &mut wx[..tw]);
        m.copy_from_slice(row(0));
        for k in 1..c {
            for (m, &v) in m.iter_mut().zip(row(k)) {
                *m = if v > *m { v } else { *m };
            }
        }
        if smooth {
            wx.fill(0.0);
            for k in 0..c {
                let wk = p.weight(k);
                for (acc, &v) in wx.iter_mut().zip(row(k)) {
                    *acc += wk * Element::to_f64(v);
                }
            }
        }
        sum.fill(0.0);
        for k in 0..c {
            let (t, e) = (&mut tmp[..tw], &mut e[..tw]);
            for ((t, &v), &m) in t.iter_mut().zip(row(k)).zip(m.iter()) {
                *t = v - m;
            }
            T::exp_slice(t, e);
            for (acc, &v) in sum.iter_mut().zip(e.iter()) {
                *acc += Element::to_f64(v);
            }
        }
        for j in 0..tw {
            let v = Element::to_f64(m[j]) + sum[j].ln();
            let q = pos - p0 + j;
            lse[q] = T::from_f64(v);
            let y = p.y[pos + j];
            let x_y = if y == IGNORED {
                0.0
            } else {
                Element::to_f64(x[base + y * s + j])
            };
            loss[q] = p.loss(y, v, x_y, if smooth { wx[j] } else { 0.0 });
        }
        pos += tw;
    }
}

/// The per-position coefficients of the cross-entropy gradient, already scaled by the
/// upstream gradient: `grad = exp(x − lse)·coef − bgi·w_c − [c = y]·agi` (all 0 where
/// ignored), i.e. `softmax − smoothed one-hot`, weighted.
struct CeGrad<'a, T> {
    g: Geom,
    y: &'a [usize],
    w: Option<&'a [T]>,
    lse: &'a [T],
    coef: &'a [T],
    agi: &'a [T],
    bgi: &'a [T],
}

/// Backward when the classes are the last dim (`s == 1`), over the gradient elements
/// `k0..k0 + out.len()`: runs along the classes of a row.
fn ce_backward_rows<T: LossFloat>(x: &[T], q: &CeGrad<T>, k0: usize, out: &mut [T]) {
    let (mut tmp, mut e) = ([T::zero(); TILE], [T::zero(); TILE]);
    let c_len = q.g.c;
    let end = k0 + out.len();
    let mut k = k0;
    while k < end {
        let (n, c) = (k / c_len, k % c_len);
        let len = (c_len - c).min(end - k).min(TILE);
        let o = &mut out[k - k0..k - k0 + len];
        let (t, e) = (&mut tmp[..len], &mut e[..len]);
        let l = q.lse[n];
        for (t, &v) in t.iter_mut().zip(&x[k..k + len]) {
            *t = v - l;
        }
        T::exp_slice(t, e);
        let (cf, b) = (q.coef[n], q.bgi[n]);
        match q.w {
            None => {
                for (o, &e) in o.iter_mut().zip(e.iter()) {
                    *o = e * cf - b;
                }
            }
            Some(w) => {
                for ((o, &e), &w) in o.iter_mut().zip(e.iter()).zip(&w[c..c + len]) {
                    *o = e * cf - b * w;
                }
            }
        }
        let yt = q.y[n];
        if (c..c + len).contains(&yt) {
            o[yt - c] -= q.agi[n];
        }
        k += len;
    }
}

/// Backward when the classes are strided (`s > 1`), for the samples whose `[c, s]` blocks
/// make up `out`, the first being `n0`: a tile of spatial columns at a time, so the
/// per-position coefficients stay in cache across the class rows.
fn ce_backward_samples<T: LossFloat>(x: &[T], q: &CeGrad<T>, n0: usize, out: &mut [T]) {
    let Geom { c, s, .. } = q.g;
    let (mut tmp, mut e) = ([T::zero(); TILE], [T::zero(); TILE]);
    for (i, o) in out.chunks_mut(c * s).enumerate() {
        let n = n0 + i;
        let xb = &x[n * c * s..(n + 1) * c * s];
        for s0 in (0..s).step_by(TILE) {
            let tw = (s - s0).min(TILE);
            let ps = n * s + s0..n * s + s0 + tw;
            let (lse, coef, bgi) = (&q.lse[ps.clone()], &q.coef[ps.clone()], &q.bgi[ps.clone()]);
            for k in 0..c {
                let r = k * s + s0..k * s + s0 + tw;
                let (t, e) = (&mut tmp[..tw], &mut e[..tw]);
                for ((t, &v), &l) in t.iter_mut().zip(&xb[r.clone()]).zip(lse) {
                    *t = v - l;
                }
                T::exp_slice(t, e);
                let wk = q.w.map_or(T::one(), |w| w[k]);
                for (((o, &e), &cf), &b) in o[r].iter_mut().zip(e.iter()).zip(coef).zip(bgi) {
                    *o = e * cf - b * wk;
                }
            }
            for (j, p) in ps.enumerate() {
                let yt = q.y[p];
                if yt != IGNORED {
                    o[yt * s + s0 + j] -= q.agi[p];
                }
            }
        }
    }
}

/// Backward of the fused cross-entropy: holds the contiguous logits, the targets and the
/// per-position log-sum-exp of the forward pass.
struct CrossEntropyBackward<T> {
    x: Tensor,
    g: Geom,
    y: Vec<usize>,
    w: Option<Vec<f64>>,
    eps: f64,
    lse: Vec<T>,
    reduction: Reduction,
    denom: f64,
}

impl<T: LossFloat> GradFn for CrossEntropyBackward<T> {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn backward(&self, _inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let geo = self.g;
        let scales = position_scales(&self.y, g, self.reduction, self.denom);
        let w = self.w.as_deref();
        let b = self.eps / geo.c as f64;
        let big_w: f64 = w.map_or(geo.c as f64, |w| w.iter().sum());
        let np = geo.positions();
        let (mut coef, mut agi, mut bgi) = (
            vec![T::zero(); np],
            vec![T::zero(); np],
            vec![T::zero(); np],
        );
        for (p, &gi) in scales.iter().enumerate() {
            if self.y[p] == IGNORED {
                continue;
            }
            let a = (1.0 - self.eps) * w.map_or(1.0, |w| w[self.y[p]]);
            coef[p] = T::from_f64(gi * (a + b * big_w));
            agi[p] = T::from_f64(gi * a);
            bgi[p] = T::from_f64(gi * b);
        }
        let wt: Option<Vec<T>> = w.map(|w| w.iter().map(|&v| T::from_f64(v)).collect());
        let q = CeGrad {
            g: geo,
            y: &self.y,
            w: wt.as_deref(),
            lse: &self.lse,
            coef: &coef,
            agi: &agi,
            bgi: &bgi,
        };
        let guard = self.x.storage();
        let xs = contiguous_slice::<T>(&guard, &self.x, "cross_entropy");
        let mut out = Buffer::<T>::uninit(xs.len());
        if geo.s == 1 {
            for_each_chunk(&mut out, |k0, chunk| ce_backward_rows(xs, &q, k0, chunk));
        } else {
            par_blocks(&mut out, geo.c * geo.s, |n0, chunk| {
                ce_backward_samples(xs, &q, n0, chunk)
            });
        }
        let gx = Tensor::from_storage(
            T::into_storage(out),
            Layout::contiguous(self.x.shape().clone()),
        );
        vec![Some(gx)]
    }
}

fn cross_entropy_indices(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    ignore_index: i64,
    reduction: Reduction,
    eps: f64,
) -> Tensor {
    let name = "cross_entropy";
    let (g, target_shape) = Geom::of(name, input);
    let y = read_targets(name, input, target, g, &target_shape, ignore_index);
    let w = read_weight(name, weight, input, g.c);
    let denom = total_weight(&y, w.as_deref());
    let x = input.detach().contiguous();
    let w_sum = w.as_ref().map_or(g.c as f64, |w| w.iter().sum());
    kiln_core::dispatch_float!(input.dtype(), name, |T| {
        let wt: Option<Vec<T>> = w
            .as_ref()
            .map(|w| w.iter().map(|&v| T::from_f64(v)).collect());
        let p = CeParams {
            g,
            y: &y,
            w: w.as_deref(),
            wt: wt.as_deref(),
            w_sum,
            eps,
        };
        let np = g.positions();
        let mut loss = vec![0f64; np];
        let mut lse = vec![T::default(); np];
        {
            let guard = x.storage();
            let xs = contiguous_slice::<T>(&guard, &x, name);
            par_chunks2(&mut loss, &mut lse, g.c, |p0, l, ls| {
                ce_forward_range(xs, &p, p0, l, ls)
            });
        }
        let (storage, shape) = reduce_positions::<T>(&loss, reduction, denom, &target_shape);
        Tensor::op_result(
            storage,
            shape,
            &[input],
            move || CrossEntropyBackward::<T> {
                x,
                g,
                y,
                w,
                eps,
                lse,
                reduction,
                denom,
            },
        )
    })
}

/// Cross-entropy with class-probability targets, composed from differentiable ops (the
/// gradient reaches the target too).
fn cross_entropy_probs(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    eps: f64,
) -> Tensor {
    let name = "cross_entropy";
    assert!(
        target.shape() == input.shape() && target.dtype() == input.dtype(),
        "{name}: float targets are class probabilities and must have the input's shape {} and dtype {}, got shape {} and dtype {} (class-index targets are i64 or u32)",
        input.shape(),
        input.dtype(),
        target.shape(),
        target.dtype()
    );
    let (g, _) = Geom::of(name, input);
    let class_dim = if input.rank() == 1 { 0 } else { 1 };
    let w = read_weight(name, weight, input, g.c);
    let logp = input.log_softmax(class_dim);
    let t = if eps > 0.0 {
        target.mul_scalar(1.0 - eps).add_scalar(eps / g.c as f64)
    } else {
        target.clone()
    };
    let mut prod = logp.mul(&t);
    if let Some(w) = w {
        let mut shape = vec![1; input.rank()];
        shape[class_dim] = g.c;
        let wt = Tensor::from_vec(w, shape).to_dtype(input.dtype());
        prod = prod.mul(&wt);
    }
    match reduction {
        Reduction::None => prod.sum(class_dim, false).neg(),
        Reduction::Sum => prod.sum_all().neg(),
        Reduction::Mean => prod
            .sum_all()
            .neg()
            .div_scalar((input.elem_count() / g.c) as f64),
    }
}

/// Cross-entropy between `input` logits (`[C]`, `[N, C]` or `[N, C, d1, ...]`, classes along
/// dim 1) and `target`, as `torch.nn.functional.cross_entropy`.
///
/// `target` holds class indices (i64 or u32, shape `[N, d1, ...]`; positions equal to
/// `ignore_index` count for nothing) or class probabilities (float, the input's shape).
/// `weight` (`[C]`) scales each class; `Mean` then divides by the total weight of the
/// targets that count. `label_smoothing` in `[0, 1]` mixes the target with the uniform
/// distribution. Class-index targets run one fused kernel forward and backward.
pub fn cross_entropy(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    ignore_index: i64,
    reduction: Reduction,
    label_smoothing: f64,
) -> Tensor {
    assert!(
        input.dtype().is_float(),
        "cross_entropy: input must be f32 or f64 logits, got {} (input shape {}, target shape {})",
        input.dtype(),
        input.shape(),
        target.shape()
    );
    assert!(
        (0.0..=1.0).contains(&label_smoothing),
        "cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}"
    );
    if target.dtype().is_float() {
        cross_entropy_probs(input, target, weight, reduction, label_smoothing)
    } else {
        cross_entropy_indices(
            input,
            target,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
        )
    }
}

// ---------------------------------------------------------------------- nll_loss

/// Backward of `nll_loss`: `−scale·w_y` at each target's log-probability, 0 elsewhere.
struct NllBackward {
    g: Geom,
    shape: Shape,
    y: Vec<usize>,
    w: Option<Vec<f64>>,
    reduction: Reduction,
    denom: f64,
}

impl GradFn for NllBackward {
    fn name(&self) -> &'static str {
        "nll_loss"
    }

    fn backward(&self, inputs: &[Tensor], _output: &Tensor, g: &Tensor) -> Vec<Option<Tensor>> {
        let scales = position_scales(&self.y, g, self.reduction, self.denom);
        let storage = kiln_core::dispatch_float!(inputs[0].dtype(), "nll_loss", |T| {
            let mut out = Buffer::<T>::filled(self.shape.elem_count(), T::default());
            for (p, (&t, &gi)) in self.y.iter().zip(&scales).enumerate() {
                if t != IGNORED {
                    let wy = self.w.as_ref().map_or(1.0, |w| w[t]);
                    out[self.g.at(p, t)] = T::from_f64(-gi * wy);
                }
            }
            <T as Element>::into_storage(out)
        });
        vec![Some(Tensor::from_storage(
            storage,
            Layout::contiguous(self.shape.clone()),
        ))]
    }
}

/// Negative log-likelihood of class-index `target` under `input` log-probabilities (`[C]`,
/// `[N, C]` or `[N, C, d1, ...]`), as `torch.nn.functional.nll_loss`: `−w_y·input[y]` per
/// position, with the same target, `ignore_index`, `weight` and `Mean` semantics as
/// [`cross_entropy`].
pub fn nll_loss(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    ignore_index: i64,
    reduction: Reduction,
) -> Tensor {
    let name = "nll_loss";
    assert!(
        input.dtype().is_float(),
        "{name}: input must be f32 or f64 log-probabilities, got {} (input shape {}, target shape {})",
        input.dtype(),
        input.shape(),
        target.shape()
    );
    let (g, target_shape) = Geom::of(name, input);
    let y = read_targets(name, input, target, g, &target_shape, ignore_index);
    let w = read_weight(name, weight, input, g.c);
    let denom = total_weight(&y, w.as_deref());
    let x = input.detach().contiguous();
    let (storage, shape) = kiln_core::dispatch_float!(input.dtype(), name, |T| {
        let guard = x.storage();
        let xs = contiguous_slice::<T>(&guard, &x, name);
        let losses: Vec<f64> = y
            .iter()
            .enumerate()
            .map(|(p, &t)| {
                if t == IGNORED {
                    0.0
                } else {
                    -w.as_ref().map_or(1.0, |w| w[t]) * Element::to_f64(xs[g.at(p, t)])
                }
            })
            .collect();
        reduce_positions::<T>(&losses, reduction, denom, &target_shape)
    });
    let in_shape = input.shape().clone();
    Tensor::op_result(storage, shape, &[input], move || NllBackward {
        g,
        shape: in_shape,
        y,
        w,
        reduction,
        denom,
    })
}

// ---------------------------------------------------------------------- config structs

/// `torch.nn.CrossEntropyLoss`: the options of [`cross_entropy`]; `forward(&logits,
/// &target)` applies it.
#[derive(Clone, Debug)]
pub struct CrossEntropyLoss {
    /// Per-class weights (`[C]`), or none.
    pub weight: Option<Tensor>,
    /// Target value that is ignored (default −100).
    pub ignore_index: i64,
    /// Amount of label smoothing in `[0, 1]` (default 0).
    pub label_smoothing: f64,
    /// How the per-sample losses are combined (default `Mean`).
    pub reduction: Reduction,
}

impl Default for CrossEntropyLoss {
    fn default() -> Self {
        CrossEntropyLoss {
            weight: None,
            ignore_index: -100,
            label_smoothing: 0.0,
            reduction: Reduction::Mean,
        }
    }
}

impl CrossEntropyLoss {
    /// PyTorch's defaults: no weights, `ignore_index` −100, no smoothing, `Mean`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The loss of `logits` against `target` (class indices or probabilities).
    pub fn forward(&self, logits: &Tensor, target: &Tensor) -> Tensor {
        cross_entropy(
            logits,
            target,
            self.weight.as_ref(),
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
        )
    }
}

impl Loss for CrossEntropyLoss {
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        CrossEntropyLoss::forward(self, input, target)
    }
}

/// `torch.nn.NLLLoss`: the options of [`nll_loss`]; `forward(&log_probs, &target)` applies it.
#[derive(Clone, Debug)]
pub struct NllLoss {
    /// Per-class weights (`[C]`), or none.
    pub weight: Option<Tensor>,
    /// Target value that is ignored (default −100).
    pub ignore_index: i64,
    /// How the per-sample losses are combined (default `Mean`).
    pub reduction: Reduction,
}

impl Default for NllLoss {
    fn default() -> Self {
        NllLoss {
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
        }
    }
}

impl NllLoss {
    /// PyTorch's defaults: no weights, `ignore_index` −100, `Mean`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The loss of `log_probs` against class-index `target`.
    pub fn forward(&self, log_probs: &Tensor, target: &Tensor) -> Tensor {
        nll_loss(
            log_probs,
            target,
            self.weight.as_ref(),
            self.ignore_index,
            self.reduction,
        )
    }
}

impl Loss for NllLoss {
    fn forward(&self, input: &Tensor, target: &Tensor) -> Tensor {
        NllLoss::forward(self, input, target)
    }
}
