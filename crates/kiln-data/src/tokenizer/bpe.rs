//! Byte-level BPE tokenizers built from raw vocabularies: GPT-2's `encoder.json` + `vocab.bpe`,
//! and the `tokenizer.ggml.*` arrays of a GGUF file (reproducing HF transformers' GGUF
//! converter, so ids equal `AutoTokenizer.from_pretrained(dir, gguf_file=...)`).

use super::{read_text, tok_err, SpecialTokens, Tokenizer};
use crate::error::{DataError, Result};
use std::collections::HashSet;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to U+0100.. .
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are chars");
            next += 1;
            c
        };
    }
    table
}

/// What a GGUF `tokenizer.ggml.token_type` entry says a token is (llama.cpp's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TokenType {
    /// An ordinary vocabulary entry (1, and anything undefined).
    #[default]
    Normal,
    /// The unknown token (2).
    Unknown,
    /// A control token such as `<|im_start|>` (3): added as a special token.
    Control,
    /// A user-defined token such as `<think>` (4): added, matched whole, not special.
    UserDefined,
    /// Unused (5).
    Unused,
    /// A byte token `<0xAB>` (6).
    Byte,
}

impl TokenType {
    /// The type of GGUF's integer code.
    pub fn from_gguf(code: i32) -> TokenType {
        match code {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// How text is split into words before BPE (GGUF's `tokenizer.ggml.pre`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum PreTokenizerKind {
    /// GPT-2's regex inside the byte-level pre-tokenizer (also SmolLM's "smollm").
    #[default]
    Gpt2,
    /// Llama 3's split regex.
    Llama3,
    /// Qwen2's split regex (single digits).
    Qwen2,
    /// Qwen3.5's split regex.
    Qwen35,
    /// GPT-4o's split regex (also Llama 4).
    Gpt4o,
    /// Mistral's tekken split regex.
    Tekken,
    /// Any other split regex (applied with "isolated" behaviour before the byte-level step).
    Regex(String),
}

const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN35_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

impl PreTokenizerKind {
    /// The kind for a GGUF `tokenizer.ggml.pre` name, as transformers maps it; names it does
    /// not list (like "smollm" or "gpt-2") keep GPT-2's byte-level regex.
    pub fn from_gguf_pre(name: &str) -> PreTokenizerKind {
        match name {
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => {
                PreTokenizerKind::Llama3
            }
            "tekken" => PreTokenizerKind::Tekken,
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => {
                PreTokenizerKind::Qwen2
            }
            "qwen35" => PreTokenizerKind::Qwen35,
            "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => PreTokenizerKind::Gpt4o,
            _ => PreTokenizerKind::Gpt2,
        }
    }

    fn split_regex(&self) -> Option<&str> {
        match self {
            PreTokenizerKind::Gpt2 => None,
            PreTokenizerKind::Llama3 => Some(LLAMA3_SPLIT),
            PreTokenizerKind::Qwen2 => Some(QWEN2_SPLIT),
            PreTokenizerKind::Qwen35 => Some(QWEN35_SPLIT),
            PreTokenizerKind::Gpt4o => Some(GPT4O_SPLIT),
            PreTokenizerKind::Tekken => Some(TEKKEN_SPLIT),
            PreTokenizerKind::Regex(r) => Some(r),
        }
    }

    fn build(&self, origin: &str) -> Result<PreTokenizerWrapper> {
        Ok(match self.split_regex() {
            None => ByteLevel::new(false, true, true).into(),
            Some(re) => {
                let split = Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(origin, format!("invalid pre-tokenizer regex {re:?}: {e}")))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
        })
    }
}

/// A byte-level BPE vocabulary as GGUF files store it, for [`Tokenizer::from_bpe_vocab`].
#[derive(Clone, Debug, Default)]
pub struct BpeVocab {
    /// Tokens by id (`tokenizer.ggml.tokens`).
    pub tokens: Vec<String>,
    /// Merges, `"left right"` in priority order (`tokenizer.ggml.merges`).
    pub merges: Vec<String>,
    /// Token types by id (`tokenizer.ggml.token_type`); empty means all normal.
    pub token_types: Vec<TokenType>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: prepend BOS when adding special tokens.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token`: append EOS when adding special tokens.
    pub add_eos: bool,
    /// The pre-tokenizer (`PreTokenizerKind::from_gguf_pre(tokenizer.ggml.pre)`).
    pub pre: PreTokenizerKind,
}

/// Parses `"left right"` merge lines; `line_base` numbers them in errors (1-based lines).
fn parse_merges<'a>(
    lines: impl Iterator<Item = (usize, &'a str)>,
    origin: &str,
    what: &str,
) -> Result<Merges> {
    lines
        .map(|(n, line)| {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(tok_err(
                    origin,
                    format!("{what} {n}: expected \"left right\", got {line:?}"),
                )),
            }
        })
        .collect()
}

fn build_bpe(vocab: Vocab, merges: Merges, origin: &str) -> Result<BPE> {
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tok_err(origin, format!("invalid BPE vocabulary: {e}")))
}

/// Byte-level tokenizer around `bpe`: pre-tokenizer, byte-level decoder, and a template
/// post-processor adding BOS/EOS as asked (transformers' `TokenizersBackend` layout).
fn byte_level_tokenizer(
    bpe: BPE,
    pre: &PreTokenizerKind,
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
    origin: &str,
) -> Result<tokenizers::Tokenizer> {
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(pre.build(origin)?));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let seq = |name: &str, t: u32| {
        let mut s = String::new();
        if let Some((b, _)) = bos {
            s += &format!("{b}:{t} ");
        }
        s += &format!("${name}:{t}");
        if let Some((e, _)) = eos {
            s += &format!(" {e}:{t}");
        }
        s
    };
    let single = seq("A", 0);
    let pair = format!("{single} {}", seq("B", 1));
    let specials: Vec<(String, u32)> = bos
        .iter()
        .chain(eos.iter())
        .map(|&(t, id)| (t.to_string(), id))
        .collect();
    let template = TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| tok_err(origin, format!("post-processor template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| tok_err(origin, format!("post-processor template: {e}")))?;
    tk.with_post_processor(Some(template));
    Ok(tk)
}

impl Tokenizer {
    /// GPT-2's tokenizer from `encoder.json` (token -> id) and `vocab.bpe` (merges): byte-level
    /// BPE, GPT-2's pre-tokenizer regex, byte-level decoder, `<|endoftext|>` special (BOS, EOS
    /// and UNK; no pad token).
    pub fn from_gpt2_files(
        encoder_json: impl AsRef<Path>,
        vocab_bpe: impl AsRef<Path>,
    ) -> Result<Tokenizer> {
        let (enc_path, bpe_path) = (encoder_json.as_ref(), vocab_bpe.as_ref());
        let enc_text = read_text(enc_path)?;
        let map: std::collections::HashMap<String, u32> =
            serde_json::from_str(&enc_text).map_err(|e| {
                DataError::invalid(
                    enc_path,
                    format!("invalid encoder.json (token -> id object): {e}"),
                )
            })?;
        let vocab: Vocab = map.into_iter().collect();
        let bpe_text = read_text(bpe_path)?;
        let bpe_origin = bpe_path.display().to_string();
        let lines = bpe_text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l))
            .filter(|(_, l)| !l.starts_with("#version") && !l.is_empty());
        let merges = parse_merges(lines, &bpe_origin, "line")?;
        let origin = format!("{} + {}", enc_path.display(), bpe_path.display());
        let bpe = build_bpe(vocab, merges, &origin)?;
        let mut tk = byte_level_tokenizer(bpe, &PreTokenizerKind::Gpt2, None, None, &origin)?;
        const EOT: &str = "<|endoftext|>";
        let eot = tk.token_to_id(EOT).ok_or_else(|| {
            DataError::invalid(enc_path, format!("{EOT} is not in the vocabulary"))
        })?;
        tk.add_special_tokens(&[AddedToken::from(EOT, true)]);
        let mut tok = Tokenizer::from_hf(tk, origin);
        tok.special = SpecialTokens {
            bos: Some(eot),
            eos: Some(eot),
            unk: Some(eot),
            ..SpecialTokens::default()
        };
        Ok(tok)
    }

    /// A byte-level BPE tokenizer from a GGUF-style vocabulary (what a GGUF loader passes for
    /// `tokenizer.ggml.model == "gpt2"`), built as transformers' GGUF converter builds it:
    /// tokens not spelled in GPT-2's byte alphabet are respelled byte by byte, CONTROL tokens
    /// (spelled in the alphabet) become special added tokens, USER_DEFINED ones plain added
    /// tokens, and the BOS/EOS/UNK/PAD tokens are special too.
    pub fn from_bpe_vocab(vocab: BpeVocab) -> Result<Tokenizer> {
        let origin = "BPE vocabulary";
        let n = vocab.tokens.len();
        if n == 0 {
            return Err(tok_err(origin, "no tokens"));
        }
        if !vocab.token_types.is_empty() && vocab.token_types.len() != n {
            return Err(tok_err(
                origin,
                format!("{} token types for {n} tokens", vocab.token_types.len()),
            ));
        }
        for (what, id) in [
            ("bos", vocab.bos_id),
            ("eos", vocab.eos_id),
            ("unk", vocab.unk_id),
            ("pad", vocab.pad_id),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(tok_err(
                    origin,
                    format!("{what} id {id} is outside the {n} tokens"),
                ));
            }
        }
        let table = bytes_to_unicode();
        let alphabet: HashSet<char> = table.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut map = Vocab::default();
        for (id, token) in vocab.tokens.iter().enumerate() {
            let key = if in_alphabet(token) {
                token.clone()
            } else {
                token.bytes().map(|b| table[b as usize]).collect()
            };
            // Later duplicates win, as in a Python dict comprehension.
            map.insert(key, id as u32);
        }
        let merges = parse_merges(
            vocab
                .merges
                .iter()
                .enumerate()
                .map(|(i, m)| (i, m.as_str())),
            origin,
            "merge",
        )?;
        let bpe = build_bpe(map, merges, origin)?;
        let token_of = |id: Option<u32>| id.map(|i| (vocab.tokens[i as usize].as_str(), i));
        let bos = vocab.add_bos.then(|| token_of(vocab.bos_id)).flatten();
        let eos = vocab.add_eos.then(|| token_of(vocab.eos_id)).flatten();
        if vocab.add_bos && bos.is_none() {
            return Err(tok_err(origin, "add_bos is set but there is no bos id"));
        }
        if vocab.add_eos && eos.is_none() {
            return Err(tok_err(origin, "add_eos is set but there is no eos id"));
        }
        let mut tk = byte_level_tokenizer(bpe, &vocab.pre, bos, eos, origin)?;
        let type_of = |i: usize| vocab.token_types.get(i).copied().unwrap_or_default();
        let mut specials: Vec<AddedToken> = vocab
            .tokens
            .iter()
            .enumerate()
            .filter(|&(i, t)| type_of(i) == TokenType::Control && in_alphabet(t))
            .map(|(_, t)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        for id in [vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id]
            .into_iter()
            .flatten()
        {
            let t = &vocab.tokens[id as usize];
            if !specials.iter().any(|s| &s.content == t) {
                specials.push(AddedToken::from(t.clone(), true).normalized(false));
            }
        }
        tk.add_special_tokens(&specials);
        let user: Vec<AddedToken> = vocab
            .tokens
            .iter()
            .enumerate()
            .filter(|&(i, t)| type_of(i) == TokenType::UserDefined && tk.token_to_id(t).is_some())
            .map(|(_, t)| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        tk.add_tokens(&user);
        let mut tok = Tokenizer::from_hf(tk, origin);
        tok.special = SpecialTokens {
            bos: vocab.bos_id,
            eos: vocab.eos_id,
            unk: vocab.unk_id,
            pad: vocab.pad_id,
            ..SpecialTokens::default()
        };
        Ok(tok)
    }
}
