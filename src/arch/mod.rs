//! Model architectures, each built from [`QLinear`](crate::nn::QLinear) layers.

pub mod llama;
pub mod mlp;
pub mod train;
