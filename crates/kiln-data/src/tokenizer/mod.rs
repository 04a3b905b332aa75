//! Tokenizers: HF `tokenizer.json` files, GPT-2 byte-level BPE (`encoder.json` + `vocab.bpe`)
//! and the BPE vocabularies GGUF files embed, all through the HF `tokenizers` crate so ids,
//! tokens and offsets equal the Python `tokenizers` / `transformers` ones. Batches become
//! `[B, L]` I64 tensors with padding, truncation and attention masks; [`ChatTemplate`] renders
//! HF chat templates with minijinja.
//!
//! Offsets are in characters (Unicode scalar values) of the input, as HF's Python API returns
//! them.

mod bpe;
mod chat;

pub use bpe::{BpeVocab, PreTokenizerKind, TokenType};
pub use chat::{ChatMessage, ChatTemplate};

use crate::error::{DataError, Result};
use kiln_core::alloc::Buffer;
use kiln_core::Tensor;
use std::path::Path;
use tokenizers::{PostProcessor, TruncationDirection, TruncationParams, TruncationStrategy};

/// Total input bytes below which a batch is encoded on the calling thread.
pub const PARALLEL_MIN_BYTES: usize = 4096;

/// The ids of a tokenizer's special tokens (those it has).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// Classifier token (BERT's `[CLS]`).
    pub cls: Option<u32>,
    /// Separator (BERT's `[SEP]`).
    pub sep: Option<u32>,
    /// Mask token (BERT's `[MASK]`).
    pub mask: Option<u32>,
}

/// One encoded text (or text pair), as HF's `Encoding`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoding {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Segment ids: 0 for the first text, 1 for the second of a pair.
    pub type_ids: Vec<u32>,
    /// 1 for real tokens (all of them, since a single encoding is not padded).
    pub attention_mask: Vec<u32>,
    /// `(start, end)` character offsets of each token in its text; `(0, 0)` for added specials.
    pub offsets: Vec<(usize, usize)>,
    /// The tokens' strings (byte-level BPE spells bytes as in GPT-2: `Ġ` is a space).
    pub tokens: Vec<String>,
    /// 1 where the token was added by the post-processor (`[CLS]`, BOS, ...).
    pub special_tokens_mask: Vec<u32>,
}

impl Encoding {
    fn from_hf(e: tokenizers::Encoding) -> Encoding {
        Encoding {
            ids: e.get_ids().to_vec(),
            type_ids: e.get_type_ids().to_vec(),
            attention_mask: e.get_attention_mask().to_vec(),
            offsets: e.get_offsets().to_vec(),
            tokens: e.get_tokens().to_vec(),
            special_tokens_mask: e.get_special_tokens_mask().to_vec(),
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// How [`Tokenizer::encode_batch`] makes the rows of a batch equally long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Padding {
    /// No padding: every row must already have the same length.
    None,
    /// Pad to the longest row of the batch.
    #[default]
    Longest,
    /// Pad every row to exactly this length (rows longer than it are an error; truncate them).
    Fixed(usize),
}

/// Which end of a row padding goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PadSide {
    /// After the tokens (HF's default).
    #[default]
    Right,
    /// Before the tokens (for decoder-only generation).
    Left,
}

/// Options of [`Tokenizer::encode_batch`]: padding, truncation, special tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Padding strategy (default [`Padding::Longest`]).
    pub padding: Padding,
    /// Maximum row length including special tokens; pairs are cut with HF's `longest_first`.
    pub truncation: Option<usize>,
    /// Padding id (default: the tokenizer's pad token).
    pub pad_id: Option<u32>,
    /// Where padding goes (default right).
    pub pad_side: PadSide,
    /// Whether the post-processor adds special tokens (`[CLS]`/`[SEP]`, BOS); default true.
    pub add_special_tokens: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            padding: Padding::Longest,
            truncation: None,
            pad_id: None,
            pad_side: PadSide::Right,
            add_special_tokens: true,
        }
    }
}

impl EncodeOptions {
    /// Sets the padding strategy.
    pub fn padding(mut self, padding: Padding) -> Self {
        self.padding = padding;
        self
    }
    /// Truncates rows to `max_length` tokens (special tokens included).
    pub fn truncation(mut self, max_length: usize) -> Self {
        self.truncation = Some(max_length);
        self
    }
    /// Pads with `id` instead of the tokenizer's pad token.
    pub fn pad_id(mut self, id: u32) -> Self {
        self.pad_id = Some(id);
        self
    }
    /// Sets the side padding goes to.
    pub fn pad_side(mut self, side: PadSide) -> Self {
        self.pad_side = side;
        self
    }
    /// Sets whether special tokens are added.
    pub fn add_special_tokens(mut self, yes: bool) -> Self {
        self.add_special_tokens = yes;
        self
    }
}

/// A padded batch: `[B, L]` I64 tensors plus each row's character offsets.
#[derive(Clone, Debug)]
pub struct BatchEncoding {
    /// Token ids, padded with the pad id.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Segment ids (0 for padding).
    pub token_type_ids: Tensor,
    /// Per row and column, the token's `(start, end)` character offsets; `(0, 0)` for padding.
    pub offsets: Vec<Vec<(usize, usize)>>,
}

/// A text tokenizer (any model HF `tokenizers` supports: BPE, WordPiece, Unigram, ...).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    origin: String,
    special: SpecialTokens,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

/// Reads `path` as UTF-8 text, with errors that name it.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "cannot read", e))?;
    if bytes.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    String::from_utf8(bytes).map_err(|e| DataError::invalid(path, format!("not UTF-8: {e}")))
}

fn tok_err(origin: &str, msg: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer {
        origin: origin.to_string(),
        msg: msg.to_string(),
    }
}

/// Candidate spellings of each special token, for `tokenizer.json` files without a
/// `special_tokens_map.json` next to them.
const SPECIAL_CANDIDATES: [(&str, &[&str]); 7] = [
    (
        "bos_token",
        &["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"],
    ),
    (
        "eos_token",
        &["</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"],
    ),
    ("unk_token", &["[UNK]", "<unk>", "<|unk|>"]),
    ("pad_token", &["[PAD]", "<pad>", "<|pad|>"]),
    ("cls_token", &["[CLS]", "<cls>"]),
    ("sep_token", &["[SEP]", "<sep>"]),
    ("mask_token", &["[MASK]", "<mask>"]),
];

impl SpecialTokens {
    fn slot(&mut self, key: &str) -> Option<&mut Option<u32>> {
        Some(match key {
            "bos_token" => &mut self.bos,
            "eos_token" => &mut self.eos,
            "unk_token" => &mut self.unk,
            "pad_token" => &mut self.pad,
            "cls_token" => &mut self.cls,
            "sep_token" => &mut self.sep,
            "mask_token" => &mut self.mask,
            _ => return None,
        })
    }
}

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer (padding and truncation settings are dropped: they are
    /// per-call options here).
    pub fn from_hf(mut inner: tokenizers::Tokenizer, origin: impl Into<String>) -> Tokenizer {
        inner.with_padding(None);
        // Removing truncation cannot fail.
        let _ = inner.with_truncation(None);
        Tokenizer {
            inner,
            origin: origin.into(),
            special: SpecialTokens::default(),
        }
    }

    /// Loads an HF `tokenizer.json`. Special token ids come from a `special_tokens_map.json`
    /// beside it when there is one, else from the usual spellings among the added special
    /// tokens (`[CLS]`, `<s>`, `<|endoftext|>`, ...).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let text = read_text(path)?;
        let origin = path.display().to_string();
        let pad_from_json = serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| tok_err(&origin, format!("invalid tokenizer.json: {e}")))?
            .pointer("/padding/pad_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| tok_err(&origin, format!("invalid tokenizer.json: {e}")))?;
        let mut tok = Tokenizer::from_hf(inner, origin);
        let map_path = path.with_file_name("special_tokens_map.json");
        if map_path.is_file() {
            tok.special = tok.special_tokens_from_map(&map_path)?;
        } else {
            tok.special = tok.guess_special_tokens();
            if tok.special.pad.is_none() {
                tok.special.pad = pad_from_json;
            }
        }
        Ok(tok)
    }

    fn special_tokens_from_map(&self, path: &Path) -> Result<SpecialTokens> {
        let text = read_text(path)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| DataError::invalid(path, format!("invalid JSON: {e}")))?;
        let obj = json
            .as_object()
            .ok_or_else(|| DataError::invalid(path, "expected a JSON object"))?;
        let mut special = SpecialTokens::default();
        for (key, value) in obj {
            let content = match value {
                serde_json::Value::String(s) => Some(s.as_str()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
                _ => None,
            };
            if let (Some(slot), Some(content)) = (special.slot(key), content) {
                *slot = self.inner.token_to_id(content);
            }
        }
        Ok(special)
    }

    fn guess_special_tokens(&self) -> SpecialTokens {
        let added = self.inner.get_added_tokens_decoder();
        let is_special = |id: u32| added.get(&id).is_some_and(|t| t.special);
        let mut special = SpecialTokens::default();
        for (key, candidates) in SPECIAL_CANDIDATES {
            let found = candidates.iter().find_map(|c| {
                let id = self.inner.token_to_id(c)?;
                (is_special(id) || key == "unk_token").then_some(id)
            });
            *special.slot(key).expect("known key") = found;
        }
        special
    }

    /// Replaces the special token ids (for files whose special tokens are not guessed right).
    pub fn with_special_tokens(mut self, special: SpecialTokens) -> Tokenizer {
        self.special = special;
        self
    }

    /// The special token ids.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }
    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }
    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }
    /// Padding id.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad
    }
    /// Unknown-token id.
    pub fn unk_id(&self) -> Option<u32> {
        self.special.unk
    }
    /// Classifier-token id.
    pub fn cls_id(&self) -> Option<u32> {
        self.special.cls
    }
    /// Separator id.
    pub fn sep_id(&self) -> Option<u32> {
        self.special.sep
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where the tokenizer came from (a path or a description), as errors name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token` (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Encodes one text; `add_special_tokens` lets the post-processor add `[CLS]`/`[SEP]`/BOS.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoding> {
        self.inner
            .encode_char_offsets(text, add_special_tokens)
            .map(Encoding::from_hf)
            .map_err(|e| tok_err(&self.origin, format!("cannot encode {text:?}: {e}")))
    }

    /// Encodes a text pair (type ids 0 then 1), e.g. question and context.
    pub fn encode_pair(
        &self,
        first: &str,
        second: &str,
        add_special_tokens: bool,
    ) -> Result<Encoding> {
        self.inner
            .encode_char_offsets((first, second), add_special_tokens)
            .map(Encoding::from_hf)
            .map_err(|e| {
                tok_err(
                    &self.origin,
                    format!("cannot encode the pair ({first:?}, {second:?}): {e}"),
                )
            })
    }

    /// Decodes ids to text; `skip_special_tokens` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.origin, format!("cannot decode {ids:?}: {e}")))
    }

    /// Encodes one row of a batch: both texts without specials, truncation as HF (budget minus
    /// the specials the post-processor will add), then post-processing.
    fn encode_row(
        &self,
        first: &str,
        second: Option<&str>,
        opts: &EncodeOptions,
    ) -> Result<tokenizers::Encoding> {
        let fail = |e: tokenizers::Error| {
            tok_err(
                &self.origin,
                match second {
                    Some(s) => format!("cannot encode the pair ({first:?}, {s:?}): {e}"),
                    None => format!("cannot encode {first:?}: {e}"),
                },
            )
        };
        let a = self.inner.encode_char_offsets(first, false).map_err(fail)?;
        let b = second
            .map(|s| self.inner.encode_char_offsets(s, false))
            .transpose()
            .map_err(fail)?;
        let (a, b) = match opts.truncation {
            Some(max_length) => {
                let added = match (opts.add_special_tokens, self.inner.get_post_processor()) {
                    (true, Some(p)) => p.added_tokens(b.is_some()),
                    _ => 0,
                };
                let params = TruncationParams {
                    max_length: max_length.saturating_sub(added),
                    strategy: TruncationStrategy::LongestFirst,
                    stride: 0,
                    direction: TruncationDirection::Right,
                };
                tokenizers::truncate_encodings(a, b, &params).map_err(fail)?
            }
            None => (a, b),
        };
        self.inner
            .post_process(a, b, opts.add_special_tokens)
            .map_err(fail)
    }

    /// Encodes rows (in parallel when the batch is large) and pads them into tensors.
    fn batch<T: Sync>(
        &self,
        items: &[T],
        bytes: usize,
        row: impl Fn(&T) -> Result<tokenizers::Encoding> + Sync,
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        use rayon::prelude::*;
        let rows: Vec<tokenizers::Encoding> = if items.len() > 1
            && bytes >= PARALLEL_MIN_BYTES
            && kiln_core::parallel::num_threads() > 1
        {
            kiln_core::parallel::install(|| items.par_iter().map(&row).collect::<Result<Vec<_>>>())?
        } else {
            items.iter().map(&row).collect::<Result<Vec<_>>>()?
        };
        self.pad(rows, opts)
    }

    fn pad(&self, rows: Vec<tokenizers::Encoding>, opts: &EncodeOptions) -> Result<BatchEncoding> {
        let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let width = match opts.padding {
            Padding::None => {
                if let Some(r) = rows.iter().position(|r| r.len() != longest) {
                    return Err(tok_err(
                        &self.origin,
                        format!(
                            "encode_batch: row {r} has {} tokens but the longest has {longest}; \
                             use Padding::Longest or Padding::Fixed",
                            rows[r].len()
                        ),
                    ));
                }
                longest
            }
            Padding::Longest => longest,
            Padding::Fixed(n) => {
                if let Some(r) = rows.iter().position(|r| r.len() > n) {
                    return Err(tok_err(
                        &self.origin,
                        format!(
                            "encode_batch: row {r} has {} tokens, more than Padding::Fixed({n}); \
                             set truncation to {n}",
                            rows[r].len()
                        ),
                    ));
                }
                n
            }
        };
        let needs_pad = rows.iter().any(|r| r.len() < width);
        let pad = match opts.pad_id.or(self.special.pad) {
            Some(id) => id as i64,
            None if needs_pad => {
                return Err(tok_err(
                    &self.origin,
                    "encode_batch: padding is needed but the tokenizer has no pad token; \
                     set EncodeOptions::pad_id",
                ))
            }
            None => 0,
        };
        let b = rows.len();
        // Column where each row's tokens start.
        let start = |r: &tokenizers::Encoding| match opts.pad_side {
            PadSide::Right => 0,
            PadSide::Left => width - r.len(),
        };
        let at = |i: usize| {
            let (row, col) = (i / width, i % width);
            let r = &rows[row];
            let s = start(r);
            (col >= s && col < s + r.len()).then(|| (r, col - s))
        };
        let n = b * width;
        let ids = Buffer::from_fn(n, |i| at(i).map_or(pad, |(r, c)| r.get_ids()[c] as i64));
        let mask = Buffer::from_fn(n, |i| {
            at(i).map_or(0i64, |(r, c)| r.get_attention_mask()[c] as i64)
        });
        let types = Buffer::from_fn(n, |i| {
            at(i).map_or(0i64, |(r, c)| r.get_type_ids()[c] as i64)
        });
        let offsets = rows
            .iter()
            .map(|r| {
                let mut o = vec![(0, 0); width];
                let s = start(r);
                o[s..s + r.len()].copy_from_slice(r.get_offsets());
                o
            })
            .collect();
        Ok(BatchEncoding {
            input_ids: Tensor::from_buffer(ids, [b, width]),
            attention_mask: Tensor::from_buffer(mask, [b, width]),
            token_type_ids: Tensor::from_buffer(types, [b, width]),
            offsets,
        })
    }

    /// Encodes a batch of texts into padded `[B, L]` I64 tensors (see [`EncodeOptions`]).
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        let bytes = texts.iter().map(|t| t.as_ref().len()).sum();
        self.batch(
            texts,
            bytes,
            |t| self.encode_row(t.as_ref(), None, opts),
            opts,
        )
    }

    /// Encodes a batch of text pairs (type ids 0/1); truncation is HF's `longest_first`.
    pub fn encode_batch_pairs<A: AsRef<str> + Sync, B: AsRef<str> + Sync>(
        &self,
        pairs: &[(A, B)],
        opts: &EncodeOptions,
    ) -> Result<BatchEncoding> {
        let bytes = pairs
            .iter()
            .map(|(a, b)| a.as_ref().len() + b.as_ref().len())
            .sum();
        self.batch(
            pairs,
            bytes,
            |(a, b)| self.encode_row(a.as_ref(), Some(b.as_ref()), opts),
            opts,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the 256 byte characters (id = byte), the merge "a b" -> "ab",
    /// and control tokens `<pad>` and `<s>`.
    fn toy(add_bos: bool) -> Tokenizer {
        let table = bpe::bytes_to_unicode();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        tokens.extend(["ab".to_string(), "<pad>".to_string(), "<s>".to_string()]);
        let mut token_types = vec![TokenType::Normal; 257];
        token_types.extend([TokenType::Control, TokenType::Control]);
        Tokenizer::from_bpe_vocab(BpeVocab {
            tokens,
            merges: vec!["a b".into()],
            token_types,
            bos_id: Some(258),
            pad_id: Some(257),
            add_bos,
            ..BpeVocab::default()
        })
        .unwrap()
    }

    fn rows(t: &Tensor) -> Vec<Vec<i64>> {
        let dims = t.shape().dims().to_vec();
        t.to_vec::<i64>()
            .chunks(dims[1].max(1))
            .map(<[i64]>::to_vec)
            .take(dims[0])
            .collect()
    }

    #[test]
    fn toy_vocabulary_encodes_bytes_merges_and_specials() {
        let t = toy(true);
        let e = t.encode("abc<pad>", true).unwrap();
        assert_eq!(e.ids, vec![258, 256, b'c' as u32, 257]);
        assert_eq!(e.tokens, vec!["<s>", "ab", "c", "<pad>"]);
        assert_eq!(e.offsets, vec![(0, 0), (0, 2), (2, 3), (3, 8)]);
        assert_eq!(e.special_tokens_mask, vec![1, 0, 0, 0]);
        assert_eq!(t.decode(&e.ids, true).unwrap(), "abc");
        assert_eq!(t.decode(&e.ids, false).unwrap(), "<s>abc<pad>");
        assert_eq!(t.vocab_size(), 259);
        assert_eq!(
            (t.bos_id(), t.pad_id(), t.eos_id()),
            (Some(258), Some(257), None)
        );
        let p = t.encode_pair("ab", "c", true).unwrap();
        assert_eq!(p.ids, vec![258, 256, 258, b'c' as u32]);
        assert_eq!(p.type_ids, vec![0, 0, 1, 1]);
    }

    #[test]
    fn padding_right_and_left() {
        let t = toy(false);
        let texts = ["abab", "c", ""];
        let right = t.encode_batch(&texts, &EncodeOptions::default()).unwrap();
        let (c, p) = (b'c' as i64, 257);
        assert_eq!(
            rows(&right.input_ids),
            vec![vec![256, 256], vec![c, p], vec![p, p]]
        );
        assert_eq!(
            rows(&right.attention_mask),
            vec![vec![1, 1], vec![1, 0], vec![0, 0]]
        );
        assert_eq!(right.offsets[1], vec![(0, 1), (0, 0)]);
        let left = t
            .encode_batch(
                &texts,
                &EncodeOptions::default()
                    .pad_side(PadSide::Left)
                    .padding(Padding::Fixed(3)),
            )
            .unwrap();
        assert_eq!(
            rows(&left.input_ids),
            vec![vec![p, 256, 256], vec![p, p, c], vec![p, p, p]]
        );
        assert_eq!(
            rows(&left.attention_mask),
            vec![vec![0, 1, 1], vec![0, 0, 1], vec![0, 0, 0]]
        );
        assert_eq!(left.offsets[0], vec![(0, 0), (0, 2), (2, 4)]);
        let custom = t
            .encode_batch(&["c", ""], &EncodeOptions::default().pad_id(7))
            .unwrap();
        assert_eq!(rows(&custom.input_ids), vec![vec![c], vec![7]]);
    }

    #[test]
    fn truncation_of_pairs_is_longest_first() {
        let t = toy(true);
        // first: 5 tokens, second: 2; budget 6 minus 2 BOS = 4 -> the longer one is cut to 2.
        let pairs = [("ccccc", "dd")];
        let b = t
            .encode_batch_pairs(&pairs, &EncodeOptions::default().truncation(6))
            .unwrap();
        let (c, d) = (b'c' as i64, b'd' as i64);
        assert_eq!(rows(&b.input_ids), vec![vec![258, c, c, 258, d, d]]);
        assert_eq!(rows(&b.token_type_ids), vec![vec![0, 0, 0, 1, 1, 1]]);
        // Both longer than half the budget (5): the longer (first) gets 3, the other 2.
        let b = t
            .encode_batch_pairs(
                &[("ccccc", "dddd")],
                &EncodeOptions::default().truncation(7),
            )
            .unwrap();
        assert_eq!(rows(&b.input_ids), vec![vec![258, c, c, c, 258, d, d]]);
        // Without special tokens the whole budget goes to text.
        let b = t
            .encode_batch_pairs(
                &pairs,
                &EncodeOptions::default()
                    .truncation(4)
                    .add_special_tokens(false),
            )
            .unwrap();
        assert_eq!(rows(&b.input_ids), vec![vec![c, c, d, d]]);
    }

    #[test]
    fn empty_batch_gives_empty_tensors() {
        let t = toy(false);
        let none: [&str; 0] = [];
        let b = t.encode_batch(&none, &EncodeOptions::default()).unwrap();
        assert_eq!(b.input_ids.shape().dims(), &[0, 0]);
        assert_eq!(b.attention_mask.shape().dims(), &[0, 0]);
        assert!(b.offsets.is_empty());
        let b = t
            .encode_batch(&none, &EncodeOptions::default().padding(Padding::Fixed(4)))
            .unwrap();
        assert_eq!(b.input_ids.shape().dims(), &[0, 4]);
    }

    #[test]
    fn batch_errors_name_the_problem() {
        let t = toy(false);
        let opts = EncodeOptions::default().padding(Padding::None);
        let err = t
            .encode_batch(&["ab", "abc"], &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 0 has 1 tokens but the longest has 2"),
            "{err}"
        );
        let err = t
            .encode_batch(
                &["ccc"],
                &EncodeOptions::default().padding(Padding::Fixed(2)),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 0 has 3 tokens, more than Padding::Fixed(2)"),
            "{err}"
        );
        let no_pad = t.clone().with_special_tokens(SpecialTokens::default());
        let err = no_pad
            .encode_batch(&["c", "cc"], &EncodeOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no pad token"), "{err}");
        // Equal lengths need no pad token.
        assert!(no_pad
            .encode_batch(&["c", "d"], &EncodeOptions::default())
            .is_ok());
    }

    #[test]
    fn parallel_batch_equals_serial() {
        let t = toy(true);
        let texts: Vec<String> = (0..64).map(|i| "abc ".repeat(i % 7 + 30)).collect();
        assert!(texts.iter().map(String::len).sum::<usize>() >= PARALLEL_MIN_BYTES);
        let b = t
            .encode_batch(&texts, &EncodeOptions::default().truncation(50))
            .unwrap();
        let ids = rows(&b.input_ids);
        for (i, text) in texts.iter().enumerate() {
            let mut want = t.encode(text, true).unwrap().ids;
            want.truncate(50);
            let got: Vec<u32> = ids[i][..want.len()].iter().map(|&v| v as u32).collect();
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn missing_and_corrupt_files_are_named() {
        let dir = std::env::temp_dir().join(format!("kiln-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("nope.json");
        let err = Tokenizer::from_file(&missing).unwrap_err().to_string();
        assert!(
            err.contains("nope.json") && err.contains("cannot read"),
            "{err}"
        );
        let corrupt = dir.join("corrupt.json");
        std::fs::write(&corrupt, "{\"model\": [1, 2").unwrap();
        let err = Tokenizer::from_file(&corrupt).unwrap_err().to_string();
        assert!(
            err.contains("corrupt.json") && err.contains("invalid tokenizer.json"),
            "{err}"
        );
        let wrong = dir.join("wrong.json");
        std::fs::write(&wrong, "{\"model\": {\"type\": \"Nope\"}}").unwrap();
        let err = Tokenizer::from_file(&wrong).unwrap_err().to_string();
        assert!(
            err.contains("wrong.json") && err.contains("invalid tokenizer.json"),
            "{err}"
        );
        let enc = dir.join("encoder.json");
        std::fs::write(&enc, "[1, 2]").unwrap();
        let err = Tokenizer::from_gpt2_files(&enc, dir.join("vocab.bpe"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("encoder.json") && err.contains("invalid encoder.json"),
            "{err}"
        );
        std::fs::write(
            &enc,
            "{\"a\": 0, \"b\": 1, \"ab\": 2, \"<|endoftext|>\": 3}",
        )
        .unwrap();
        let err = Tokenizer::from_gpt2_files(&enc, dir.join("vocab.bpe"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vocab.bpe") && err.contains("cannot read"),
            "{err}"
        );
        let merges = dir.join("vocab.bpe");
        std::fs::write(&merges, "#version: 0.2\na b\nab\n").unwrap();
        let err = Tokenizer::from_gpt2_files(&enc, &merges)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vocab.bpe") && err.contains("line 3"), "{err}");
        std::fs::write(&merges, "#version: 0.2\na b\n").unwrap();
        let t = Tokenizer::from_gpt2_files(&enc, &merges).unwrap();
        assert_eq!(t.encode("ab<|endoftext|>", false).unwrap().ids, vec![2, 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bpe_vocab_errors() {
        let err = Tokenizer::from_bpe_vocab(BpeVocab::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no tokens"), "{err}");
        let v = BpeVocab {
            tokens: vec!["a".into(), "b".into()],
            bos_id: Some(5),
            ..BpeVocab::default()
        };
        let err = Tokenizer::from_bpe_vocab(v).unwrap_err().to_string();
        assert!(err.contains("bos id 5 is outside the 2 tokens"), "{err}");
        let v = BpeVocab {
            tokens: vec!["a".into(), "b".into()],
            merges: vec!["a b c".into()],
            ..BpeVocab::default()
        };
        let err = Tokenizer::from_bpe_vocab(v).unwrap_err().to_string();
        assert!(err.contains("merge 0"), "{err}");
    }
}
