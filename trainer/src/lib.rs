//! etpo trainer: the language-model core (a Llama-family model in candle with named LoRA
//! adapter sets, loading, tokenizer, batched generation) and the ETPO / PPO-KL / GRPO trainers.

pub mod bf16;
mod blas;
mod error;
pub mod etpo;
pub mod generate;
pub mod grpo;
mod kernels;
pub mod load;
pub mod lora;
pub mod model;
pub mod ops;
pub mod ppo;
mod quant;
pub mod tokenizer;
pub mod value_head;

pub use generate::{generate, generate_ids, Completion, FinishReason, GenerateConfig};
pub use load::{default_model_path, load_model, parse_device, LoadedModel, ModelInfo};
pub use lora::LoraConfig;
pub use model::{
    ForwardOptions, GenerationWeights, KvCache, Llama, LlamaConfig, MergedAdapter, ModelError, Projection,
    QuantizedWeights,
};
pub use tokenizer::{Tokenizer, TokenizerError};
