//! W8A8 layers (int8 per token, FP8 per token) multiplied in their own precision on a GPU's
//! tensor cores ([`crate::nn::cuda_lt`]): the weight codes live on the device as they are
//! stored, each call quantizes its activation rows on the device with the CPU kernels'
//! rules, multiplies codes by codes (s8·s8 → s32, or e4m3·e4m3 → f32), and applies the
//! activation-row and weight-channel scales to the product. Before this, such layers ran a
//! dequantized bf16/f32 copy with fake-quantized inputs ([`super::on_device`]), which
//! computes the same numbers with twice or four times the weight traffic.
//!
//! Used where cuBLASLt takes the shapes (`k`, `n` multiples of 16) unless
//! `QUANTLAB_TENSOR_CORES=0` (for before/after measurements); otherwise the emulation runs.

use super::{fp8::Fp8, int8::ActQuant, int8::Int8, InputQuant, WeightFormat};
use crate::load::NamedTensor;
use crate::nn::cuda_lt::{lt_matmul, shapes_fit, LtInput};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use std::any::Any;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct TensorCore {
    host: Arc<dyn WeightFormat>,
    kind: LtInput,
    /// `[out, in]` codes on the device as bytes (two's complement int8, or E4M3).
    codes: Tensor,
    /// `[1, out]` f32 weight scales on the device.
    scale: Tensor,
}

/// Whether tensor-core W8A8 is switched on (`QUANTLAB_TENSOR_CORES=0` turns it off).
fn enabled() -> bool {
    std::env::var("QUANTLAB_TENSOR_CORES").map_or(true, |v| v != "0")
}

impl TensorCore {
    /// The layer on `device` through tensor cores, or `None` when its format, the device or
    /// its shape does not allow them (the caller then emulates it).
    pub fn try_new<F: WeightFormat + Clone + 'static>(
        host: &F,
        device: &Device,
    ) -> Result<Option<Self>> {
        if !device.is_cuda() || !enabled() {
            return Ok(None);
        }
        Self::build(host, device)
    }

    /// [`Self::try_new`] on any device (the CPU runs the reference product: tests).
    fn build<F: WeightFormat + Clone + 'static>(host: &F, device: &Device) -> Result<Option<Self>> {
        let (n, k) = host.shape();
        if !shapes_fit(k, n) {
            return Ok(None);
        }
        let any: &dyn Any = host.as_any();
        let (kind, codes, scales) = if let Some(f) = any.downcast_ref::<Int8>() {
            if f.act != ActQuant::PerToken {
                return Ok(None);
            }
            let bytes: Vec<u8> = f.codes.iter().map(|&c| c as u8).collect();
            let codes = Tensor::from_vec(bytes, (n, k), device)?;
            (LtInput::I8, codes, f.scale.clone())
        } else if let Some(f) = any.downcast_ref::<Fp8>() {
            if !f.dynamic_activations() {
                return Ok(None);
            }
            let codes = Tensor::from_vec(f.codes().to_vec(), (n, k), device)?;
            let s = f.scales();
            let scales = if s.len() == 1 {
                vec![s[0]; n]
            } else {
                s.to_vec()
            };
            (LtInput::Fp8, codes, scales)
        } else {
            return Ok(None);
        };
        let host: Arc<dyn WeightFormat> = Arc::new(host.clone());
        Ok(Some(TensorCore {
            host,
            kind,
            codes,
            scale: Tensor::from_vec(scales, (1, n), device)?,
        }))
    }

    /// Activation rows as codes of `self.kind` and their `[m, 1]` scales, by the CPU
    /// kernels' rules ([`crate::nn::cuda_lt::quantize_rows`]): int8 with scale
    /// `absmax / 127`, FP8 with scale `amax / 448` (zero rows have zero codes, so their
    /// scale does not matter).
    fn quantize_rows(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let absmax = x.abs()?.max_keepdim(D::Minus1)?;
        let codes = crate::nn::cuda_lt::quantize_rows(x, &absmax, self.kind)?;
        let per = match self.kind {
            LtInput::I8 => 127f32,
            LtInput::Fp8 => crate::quant::fp8::E4M3_MAX,
        };
        let scale = absmax.broadcast_div(&Tensor::new(per, x.device())?)?;
        Ok((codes, scale))
    }
}

impl WeightFormat for TensorCore {
    fn id(&self) -> &'static str {
        self.host.id()
    }

    fn label(&self) -> String {
        self.host.label()
    }

    fn describe(&self) -> String {
        format!(
            "{} (tensor cores, {} on {:?})",
            self.host.describe(),
            match self.kind {
                LtInput::I8 => "s8·s8→s32",
                LtInput::Fp8 => "e4m3·e4m3→f32",
            },
            self.codes.device().location()
        )
    }

    fn shape(&self) -> (usize, usize) {
        self.host.shape()
    }

    fn device(&self) -> Device {
        self.codes.device().clone()
    }

    fn native_input(&self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let (codes, row_scale) = self.quantize_rows(&xf)?;
        let y = lt_matmul(&codes, &self.codes, self.kind)?
            .broadcast_mul(&row_scale)?
            .broadcast_mul(&self.scale)?;
        let y = match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => y,
        };
        Ok(y.to_dtype(dtype)?)
    }

    fn dequantize(&self) -> Result<Tensor> {
        self.host.dequantize()
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        if device.same_device(self.codes.device()) {
            return Ok(Arc::new(self.clone()));
        }
        self.host.to_device(device)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::format::int8::ActQuant;
    use crate::quant::fp8::Fp8Scaling;

    fn weight(n: usize, k: usize) -> Tensor {
        let v: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
            .collect();
        Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap()
    }

    /// The tensor-core path (its CPU reference product, in tests) against the host
    /// format's own kernel: the same codes and scales, so equal up to f32 rounding of the
    /// scaled result, and the rare rounding tie in the activation codes.
    #[test]
    fn matches_the_host_kernels() {
        let (n, k, m) = (32, 48, 5);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.731).sin() * 4.0).collect();
        let x = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        let bias =
            Tensor::from_vec((0..n).map(|i| i as f32 * 0.1).collect(), n, &Device::Cpu).unwrap();
        let int8 = Int8::quantize_absmax(&weight(n, k), ActQuant::PerToken).unwrap();
        let fp8 = Fp8::quantize(&weight(n, k), Fp8Scaling::PerChannel, true).unwrap();
        let fp8t = Fp8::quantize(&weight(n, k), Fp8Scaling::PerTensor, true).unwrap();
        let cores = [
            TensorCore::build(&int8, &Device::Cpu).unwrap().unwrap(),
            TensorCore::build(&fp8, &Device::Cpu).unwrap().unwrap(),
            TensorCore::build(&fp8t, &Device::Cpu).unwrap().unwrap(),
        ];
        for tc in cores {
            let host = tc.host.clone();
            let want = host
                .forward(&x, Some(&bias))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = tc
                .forward(&x, Some(&bias))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{}: {a} vs {b}",
                    host.describe()
                );
            }
        }
        // Weight-only and unaligned layers are left to the emulation.
        let wo = Fp8::quantize(&weight(n, k), Fp8Scaling::PerChannel, false).unwrap();
        assert!(TensorCore::build(&wo, &Device::Cpu).unwrap().is_none());
        let odd = Int8::quantize_absmax(&weight(10, 48), ActQuant::PerToken).unwrap();
        assert!(TensorCore::build(&odd, &Device::Cpu).unwrap().is_none());
    }
}
