//! int8 weights (symmetric, per output channel) with int8 activations: the input is
//! quantized to u8 per call (dynamic) or with a calibrated range (static), multiplied in
//! integers with i32 accumulation, and rescaled in the epilogue.

use super::{keep_on_cpu, named, StoredParts, WeightFormat};
use crate::load::{NamedTensor, RawTensor};
use crate::nn::kernels;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::any::Any;
use std::sync::Arc;

pub const ID: &str = "int8";

/// How the input activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActQuant {
    /// From each batch's own min/max, at run time.
    Dynamic,
    /// Fixed (scale, zero point) from calibration.
    Static { scale: f32, zero_point: i32 },
}

#[derive(Debug, Clone)]
pub struct Int8 {
    pub out_features: usize,
    pub in_features: usize,
    /// `[out, in]` row-major codes.
    pub codes: Vec<i8>,
    pub scale: Vec<f32>,
    pub act: ActQuant,
    /// The codes packed once for the kernels, with their per-row sums (Σ codes per output
    /// row, for the activation zero-point correction). Shared between clones.
    packed: Arc<kernels::PackedI8>,
}

/// The scheme int8 layers use for weights: symmetric, per output channel (PyTorch's
/// `per_channel_symmetric` qint8).
pub fn weight_scheme() -> crate::quant::Scheme {
    crate::quant::Scheme::new(8, true)
        .expect("8-bit signed is valid")
        .symmetric()
        .per_channel(0)
}

impl Int8 {
    /// Quantizes an f32 `[out, in]` weight.
    pub fn quantize(w: &Tensor, act: ActQuant) -> Result<Self> {
        let (out_features, in_features) = w.dims2()?;
        let q = crate::quant::quantize(&w.to_device(&Device::Cpu)?, &weight_scheme())?;
        let codes: Vec<i8> = q.codes_i32()?.into_iter().map(|c| c as i8).collect();
        Ok(Self::from_parts(
            out_features,
            in_features,
            codes,
            q.params.scale,
            act,
        ))
    }

    fn from_parts(o: usize, i: usize, codes: Vec<i8>, scale: Vec<f32>, act: ActQuant) -> Self {
        let packed = Arc::new(kernels::PackedI8::new(&codes, o, i));
        Int8 {
            out_features: o,
            in_features: i,
            codes,
            scale,
            act,
            packed,
        }
    }

    /// Σ codes per output row.
    pub fn row_sum(&self) -> &[i32] {
        &self.packed.row_sum
    }

    /// `x` (`m` rows of `in_features`, f32) quantized to u8 rows for the kernels, per this
    /// layer's activation scheme (one (scale, zero point) for the whole call).
    fn quantize_input(&self, xs: &[f32], m: usize) -> Result<kernels::ActRows> {
        let (scale, zp) = match self.act {
            ActQuant::Static { scale, zero_point } => (scale, zero_point),
            ActQuant::Dynamic => {
                let Some((lo, hi)) = kernels::act::finite_range(xs) else {
                    bail!("input activations contain NaN or infinite values");
                };
                kernels::activation_qparams_u8(lo, hi)
            }
        };
        Ok(kernels::ActRows::per_tensor(
            xs,
            m,
            self.in_features,
            self.packed.kp,
            scale,
            zp,
        ))
    }

    pub fn load(
        shape: (usize, usize),
        _meta: &serde_json::Value,
        parts: &mut StoredParts,
        _device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let (o, i) = shape;
        let what = parts.what("weight");
        let codes = parts
            .get("weight")?
            .to_bytes(&what, safetensors::Dtype::I8, o * i)?;
        let scale = parts.f32("weight_scale", o)?;
        crate::load::ensure_finite_values(&scale, &parts.what("weight_scale"))?;
        let act = if parts.has("input_scale") {
            let s = parts.f32("input_scale", 1)?[0];
            let what = parts.what("input_zero_point");
            let z = parts
                .get("input_zero_point")?
                .to_bytes(&what, safetensors::Dtype::I32, 1)?;
            let zero_point = i32::from_le_bytes([z[0], z[1], z[2], z[3]]);
            if !(s.is_finite() && s > 0.0 && (0..=255).contains(&zero_point)) {
                bail!(
                    "layer {}: stored input quantization (scale {s}, zero point {zero_point}) is invalid",
                    parts.layer
                );
            }
            ActQuant::Static {
                scale: s,
                zero_point,
            }
        } else {
            ActQuant::Dynamic
        };
        let codes = codes.into_iter().map(|c| c as i8).collect();
        Ok(Arc::new(Self::from_parts(o, i, codes, scale, act)))
    }
}

impl WeightFormat for Int8 {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        "qint8".into()
    }

    fn describe(&self) -> String {
        match self.act {
            ActQuant::Dynamic => "int8 w:ch a:dynamic".into(),
            ActQuant::Static { .. } => "int8 w:ch a:static".into(),
        }
    }

    fn shape(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn input_quant(&self) -> super::InputQuant {
        match self.act {
            ActQuant::Dynamic => super::InputQuant::U8PerTensor,
            ActQuant::Static { scale, zero_point } => {
                super::InputQuant::U8Fixed { scale, zero_point }
            }
        }
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let m = x.dim(0)?;
        let k = self.in_features;
        if x.elem_count() != m * k {
            bail!(
                "int8 layer expects [rows, {k}] input, got shape {:?}",
                x.dims()
            );
        }
        // Quantize straight from the tensor's storage when it is a contiguous f32 CPU
        // tensor (the usual case); copy it out otherwise.
        let pick = candle_core::CpuStorage::as_slice::<f32>;
        let a = match crate::nn::rows::with_cpu_slice(x, m * k, pick, |xs| {
            self.quantize_input(xs, m)
        }) {
            Some(a) => a?,
            None => self.quantize_input(&x.flatten_all()?.to_vec1::<f32>()?, m)?,
        };
        let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != self.out_features) {
            bail!("int8 layer: bias has the wrong length");
        }
        let y = kernels::gemm_u8_i8_f32(&a, &self.packed, &self.scale, bias.as_deref());
        Ok(Tensor::from_vec(y, (m, self.out_features), x.device())?)
    }

    fn dequantize(&self) -> Result<Tensor> {
        let deq: Vec<f32> = self
            .codes
            .chunks(self.in_features)
            .zip(&self.scale)
            .flat_map(|(row, &s)| row.iter().map(move |&c| c as f32 * s))
            .collect();
        Ok(Tensor::from_vec(
            deq,
            (self.out_features, self.in_features),
            &Device::Cpu,
        )?)
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        keep_on_cpu(self, "int8", device)
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        let (o, i) = self.shape();
        let mut out = vec![
            named(
                prefix,
                "weight",
                RawTensor::new(
                    safetensors::Dtype::I8,
                    vec![o, i],
                    self.codes.iter().map(|&c| c as u8).collect(),
                ),
            ),
            named(prefix, "weight_scale", RawTensor::f32s(&self.scale)),
        ];
        if let ActQuant::Static { scale, zero_point } = self.act {
            out.push(named(prefix, "input_scale", RawTensor::f32s(&[scale])));
            out.push(named(
                prefix,
                "input_zero_point",
                RawTensor::new(
                    safetensors::Dtype::I32,
                    vec![1],
                    zero_point.to_le_bytes().to_vec(),
                ),
            ));
        }
        Ok(out)
    }

    fn stored_bytes(&self) -> usize {
        let statics = match self.act {
            ActQuant::Dynamic => 0,
            ActQuant::Static { .. } => 8,
        };
        self.codes.len() + self.scale.len() * 4 + statics
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Activation (scale, zero point) from a calibrated input range; an error naming the layer
/// when no range was gathered.
pub fn static_qparams(layer: &str, range: Option<(f32, f32)>) -> Result<(f32, i32)> {
    let (lo, hi) = range.with_context(|| {
        format!("layer {layer}: static int8 needs calibration data first (no observer ran)")
    })?;
    Ok(kernels::activation_qparams_u8(lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::random;

    /// The forward's arithmetic in f64 from its definition: activations quantized with the
    /// scalar rule, centred by the zero point, times the weight codes and both scales, plus
    /// bias. Only the final f32 rounding of the kernel differs.
    fn reference(l: &Int8, x: &[f32], m: usize, b: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (k, n) = (l.in_features, l.out_features);
        let (sa, za) = match l.act {
            ActQuant::Static { scale, zero_point } => (scale, zero_point),
            ActQuant::Dynamic => {
                let lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                kernels::activation_qparams_u8(lo, hi)
            }
        };
        let q: Vec<f64> = x
            .iter()
            .map(|&v| ((v * (1.0 / sa)).round_ties_even() + za as f32).clamp(0.0, 255.0) as f64)
            .collect();
        let (mut y, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| (q[i * k + p] - za as f64) * l.codes[j * k + p] as f64)
                    .sum();
                let s = sa as f64 * l.scale[j] as f64;
                y[i * n + j] = s * dot + b[j] as f64;
                mag[i * n + j] = (s * dot).abs() + (b[j] as f64).abs();
            }
        }
        (y, mag)
    }

    #[test]
    fn forward_equals_the_quantized_arithmetic_in_f64() {
        // m = 1 (GEMV), a ragged tile count, and a batch over the threading threshold.
        for (m, k, n) in [(1, 37, 19), (5, 300, 70), (70, 301, 130), (2, 1100, 2000)] {
            let w = random::randn(&[n, k], 3).unwrap();
            let x = random::randn(&[m, k], 4).unwrap();
            let b = random::randn(&[n], 5).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bs = b.to_vec1::<f32>().unwrap();
            for act in [
                ActQuant::Dynamic,
                ActQuant::Static {
                    scale: 0.02,
                    zero_point: 117,
                },
            ] {
                let l = Int8::quantize(&w, act).unwrap();
                let y = l.forward(&x, Some(&b)).unwrap();
                let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (r, mag) = reference(&l, &xs, m, &bs);
                for ((got, want), mag) in y.iter().zip(&r).zip(&mag) {
                    // f32 rounding of sa·sw, of the i32 sum (exact below 2^24) and of the
                    // product and bias sum: a few ulps of the magnitudes involved.
                    let tol = 4.0 * f32::EPSILON as f64 * mag + 1e-30;
                    assert!(
                        (*got as f64 - want).abs() <= tol,
                        "{act:?} {m}x{k}x{n}: {got} vs {want}"
                    );
                }
                // A non-contiguous input (copied out, not read in place) gives the same bits.
                let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
                assert!(!xt.is_contiguous() || m == 1);
                let yt = l.forward(&xt, Some(&b)).unwrap();
                assert_eq!(
                    yt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    y,
                    "{act:?} {m}x{k}x{n} non-contiguous"
                );
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let w = random::randn(&[4, 8], 3).unwrap();
        let l = Int8::quantize(&w, ActQuant::Dynamic).unwrap();
        let mut xs = vec![0.5f32; 16];
        xs[3] = f32::NAN;
        let x = Tensor::from_vec(xs, (2, 8), &Device::Cpu).unwrap();
        let e = l.forward(&x, None).unwrap_err().to_string();
        assert!(e.contains("NaN"), "{e}");
        let x = Tensor::zeros((2, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(l.forward(&x, None).is_err());
        let x = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(l.forward(&x, Some(&b)).is_err());
        assert_eq!(l.forward(&x, None).unwrap().dims(), &[2, 4]);
    }
}
