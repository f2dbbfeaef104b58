//! CPU kernels behind the weight formats, each with a portable path and SIMD paths chosen
//! at run time (`isa`), so one binary runs at its best on AVX2-only and AVX-512 machines.

pub mod gemm_f32;
pub mod ggml_blocks;
pub mod int8;
pub mod isa;
pub mod llm_f32;
pub mod lowbit;

pub use int8::*;
pub use isa::Isa;
