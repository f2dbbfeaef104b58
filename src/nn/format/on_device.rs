//! Formats without a kernel on a device (int8, int-N, NF4/FP4 on CUDA) run there by
//! emulation: the weight is dequantized once into a device tensor (cached for the layer's
//! life) and multiplied with the device's matmul (cuBLAS); a format that quantizes its
//! inputs (int8 W8A8) has them fake-quantized with the same parameters first. The same
//! numbers as the CPU kernels up to float summation order and the compute dtype, which
//! `describe` names. The host copy stays the source of truth for saving and inspection.
//!
//! Weight-only int-N and NF4/FP4 weights on a GPU also keep their packed codes there
//! ([`super::packed_cuda`]): up to 2 activation rows (decode) multiply straight from the
//! codes with a fused dequantize-GEMV, which reads 4–8 bits a weight instead of 16; more
//! rows (prefill) use the cached dequantized copy and cuBLAS. Both copies stay resident
//! (the packed one adds a quarter to a half of the bf16 copy's bytes) so neither path
//! pays a conversion per call. `QUANTLAB_PACKED_GEMV=0` uses the dequantized copy for
//! every call.

use super::packed_cuda::{self, PackedLayout, PackedWeight};
use super::{InputQuant, WeightFormat};
use crate::load::NamedTensor;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::any::Any;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Dequantized {
    /// The stored format, on the CPU.
    host: Arc<dyn WeightFormat>,
    /// `[out, in]` dequantized weight on the device, in the compute dtype.
    weight: Tensor,
    /// The packed codes on the device for the decode GEMV (GPU devices, weight-only
    /// formats with a packed layout).
    packed: Option<Arc<PackedWeight>>,
}

impl Dequantized {
    /// `host` (a CPU format) run on `device` in `dtype` (f32, bf16 or f16).
    pub fn wrap(host: Arc<dyn WeightFormat>, device: &Device, dtype: DType) -> Result<Self> {
        if host.input_quant() == InputQuant::Unknown {
            anyhow::bail!(
                "{} has no kernel and no emulation on {device:?} in this build: use --device cpu",
                host.describe()
            );
        }
        let weight = host
            .dequantize()
            .and_then(|w| Ok(w.to_device(device)?.to_dtype(dtype)?))
            .with_context(|| {
                format!("dequantizing a {} weight onto {device:?}", host.describe())
            })?;
        let packed = if device.is_cpu() {
            None
        } else {
            Self::pack(host.as_ref(), device)?
        };
        Ok(Dequantized {
            host,
            weight,
            packed,
        })
    }

    fn pack(host: &dyn WeightFormat, device: &Device) -> Result<Option<Arc<PackedWeight>>> {
        Self::pack_within(host, device, packed_cuda::max_weights())
    }

    /// A packed copy of `host` if it has at most `limit` weights and a packed layout.
    fn pack_within(
        host: &dyn WeightFormat,
        device: &Device,
        limit: usize,
    ) -> Result<Option<Arc<PackedWeight>>> {
        let (n, k) = host.shape();
        if host.input_quant() != InputQuant::None || n.saturating_mul(k) > limit {
            return Ok(None);
        }
        let Some(layout) = PackedLayout::from_format(host) else {
            return Ok(None);
        };
        let p = PackedWeight::upload(&layout, device)
            .with_context(|| format!("uploading a packed {} weight", host.describe()))?;
        Ok(Some(Arc::new(p)))
    }

    /// The same with the packed GEMV used on any device, the CPU included (where it runs
    /// the kernel's CPU reference: for tests).
    pub fn with_packed(mut self) -> Result<Self> {
        let device = self.weight.device().clone();
        self.packed = Self::pack(self.host.as_ref(), &device)?;
        Ok(self)
    }

    /// Whether decode-sized calls use the packed GEMV.
    pub fn has_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The stored format this layer emulates.
    pub fn host(&self) -> &Arc<dyn WeightFormat> {
        &self.host
    }
}

/// `x` rounded to the u8 grid of `(scale, zero_point)` and mapped back (PyTorch's fake
/// quantization): `(clamp(round(x / s) + zp, 0, 255) − zp) · s`.
fn fake_quant_u8(x: &Tensor, scale: f32, zero_point: i32) -> Result<Tensor> {
    let inv = 1.0 / scale as f64;
    let zp = zero_point as f64;
    let q = ((x.affine(inv, zp)?.round()?).clamp(0.0, 255.0)? - zp)?;
    Ok(q.affine(scale as f64, 0.0)?)
}

impl WeightFormat for Dequantized {
    fn id(&self) -> &'static str {
        self.host.id()
    }

    fn label(&self) -> String {
        self.host.label()
    }

    fn describe(&self) -> String {
        format!(
            "{} (dequantized to {:?} on {:?}{})",
            self.host.describe(),
            self.weight.dtype(),
            self.weight.device().location(),
            if self.packed.is_some() {
                ", packed GEMV for decode"
            } else {
                ""
            }
        )
    }

    fn shape(&self) -> (usize, usize) {
        self.host.shape()
    }

    fn device(&self) -> Device {
        self.weight.device().clone()
    }

    fn native_input(&self, dtype: DType) -> bool {
        dtype == self.weight.dtype()
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let x = x.to_dtype(self.weight.dtype())?;
        if let Some(p) = &self.packed {
            let k = p.shape.k;
            if k > 0 && x.elem_count() / k <= packed_cuda::DECODE_ROWS && packed_cuda::enabled() {
                let y = p.gemv(&x)?;
                return Ok(match bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                    None => y,
                });
            }
        }
        let x = match self.host.input_quant() {
            InputQuant::None => x,
            InputQuant::Unknown => anyhow::bail!("{} cannot be emulated", self.describe()),
            InputQuant::U8Fixed { scale, zero_point } => fake_quant_u8(&x, scale, zero_point)?,
            InputQuant::I8PerRow => {
                let xf = x.to_dtype(DType::F32)?;
                let absmax = xf.abs()?.max_keepdim(candle_core::D::Minus1)?;
                // Rows of zeros keep scale 1 (codes 0), as the CPU kernel does.
                let safe = absmax.maximum(f32::MIN_POSITIVE as f64)?;
                let mul = (safe.recip()? * 127.0)?;
                let codes = xf.broadcast_mul(&mul)?.round()?.clamp(-127.0, 127.0)?;
                let scale = (safe * (1.0 / 127.0))?;
                codes.broadcast_mul(&scale)?.to_dtype(x.dtype())?
            }
            InputQuant::Fp8PerRow => {
                // As `quant::fp8::fake_quantize_row`: scale amax/448 per row, saturating
                // round-to-nearest-even cast, in one kernel (kernels/cuda/fused.cu).
                let xf = x.to_dtype(DType::F32)?;
                let amax = xf.abs()?.max_keepdim(candle_core::D::Minus1)?;
                crate::nn::cuda_lt::fake_quant_rows_e4m3(&xf, &amax)?.to_dtype(x.dtype())?
            }
            InputQuant::U8PerTensor if crate::nn::cuda::enabled(x.device()) => {
                crate::nn::cuda::fake_quant_u8_dynamic(&x)?
            }
            InputQuant::U8PerTensor => {
                let xf = x.to_dtype(DType::F32)?.flatten_all()?;
                let lo = xf.min(0)?.to_scalar::<f32>()?;
                let hi = xf.max(0)?.to_scalar::<f32>()?;
                if !(lo.is_finite() && hi.is_finite()) {
                    anyhow::bail!("input activations contain NaN or infinite values");
                }
                let (s, zp) = crate::nn::kernels::activation_qparams_u8(lo, hi);
                fake_quant_u8(&x, s, zp)?
            }
        };
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    fn dequantize(&self) -> Result<Tensor> {
        self.host.dequantize()
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        if device.same_device(self.weight.device()) {
            return Ok(Arc::new(self.clone()));
        }
        self.host.to_device(device)
    }

    fn with_compute_dtype(&self, dtype: DType) -> Result<Option<Arc<dyn WeightFormat>>> {
        if dtype == self.weight.dtype() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Dequantized::wrap(
            self.host.clone(),
            self.weight.device(),
            dtype,
        )?)))
    }

    fn input_quant(&self) -> InputQuant {
        self.host.input_quant()
    }

    fn meta(&self) -> serde_json::Value {
        self.host.meta()
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        self.host.tensors(prefix)
    }

    fn stored_bytes(&self) -> usize {
        self.host.stored_bytes()
    }

    fn as_any(&self) -> &dyn Any {
        self.host.as_any()
    }

    fn packed_gemv(&self) -> Option<Arc<PackedWeight>> {
        self.packed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::algo::LayerInput;
    use crate::nn::format::dense::Dense;
    use crate::quant::random::randn;

    /// The emulation (run here on the CPU, as it would on a GPU) against the format's own
    /// CPU kernel: the same products up to f32 summation order.
    fn emulation_matches_kernel(method: &str, tol: f32) {
        let w = randn(&[24, 96], 7).unwrap();
        let dense: Arc<dyn WeightFormat> = Arc::new(Dense::new(w).unwrap());
        let alg = crate::nn::registry::parse_algorithm(method).unwrap();
        let x = randn(&[5, 96], 8).unwrap();
        let needs = alg.needs();
        let calibration = (!needs.is_empty()).then(|| {
            let mut c = crate::nn::calib::Collector::new(&needs, 96);
            c.observe(&x).unwrap();
            c.finish().unwrap()
        });
        let host = alg
            .apply(&LayerInput {
                name: "fc",
                weight: &dense,
                calibration: calibration.as_ref(),
            })
            .unwrap();
        let bias = randn(&[24], 9).unwrap();
        let want = host.forward(&x, Some(&bias)).unwrap();
        let emu = Dequantized::wrap(host.clone(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(emu.input_quant(), host.input_quant());
        let got = emu.forward(&x, Some(&bias)).unwrap();
        let d = crate::nn::format::max_abs_diff(&want, &got);
        assert!(d < tol, "{method}: max difference {d}");
        // The packed decode GEMV (its CPU reference here) on the first 2 rows: decode-sized
        // inputs take it (`packed_cuda::DECODE_ROWS`).
        let x = x.narrow(0, 0, 2).unwrap();
        let want = host.forward(&x, Some(&bias)).unwrap();
        let packed = emu.clone().with_packed().unwrap();
        let weight_only = host.input_quant() == InputQuant::None;
        // NF4 here has blocks that cross rows (96 columns, blocks of 64): no packed layout.
        let expect = weight_only && !method.starts_with("nf4");
        assert_eq!(packed.has_packed(), expect, "{method}");
        if expect {
            let got = packed.forward(&x, Some(&bias)).unwrap();
            let d = crate::nn::format::max_abs_diff(&want, &got);
            assert!(d < tol, "{method} packed: max difference {d}");
        }
        assert_eq!(emu.stored_bytes(), host.stored_bytes());
        assert_eq!(emu.id(), host.id());
    }

    /// A weight-only layer at a packing limit gets a packed copy, one weight more does
    /// not (it decodes through the dequantized copy), and neither does a stack that would
    /// pass the limit (`QUANTLAB_PACKED_MAX_WEIGHTS`; by default there is none).
    #[test]
    fn only_weights_within_the_limit_are_packed() {
        let alg = crate::nn::registry::parse_algorithm("w:i4:sym:g64").unwrap();
        let (k, limit) = (512, 1 << 16);
        let quantized = |n: usize| {
            let w = Tensor::zeros((n, k), DType::F32, &Device::Cpu).unwrap();
            let dense: Arc<dyn WeightFormat> = Arc::new(Dense::new(w).unwrap());
            alg.apply(&LayerInput {
                name: "fc",
                weight: &dense,
                calibration: None,
            })
            .unwrap()
        };
        let packed = |n: usize| {
            Dequantized::pack_within(quantized(n).as_ref(), &Device::Cpu, limit).unwrap()
        };
        let n = limit / k;
        assert!(packed(n).is_some());
        assert!(packed(n + 1).is_none());
        let half = packed(n / 2).unwrap();
        let one = packed(1).unwrap();
        assert!(PackedWeight::stack_within(&[&half, &half], limit)
            .unwrap()
            .is_some());
        assert!(PackedWeight::stack_within(&[&half, &half, &one], limit)
            .unwrap()
            .is_none());
        assert!(PackedWeight::stack(&[&half, &half, &one])
            .unwrap()
            .is_some());
    }

    #[test]
    fn emulated_formats_match_their_cpu_kernels() {
        for m in [
            "w:i4:sym:g32",
            "w:u3:affine:g64",
            "w:i8:sym",
            "nf4",
            "fp4:b32",
            "dynamic-int8",
            "static-int8",
            "w8a8:token",
        ] {
            emulation_matches_kernel(m, 2e-4);
        }
    }

    #[test]
    fn a_format_without_an_emulation_is_refused() {
        let w = randn(&[4, 8], 1).unwrap();
        let dense: Arc<dyn WeightFormat> = Arc::new(Dense::new(w).unwrap());
        assert_eq!(dense.input_quant(), InputQuant::Unknown);
        let e = Dequantized::wrap(dense, &Device::Cpu, DType::F32).unwrap_err();
        assert!(e.to_string().contains("no emulation"), "{e}");
    }

    #[test]
    fn bf16_compute_is_a_rounding_of_the_f32_product() {
        let w = randn(&[16, 64], 1).unwrap();
        let host: Arc<dyn WeightFormat> = Arc::new(
            crate::nn::format::grouped::Grouped::quantize(&w, &"i4:sym:g32".parse().unwrap(), "fc")
                .unwrap(),
        );
        let emu = Dequantized::wrap(host.clone(), &Device::Cpu, DType::F32).unwrap();
        let bf = emu.with_compute_dtype(DType::BF16).unwrap().unwrap();
        assert!(bf.native_input(DType::BF16) && !bf.native_input(DType::F32));
        assert!(emu.with_compute_dtype(DType::F32).unwrap().is_none());
        let x = randn(&[3, 64], 2).unwrap();
        let y32 = host.forward(&x, None).unwrap();
        let y16 = bf
            .forward(&x.to_dtype(DType::BF16).unwrap(), None)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        // bf16 keeps 8 significant bits: inputs, weights and output each round by ≤ 2^-8
        // relative; bound the error by 3·2^-8 of Σ|x||w| per output.
        let bound = x
            .abs()
            .unwrap()
            .matmul(&host.dequantize().unwrap().abs().unwrap().t().unwrap())
            .unwrap();
        let excess = ((y32 - y16).unwrap().abs().unwrap() - (bound * (3.0 / 256.0)).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(excess <= 0.0, "bf16 error above its bound by {excess}");
    }
}
