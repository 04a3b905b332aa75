//! Recurrent layers `Rnn` (tanh/relu), `Lstm` and `Gru`, with `torch.nn.RNN/LSTM/GRU`'s
//! parameter names (`weight_ih_l{k}[_reverse]`, `weight_hh_l{k}`, `bias_ih_l{k}`,
//! `bias_hh_l{k}`), shapes, gate order (LSTM `i, f, g, o`; GRU `r, z, n` with
//! `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`) and init (`U(±1/√hidden)` for all).
//!
//! Each layer/direction projects the whole sequence with ONE matmul (`x·W_ihᵀ + b`), then each
//! time step only multiplies the hidden state by `W_hhᵀ`. The gate nonlinearities and the state
//! update run as one fused kernel per step (`kiln_core::ops::rnn_cell`). Step outputs are
//! collected and stacked once per layer/direction.
//!
//! Unlike PyTorch, kiln's default is `batch_first: true` (inputs `[batch, seq, features]`);
//! `batch_first: false` (`[seq, batch, features]`) and unbatched `[seq, features]` inputs are
//! supported.

use crate::{init, Forward, Module, Param, RandomState, TrainFlag, Visitor};
use kiln_core::ops::rnn_cell::{gru_cell, lstm_cell};
use kiln_core::{Rng, Tensor};

/// The nonlinearity of a plain [`Rnn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RnnNonlinearity {
    /// `tanh` (PyTorch's default).
    Tanh,
    /// `relu`.
    Relu,
}

/// Options of [`Rnn`], [`Lstm`] and [`Gru`] (`with_config`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RnnConfig {
    /// Number of stacked recurrent layers (default 1).
    pub num_layers: usize,
    /// Whether the layers have `bias_ih`/`bias_hh` (default true).
    pub bias: bool,
    /// Inputs and outputs are `[batch, seq, features]` (default **true**, unlike PyTorch);
    /// false means `[seq, batch, features]`. States are always `[layers·dirs, batch, hidden]`.
    pub batch_first: bool,
    /// Dropout probability on the outputs of each layer but the last, in training mode only
    /// (default 0).
    pub dropout: f64,
    /// Run a second, time-reversed direction per layer and concatenate (default false).
    pub bidirectional: bool,
    /// The nonlinearity of a plain [`Rnn`] (default tanh; ignored by LSTM and GRU).
    pub nonlinearity: RnnNonlinearity,
}

impl Default for RnnConfig {
    fn default() -> Self {
        RnnConfig {
            num_layers: 1,
            bias: true,
            batch_first: true,
            dropout: 0.0,
            bidirectional: false,
            nonlinearity: RnnNonlinearity::Tanh,
        }
    }
}

impl RnnConfig {
    /// Sets the number of stacked layers.
    pub fn num_layers(mut self, n: usize) -> Self {
        self.num_layers = n;
        self
    }

    /// Sets whether the layers have biases.
    pub fn bias(mut self, on: bool) -> Self {
        self.bias = on;
        self
    }

    /// Sets whether inputs/outputs are batch-major.
    pub fn batch_first(mut self, on: bool) -> Self {
        self.batch_first = on;
        self
    }

    /// Sets the dropout probability between layers.
    pub fn dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// Sets whether the layers are bidirectional.
    pub fn bidirectional(mut self, on: bool) -> Self {
        self.bidirectional = on;
        self
    }

    /// Sets the plain RNN's nonlinearity.
    pub fn nonlinearity(mut self, nl: RnnNonlinearity) -> Self {
        self.nonlinearity = nl;
        self
    }

    fn directions(&self) -> usize {
        if self.bidirectional {
            2
        } else {
            1
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rnn(RnnNonlinearity),
    Lstm,
    Gru,
}

impl Kind {
    fn gates(self) -> usize {
        match self {
            Kind::Rnn(_) => 1,
            Kind::Lstm => 4,
            Kind::Gru => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Rnn(_) => "RNN",
            Kind::Lstm => "LSTM",
            Kind::Gru => "GRU",
        }
    }
}

/// The parameters of one layer and direction.
#[derive(Debug, Clone)]
struct Cell {
    w_ih: Param,
    w_hh: Param,
    b_ih: Option<Param>,
    b_hh: Option<Param>,
}

/// What the three layer types share: parameters of every layer/direction and the unrolled loop.
#[derive(Debug)]
struct Core {
    kind: Kind,
    input_size: usize,
    hidden_size: usize,
    config: RnnConfig,
    /// Index `layer · directions + direction`.
    cells: Vec<Cell>,
    training: TrainFlag,
    rng: RandomState,
}

impl Clone for Core {
    fn clone(&self) -> Self {
        Core {
            kind: self.kind,
            input_size: self.input_size,
            hidden_size: self.hidden_size,
            config: self.config,
            cells: self.cells.clone(),
            training: self.training.clone(),
            rng: self.rng.clone(),
        }
    }
}

/// `(shape of weight_ih, shape of weight_hh, bias length)` for each cell, in order.
fn cell_shapes(kind: Kind, input: usize, hidden: usize, c: &RnnConfig) -> Vec<[Vec<usize>; 2]> {
    let g = kind.gates() * hidden;
    let d = c.directions();
    (0..c.num_layers * d)
        .map(|i| {
            let inp = if i < d { input } else { hidden * d };
            [vec![g, inp], vec![g, hidden]]
        })
        .collect()
}

impl Core {
    fn check_config(kind: Kind, hidden: usize, c: &RnnConfig) {
        let name = kind.name();
        assert!(
            hidden > 0 && c.num_layers > 0,
            "{name}: hidden_size and num_layers must be positive, got {hidden} and {}",
            c.num_layers
        );
        assert!(
            (0.0..=1.0).contains(&c.dropout),
            "{name}: dropout must be in [0, 1], got {}",
            c.dropout
        );
    }

    fn new(kind: Kind, input: usize, hidden: usize, config: RnnConfig, rng: &mut Rng) -> Self {
        Self::check_config(kind, hidden, &config);
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut draw = |shape: &[usize]| {
            let t = Tensor::zeros(shape);
            init::uniform_(&t, -bound, bound, rng);
            Param::new(t)
        };
        let cells = cell_shapes(kind, input, hidden, &config)
            .into_iter()
            .map(|[ih, hh]| {
                // PyTorch's order: weight_ih, weight_hh, bias_ih, bias_hh.
                let w_ih = draw(&ih);
                let w_hh = draw(&hh);
                let b_ih = config.bias.then(|| draw(&ih[..1]));
                let b_hh = config.bias.then(|| draw(&hh[..1]));
                Cell {
                    w_ih,
                    w_hh,
                    b_ih,
                    b_hh,
                }
            })
            .collect();
        let seed = rng.next_u64();
        Core {
            kind,
            input_size: input,
            hidden_size: hidden,
            config,
            cells,
            training: TrainFlag::default(),
            rng: RandomState::new(seed),
        }
    }

    fn from_weights(
        kind: Kind,
        input: usize,
        hidden: usize,
        config: RnnConfig,
        weights: Vec<Tensor>,
    ) -> Self {
        Self::check_config(kind, hidden, &config);
        let name = kind.name();
        let shapes = cell_shapes(kind, input, hidden, &config);
        let per = if config.bias { 4 } else { 2 };
        assert_eq!(
            weights.len(),
            shapes.len() * per,
            "{name}: from_weights expects {} tensors (weight_ih, weight_hh{} per layer and direction), got {}",
            shapes.len() * per,
            if config.bias { ", bias_ih, bias_hh" } else { "" },
            weights.len()
        );
        let dtype = weights[0].dtype();
        let mut it = weights.into_iter();
        let mut take = |want: &[usize]| {
            let t = it.next().expect("counted above");
            assert!(
                t.dims() == want && t.dtype() == dtype,
                "{name}: from_weights got a {} {} tensor where {want:?} {dtype} was expected",
                t.shape(),
                t.dtype()
            );
            Param::new(t)
        };
        let cells = shapes
            .iter()
            .map(|[ih, hh]| {
                let w_ih = take(ih);
                let w_hh = take(hh);
                let b_ih = config.bias.then(|| take(&ih[..1]));
                let b_hh = config.bias.then(|| take(&hh[..1]));
                Cell {
                    w_ih,
                    w_hh,
                    b_ih,
                    b_hh,
                }
            })
            .collect();
        Core {
            kind,
            input_size: input,
            hidden_size: hidden,
            config,
            cells,
            training: TrainFlag::default(),
            rng: RandomState::new(0x5eed_4e4e),
        }
    }

    fn visit(&self, v: &mut Visitor) {
        let d = self.config.directions();
        for (i, c) in self.cells.iter().enumerate() {
            let sfx = format!("_l{}{}", i / d, if i % d == 1 { "_reverse" } else { "" });
            v.param(&format!("weight_ih{sfx}"), &c.w_ih);
            v.param(&format!("weight_hh{sfx}"), &c.w_hh);
            if let Some(b) = &c.b_ih {
                v.param(&format!("bias_ih{sfx}"), b);
            }
            if let Some(b) = &c.b_hh {
                v.param(&format!("bias_hh{sfx}"), b);
            }
        }
        v.flag(&self.training);
        v.rng(&self.rng);
    }

    /// Checks an initial state against `[layers·dirs, batch, hidden]` (or `[layers·dirs,
    /// hidden]` for unbatched input) and returns it with a batch dim.
    fn state(
        &self,
        s: Option<&Tensor>,
        what: &str,
        x: &Tensor,
        batch: usize,
        unbatched: bool,
    ) -> Tensor {
        let ld = self.config.num_layers * self.config.directions();
        let h = self.hidden_size;
        match s {
            None => Tensor::zeros_dtype([ld, batch, h], x.dtype()),
            Some(s) => {
                let want: Vec<usize> = if unbatched {
                    vec![ld, h]
                } else {
                    vec![ld, batch, h]
                };
                assert!(
                    s.dims() == want.as_slice() && s.dtype() == x.dtype(),
                    "{}: {what} must be {want:?} {} for input {}, got {} {}",
                    self.kind.name(),
                    x.dtype(),
                    x.shape(),
                    s.shape(),
                    s.dtype()
                );
                if unbatched {
                    s.unsqueeze(1)
                } else {
                    s.clone()
                }
            }
        }
    }

    /// Runs all layers: `(output, h_n, c_n)` (`c_n` for LSTM only).
    fn run(
        &self,
        x: &Tensor,
        h0: Option<&Tensor>,
        c0: Option<&Tensor>,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        let name = self.kind.name();
        let layout = if self.config.batch_first {
            "[batch, seq, input_size]"
        } else {
            "[seq, batch, input_size]"
        };
        assert!(
            (x.rank() == 2 || x.rank() == 3) && x.dims()[x.rank() - 1] == self.input_size,
            "{name}: input must be {layout} or [seq, input_size] with input_size {}, got {}",
            self.input_size,
            x.shape()
        );
        let p0 = self.cells[0].w_ih.dtype();
        assert!(
            x.dtype() == p0,
            "{name}: input dtype {} differs from the parameters' {p0}",
            x.dtype()
        );
        let unbatched = x.rank() == 2;
        // Time dim of the (batched) input; outputs keep the input's layout.
        let (x, td) = if unbatched {
            (x.unsqueeze(1), 0)
        } else if self.config.batch_first {
            (x.clone(), 1)
        } else {
            (x.clone(), 0)
        };
        let seq = x.dims()[td];
        let batch = x.dims()[1 - td];
        assert!(seq > 0, "{name}: input {} has an empty sequence", x.shape());
        let h0 = self.state(h0, "h0", &x, batch, unbatched);
        let c0 = (self.kind == Kind::Lstm).then(|| self.state(c0, "c0", &x, batch, unbatched));

        let d = self.config.directions();
        let (mut hn, mut cn) = (Vec::new(), Vec::new());
        let mut input = x;
        for layer in 0..self.config.num_layers {
            let mut outs = Vec::with_capacity(d);
            for dir in 0..d {
                let idx = layer * d + dir;
                let h = h0.narrow(0, idx, 1).squeeze(0);
                let c = c0.as_ref().map(|c| c.narrow(0, idx, 1).squeeze(0));
                let (out, h, c) = self.direction(&self.cells[idx], &input, td, dir == 1, h, c);
                outs.push(out);
                hn.push(h);
                cn.extend(c);
            }
            let mut out = if d == 1 {
                outs.pop().unwrap()
            } else {
                Tensor::cat(&outs, 2)
            };
            let p = self.config.dropout;
            if p > 0.0 && layer + 1 < self.config.num_layers && self.training.is_training() {
                out = out.dropout(p, true, &mut self.rng.lock());
            }
            input = out;
        }
        let mut hn = Tensor::stack(&hn, 0);
        let mut cn = (!cn.is_empty()).then(|| Tensor::stack(&cn, 0));
        if unbatched {
            input = input.squeeze(1);
            hn = hn.squeeze(1);
            cn = cn.map(|c| c.squeeze(1));
        }
        (input, hn, cn)
    }

    /// One layer in one direction over the whole sequence: `(outputs, h_last, c_last)`.
    fn direction(
        &self,
        cell: &Cell,
        input: &Tensor,
        td: usize,
        reverse: bool,
        mut h: Tensor,
        mut c: Option<Tensor>,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        let seq = input.dims()[td];
        // One matmul for every time step's input projection; for RNN and LSTM both biases
        // are folded in here (GRU keeps b_hh per step: its n-gate needs `r ⊙ (W_hn h + b_hn)`).
        let mut proj = input.matmul(&cell.w_ih.t());
        match (&cell.b_ih, &cell.b_hh, self.kind) {
            (Some(bi), Some(_), Kind::Gru) => proj = proj.add(bi),
            (Some(bi), Some(bh), _) => proj = proj.add(&bi.add(bh)),
            _ => {}
        }
        let w_hh_t = cell.w_hh.t();
        let mut outs: Vec<Tensor> = Vec::with_capacity(seq);
        for s in 0..seq {
            let t = if reverse { seq - 1 - s } else { s };
            let xp = proj.narrow(td, t, 1).squeeze(td);
            let hg = h.matmul(&w_hh_t);
            match self.kind {
                Kind::Rnn(nl) => {
                    let pre = xp.add(&hg);
                    h = match nl {
                        RnnNonlinearity::Tanh => pre.tanh(),
                        RnnNonlinearity::Relu => pre.relu(),
                    };
                }
                Kind::Lstm => {
                    let cp = c.take().expect("LSTM cell state");
                    let state = lstm_cell(&xp, &hg, &cp);
                    h = state.narrow(0, 0, 1).squeeze(0);
                    c = Some(state.narrow(0, 1, 1).squeeze(0));
                }
                Kind::Gru => h = gru_cell(&xp, &hg, cell.b_hh.as_deref(), &h),
            }
            outs.push(h.clone());
        }
        if reverse {
            outs.reverse();
        }
        (Tensor::stack(&outs, td), h, c)
    }
}

macro_rules! recurrent_layer {
    ($ty:ident, $alias:ident, $torch:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $ty {
            core: Core,
        }

        #[doc = concat!("PyTorch's spelling of [`", stringify!($ty), "`].")]
        pub type $alias = $ty;

        impl Module for $ty {
            fn visit(&self, visitor: &mut Visitor) {
                self.core.visit(visitor)
            }
        }

        impl $ty {
            /// Number of input features.
            pub fn input_size(&self) -> usize {
                self.core.input_size
            }

            /// Number of hidden features (per direction).
            pub fn hidden_size(&self) -> usize {
                self.core.hidden_size
            }

            /// The layer's options.
            pub fn config(&self) -> &RnnConfig {
                &self.core.config
            }

            /// True in training mode (dropout between layers active).
            pub fn is_training(&self) -> bool {
                self.core.training.is_training()
            }
        }

        impl Forward for $ty {
            #[doc = concat!("The output sequence of `", $torch, "(x)` (zero initial state).")]
            fn forward(&self, x: &Tensor) -> Tensor {
                self.core.run(x, None, None).0
            }
        }
    };
}

recurrent_layer!(
    Rnn,
    RNN,
    "torch.nn.RNN",
    "`torch.nn.RNN`: `h' = act(W_ih x + b_ih + W_hh h + b_hh)` with tanh or relu, stacked and optionally bidirectional."
);
recurrent_layer!(
    Lstm,
    LSTM,
    "torch.nn.LSTM",
    "`torch.nn.LSTM`: gates `i, f, g, o` from `W_ih x + b_ih + W_hh h + b_hh`; `c' = f c + i g`, `h' = o tanh(c')`."
);
recurrent_layer!(
    Gru,
    GRU,
    "torch.nn.GRU",
    "`torch.nn.GRU`: gates `r, z, n` with `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`, `h' = (1 − z) n + z h`."
);

impl Rnn {
    /// One tanh layer with the default options, initialised like PyTorch (`U(±1/√hidden)`).
    pub fn new(input_size: usize, hidden_size: usize, rng: &mut Rng) -> Self {
        Self::with_config(input_size, hidden_size, RnnConfig::default(), rng)
    }

    /// A layer with the given options (nonlinearity from `config.nonlinearity`).
    pub fn with_config(
        input_size: usize,
        hidden_size: usize,
        config: RnnConfig,
        rng: &mut Rng,
    ) -> Self {
        let kind = Kind::Rnn(config.nonlinearity);
        Rnn {
            core: Core::new(kind, input_size, hidden_size, config, rng),
        }
    }

    /// A layer over given tensors in PyTorch's order: per layer and direction `weight_ih`
    /// `[hidden, in]`, `weight_hh` `[hidden, hidden]`, then `bias_ih`, `bias_hh` if `config.bias`.
    pub fn from_weights(
        input_size: usize,
        hidden_size: usize,
        config: RnnConfig,
        weights: Vec<Tensor>,
    ) -> Self {
        let kind = Kind::Rnn(config.nonlinearity);
        Rnn {
            core: Core::from_weights(kind, input_size, hidden_size, config, weights),
        }
    }

    /// `(output, h_n)` from an optional initial state `h0` `[layers·dirs, batch, hidden]`
    /// (`[layers·dirs, hidden]` for unbatched input; zeros when `None`).
    pub fn forward_with_state(&self, x: &Tensor, h0: Option<&Tensor>) -> (Tensor, Tensor) {
        let (out, h, _) = self.core.run(x, h0, None);
        (out, h)
    }
}

impl Gru {
    /// One layer with the default options, initialised like PyTorch (`U(±1/√hidden)`).
    pub fn new(input_size: usize, hidden_size: usize, rng: &mut Rng) -> Self {
        Self::with_config(input_size, hidden_size, RnnConfig::default(), rng)
    }

    /// A layer with the given options.
    pub fn with_config(
        input_size: usize,
        hidden_size: usize,
        config: RnnConfig,
        rng: &mut Rng,
    ) -> Self {
        Gru {
            core: Core::new(Kind::Gru, input_size, hidden_size, config, rng),
        }
    }

    /// A layer over given tensors in PyTorch's order: per layer and direction `weight_ih`
    /// `[3·hidden, in]`, `weight_hh` `[3·hidden, hidden]`, then `bias_ih`, `bias_hh` if
    /// `config.bias`.
    pub fn from_weights(
        input_size: usize,
        hidden_size: usize,
        config: RnnConfig,
        weights: Vec<Tensor>,
    ) -> Self {
        Gru {
            core: Core::from_weights(Kind::Gru, input_size, hidden_size, config, weights),
        }
    }

    /// `(output, h_n)` from an optional initial state `h0` `[layers·dirs, batch, hidden]`
    /// (`[layers·dirs, hidden]` for unbatched input; zeros when `None`).
    pub fn forward_with_state(&self, x: &Tensor, h0: Option<&Tensor>) -> (Tensor, Tensor) {
        let (out, h, _) = self.core.run(x, h0, None);
        (out, h)
    }
}

impl Lstm {
    /// One layer with the default options, initialised like PyTorch (`U(±1/√hidden)`).
    pub fn new(input_size: usize, hidden_size: usize, rng: &mut Rng) -> Self {
        Self::with_config(input_size, hidden_size, RnnConfig::default(), rng)
    }

    /// A layer with the given options.
    pub fn with_config(
        input_size: usize,
        hidden_size: usize,
        config: RnnConfig,
        rng: &mut Rng,
    ) -> Self {
        Lstm {
            core: Core::new(Kind::Lstm, input_size, hidden_size, config, rng),
        }
    }

    /// A layer over given tensors in PyTorch's order: per layer and direction `weight_ih`
    /// `[4·hidden, in]`, `weight_hh` `[4·hidden, hidden]`, then `bias_ih`, `bias_hh` if
    /// `config.bias`.
    pub fn from_weights(
        input_size: usize,
        hidden_size: usize,
        config: RnnConfig,
        weights: Vec<Tensor>,
    ) -> Self {
        Lstm {
            core: Core::from_weights(Kind::Lstm, input_size, hidden_size, config, weights),
        }
    }

    /// `(output, h_n, c_n)` from an optional initial state `(h0, c0)`, each
    /// `[layers·dirs, batch, hidden]` (`[layers·dirs, hidden]` for unbatched input; zeros when
    /// `None`).
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<(&Tensor, &Tensor)>,
    ) -> (Tensor, Tensor, Tensor) {
        let (h0, c0) = match state {
            Some((h, c)) => (Some(h), Some(c)),
            None => (None, None),
        };
        let (out, h, c) = self.core.run(x, h0, c0);
        (out, h, c.expect("LSTM cell state"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck_module;
    use crate::ModuleExt;
    use kiln_core::DType;

    /// A layer with its initial state as parameters, whose output is the output sequence
    /// followed by the final states (flattened), so one gradcheck covers all of them.
    struct WithState<L> {
        layer: L,
        h0: Param,
        c0: Option<Param>,
    }

    impl<L: Module> Module for WithState<L> {
        fn visit(&self, v: &mut Visitor) {
            v.module("layer", &self.layer);
            v.param("h0", &self.h0);
            if let Some(c) = &self.c0 {
                v.param("c0", c);
            }
        }
    }

    fn flat(ts: &[Tensor]) -> Tensor {
        let f: Vec<Tensor> = ts.iter().map(|t| t.reshape([t.elem_count()])).collect();
        Tensor::cat(&f, 0)
    }

    impl Forward for WithState<Lstm> {
        fn forward(&self, x: &Tensor) -> Tensor {
            let c0 = self.c0.as_ref().unwrap();
            let (o, h, c) = self.layer.forward_with_state(x, Some((&self.h0, c0)));
            flat(&[o, h, c])
        }
    }

    impl Forward for WithState<Gru> {
        fn forward(&self, x: &Tensor) -> Tensor {
            let (o, h) = self.layer.forward_with_state(x, Some(&self.h0));
            flat(&[o, h])
        }
    }

    impl Forward for WithState<Rnn> {
        fn forward(&self, x: &Tensor) -> Tensor {
            let (o, h) = self.layer.forward_with_state(x, Some(&self.h0));
            flat(&[o, h])
        }
    }

    /// f64 weights in PyTorch's order for `kind` with `config`, values in ±0.6.
    fn weights(
        kind: Kind,
        input: usize,
        hidden: usize,
        config: &RnnConfig,
        seed: u64,
    ) -> Vec<Tensor> {
        let mut out = Vec::new();
        for (k, [ih, hh]) in cell_shapes(kind, input, hidden, config)
            .into_iter()
            .enumerate()
        {
            let mut shapes = vec![ih.clone(), hh.clone()];
            if config.bias {
                shapes.push(ih[..1].to_vec());
                shapes.push(hh[..1].to_vec());
            }
            for (j, s) in shapes.into_iter().enumerate() {
                out.push(Tensor::randn_f64(s, seed + 10 * k as u64 + j as u64).mul_scalar(0.6));
            }
        }
        out
    }

    fn state_param(config: &RnnConfig, batch: Option<usize>, hidden: usize, seed: u64) -> Param {
        let ld = config.num_layers * config.directions();
        let shape = match batch {
            Some(b) => vec![ld, b, hidden],
            None => vec![ld, hidden],
        };
        Param::new(Tensor::randn_f64(shape, seed).mul_scalar(0.5))
    }

    fn configs() -> Vec<RnnConfig> {
        let base = RnnConfig::default();
        vec![
            base,
            base.num_layers(2).bidirectional(true),
            base.batch_first(false).num_layers(2),
            base.batch_first(false).bidirectional(true).bias(false),
        ]
    }

    /// Input `[2, 3, in]` in the config's layout, as a non-contiguous view when `strided`.
    fn input(config: &RnnConfig, input: usize, strided: bool) -> Tensor {
        let x = if strided {
            // A transposed (non-contiguous) view with the layout's shape.
            let (a, b) = if config.batch_first { (3, 2) } else { (2, 3) };
            Tensor::randn_f64([a, b, input], 77).transpose(0, 1)
        } else if config.batch_first {
            Tensor::randn_f64([2, 3, input], 77)
        } else {
            Tensor::randn_f64([3, 2, input], 77)
        };
        assert_eq!(x.is_contiguous(), !strided);
        x.detach().requires_grad()
    }

    #[test]
    fn names_shapes_and_init_follow_torch() {
        let mut rng = Rng::new(0);
        let cfg = RnnConfig::default().num_layers(2).bidirectional(true);
        let l = Lstm::with_config(3, 5, cfg, &mut rng);
        let got: Vec<(String, Vec<usize>)> = l
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.dims().to_vec()))
            .collect();
        let mut want = Vec::new();
        for k in 0..2 {
            for sfx in ["", "_reverse"] {
                let inp = if k == 0 { 3 } else { 10 };
                want.push((format!("weight_ih_l{k}{sfx}"), vec![20, inp]));
                want.push((format!("weight_hh_l{k}{sfx}"), vec![20, 5]));
                want.push((format!("bias_ih_l{k}{sfx}"), vec![20]));
                want.push((format!("bias_hh_l{k}{sfx}"), vec![20]));
            }
        }
        assert_eq!(got, want);
        let bound = 1.0 / 5f64.sqrt();
        for p in l.parameters() {
            assert!(p.to_f64_vec().iter().all(|v| v.abs() <= bound));
        }
        let g = Gru::with_config(4, 6, RnnConfig::default().bias(false), &mut rng);
        let names: Vec<_> = g.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight_ih_l0", "weight_hh_l0"]);
        assert_eq!(g.weight_dims(), vec![vec![18, 4], vec![18, 6]]);
        let r = Rnn::new(4, 6, &mut rng);
        assert_eq!(r.num_parameters(), 6 * 4 + 6 * 6 + 12);
        assert!(RnnConfig::default().batch_first);
    }

    impl Gru {
        fn weight_dims(&self) -> Vec<Vec<usize>> {
            self.parameters()
                .iter()
                .map(|p| p.dims().to_vec())
                .collect()
        }
    }

    #[test]
    fn output_and_state_shapes_in_every_layout() {
        let mut rng = Rng::new(1);
        for bf in [true, false] {
            for bidir in [false, true] {
                let cfg = RnnConfig::default()
                    .num_layers(3)
                    .batch_first(bf)
                    .bidirectional(bidir);
                let d = if bidir { 2 } else { 1 };
                let l = Lstm::with_config(4, 5, cfg, &mut rng);
                let x = if bf {
                    Tensor::ones([2, 7, 4])
                } else {
                    Tensor::ones([7, 2, 4])
                };
                let (o, h, c) = l.forward_with_state(&x, None);
                let want_o = if bf { [2, 7, 5 * d] } else { [7, 2, 5 * d] };
                assert_eq!(o.dims(), &want_o);
                assert_eq!(h.dims(), &[3 * d, 2, 5]);
                assert_eq!(c.dims(), &[3 * d, 2, 5]);
                let g = Gru::with_config(4, 5, cfg, &mut rng);
                assert_eq!(g.forward(&x).dims(), &want_o);
                let (o, h) = g.forward_with_state(&Tensor::ones([7, 4]), None);
                assert_eq!((o.dims(), h.dims()), (&[7, 5 * d][..], &[3 * d, 5][..]));
            }
        }
    }

    #[test]
    fn last_step_output_is_final_state_and_unbatched_matches_batch_of_one() {
        let cfg = RnnConfig::default().num_layers(2).bidirectional(true);
        let l = Lstm::from_weights(3, 4, cfg, weights(Kind::Lstm, 3, 4, &cfg, 5));
        let x = Tensor::randn_f64([1, 6, 3], 9);
        let (o, h, _) = l.forward_with_state(&x, None);
        // Forward direction of the top layer ends at the last step, reverse at the first.
        let fwd_last = o.narrow(1, 5, 1).narrow(2, 0, 4).reshape([4]);
        let rev_first = o.narrow(1, 0, 1).narrow(2, 4, 4).reshape([4]);
        assert_eq!(
            fwd_last.to_f64_vec(),
            h.narrow(0, 2, 1).reshape([4]).to_f64_vec()
        );
        assert_eq!(
            rev_first.to_f64_vec(),
            h.narrow(0, 3, 1).reshape([4]).to_f64_vec()
        );
        let (ou, hu, cu) = l.forward_with_state(&x.reshape([6, 3]), None);
        let (_, _, c) = l.forward_with_state(&x, None);
        assert_eq!(ou.to_f64_vec(), o.to_f64_vec());
        assert_eq!(hu.to_f64_vec(), h.to_f64_vec());
        assert_eq!(cu.to_f64_vec(), c.to_f64_vec());
        assert_eq!(hu.dims(), &[4, 4]);
        // batch_first false on the transposed input gives the transposed output.
        let l2 = Lstm::from_weights(
            3,
            4,
            cfg.batch_first(false),
            weights(Kind::Lstm, 3, 4, &cfg, 5),
        );
        let xb = Tensor::randn_f64([2, 6, 3], 10);
        let a = l.forward(&xb);
        let b = l2.forward(&xb.transpose(0, 1)).transpose(0, 1);
        assert_eq!(a.to_f64_vec(), b.to_f64_vec());
    }

    #[test]
    fn gradcheck_lstm_params_input_and_state() {
        for (i, cfg) in configs().into_iter().enumerate() {
            let m = WithState {
                layer: Lstm::from_weights(3, 2, cfg, weights(Kind::Lstm, 3, 2, &cfg, 100)),
                h0: state_param(&cfg, Some(2), 2, 1),
                c0: Some(state_param(&cfg, Some(2), 2, 2)),
            };
            assert_eq!(m.layer.parameters()[0].dtype(), DType::F64);
            gradcheck_module(&m, &input(&cfg, 3, i % 2 == 1)).unwrap();
        }
        // Unbatched input and state.
        let cfg = RnnConfig::default().bidirectional(true);
        let m = WithState {
            layer: Lstm::from_weights(3, 2, cfg, weights(Kind::Lstm, 3, 2, &cfg, 7)),
            h0: state_param(&cfg, None, 2, 3),
            c0: Some(state_param(&cfg, None, 2, 4)),
        };
        gradcheck_module(&m, &Tensor::randn_f64([4, 3], 5).requires_grad()).unwrap();
    }

    #[test]
    fn gradcheck_gru_params_input_and_state() {
        for (i, cfg) in configs().into_iter().enumerate() {
            let m = WithState {
                layer: Gru::from_weights(3, 2, cfg, weights(Kind::Gru, 3, 2, &cfg, 200)),
                h0: state_param(&cfg, Some(2), 2, 1),
                c0: None,
            };
            gradcheck_module(&m, &input(&cfg, 3, i % 2 == 0)).unwrap();
        }
        let cfg = RnnConfig::default();
        let m = WithState {
            layer: Gru::from_weights(3, 2, cfg, weights(Kind::Gru, 3, 2, &cfg, 9)),
            h0: state_param(&cfg, None, 2, 3),
            c0: None,
        };
        gradcheck_module(&m, &Tensor::randn_f64([4, 3], 5).requires_grad()).unwrap();
    }

    #[test]
    fn gradcheck_rnn_tanh_and_relu() {
        for (i, cfg) in configs().into_iter().enumerate() {
            for nl in [RnnNonlinearity::Tanh, RnnNonlinearity::Relu] {
                let cfg = cfg.nonlinearity(nl);
                let kind = Kind::Rnn(nl);
                let m = WithState {
                    layer: Rnn::from_weights(3, 2, cfg, weights(kind, 3, 2, &cfg, 300)),
                    h0: state_param(&cfg, Some(2), 2, 1),
                    c0: None,
                };
                gradcheck_module(&m, &input(&cfg, 3, i % 2 == 0)).unwrap();
            }
        }
    }

    #[test]
    fn rnn_relu_matches_hand_computed_steps() {
        // One layer, one unit, one input: h_t = relu(w x_t + b + u h_{t-1} + c).
        let cfg = RnnConfig::default().nonlinearity(RnnNonlinearity::Relu);
        let ws = [0.5f64, -0.8, 0.1, 0.2];
        let r = Rnn::from_weights(
            1,
            1,
            cfg,
            vec![
                Tensor::from_slice(&ws[..1], [1, 1]),
                Tensor::from_slice(&ws[1..2], [1, 1]),
                Tensor::from_slice(&ws[2..3], [1]),
                Tensor::from_slice(&ws[3..], [1]),
            ],
        );
        let xs = [1.0f64, 2.0, -3.0, 0.5];
        let out = r.forward(&Tensor::from_slice(&xs, [1, 4, 1])).to_f64_vec();
        let mut h = 0.0f64;
        for (t, &x) in xs.iter().enumerate() {
            h = (ws[0] * x + ws[2] + ws[1] * h + ws[3]).max(0.0);
            assert!((out[t] - h).abs() < 1e-12, "{t}: {} vs {h}", out[t]);
        }
    }

    #[test]
    fn dropout_between_layers_only_in_training() {
        let cfg = RnnConfig::default().num_layers(2).dropout(0.5);
        let mut rng = Rng::new(4);
        let l = Gru::with_config(3, 8, cfg, &mut rng);
        let plain = Gru::from_weights(
            3,
            8,
            cfg.dropout(0.0),
            l.parameters().iter().map(|p| p.tensor().clone()).collect(),
        );
        let x = Tensor::randn([2, 5, 3], 1);
        let want = plain.forward(&x).to_vec::<f32>();
        assert!(l.is_training());
        assert_ne!(l.forward(&x).to_vec::<f32>(), want);
        l.eval();
        assert_eq!(l.forward(&x).to_vec::<f32>(), want);
        // One layer: no dropout at all, even in training.
        let one = Gru::with_config(3, 8, RnnConfig::default().dropout(0.9), &mut rng);
        assert_eq!(
            one.forward(&x).to_vec::<f32>(),
            one.forward(&x).to_vec::<f32>()
        );
    }

    #[test]
    #[should_panic(
        expected = "LSTM: input must be [batch, seq, input_size] or [seq, input_size] with input_size 3, got [2, 4, 5]"
    )]
    fn wrong_input_size_panics() {
        Lstm::new(3, 4, &mut Rng::new(0)).forward(&Tensor::ones([2, 4, 5]));
    }

    #[test]
    #[should_panic(
        expected = "GRU: h0 must be [2, 2, 4] f32 for input [2, 5, 3], got [1, 2, 4] f32"
    )]
    fn wrong_state_shape_panics() {
        let g = Gru::with_config(
            3,
            4,
            RnnConfig::default().bidirectional(true),
            &mut Rng::new(0),
        );
        g.forward_with_state(&Tensor::ones([2, 5, 3]), Some(&Tensor::zeros([1, 2, 4])));
    }

    #[test]
    #[should_panic(
        expected = "RNN: from_weights got a [2, 3] f64 tensor where [2, 4] f64 was expected"
    )]
    fn wrong_weight_shape_panics() {
        let w = vec![Tensor::randn_f64([2, 3], 0), Tensor::randn_f64([2, 2], 1)];
        Rnn::from_weights(4, 2, RnnConfig::default().bias(false), w);
    }
}
