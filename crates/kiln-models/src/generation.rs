//! Text generation for causal language models: greedy decoding or seeded sampling with
//! temperature, top-k, top-p and a repetition penalty, stop tokens and a token budget, each new
//! token handed to a callback as it is produced (streaming). A [`Sequence`] is one generation
//! advanced a token at a time, so that a server can decode many at once ([`step_many`]).

use kiln_core::Rng;

/// A model that continues token sequences, with a cache of what it has seen.
pub trait CausalLm {
    /// Whatever the model keeps between steps (keys and values).
    type Cache;

    /// A fresh, empty cache.
    fn new_cache(&self) -> Self::Cache;

    /// Feeds `ids` after the positions already in `cache` (extending it) and returns the logits
    /// for the token that follows the last of them (`[vocab]`).
    fn next_logits(&self, ids: &[u32], cache: &mut Self::Cache) -> Vec<f32>;

    /// Feeds one token to each of several independent sequences (`ids[i]` after what
    /// `caches[i]` holds) and returns each one's next-token logits. Models override this to
    /// take all the sequences through the weights together; this default runs them one by one.
    fn next_logits_many(&self, ids: &[u32], caches: &mut [&mut Self::Cache]) -> Vec<Vec<f32>> {
        assert_eq!(
            ids.len(),
            caches.len(),
            "next_logits_many: one token per cache"
        );
        ids.iter()
            .zip(caches.iter_mut())
            .map(|(&id, cache)| self.next_logits(&[id], cache))
            .collect()
    }

    /// Tokens in the vocabulary.
    fn vocab_size(&self) -> usize;
}

/// How to pick tokens; `Default` is greedy decoding of up to 64 tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to add.
    pub max_new_tokens: usize,
    /// Sample (true) or take the most likely token (false).
    pub do_sample: bool,
    /// Divides the logits before sampling (must be > 0 when sampling).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens when sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// HF's repetition penalty: logits of tokens already in the sequence are divided by it
    /// (multiplied when negative); 1 leaves them alone.
    pub repetition_penalty: f32,
    /// Tokens that end generation (they are included in the output).
    pub stop_tokens: Vec<u32>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            do_sample: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            stop_tokens: Vec::new(),
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationConfig {
            max_new_tokens,
            ..Self::default()
        }
    }

    /// Sampling at `temperature` with `seed`.
    pub fn sampling(max_new_tokens: usize, temperature: f32, seed: u64) -> Self {
        GenerationConfig {
            max_new_tokens,
            do_sample: true,
            temperature,
            seed,
            ..Self::default()
        }
    }

    /// Sets top-k.
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = Some(k);
        self
    }

    /// Sets top-p.
    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = Some(p);
        self
    }

    /// Sets the repetition penalty.
    pub fn repetition_penalty(mut self, penalty: f32) -> Self {
        self.repetition_penalty = penalty;
        self
    }

    /// Sets the stop tokens.
    pub fn stop_tokens(mut self, tokens: impl Into<Vec<u32>>) -> Self {
        self.stop_tokens = tokens.into();
        self
    }

    /// Checks the values (a message naming the field when one is out of range).
    pub fn validate(&self) -> Result<(), String> {
        if self.do_sample && (self.temperature.is_nan() || self.temperature <= 0.0) {
            return Err(format!(
                "temperature must be > 0 when sampling, got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if self.repetition_penalty.is_nan() || self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced.
    StopToken,
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The callback asked to stop.
    Callback,
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens (a final stop token included).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
}

/// Applies the penalty, temperature, top-k and top-p to `logits` and picks a token.
pub fn pick_token(
    logits: &mut [f32],
    context: &[u32],
    config: &GenerationConfig,
    rng: &mut Rng,
) -> u32 {
    if config.repetition_penalty != 1.0 {
        let mut seen = context.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / config.repetition_penalty
                } else {
                    *l * config.repetition_penalty
                };
            }
        }
    }
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            })
            .0 as u32
    };
    if !config.do_sample {
        return argmax(logits);
    }
    let t = config.temperature as f64;
    let top = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let weight = |l: f32| ((l as f64 - top) / t).exp();
    if config.top_k.is_none() && config.top_p.is_none_or(|p| p >= 1.0) {
        // The whole distribution: no ordering needed, one pass to sum and one to draw.
        let total: f64 = logits.iter().map(|&l| weight(l)).sum();
        let target = rng.next_f64() * total;
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &l) in logits.iter().enumerate() {
            let w = weight(l);
            if w > 0.0 {
                acc += w;
                last = i;
                if target < acc {
                    return i as u32;
                }
            }
        }
        return last as u32;
    }
    // Candidates sorted by logit, highest first, cut to top-k (found by selection, so only the
    // k survivors are sorted).
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    if let Some(k) = config.top_k.map(|k| k.max(1)).filter(|&k| k < order.len()) {
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit);
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(logits[i as usize])).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = config.top_p {
        // Keep the smallest prefix whose mass reaches p (at least one token).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, &q) in probs.iter().enumerate() {
            mass += q;
            if mass >= p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (i, &q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return order[i];
        }
    }
    order[probs.len() - 1]
}

/// One generation in progress: the model's cache, the sampler and the tokens so far. Advance
/// it with [`Sequence::step`] alone, or with others through [`step_many`].
pub struct Sequence<C> {
    cache: C,
    config: GenerationConfig,
    rng: Rng,
    /// The prompt and every token generated so far (for the repetition penalty).
    context: Vec<u32>,
    /// Where the generated tokens start in `context`.
    prompt_len: usize,
    /// What the next step feeds: the whole prompt first, then the last token.
    feed: Vec<u32>,
    stop: Option<StopReason>,
}

impl<C> std::fmt::Debug for Sequence<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("prompt_len", &self.prompt_len)
            .field("tokens", &self.tokens())
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl<C> Sequence<C> {
    /// Checks `config` and `prompt` (non-empty, inside the vocabulary) and sets up a
    /// generation; nothing runs until the first step.
    pub fn new<M: CausalLm<Cache = C>>(
        model: &M,
        prompt: &[u32],
        config: GenerationConfig,
    ) -> Result<Sequence<C>, String> {
        config.validate()?;
        if prompt.is_empty() {
            return Err("the prompt has no tokens".into());
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= model.vocab_size()) {
            return Err(format!(
                "prompt token {t} is outside the vocabulary of {}",
                model.vocab_size()
            ));
        }
        let stop = (config.max_new_tokens == 0).then_some(StopReason::MaxTokens);
        Ok(Sequence {
            cache: model.new_cache(),
            rng: Rng::new(config.seed),
            context: prompt.to_vec(),
            prompt_len: prompt.len(),
            feed: prompt.to_vec(),
            stop,
            config,
        })
    }

    /// The tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.context[self.prompt_len..]
    }

    /// Why the sequence ended, once it has.
    pub fn finished(&self) -> Option<StopReason> {
        self.stop
    }

    /// Ends the sequence on the caller's request ([`StopReason::Callback`]), unless its last
    /// token was a stop token.
    pub fn cancel(&mut self) {
        if self.stop != Some(StopReason::StopToken) {
            self.stop = Some(StopReason::Callback);
        }
    }

    /// What was generated (the sequence counts as cancelled if it had not ended).
    pub fn into_generated(self) -> Generated {
        let stop = self.stop.unwrap_or(StopReason::Callback);
        Generated {
            tokens: self.context[self.prompt_len..].to_vec(),
            stop,
        }
    }

    /// Adds one token, one step of `model`.
    ///
    /// # Panics
    /// If the sequence has ended.
    pub fn step<M: CausalLm<Cache = C>>(&mut self, model: &M) -> u32 {
        step_many(model, &mut [self])[0]
    }

    /// Picks the next token from `logits` and records it.
    fn accept(&mut self, mut logits: Vec<f32>) -> u32 {
        let next = pick_token(&mut logits, &self.context, &self.config, &mut self.rng);
        self.context.push(next);
        self.feed = vec![next];
        if self.config.stop_tokens.contains(&next) {
            self.stop = Some(StopReason::StopToken);
        } else if self.context.len() - self.prompt_len >= self.config.max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
        }
        next
    }
}

/// Adds one token to each of `seqs` and returns them in order. Sequences that still have a
/// prompt to read run alone; all the others go through the model together
/// ([`CausalLm::next_logits_many`]), so the weights are read once for all of them. Tokens are
/// picked only after every model call has returned.
///
/// # Panics
/// If one of the sequences has ended.
pub fn step_many<M: CausalLm>(model: &M, seqs: &mut [&mut Sequence<M::Cache>]) -> Vec<u32> {
    if let Some(s) = seqs.iter().find(|s| s.stop.is_some()) {
        panic!(
            "step_many: a sequence that has ended ({:?}) cannot take another step",
            s.stop
        );
    }
    let mut logits: Vec<Option<Vec<f32>>> = seqs.iter().map(|_| None).collect();
    let mut ids = Vec::new();
    let mut caches = Vec::new();
    let mut together = Vec::new();
    for (i, s) in seqs.iter_mut().enumerate() {
        if s.feed.len() == 1 {
            ids.push(s.feed[0]);
            caches.push(&mut s.cache);
            together.push(i);
        } else {
            logits[i] = Some(model.next_logits(&s.feed, &mut s.cache));
        }
    }
    let batched = match ids.len() {
        0 => Vec::new(),
        1 => vec![model.next_logits(&ids, caches[0])],
        _ => model.next_logits_many(&ids, &mut caches),
    };
    assert_eq!(
        batched.len(),
        together.len(),
        "one row of logits per sequence"
    );
    for (i, l) in together.into_iter().zip(batched) {
        logits[i] = Some(l);
    }
    seqs.iter_mut()
        .zip(logits)
        .map(|(s, l)| s.accept(l.expect("every sequence ran")))
        .collect()
}

/// Continues `prompt` with `model`; `on_token` sees each new token as it comes and returns
/// false to stop. The prompt is fed once, then one token per step through the cache.
pub fn generate<M: CausalLm>(
    model: &M,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generated, String> {
    let mut seq = Sequence::new(model, prompt, config.clone())?;
    while seq.finished().is_none() {
        let next = seq.step(model);
        if !on_token(next) {
            seq.cancel();
        }
    }
    Ok(seq.into_generated())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy model: the next token is (last + 1) mod vocab, with a margin of 5 logits.
    struct Counter {
        vocab: usize,
    }

    impl CausalLm for Counter {
        type Cache = usize;
        fn new_cache(&self) -> usize {
            0
        }
        fn next_logits(&self, ids: &[u32], cache: &mut usize) -> Vec<f32> {
            *cache += ids.len();
            let next = (*ids.last().unwrap() as usize + 1) % self.vocab;
            (0..self.vocab)
                .map(|i| if i == next { 5.0 } else { 0.0 })
                .collect()
        }
        fn vocab_size(&self) -> usize {
            self.vocab
        }
    }

    #[test]
    fn greedy_follows_the_argmax_and_feeds_one_token_per_step() {
        let m = Counter { vocab: 10 };
        let mut streamed = Vec::new();
        let g = generate(&m, &[3, 4], &GenerationConfig::greedy(4), |t| {
            streamed.push(t);
            true
        })
        .unwrap();
        assert_eq!(g.tokens, vec![5, 6, 7, 8]);
        assert_eq!(streamed, g.tokens);
        assert_eq!(g.stop, StopReason::MaxTokens);
    }

    #[test]
    fn stop_tokens_and_the_callback_end_generation() {
        let m = Counter { vocab: 10 };
        let cfg = GenerationConfig::greedy(20).stop_tokens(vec![7]);
        let g = generate(&m, &[3], &cfg, |_| true).unwrap();
        assert_eq!(
            (g.tokens, g.stop),
            (vec![4, 5, 6, 7], StopReason::StopToken)
        );
        let mut n = 0;
        let g = generate(&m, &[3], &GenerationConfig::greedy(20), |_| {
            n += 1;
            n < 2
        })
        .unwrap();
        assert_eq!((g.tokens, g.stop), (vec![4, 5], StopReason::Callback));
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let logits = [0.0f32, (3f32).ln(), 0.0, 0.0];
        // p = [1, 3, 1, 1] / 6.
        let cfg = GenerationConfig::sampling(1, 1.0, 0);
        let mut rng = Rng::new(42);
        let mut counts = [0usize; 4];
        for _ in 0..6000 {
            counts[pick_token(&mut logits.clone(), &[], &cfg, &mut rng) as usize] += 1;
        }
        assert!((2800..3200).contains(&counts[1]), "{counts:?}");
        for c in [counts[0], counts[2], counts[3]] {
            assert!((850..1150).contains(&c), "{counts:?}");
        }
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| pick_token(&mut logits.clone(), &[], &cfg, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_top_p_and_temperature_narrow_the_choice() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = Rng::new(1);
        let k1 = GenerationConfig::sampling(1, 1.0, 0).top_k(1);
        let p = GenerationConfig::sampling(1, 1.0, 0).top_p(0.5);
        let cold = GenerationConfig::sampling(1, 1e-4, 0);
        for _ in 0..200 {
            assert_eq!(pick_token(&mut logits.clone(), &[], &k1, &mut rng), 0);
            // p(0) = 0.64 ≥ 0.5: only token 0 survives top-p.
            assert_eq!(pick_token(&mut logits.clone(), &[], &p, &mut rng), 0);
            assert_eq!(pick_token(&mut logits.clone(), &[], &cold, &mut rng), 0);
        }
        let k2 = GenerationConfig::sampling(1, 1.0, 0).top_k(2);
        let picks: Vec<u32> = (0..300)
            .map(|_| pick_token(&mut logits.clone(), &[], &k2, &mut rng))
            .collect();
        assert!(picks.iter().all(|&t| t < 2) && picks.contains(&1));
    }

    #[test]
    fn repetition_penalty_is_hfs_rule() {
        let mut logits = vec![2.0f32, -2.0, 1.9];
        let cfg = GenerationConfig::greedy(1).repetition_penalty(2.0);
        let t = pick_token(&mut logits, &[0, 1, 0], &cfg, &mut Rng::new(0));
        assert_eq!(logits, vec![1.0, -4.0, 1.9]);
        assert_eq!(t, 2);
    }

    #[test]
    fn sequences_stepped_together_equal_each_generated_alone() {
        let m = Counter { vocab: 10 };
        let configs = [
            GenerationConfig::greedy(5),
            GenerationConfig::greedy(3).stop_tokens(vec![9]),
            GenerationConfig::sampling(6, 0.7, 3).top_k(2),
        ];
        let prompts: [&[u32]; 3] = [&[3, 4], &[6], &[1, 2, 3]];
        let alone: Vec<Generated> = prompts
            .iter()
            .zip(&configs)
            .map(|(p, c)| generate(&m, p, c, |_| true).unwrap())
            .collect();
        let mut seqs: Vec<Sequence<usize>> = prompts
            .iter()
            .zip(&configs)
            .map(|(p, c)| Sequence::new(&m, p, c.clone()).unwrap())
            .collect();
        // The third joins one step late, as a request arriving mid-way would.
        let mut steps = 0;
        loop {
            let mut live: Vec<&mut Sequence<usize>> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, s)| s.finished().is_none() && (*i < 2 || steps > 0))
                .map(|(_, s)| s)
                .collect();
            if live.is_empty() {
                break;
            }
            let got = step_many(&m, &mut live);
            assert_eq!(got.len(), live.len());
            steps += 1;
        }
        let together: Vec<Generated> = seqs.into_iter().map(Sequence::into_generated).collect();
        assert_eq!(together, alone);
        assert_eq!(alone[1].stop, StopReason::StopToken);
        assert_eq!(alone[1].tokens, vec![7, 8, 9]);
    }

    #[test]
    #[should_panic(
        expected = "a sequence that has ended (Some(MaxTokens)) cannot take another step"
    )]
    fn stepping_an_ended_sequence_panics() {
        let m = Counter { vocab: 10 };
        let mut s = Sequence::new(&m, &[1], GenerationConfig::greedy(1)).unwrap();
        s.step(&m);
        s.step(&m);
    }

    #[test]
    fn bad_settings_and_prompts_are_errors() {
        let m = Counter { vocab: 10 };
        let bad = |c: GenerationConfig| generate(&m, &[1], &c, |_| true).unwrap_err();
        assert!(bad(GenerationConfig::sampling(1, 0.0, 0)).contains("temperature must be > 0"));
        assert!(bad(GenerationConfig::greedy(1).top_p(1.5)).contains("top_p must be in (0, 1]"));
        assert!(bad(GenerationConfig::greedy(1).top_k(0)).contains("top_k must be at least 1"));
        let e = generate(&m, &[], &GenerationConfig::greedy(1), |_| true).unwrap_err();
        assert!(e.contains("no tokens"));
        let e = generate(&m, &[10], &GenerationConfig::greedy(1), |_| true).unwrap_err();
        assert!(e.contains("prompt token 10 is outside the vocabulary of 10"));
    }
}
