//! The tokenizer and chat template a GGUF file carries (`tokenizer.ggml.*`,
//! `tokenizer.chat_template`), as kiln-data tokenizers.

use crate::error::ModelError;
use kiln_data::tokenizer::{BpeVocab, PreTokenizerKind, TokenType};
use kiln_data::{ChatTemplate, Tokenizer};
use kiln_io::{GgufFile, IoError};

/// The byte-level BPE tokenizer stored in `file`, and its chat template when it has one.
/// Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported; other models are an
/// error naming the model.
pub fn tokenizer_from_gguf(
    file: &GgufFile,
) -> Result<(Tokenizer, Option<ChatTemplate>), ModelError> {
    let origin = file.path().display().to_string();
    let io = |e: IoError| ModelError::Io {
        path: file.path().to_path_buf(),
        message: e.to_string(),
    };
    let model = file.get_str("tokenizer.ggml.model").map_err(io)?;
    if model != "gpt2" {
        return Err(ModelError::ConfigField {
            origin,
            field: "tokenizer.ggml.model".into(),
            message: format!("\"{model}\" is not supported (only \"gpt2\", byte-level BPE)"),
        });
    }
    let id = |key: &str| -> Result<Option<u32>, ModelError> {
        match file.metadata(key) {
            Some(_) => file.get_u32(key).map(Some).map_err(io),
            None => Ok(None),
        }
    };
    let flag = |key: &str, default: bool| -> Result<bool, ModelError> {
        match file.metadata(key) {
            Some(_) => file.get_bool(key).map_err(io),
            None => Ok(default),
        }
    };
    let token_types = match file.metadata("tokenizer.ggml.token_type") {
        Some(_) => file
            .get_i32_array("tokenizer.ggml.token_type")
            .map_err(io)?
            .iter()
            .map(|&c| TokenType::from_gguf(c))
            .collect(),
        None => Vec::new(),
    };
    let pre = match file.metadata("tokenizer.ggml.pre") {
        Some(_) => PreTokenizerKind::from_gguf_pre(file.get_str("tokenizer.ggml.pre").map_err(io)?),
        None => PreTokenizerKind::from_gguf_pre("default"),
    };
    let vocab = BpeVocab {
        tokens: file
            .get_str_array("tokenizer.ggml.tokens")
            .map_err(io)?
            .to_vec(),
        merges: file
            .get_str_array("tokenizer.ggml.merges")
            .map_err(io)?
            .to_vec(),
        token_types,
        bos_id: id("tokenizer.ggml.bos_token_id")?,
        eos_id: id("tokenizer.ggml.eos_token_id")?,
        unk_id: id("tokenizer.ggml.unknown_token_id")?,
        pad_id: id("tokenizer.ggml.padding_token_id")?,
        add_bos: flag("tokenizer.ggml.add_bos_token", false)?,
        add_eos: flag("tokenizer.ggml.add_eos_token", false)?,
        pre,
    };
    let tokenizer = Tokenizer::from_bpe_vocab(vocab).map_err(|e| ModelError::Io {
        path: file.path().to_path_buf(),
        message: e.to_string(),
    })?;
    let template = match file.metadata("tokenizer.chat_template") {
        Some(_) => {
            let src = file.get_str("tokenizer.chat_template").map_err(io)?;
            Some(
                ChatTemplate::new(src)
                    .map_err(|e| ModelError::ConfigField {
                        origin: origin.clone(),
                        field: "tokenizer.chat_template".into(),
                        message: e.to_string(),
                    })?
                    .with_tokenizer_tokens(&tokenizer),
            )
        }
        None => None,
    };
    Ok((tokenizer, template))
}
