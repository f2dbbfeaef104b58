//! Integer kernels for int8 linear layers: activations quantized to u8 (affine), weights
//! held as i8 (symmetric, per output channel), products accumulated exactly in i32, and the
//! result rescaled to f32 in the same pass that writes it.
//!
//! The pieces, in the order a forward call meets them:
//! - [`act`]: min/max and quantization of f32 activations to u8, one (scale, zero point)
//!   per row (per-tensor parameters are the same pair repeated), into rows padded to the
//!   packed weight's depth;
//! - [`PackedI8`]: the weight, packed once at load time into panels of 16 output channels ×
//!   4 consecutive k bytes, the operand shape of AVX-512 VNNI's `vpdpbusd` (the AVX2 and
//!   portable paths read the same layout);
//! - [`gemm`]: the driver (register blocks of rows × panels, threads when the work pays for
//!   them) with the zero-point correction, per-channel scale and bias fused into the store;
//! - one micro-kernel per instruction-set path (`portable`, `avx2`, `avx512`), chosen at run
//!   time through [`super::Isa`]. All are exact: the results are bit-identical to a plain
//!   i32 triple loop.

pub mod act;
mod gemm;
mod pack;
mod portable;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;

pub use act::{activation_qparams_u8, min_max, quantize_u8, ActRows};
pub use gemm::{gemm_u8_i8_f32, gemm_u8_i8_f32_with};
pub use pack::{row_sums_i8, PackedI8};
