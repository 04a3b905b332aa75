//! Scaled dot-product attention and `MultiheadAttention`, with PyTorch's parameter names, shapes,
//! initialisation and mask conventions.
//!
//! Masks come in two kinds, told apart by dtype: an integer tensor (kiln's booleans are U32 0/1,
//! as the comparisons return; any nonzero value is "true") is a *boolean* mask, a float tensor
//! is *additive* (added to the scores, `-inf` removes a position). Which boolean value means
//! "masked out" follows PyTorch, and differs between the two entry points:
//! - [`scaled_dot_product_attention`]: `true` = the position **takes part** (as
//!   `F.scaled_dot_product_attention`);
//! - [`MultiheadAttention`]: `true` in `key_padding_mask` or `attn_mask` = the position is
//!   **masked out** (as `nn.MultiheadAttention`).
//!
//! A query row whose every key is masked out gets all-zero attention weights, so its attention
//! output is zero (PyTorch's `scaled_dot_product_attention` does the same; its
//! `MultiheadAttention` with `need_weights=True` gives NaN there instead). No gradient flows
//! through such a row.
//!
//! The output alone is computed by kiln-core's fused kernel
//! ([`fused_attention`]: no scores tensor in memory, head-split views read in place); the
//! composed ops serve the attention weights (`need_weights`) and the inputs the kernel declines.

use crate::layers::Linear;
use crate::{init, Forward, Module, Param, RandomState, TrainFlag};
use kiln_core::ops::attention::fused_attention;
use kiln_core::{DType, Rng, Tensor};

// ---------------------------------------------------------------------- functional core

/// A mask as the attention core applies it, already broadcastable to the scores `[.., L, S]`.
enum Mask {
    /// Nonzero = masked out (filled with `-inf`).
    Block(Tensor),
    /// Added to the scores.
    Add(Tensor),
}

/// True when `from` broadcasts to `to` (numpy rules, `from` may have fewer dims).
fn broadcasts_to(from: &[usize], to: &[usize]) -> bool {
    from.len() <= to.len()
        && from
            .iter()
            .rev()
            .zip(to.iter().rev())
            .all(|(&f, &t)| f == t || f == 1)
}

/// `[l, s]` U32 mask, 1 above the diagonal (`j > i`): what `is_causal` masks out.
fn causal_block(l: usize, s: usize) -> Tensor {
    let data: Vec<u32> = (0..l * s).map(|i| u32::from(i % s > i / s)).collect();
    Tensor::from_vec(data, [l, s])
}

/// `softmax(q kᵀ · scale + masks) v` with optional dropout on the weights; returns the output
/// and the (post-dropout) weights. Rows left with no key get zero weights.
fn attention_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    masks: &[Mask],
    is_causal: bool,
    dropout: Option<(f64, &mut Rng)>,
) -> (Tensor, Tensor) {
    let e = q.dim(-1);
    let scale = 1.0 / (e as f64).sqrt();
    let mut scores = q.mul_scalar(scale).matmul(&k.transpose(-2, -1));
    let (l, s) = (scores.dim(-2), scores.dim(-1));
    if is_causal {
        scores = scores.masked_fill(&causal_block(l, s), f64::NEG_INFINITY);
    }
    for m in masks {
        scores = match m {
            Mask::Block(b) => scores.masked_fill(b, f64::NEG_INFINITY),
            Mask::Add(a) => scores.add(a),
        };
    }
    let mut weights;
    if masks.is_empty() {
        // Without user masks every row keeps at least one key (the causal mask keeps j = 0).
        weights = scores.softmax(-1);
    } else {
        // Rows whose every score is -inf: softmax them over zeros (finite, gradient-safe) and
        // zero their weights, instead of letting NaN through.
        let dead = scores.detach().max(-1, true).eq_scalar(f64::NEG_INFINITY);
        if dead.to_vec::<u32>().iter().any(|&d| d != 0) {
            weights = scores
                .masked_fill(&dead, 0.0)
                .softmax(-1)
                .masked_fill(&dead, 0.0);
        } else {
            weights = scores.softmax(-1);
        }
    }
    if let Some((p, rng)) = dropout {
        weights = weights.dropout(p, true, rng);
    }
    (weights.matmul(v), weights)
}

/// The output of [`attention_core`] alone: the fused kernel when it takes the inputs (all masks
/// folded into one additive mask), else the composed ops.
fn attention_output(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    masks: &[Mask],
    is_causal: bool,
    mut dropout: Option<(f64, &mut Rng)>,
) -> Tensor {
    let additive = masks
        .iter()
        .map(|m| match m {
            Mask::Block(b) => {
                Tensor::zeros_dtype(b.shape().clone(), q.dtype()).masked_fill(b, f64::NEG_INFINITY)
            }
            Mask::Add(a) => a.clone(),
        })
        .reduce(|a, b| a.add(&b));
    let fused_dropout = dropout.as_mut().map(|(p, rng)| (*p, &mut **rng));
    // A declined call draws nothing from the generator: the composed path below draws.
    if let Some(out) = fused_attention(q, k, v, additive.as_ref(), is_causal, fused_dropout) {
        return out;
    }
    attention_core(q, k, v, masks, is_causal, dropout).0
}

/// Checks `q [.., L, E]`, `k [.., S, E]`, `v [.., S, Ev]`; returns `(L, S)`.
fn check_qkv(op: &str, q: &Tensor, k: &Tensor, v: &Tensor) -> (usize, usize) {
    assert!(
        q.rank() >= 2 && k.rank() >= 2 && v.rank() >= 2,
        "{op}: query, key and value must be [.., L, E], [.., S, E], [.., S, Ev], got {}, {}, {}",
        q.shape(),
        k.shape(),
        v.shape()
    );
    assert!(
        q.dim(-1) == k.dim(-1) && k.dim(-2) == v.dim(-2),
        "{op}: query [.., L, E], key [.., S, E] and value [.., S, Ev] do not fit: got {}, {}, {}",
        q.shape(),
        k.shape(),
        v.shape()
    );
    assert!(
        q.dtype().is_float() && q.dtype() == k.dtype() && k.dtype() == v.dtype(),
        "{op}: query, key and value must share one float dtype, got {}, {}, {}",
        q.dtype(),
        k.dtype(),
        v.dtype()
    );
    (q.dim(-2), k.dim(-2))
}

/// A user mask as the core applies it: integer dtypes are boolean (`true_blocks`: whether
/// nonzero means masked out), floats are additive (converted to `dtype`).
fn to_mask(mask: &Tensor, true_blocks: bool, dtype: DType) -> Mask {
    if mask.dtype().is_float() {
        Mask::Add(mask.to_dtype(dtype))
    } else if true_blocks {
        Mask::Block(mask.clone())
    } else {
        Mask::Block(mask.eq_scalar(0.0))
    }
}

/// `F.scaled_dot_product_attention`: `softmax(q kᵀ / √E + mask) v` on `q [.., L, E]`,
/// `k [.., S, E]`, `v [.., S, Ev]` (batch dims broadcast), giving `[.., L, Ev]`.
///
/// `attn_mask` broadcasts to `[.., L, S]`: a boolean (integer, e.g. U32 0/1) mask is **true
/// where the position takes part**; a float mask is added to the scores. `is_causal` masks out
/// keys after the query position (top-left aligned, `j > i`) and cannot be combined with
/// `attn_mask` (as in PyTorch). Dropout with probability `dropout_p` (masks from `rng`) applies
/// to the weights only when `train`. Fully masked rows give zeros (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attn_mask: Option<&Tensor>,
    is_causal: bool,
    dropout_p: f64,
    train: bool,
    rng: &mut Rng,
) -> Tensor {
    let op = "scaled_dot_product_attention";
    let (l, s) = check_qkv(op, q, k, v);
    assert!(
        (0.0..=1.0).contains(&dropout_p),
        "{op}: dropout_p must be in [0, 1], got {dropout_p}"
    );
    let mut masks = Vec::new();
    if let Some(m) = attn_mask {
        assert!(
            !is_causal,
            "{op}: attn_mask and is_causal cannot both be set (mask shape {})",
            m.shape()
        );
        let mut scores_shape = q.dims()[..q.rank() - 1].to_vec();
        scores_shape.push(s);
        assert!(
            broadcasts_to(m.dims(), &scores_shape) && m.rank() >= 1,
            "{op}: attn_mask of shape {} does not broadcast to the scores [.., L, S] = {:?} (L = {l}, S = {s})",
            m.shape(),
            scores_shape
        );
        masks.push(to_mask(m, false, q.dtype()));
    }
    let dropout = (train && dropout_p > 0.0).then_some((dropout_p, rng));
    attention_output(q, k, v, &masks, is_causal, dropout)
}

// ---------------------------------------------------------------------- MultiheadAttention

/// Options of [`MultiheadAttention::with_config`] (PyTorch's constructor arguments).
#[derive(Debug, Clone, Copy)]
pub struct MhaConfig {
    /// Number of heads; must divide the embedding dim (default 1).
    pub num_heads: usize,
    /// Dropout probability on the attention weights while training (default 0).
    pub dropout: f64,
    /// Whether the input and output projections have biases (default true).
    pub bias: bool,
    /// Feature size of `key` (default: the embedding dim).
    pub kdim: Option<usize>,
    /// Feature size of `value` (default: the embedding dim).
    pub vdim: Option<usize>,
    /// `[N, L, E]` inputs when true (kiln's default), `[L, N, E]` when false (PyTorch's default).
    pub batch_first: bool,
}

impl Default for MhaConfig {
    fn default() -> Self {
        MhaConfig {
            num_heads: 1,
            dropout: 0.0,
            bias: true,
            kdim: None,
            vdim: None,
            batch_first: true,
        }
    }
}

impl MhaConfig {
    /// Defaults with `num_heads` heads.
    pub fn new(num_heads: usize) -> Self {
        MhaConfig {
            num_heads,
            ..Self::default()
        }
    }

    /// Sets the number of heads.
    pub fn num_heads(mut self, n: usize) -> Self {
        self.num_heads = n;
        self
    }

    /// Sets the attention-weight dropout probability.
    pub fn dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// Sets whether the projections have biases.
    pub fn bias(mut self, on: bool) -> Self {
        self.bias = on;
        self
    }

    /// Sets the feature size of `key`.
    pub fn kdim(mut self, kdim: usize) -> Self {
        self.kdim = Some(kdim);
        self
    }

    /// Sets the feature size of `value`.
    pub fn vdim(mut self, vdim: usize) -> Self {
        self.vdim = Some(vdim);
        self
    }

    /// Sets the input layout: `[N, L, E]` when true, `[L, N, E]` when false.
    pub fn batch_first(mut self, on: bool) -> Self {
        self.batch_first = on;
        self
    }
}

/// Per-call options of [`MultiheadAttention::forward_qkv`] (PyTorch's `forward` arguments).
#[derive(Debug, Clone, Copy)]
pub struct MhaOptions<'a> {
    /// `[N, S]` (or `[S]` unbatched): boolean **true = this key is padding, masked out**, or
    /// float, added to the scores.
    pub key_padding_mask: Option<&'a Tensor>,
    /// `[L, S]` or `[N·num_heads, L, S]`: boolean **true = masked out**, or float, added.
    pub attn_mask: Option<&'a Tensor>,
    /// Masks out keys after each query position (`j > i`). Unlike PyTorch, where it is only a
    /// hint that `attn_mask` is causal and needs one, kiln builds the causal mask itself; with an
    /// `attn_mask` too, both apply.
    pub is_causal: bool,
    /// Return the attention weights (default true).
    pub need_weights: bool,
    /// Average the returned weights over heads (`[N, L, S]`) rather than per head
    /// (`[N, num_heads, L, S]`) (default true).
    pub average_attn_weights: bool,
}

impl Default for MhaOptions<'_> {
    fn default() -> Self {
        MhaOptions {
            key_padding_mask: None,
            attn_mask: None,
            is_causal: false,
            need_weights: true,
            average_attn_weights: true,
        }
    }
}

impl<'a> MhaOptions<'a> {
    /// Sets the key padding mask (true = masked out).
    pub fn key_padding_mask(mut self, m: &'a Tensor) -> Self {
        self.key_padding_mask = Some(m);
        self
    }

    /// Sets the attention mask (true = masked out, or additive float).
    pub fn attn_mask(mut self, m: &'a Tensor) -> Self {
        self.attn_mask = Some(m);
        self
    }

    /// Sets causal masking.
    pub fn is_causal(mut self, on: bool) -> Self {
        self.is_causal = on;
        self
    }

    /// Sets whether weights are returned.
    pub fn need_weights(mut self, on: bool) -> Self {
        self.need_weights = on;
        self
    }

    /// Sets whether returned weights are averaged over heads.
    pub fn average_attn_weights(mut self, on: bool) -> Self {
        self.average_attn_weights = on;
        self
    }
}

/// `torch.nn.MultiheadAttention` (without `add_bias_kv`/`add_zero_attn`): `in_proj_weight`
/// `[3E, E]` (or `q_proj_weight [E, E]`, `k_proj_weight [E, kdim]`, `v_proj_weight [E, vdim]`
/// when `kdim`/`vdim` differ from `E`), `in_proj_bias [3E]`, `out_proj.weight [E, E]`,
/// `out_proj.bias [E]`. Inputs are `[N, L, E]` by default (`batch_first`, unlike PyTorch);
/// unbatched `[L, E]` inputs work too. [`Forward`] is self-attention without masks.
#[derive(Module, Debug)]
pub struct MultiheadAttention {
    /// Packed `[3E, E]` query/key/value projection (when `kdim == vdim == E`).
    pub in_proj_weight: Option<Param>,
    /// `[E, E]` query projection (when `kdim` or `vdim` differ from `E`).
    pub q_proj_weight: Option<Param>,
    /// `[E, kdim]` key projection (when `kdim` or `vdim` differ from `E`).
    pub k_proj_weight: Option<Param>,
    /// `[E, vdim]` value projection (when `kdim` or `vdim` differ from `E`).
    pub v_proj_weight: Option<Param>,
    /// `[3E]` packed projection bias, if `bias`.
    pub in_proj_bias: Option<Param>,
    /// Output projection `E → E`.
    pub out_proj: Linear,
    training: TrainFlag,
    /// Embedding dim `E`.
    #[module(skip)]
    pub embed_dim: usize,
    /// Number of heads.
    #[module(skip)]
    pub num_heads: usize,
    /// Feature size of `key`.
    #[module(skip)]
    pub kdim: usize,
    /// Feature size of `value`.
    #[module(skip)]
    pub vdim: usize,
    /// Attention-weight dropout probability while training.
    #[module(skip)]
    pub dropout: f64,
    /// `[N, L, E]` inputs when true, `[L, N, E]` when false.
    #[module(skip)]
    pub batch_first: bool,
    rng: RandomState,
}

impl Clone for MultiheadAttention {
    fn clone(&self) -> Self {
        MultiheadAttention {
            in_proj_weight: self.in_proj_weight.clone(),
            q_proj_weight: self.q_proj_weight.clone(),
            k_proj_weight: self.k_proj_weight.clone(),
            v_proj_weight: self.v_proj_weight.clone(),
            in_proj_bias: self.in_proj_bias.clone(),
            out_proj: self.out_proj.clone(),
            training: self.training.clone(),
            embed_dim: self.embed_dim,
            num_heads: self.num_heads,
            kdim: self.kdim,
            vdim: self.vdim,
            dropout: self.dropout,
            batch_first: self.batch_first,
            rng: self.rng.clone(),
        }
    }
}

impl MultiheadAttention {
    /// `embed_dim` split over `num_heads` heads, other options at their defaults.
    pub fn new(embed_dim: usize, num_heads: usize, rng: &mut Rng) -> Self {
        Self::with_config(embed_dim, MhaConfig::new(num_heads), rng)
    }

    /// A layer with the given options, initialised like PyTorch: Xavier-uniform input
    /// projections, zero biases, `out_proj.weight` with `Linear`'s default init. Dropout masks
    /// come from a generator seeded from `rng`.
    pub fn with_config(embed_dim: usize, config: MhaConfig, rng: &mut Rng) -> Self {
        let h = config.num_heads;
        assert!(
            h > 0 && embed_dim.is_multiple_of(h),
            "MultiheadAttention: embed_dim {embed_dim} must be divisible by num_heads {h}"
        );
        assert!(
            (0.0..=1.0).contains(&config.dropout),
            "MultiheadAttention: dropout must be in [0, 1], got {}",
            config.dropout
        );
        let e = embed_dim;
        let (kdim, vdim) = (config.kdim.unwrap_or(e), config.vdim.unwrap_or(e));
        // PyTorch builds out_proj (a Linear) before resetting the projections.
        let out_proj = Linear::with_config(
            e,
            e,
            crate::layers::LinearConfig::default().bias(config.bias),
            rng,
        );
        if let Some(b) = &out_proj.bias {
            init::zeros_(b);
        }
        let xavier = |shape: [usize; 2], rng: &mut Rng| {
            let w = Tensor::zeros(shape);
            init::xavier_uniform_(&w, 1.0, rng);
            Param::new(w)
        };
        let packed = kdim == e && vdim == e;
        let (in_proj_weight, q, k, v) = if packed {
            (Some(xavier([3 * e, e], rng)), None, None, None)
        } else {
            (
                None,
                Some(xavier([e, e], rng)),
                Some(xavier([e, kdim], rng)),
                Some(xavier([e, vdim], rng)),
            )
        };
        MultiheadAttention {
            in_proj_weight,
            q_proj_weight: q,
            k_proj_weight: k,
            v_proj_weight: v,
            in_proj_bias: config.bias.then(|| Param::new(Tensor::zeros([3 * e]))),
            out_proj,
            training: TrainFlag::default(),
            embed_dim: e,
            num_heads: h,
            kdim,
            vdim,
            dropout: config.dropout,
            batch_first: config.batch_first,
            rng: RandomState::new(rng.next_u64()),
        }
    }

    /// True in training mode (dropout on the weights active).
    pub fn is_training(&self) -> bool {
        self.training.is_training()
    }

    /// `x · Wᵀ + b` for projection `i` (0: query, 1: key, 2: value).
    fn project(&self, x: &Tensor, i: usize) -> Tensor {
        let e = self.embed_dim;
        let w = match &self.in_proj_weight {
            Some(w) => w.narrow(0, i * e, e),
            None => [
                &self.q_proj_weight,
                &self.k_proj_weight,
                &self.v_proj_weight,
            ][i]
                .as_ref()
                .expect("separate projection weights")
                .tensor()
                .clone(),
        };
        let y = x.matmul(&w.t());
        match &self.in_proj_bias {
            Some(b) => y.add(&b.narrow(0, i * e, e)),
            None => y,
        }
    }

    /// Attention of `query` over `key`/`value`: returns the output (shaped like `query`) and,
    /// if `need_weights`, the weights `[N, L, S]` (averaged) or `[N, num_heads, L, S]` (without
    /// the batch dim for unbatched input). Inputs are `[N, L, E]`, `[N, S, kdim]`,
    /// `[N, S, vdim]` (`[L, N, E]`, ... when not `batch_first`; `[L, E]`, ... unbatched).
    /// Returned weights are those after dropout, as in PyTorch.
    pub fn forward_qkv(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        opts: MhaOptions<'_>,
    ) -> (Tensor, Option<Tensor>) {
        let op = "MultiheadAttention";
        let (e, h) = (self.embed_dim, self.num_heads);
        let batched = query.rank() == 3;
        assert!(
            (query.rank() == 3 || query.rank() == 2)
                && key.rank() == query.rank()
                && value.rank() == query.rank(),
            "{op}: query, key and value must all be 3-D (batched) or 2-D (unbatched), got {}, {}, {}",
            query.shape(),
            key.shape(),
            value.shape()
        );
        assert!(
            query.dim(-1) == e && key.dim(-1) == self.kdim && value.dim(-1) == self.vdim,
            "{op}: expected feature sizes (query {e}, key {}, value {}), got shapes {}, {}, {}",
            self.kdim,
            self.vdim,
            query.shape(),
            key.shape(),
            value.shape()
        );
        // Batch and sequence axes of the (batched) inputs.
        let (bax, sax) = if self.batch_first || !batched {
            (0, 1)
        } else {
            (1, 0)
        };
        let lift = |t: &Tensor| if batched { t.clone() } else { t.unsqueeze(0) };
        let (q_in, k_in, v_in) = (lift(query), lift(key), lift(value));
        let (n, l, s) = (q_in.dim(bax), q_in.dim(sax), k_in.dim(sax));
        assert!(
            k_in.dim(bax) == n && v_in.dim(bax) == n && v_in.dim(sax) == s,
            "{op}: batch and sequence sizes of query {}, key {} and value {} do not fit (batch_first: {})",
            query.shape(),
            key.shape(),
            value.shape(),
            self.batch_first
        );

        let d = e / h;
        // [A, B, E] -> [N, H, seq, D] (a view).
        let heads = |t: Tensor, seq: usize| {
            if self.batch_first || !batched {
                t.reshape([n, seq, h, d]).permute(&[0, 2, 1, 3])
            } else {
                t.reshape([seq, n, h, d]).permute(&[1, 2, 0, 3])
            }
        };
        let same_input = self.in_proj_weight.is_some()
            && query.id() == key.id()
            && key.id() == value.id()
            && query.layout() == key.layout();
        let (q, k, v) = if same_input {
            // Self-attention: one product with the packed weight, split afterwards.
            let w = self.in_proj_weight.as_ref().unwrap();
            let mut qkv = q_in.matmul(&w.t());
            if let Some(b) = &self.in_proj_bias {
                qkv = qkv.add(b);
            }
            let parts = qkv.chunk(3, -1);
            (
                heads(parts[0].clone(), l),
                heads(parts[1].clone(), s),
                heads(parts[2].clone(), s),
            )
        } else {
            (
                heads(self.project(&q_in, 0), l),
                heads(self.project(&k_in, 1), s),
                heads(self.project(&v_in, 2), s),
            )
        };

        let dtype = query.dtype();
        let mut masks = Vec::new();
        if let Some(m) = opts.key_padding_mask {
            let want: &[usize] = if batched { &[n, s] } else { &[s] };
            assert!(
                m.dims() == want,
                "{op}: key_padding_mask must be {want:?} ([N, S], or [S] unbatched), got {}",
                m.shape()
            );
            masks.push(to_mask(&m.reshape([n, 1, 1, s]), true, dtype));
        }
        if let Some(m) = opts.attn_mask {
            let m4 = if m.dims() == [l, s] {
                m.clone()
            } else if m.dims() == [n * h, l, s] {
                m.reshape([n, h, l, s])
            } else {
                panic!(
                    "{op}: attn_mask must be [L, S] = [{l}, {s}] or [N·num_heads, L, S] = [{}, {l}, {s}], got {}",
                    n * h,
                    m.shape()
                )
            };
            masks.push(to_mask(&m4, true, dtype));
        }

        let train = self.training.is_training() && self.dropout > 0.0;
        let mut rng = self.rng.lock();
        let dropout = train.then_some((self.dropout, &mut *rng));
        let (out, weights) = if opts.need_weights {
            let (out, weights) = attention_core(&q, &k, &v, &masks, opts.is_causal, dropout);
            (out, Some(weights))
        } else {
            let out = attention_output(&q, &k, &v, &masks, opts.is_causal, dropout);
            (out, None)
        };
        drop(rng);
        // [N, H, L, D] -> input layout [.., E].
        let merged = if self.batch_first || !batched {
            out.permute(&[0, 2, 1, 3]).reshape([n, l, e])
        } else {
            out.permute(&[2, 0, 1, 3]).reshape([l, n, e])
        };
        let mut y = self.out_proj.forward(&merged);
        if !batched {
            y = y.squeeze(0);
        }
        let weights = weights.map(|weights| {
            let w = if opts.average_attn_weights {
                weights.mean(1, false)
            } else {
                weights
            };
            if batched {
                w
            } else {
                w.squeeze(0)
            }
        });
        (y, weights)
    }
}

impl Forward for MultiheadAttention {
    /// Self-attention of `x` without masks; the output only.
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_qkv(x, x, x, MhaOptions::default().need_weights(false))
            .0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::ModuleExt;
    use kiln_core::gradcheck::randn_f64;
    use kiln_core::{gradcheck, DType};

    /// Attention of one `[l, e]` query block over `[s, e]` keys and `[s, ev]` values in plain
    /// f64; `bias[i][j]` is added to the scores (`-inf` masks out); fully masked rows give 0.
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dims: (usize, usize, usize, usize),
        bias: &dyn Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let (l, s, e, ev) = dims;
        let mut out = vec![0.0; l * ev];
        for i in 0..l {
            let sc: Vec<f64> = (0..s)
                .map(|j| {
                    let dot: f64 = (0..e).map(|c| q[i * e + c] * k[j * e + c]).sum();
                    dot / (e as f64).sqrt() + bias(i, j)
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                continue;
            }
            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
            for j in 0..s {
                let w = (sc[j] - m).exp() / z;
                for c in 0..ev {
                    out[i * ev + c] += w * v[j * ev + c];
                }
            }
        }
        out
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= tol, "element {i}: {a} vs {b}");
        }
    }

    fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, m: Option<&Tensor>, causal: bool) -> Tensor {
        scaled_dot_product_attention(q, k, v, m, causal, 0.0, false, &mut Rng::new(0))
    }

    #[test]
    fn sdpa_matches_a_plain_reference_with_each_mask_kind() {
        let (l, s, e, ev) = (3, 4, 5, 2);
        let q = randn_f64(&[l, e], 1);
        let k = randn_f64(&[s, e], 2);
        let v = randn_f64(&[s, ev], 3);
        let (qv, kv, vv) = (q.to_vec::<f64>(), k.to_vec::<f64>(), v.to_vec::<f64>());
        let dims = (l, s, e, ev);
        let ninf = f64::NEG_INFINITY;

        let plain = naive(&qv, &kv, &vv, dims, &|_, _| 0.0);
        assert_close(
            &sdpa(&q, &k, &v, None, false).to_vec::<f64>(),
            &plain,
            1e-12,
        );

        let causal = naive(&qv, &kv, &vv, dims, &|i, j| if j > i { ninf } else { 0.0 });
        assert_close(
            &sdpa(&q, &k, &v, None, true).to_vec::<f64>(),
            &causal,
            1e-12,
        );

        // Boolean: true = takes part (PyTorch's SDPA convention).
        let keep = [1u32, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1];
        let bm = Tensor::from_slice(&keep, [l, s]);
        let want = naive(&qv, &kv, &vv, dims, &|i, j| {
            if keep[i * s + j] != 0 {
                0.0
            } else {
                ninf
            }
        });
        assert_close(
            &sdpa(&q, &k, &v, Some(&bm), false).to_vec::<f64>(),
            &want,
            1e-12,
        );

        // Additive float mask, broadcast over rows ([S]).
        let add = [0.5, -1.0, ninf, 2.0];
        let fm = Tensor::from_slice(&add, [s]);
        let want = naive(&qv, &kv, &vv, dims, &|_, j| add[j]);
        assert_close(
            &sdpa(&q, &k, &v, Some(&fm), false).to_vec::<f64>(),
            &want,
            1e-12,
        );
        // An f32 additive mask is converted to the inputs' dtype.
        let fm32 = fm.to_dtype(DType::F32);
        assert_close(
            &sdpa(&q, &k, &v, Some(&fm32), false).to_vec::<f64>(),
            &want,
            1e-12,
        );

        // Batch dims broadcast: a [2, 1, l, e] query against [3, s, e] keys.
        let qb = randn_f64(&[2, 1, l, e], 4);
        let kb = randn_f64(&[3, s, e], 5);
        let vb = randn_f64(&[3, s, ev], 6);
        let out = sdpa(&qb, &kb, &vb, None, false);
        assert_eq!(out.dims(), &[2, 3, l, ev]);
        let want = naive(
            &qb.narrow(0, 1, 1).to_vec::<f64>(),
            &kb.narrow(0, 2, 1).to_vec::<f64>(),
            &vb.narrow(0, 2, 1).to_vec::<f64>(),
            dims,
            &|_, _| 0.0,
        );
        assert_close(
            &out.narrow(0, 1, 1).narrow(1, 2, 1).to_vec::<f64>(),
            &want,
            1e-12,
        );
    }

    #[test]
    fn sdpa_fully_masked_rows_give_zeros_and_zero_gradients() {
        let q = randn_f64(&[2, 3, 4], 1).requires_grad();
        let k = randn_f64(&[2, 3, 4], 2).requires_grad();
        let v = randn_f64(&[2, 3, 4], 3).requires_grad();
        // Row 1 of every batch sees no key.
        let keep = Tensor::from_slice(&[1u32, 1, 0, 0, 0, 0, 0, 1, 1], [3, 3]);
        let out = sdpa(&q, &k, &v, Some(&keep), false);
        let vals = out.to_vec::<f64>();
        assert!(vals.iter().all(|x| x.is_finite()));
        for b in 0..2 {
            assert!(vals[b * 12 + 4..b * 12 + 8].iter().all(|&x| x == 0.0));
        }
        out.sum_all().backward();
        let gq = q.grad().unwrap().to_vec::<f64>();
        assert!(gq.iter().all(|x| x.is_finite()));
        assert!(gq[4..8].iter().all(|&x| x == 0.0));
        assert!(k
            .grad()
            .unwrap()
            .to_vec::<f64>()
            .iter()
            .all(|x| x.is_finite()));
        // A float mask of -inf does the same.
        let fm = Tensor::from_slice(&[f64::NEG_INFINITY; 3], [3]);
        assert!(sdpa(&q, &k, &v, Some(&fm), false)
            .to_vec::<f64>()
            .iter()
            .all(|&x| x == 0.0));
    }

    #[test]
    fn sdpa_gradcheck_with_masks_causal_and_strided_inputs() {
        let q = randn_f64(&[2, 3, 4], 1).requires_grad();
        let k = randn_f64(&[2, 5, 4], 2).requires_grad();
        let v = randn_f64(&[2, 5, 3], 3).requires_grad();
        let inputs = [q, k, v];
        gradcheck(|x| sdpa(&x[0], &x[1], &x[2], None, false), &inputs).unwrap();
        gradcheck(|x| sdpa(&x[0], &x[1], &x[2], None, true), &inputs).unwrap();
        let keep = Tensor::from_slice(&[1u32, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0], [3, 5]);
        gradcheck(|x| sdpa(&x[0], &x[1], &x[2], Some(&keep), false), &inputs).unwrap();
        let fm = randn_f64(&[2, 1, 5], 4);
        gradcheck(|x| sdpa(&x[0], &x[1], &x[2], Some(&fm), false), &inputs).unwrap();
        // Non-contiguous query and key: transposed views of [2, E, L] / [2, E, S] leaves.
        let qt = randn_f64(&[2, 4, 3], 5).requires_grad();
        let kt = randn_f64(&[2, 4, 5], 6).requires_grad();
        let v = randn_f64(&[2, 5, 3], 7).requires_grad();
        gradcheck(
            |x| {
                sdpa(
                    &x[0].transpose(1, 2),
                    &x[1].transpose(1, 2),
                    &x[2],
                    None,
                    true,
                )
            },
            &[qt, kt, v],
        )
        .unwrap();
    }

    #[test]
    fn sdpa_dropout_only_in_training() {
        let q = randn_f64(&[3, 4], 1);
        let mut rng = Rng::new(5);
        let eval = scaled_dot_product_attention(&q, &q, &q, None, false, 0.5, false, &mut rng);
        assert_eq!(
            eval.to_vec::<f64>(),
            sdpa(&q, &q, &q, None, false).to_vec::<f64>()
        );
        let all = scaled_dot_product_attention(&q, &q, &q, None, false, 1.0, true, &mut rng);
        assert!(all.to_vec::<f64>().iter().all(|&x| x == 0.0));
        let some = scaled_dot_product_attention(&q, &q, &q, None, false, 0.5, true, &mut rng);
        assert_ne!(some.to_vec::<f64>(), eval.to_vec::<f64>());
    }

    #[test]
    #[should_panic(
        expected = "scaled_dot_product_attention: query [.., L, E], key [.., S, E] and value [.., S, Ev] do not fit: got [3, 4], [5, 3], [5, 2]"
    )]
    fn sdpa_shape_mismatch_panics() {
        let (q, k, v) = (
            Tensor::zeros([3, 4]),
            Tensor::zeros([5, 3]),
            Tensor::zeros([5, 2]),
        );
        sdpa(&q, &k, &v, None, false);
    }

    #[test]
    #[should_panic(
        expected = "scaled_dot_product_attention: attn_mask of shape [4, 4] does not broadcast to the scores"
    )]
    fn sdpa_mask_shape_mismatch_panics() {
        let q = Tensor::zeros([3, 4]);
        sdpa(&q, &q, &q, Some(&Tensor::zeros([4, 4])), false);
    }

    #[test]
    #[should_panic(
        expected = "scaled_dot_product_attention: attn_mask and is_causal cannot both be set"
    )]
    fn sdpa_mask_and_causal_panics() {
        let q = Tensor::zeros([3, 4]);
        sdpa(&q, &q, &q, Some(&Tensor::zeros([3, 3])), true);
    }

    /// An f64 layer with random (non-zero) weights and biases everywhere.
    fn mha_f64(e: usize, config: MhaConfig, seed: u64) -> MultiheadAttention {
        let m = MultiheadAttention::with_config(e, config, &mut Rng::new(seed));
        let mut sd = crate::StateDict::new();
        for (i, (name, p)) in m.named_parameters().into_iter().enumerate() {
            sd.insert(
                name,
                randn_f64(p.dims(), seed + 10 + i as u64).mul_scalar(0.5),
            );
        }
        // Loading converts to the module's dtype: swap in f64 parameters instead.
        let mut m64 = m.clone();
        let f64p =
            |p: &Option<Param>, n: &str| p.as_ref().map(|_| Param::new(sd.get(n).unwrap().clone()));
        m64.in_proj_weight = f64p(&m.in_proj_weight, "in_proj_weight");
        m64.q_proj_weight = f64p(&m.q_proj_weight, "q_proj_weight");
        m64.k_proj_weight = f64p(&m.k_proj_weight, "k_proj_weight");
        m64.v_proj_weight = f64p(&m.v_proj_weight, "v_proj_weight");
        m64.in_proj_bias = f64p(&m.in_proj_bias, "in_proj_bias");
        m64.out_proj = Linear::from_weights(
            sd.get("out_proj.weight").unwrap().clone(),
            sd.get("out_proj.bias").cloned(),
        );
        m64
    }

    #[test]
    fn names_shapes_and_init_follow_pytorch() {
        let mut rng = Rng::new(0);
        let m = MultiheadAttention::new(8, 2, &mut rng);
        let shapes: Vec<(String, Vec<usize>)> = m
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.dims().to_vec()))
            .collect();
        let want = |v: &[(&str, Vec<usize>)]| -> Vec<(String, Vec<usize>)> {
            v.iter().map(|(n, s)| (n.to_string(), s.clone())).collect()
        };
        assert_eq!(
            shapes,
            want(&[
                ("in_proj_weight", vec![24, 8]),
                ("in_proj_bias", vec![24]),
                ("out_proj.weight", vec![8, 8]),
                ("out_proj.bias", vec![8]),
            ])
        );
        // Xavier uniform bound √(6 / (8 + 24)); zero biases.
        let bound = (6.0f64 / 32.0).sqrt();
        let w = m.in_proj_weight.as_ref().unwrap().to_f64_vec();
        assert!(w.iter().all(|x| x.abs() <= bound));
        assert!(w.iter().any(|x| x.abs() > 0.6 * bound));
        assert!(m
            .in_proj_bias
            .as_ref()
            .unwrap()
            .to_f64_vec()
            .iter()
            .all(|&x| x == 0.0));
        assert!(m
            .out_proj
            .bias
            .as_ref()
            .unwrap()
            .to_f64_vec()
            .iter()
            .all(|&x| x == 0.0));
        assert!(m
            .out_proj
            .weight
            .to_f64_vec()
            .iter()
            .all(|x| x.abs() <= 1.0 / 8f64.sqrt()));

        let sep = MultiheadAttention::with_config(
            8,
            MhaConfig::new(4).kdim(6).vdim(3).bias(false),
            &mut rng,
        );
        let shapes: Vec<(String, Vec<usize>)> = sep
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.dims().to_vec()))
            .collect();
        assert_eq!(
            shapes,
            want(&[
                ("q_proj_weight", vec![8, 8]),
                ("k_proj_weight", vec![8, 6]),
                ("v_proj_weight", vec![8, 3]),
                ("out_proj.weight", vec![8, 8]),
            ])
        );
        let (y, w) = sep.forward_qkv(
            &Tensor::ones([2, 5, 8]),
            &Tensor::ones([2, 7, 6]),
            &Tensor::ones([2, 7, 3]),
            MhaOptions::default().average_attn_weights(false),
        );
        assert_eq!(
            (y.dims(), w.unwrap().dims()),
            (&[2usize, 5, 8][..], &[2usize, 4, 5, 7][..])
        );
    }

    /// Self-attention under fixed options, for `gradcheck_module`.
    #[derive(Module)]
    struct WithOpts {
        mha: MultiheadAttention,
        #[module(skip)]
        kpm: Option<Tensor>,
        #[module(skip)]
        mask: Option<Tensor>,
        #[module(skip)]
        causal: bool,
        #[module(skip)]
        weights_too: bool,
    }

    impl Forward for WithOpts {
        fn forward(&self, x: &Tensor) -> Tensor {
            let opts = MhaOptions {
                key_padding_mask: self.kpm.as_ref(),
                attn_mask: self.mask.as_ref(),
                is_causal: self.causal,
                need_weights: self.weights_too,
                average_attn_weights: true,
            };
            let (y, w) = self.mha.forward_qkv(x, x, x, opts);
            match w {
                // Put the weights in the checked output too: [N, L, E + S].
                Some(w) => Tensor::cat(&[y, w], -1),
                None => y,
            }
        }
    }

    fn with_opts(
        mha: MultiheadAttention,
        kpm: Option<Tensor>,
        mask: Option<Tensor>,
        causal: bool,
    ) -> WithOpts {
        WithOpts {
            mha,
            kpm,
            mask,
            causal,
            weights_too: true,
        }
    }

    #[test]
    fn gradcheck_self_attention_params_and_input() {
        let m = mha_f64(4, MhaConfig::new(2), 1);
        assert_eq!(m.in_proj_weight.as_ref().unwrap().dtype(), DType::F64);
        let x = randn_f64(&[2, 3, 4], 2).requires_grad();
        gradcheck_module(&m, &x).unwrap();
        // Non-contiguous input: a transposed view.
        let xt = randn_f64(&[3, 2, 4], 3).requires_grad();
        let wrapped = with_opts(m.clone(), None, None, false);
        let xt_view = xt.transpose(0, 1);
        gradcheck(|xs| wrapped.forward(&xs[0].transpose(0, 1)), &[xt]).unwrap();
        assert!(!xt_view.is_contiguous());
        // Sequence-first layout, unbatched input.
        let mut sf = m.clone();
        sf.batch_first = false;
        gradcheck_module(&sf, &x).unwrap();
        gradcheck_module(&m, &randn_f64(&[3, 4], 4).requires_grad()).unwrap();
    }

    #[test]
    fn gradcheck_with_masks_and_causal() {
        let m = mha_f64(4, MhaConfig::new(2), 5);
        let x = randn_f64(&[2, 3, 4], 6).requires_grad();
        let kpm = Tensor::from_slice(&[0u32, 0, 1, 0, 1, 0], [2, 3]);
        gradcheck_module(&with_opts(m.clone(), Some(kpm.clone()), None, false), &x).unwrap();
        gradcheck_module(&with_opts(m.clone(), None, None, true), &x).unwrap();
        let fm = randn_f64(&[3, 3], 7);
        gradcheck_module(
            &with_opts(m.clone(), Some(kpm.clone()), Some(fm), false),
            &x,
        )
        .unwrap();
        // Per-head boolean mask [N·H, L, S] with causal on top.
        let hm = Tensor::from_vec(
            (0..36).map(|i| u32::from(i % 5 == 0)).collect::<Vec<_>>(),
            [4, 3, 3],
        );
        gradcheck_module(&with_opts(m, Some(kpm), Some(hm), true), &x).unwrap();
    }

    #[test]
    fn gradcheck_kdim_vdim_and_key_value_inputs() {
        let m = mha_f64(4, MhaConfig::new(2).kdim(3).vdim(5).batch_first(false), 8);
        // [L, N, E], [S, N, kdim], [S, N, vdim].
        let q = randn_f64(&[3, 2, 4], 9).requires_grad();
        let k = randn_f64(&[4, 2, 3], 10).requires_grad();
        let v = randn_f64(&[4, 2, 5], 11).requires_grad();
        let kpm = Tensor::from_slice(&[0u32, 1, 0, 0, 0, 0, 1, 1], [2, 4]);
        let run = |x: &[Tensor]| {
            let (y, w) = m.forward_qkv(
                &x[0],
                &x[1],
                &x[2],
                MhaOptions::default().key_padding_mask(&kpm),
            );
            Tensor::cat(&[y.reshape([6, 4]), w.unwrap().reshape([6, 4])], -1)
        };
        gradcheck(run, &[q.clone(), k.clone(), v.clone()]).unwrap();

        /// Cross-attention with fixed key and value, for the parameter gradcheck.
        #[derive(Module)]
        struct Cross {
            mha: MultiheadAttention,
            #[module(skip)]
            kv: (Tensor, Tensor),
        }
        impl Forward for Cross {
            fn forward(&self, x: &Tensor) -> Tensor {
                self.mha
                    .forward_qkv(
                        x,
                        &self.kv.0,
                        &self.kv.1,
                        MhaOptions::default().is_causal(true),
                    )
                    .0
            }
        }
        let cross = Cross {
            mha: m,
            kv: (k.detach(), v.detach()),
        };
        gradcheck_module(&cross, &q).unwrap();
    }

    #[test]
    fn layouts_agree_and_packed_equals_split_projection() {
        let m = mha_f64(6, MhaConfig::new(3), 12);
        let x = randn_f64(&[2, 4, 6], 13);
        let (y, w) = m.forward_qkv(&x, &x, &x, MhaOptions::default());
        // The same input through separate handles takes the three-product path.
        let (y2, _) = m.forward_qkv(&x, &x.detach(), &x.detach(), MhaOptions::default());
        assert_close(&y.to_vec::<f64>(), &y2.to_vec::<f64>(), 1e-12);
        // Sequence-first gives the transposed result.
        let mut sf = m.clone();
        sf.batch_first = false;
        let xt = x.transpose(0, 1).contiguous();
        let (yt, wt) = sf.forward_qkv(&xt, &xt, &xt, MhaOptions::default());
        assert_close(
            &yt.transpose(0, 1).to_vec::<f64>(),
            &y.to_vec::<f64>(),
            1e-12,
        );
        assert_close(
            &wt.unwrap().to_vec::<f64>(),
            &w.clone().unwrap().to_vec::<f64>(),
            1e-12,
        );
        // Unbatched equals batch 1.
        let x0 = x.narrow(0, 1, 1).squeeze(0);
        let (y0, w0) = m.forward_qkv(&x0, &x0, &x0, MhaOptions::default());
        assert_close(
            &y0.to_vec::<f64>(),
            &y.narrow(0, 1, 1).to_vec::<f64>(),
            1e-12,
        );
        assert_close(
            &w0.unwrap().to_vec::<f64>(),
            &w.unwrap().narrow(0, 1, 1).to_vec::<f64>(),
            1e-12,
        );
        // A boolean causal attn_mask equals is_causal.
        let causal = causal_block(4, 4);
        let (yc, _) = m.forward_qkv(&x, &x, &x, MhaOptions::default().is_causal(true));
        let (ym, _) = m.forward_qkv(&x, &x, &x, MhaOptions::default().attn_mask(&causal));
        assert_close(&yc.to_vec::<f64>(), &ym.to_vec::<f64>(), 1e-12);
    }

    #[test]
    fn fully_masked_sequence_outputs_the_out_proj_bias() {
        let m = mha_f64(4, MhaConfig::new(2), 14);
        let x = randn_f64(&[2, 3, 4], 15).requires_grad();
        let kpm = Tensor::from_slice(&[0u32, 1, 0, 1, 1, 1], [2, 3]);
        let (y, w) = m.forward_qkv(&x, &x, &x, MhaOptions::default().key_padding_mask(&kpm));
        let bias = m.out_proj.bias.as_ref().unwrap().to_vec::<f64>();
        let y1 = y.narrow(0, 1, 1).to_vec::<f64>();
        for r in 0..3 {
            assert_close(&y1[r * 4..r * 4 + 4], &bias, 1e-15);
        }
        assert!(w
            .unwrap()
            .narrow(0, 1, 1)
            .to_vec::<f64>()
            .iter()
            .all(|&v| v == 0.0));
        y.sum_all().backward();
        let g = x.grad().unwrap().to_vec::<f64>();
        assert!(g.iter().all(|v| v.is_finite()));
        assert!(g[12..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn dropout_applies_only_in_training() {
        let m =
            MultiheadAttention::with_config(4, MhaConfig::new(2).dropout(0.5), &mut Rng::new(3));
        let x = Tensor::randn([2, 5, 4], 4);
        let a = m.forward(&x).to_vec::<f32>();
        let b = m.forward(&x).to_vec::<f32>();
        assert_ne!(a, b);
        m.eval();
        assert!(!m.is_training());
        assert_eq!(m.forward(&x).to_vec::<f32>(), m.forward(&x).to_vec::<f32>());
    }

    #[test]
    #[should_panic(expected = "MultiheadAttention: embed_dim 6 must be divisible by num_heads 4")]
    fn heads_must_divide_embed_dim() {
        MultiheadAttention::new(6, 4, &mut Rng::new(0));
    }

    #[test]
    #[should_panic(
        expected = "MultiheadAttention: key_padding_mask must be [2, 3] ([N, S], or [S] unbatched), got [3, 2]"
    )]
    fn key_padding_mask_shape_is_checked() {
        let m = MultiheadAttention::new(4, 2, &mut Rng::new(0));
        let x = Tensor::zeros([2, 3, 4]);
        m.forward_qkv(
            &x,
            &x,
            &x,
            MhaOptions::default().key_padding_mask(&Tensor::zeros([3, 2])),
        );
    }

    #[test]
    #[should_panic(
        expected = "MultiheadAttention: attn_mask must be [L, S] = [3, 3] or [N·num_heads, L, S] = [4, 3, 3], got [2, 3, 3]"
    )]
    fn attn_mask_shape_is_checked() {
        let m = MultiheadAttention::new(4, 2, &mut Rng::new(0));
        let x = Tensor::zeros([2, 3, 4]);
        m.forward_qkv(
            &x,
            &x,
            &x,
            MhaOptions::default().attn_mask(&Tensor::zeros([2, 3, 3])),
        );
    }

    #[test]
    #[should_panic(
        expected = "MultiheadAttention: expected feature sizes (query 4, key 4, value 4), got shapes [2, 3, 5]"
    )]
    fn feature_size_is_checked() {
        let m = MultiheadAttention::new(4, 2, &mut Rng::new(0));
        m.forward(&Tensor::zeros([2, 3, 5]));
    }
}
