//! Model architectures, each built from [`QLinear`](crate::nn::QLinear) layers.

pub mod llama;
pub mod llama_gguf;
pub mod marian;
pub mod mlp;
pub mod train;
