//! kiln-models: pretrained architectures with Hugging Face parameter names, config.json
//! parsing and checkpoint key remapping.
//!
//! - [`bert`]: `BertModel` (+ pooler), sentence embeddings, `BertForSequenceClassification`,
//!   `BertForTokenClassification`, `from_pretrained` / `save_pretrained`.
//! - [`llama`]: `LlamaForCausalLM` (GQA, RoPE with scaling, SwiGLU, KV cache) from GGUF files,
//!   dense or block-quantised; [`generation`]: greedy and sampled decoding for any [`CausalLm`];
//!   [`gguf_tokenizer`]: the tokenizer and chat template inside a GGUF file.
//! - [`gpt2`]: `GPT2LMHeadModel` with a KV cache, `from_pretrained` / `save_pretrained`.
//! - [`config`]: typed access to HF `config.json` fields with precise errors.
//! - [`remap`]: [`KeyMap`], declarative renaming / splitting / transposing of checkpoint keys.
//! - [`checkpoint`]: reading safetensors checkpoints and finding the local model cache.

pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generation;
pub mod gguf_tokenizer;
pub mod gpt2;
pub mod llama;
pub mod remap;

pub use bert::{
    l2_normalize, mean_pooling, BertConfig, BertForSequenceClassification,
    BertForTokenClassification, BertModel, BertOutput, ClassifierPooling, HiddenAct, LoadOptions,
};
pub use config::HfConfig;
pub use error::ModelError;
pub use generation::{
    generate, step_many, CausalLm, Generated, GenerationConfig, Sequence, StopReason,
};
pub use gguf_tokenizer::tokenizer_from_gguf;
pub use gpt2::{
    gpt2_key_map, gpt2_tokenizer_files, GPT2LMHeadModel, Gpt2Activation, Gpt2Cache, Gpt2Config,
    Gpt2Model,
};
pub use llama::{
    KvCache, LlamaConfig, LlamaForCausalLM, LlamaTokenizer, QuantActivations, RopeScaling,
};
pub use remap::KeyMap;
