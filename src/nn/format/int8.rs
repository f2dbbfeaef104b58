//! int8 weights (symmetric, per output channel) with int8 activations: the input is
//! quantized to u8 per call (dynamic), per row at run time (per token: W8A8 as SmoothQuant
//! runs it) or with a calibrated range (static), multiplied in integers with i32
//! accumulation, and rescaled in the epilogue.
//!
//! Symmetric int8 activation codes `c ∈ [-127, 127]` ride the u8 kernels as `c + 128` with
//! zero point 128: the kernel's zero-point correction subtracts the 128 again, exactly.

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
    /// Symmetric per row (token) at run time: `absmax(row) / 127`, codes
    /// `round_half_even(x · 127 / absmax)` (SmoothQuant's and bitsandbytes' row rule,
    /// evaluated as [`quantize_row_symmetric`] does).
    PerToken,
}

/// How [`ActQuant`] is written into checkpoint metadata (`act`); absent = the older
/// dynamic/static pair, told apart by the stored input scale.
const ACT_PER_TOKEN: &str = "token";

/// The zero point symmetric int8 codes carry on the u8 kernels.
pub const SYMMETRIC_ZERO_POINT: i32 = 128;

/// Symmetric int8 scale of a range: `absmax / 127` (1 for an all-zero range, whose codes
/// are all 0 whatever the scale).
pub fn symmetric_scale(absmax: f32) -> f32 {
    if absmax > 0.0 {
        absmax / 127.0
    } else {
        1.0
    }
}

/// One row quantized symmetrically into `dst` as u8 (`code + 128`): `round_half_even(x ·
/// m)` clamped to ±127 with `m = (1 / absmax) · 127` in f32, the arithmetic of
/// bitsandbytes' `int8_vectorwise_quant` (`A * (127.0 / row_stats)`, where torch evaluates
/// `scalar / tensor` as `tensor.reciprocal() * scalar`), so codes match it bit for bit
/// (a true division differs in the last bit, which moves exact halves).
/// `absmax` 0 gives all-zero codes.
pub fn quantize_row_symmetric(src: &[f32], absmax: f32, dst: &mut [u8]) {
    let n = src.len().min(dst.len());
    if absmax <= 0.0 {
        dst[..n].fill(SYMMETRIC_ZERO_POINT as u8);
        return;
    }
    let mul = (1.0f32 / absmax) * 127.0;
    for (d, &v) in dst[..n].iter_mut().zip(&src[..n]) {
        // The clamp leaves an integer in [-127, 127] (NaN casts to 0): +128 fits a byte.
        *d = ((v * mul).round_ties_even().clamp(-127.0, 127.0) as i32 + 128) as u8;
    }
}

/// `x` (`m` rows of `k`) quantized per row, symmetric int8 on the u8 kernels' layout
/// (`stride` bytes per row, zero point 128). An error if a value is NaN or infinite.
pub fn per_token_rows(xs: &[f32], m: usize, k: usize, stride: usize) -> Result<kernels::ActRows> {
    if xs.len() != m * k || stride < k {
        bail!(
            "per-token quantization: {} values for {m} rows of {k}",
            xs.len()
        );
    }
    let mut codes = vec![SYMMETRIC_ZERO_POINT as u8; m * stride];
    let mut scale = Vec::with_capacity(m);
    if k > 0 {
        for (dst, src) in codes.chunks_exact_mut(stride).zip(xs.chunks_exact(k)) {
            let Some((lo, hi)) = kernels::act::finite_range(src) else {
                bail!("input activations contain NaN or infinite values");
            };
            let absmax = hi.max(-lo);
            quantize_row_symmetric(src, absmax, &mut dst[..k]);
            scale.push(symmetric_scale(absmax));
        }
    } else {
        scale.resize(m, 1.0);
    }
    Ok(kernels::ActRows {
        m,
        k,
        stride,
        codes,
        scale,
        zero_point: vec![SYMMETRIC_ZERO_POINT; m],
    })
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
    /// Quantizes an f32 `[out, in]` weight with the symmetric rule W8A8 methods use
    /// (SmoothQuant's `quantize_weight_per_channel_absmax`, bitsandbytes' row-wise
    /// `int8_vectorwise_quant`): per output row, scale `absmax / 127`, codes
    /// `round_half_even(w · (1 / absmax) · 127)` in [-127, 127] ([`quantize_row_symmetric`]).
    pub fn quantize_absmax(w: &Tensor, act: ActQuant) -> Result<Self> {
        let (o, i) = w.dims2()?;
        let flat = w.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let mut codes = vec![0i8; o * i];
        let mut scale = Vec::with_capacity(o);
        let mut row = vec![0u8; i];
        if i > 0 {
            for (dst, src) in codes.chunks_exact_mut(i).zip(flat.chunks_exact(i)) {
                let absmax = src.iter().fold(0f32, |a, &v| a.max(v.abs()));
                if !absmax.is_finite() {
                    bail!("weight contains NaN or infinite values");
                }
                quantize_row_symmetric(src, absmax, &mut row);
                for (d, &u) in dst.iter_mut().zip(&row) {
                    *d = (u as i32 - SYMMETRIC_ZERO_POINT) as i8;
                }
                scale.push(symmetric_scale(absmax));
            }
        } else {
            scale.resize(o, 1.0);
        }
        Ok(Self::from_parts(o, i, codes, scale, act))
    }

    /// Quantizes an f32 `[out, in]` weight (PyTorch's per-channel symmetric qint8).
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

    /// The packed weight the kernels read.
    pub fn packed(&self) -> &kernels::PackedI8 {
        &self.packed
    }

    /// The same weight codes with another activation scheme (the packed codes are shared).
    pub fn with_act(&self, act: ActQuant) -> Self {
        Int8 {
            act,
            ..self.clone()
        }
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
            ActQuant::PerToken => {
                return per_token_rows(xs, m, self.in_features, self.packed.kp);
            }
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
        meta: &serde_json::Value,
        parts: &mut StoredParts,
        _device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        Ok(Arc::new(Self::load_parts(shape, meta, parts)?))
    }

    /// Reads the stored codes, scales and activation scheme (also for formats built on
    /// int8 weights, such as LLM.int8).
    pub fn load_parts(
        shape: (usize, usize),
        meta: &serde_json::Value,
        parts: &mut StoredParts,
    ) -> Result<Self> {
        let (o, i) = shape;
        let per_token = match meta.get("act").and_then(|v| v.as_str()) {
            None => false,
            Some(ACT_PER_TOKEN) => true,
            Some(other) => bail!(
                "layer {}: unknown int8 activation scheme '{other}' (written by a newer quantlab?)",
                parts.layer
            ),
        };
        let what = parts.what("weight");
        let codes = parts
            .get("weight")?
            .to_bytes(&what, safetensors::Dtype::I8, o * i)?;
        let scale = parts.f32("weight_scale", o)?;
        crate::load::ensure_finite_values(&scale, &parts.what("weight_scale"))?;
        let act = if per_token {
            ActQuant::PerToken
        } else if parts.has("input_scale") {
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
        Ok(Self::from_parts(o, i, codes, scale, act))
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
            ActQuant::PerToken => "int8 w:ch a:token".into(),
        }
    }

    fn meta(&self) -> serde_json::Value {
        match self.act {
            ActQuant::PerToken => serde_json::json!({ "act": ACT_PER_TOKEN }),
            _ => serde_json::Value::Null,
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
            ActQuant::PerToken => super::InputQuant::I8PerRow,
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
        if let Some(tc) = super::tensor_core::TensorCore::try_new(self, device)? {
            return Ok(Arc::new(tc));
        }
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
            ActQuant::Dynamic | ActQuant::PerToken => 0,
            ActQuant::Static { .. } => 8,
        };
        self.codes.len() + self.scale.len() * 4 + statics
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Codes and per-row scales stacked, for parts with the same activation scheme: the
    /// input is then quantized once for all of them, to the same codes each part would
    /// have computed from the same input (a per-call range, per-row ranges or a fixed one
    /// all depend on the input only).
    fn concat_rows(&self, rest: &[&dyn WeightFormat]) -> Option<Arc<dyn WeightFormat>> {
        let parts = super::same_format(self, rest, self.in_features)?;
        if parts.iter().any(|p| p.act != self.act) {
            return None;
        }
        let o = parts.iter().map(|p| p.out_features).sum();
        let codes = parts.iter().flat_map(|p| p.codes.iter().copied()).collect();
        let scale = parts.iter().flat_map(|p| p.scale.iter().copied()).collect();
        Some(Arc::new(Self::from_parts(
            o,
            self.in_features,
            codes,
            scale,
            self.act,
        )))
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
        // (scale, zero point) per row, and the u8 codes of every value.
        let (row_q, q): (Vec<(f32, i32)>, Vec<f64>) = match l.act {
            ActQuant::PerToken => {
                let mut rq = Vec::new();
                let mut q = Vec::new();
                for row in x.chunks(k) {
                    let amax = row.iter().map(|v| v.abs()).fold(0f32, f32::max);
                    let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                    rq.push((s, 128));
                    for &v in row {
                        let c = if amax > 0.0 {
                            (v * ((1.0 / amax) * 127.0)).round_ties_even()
                        } else {
                            0.0
                        };
                        q.push(c as f64 + 128.0);
                    }
                }
                (rq, q)
            }
            act => {
                let (sa, za) = match act {
                    ActQuant::Static { scale, zero_point } => (scale, zero_point),
                    _ => {
                        let lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                        let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                        kernels::activation_qparams_u8(lo, hi)
                    }
                };
                let q = x
                    .iter()
                    .map(|&v| {
                        ((v * (1.0 / sa)).round_ties_even() + za as f32).clamp(0.0, 255.0) as f64
                    })
                    .collect();
                (vec![(sa, za); m], q)
            }
        };
        let (mut y, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            let (sa, za) = row_q[i];
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
            for (act, absmax_weights) in [
                (ActQuant::Dynamic, false),
                (
                    ActQuant::Static {
                        scale: 0.02,
                        zero_point: 117,
                    },
                    false,
                ),
                (ActQuant::PerToken, true),
                (ActQuant::PerToken, false),
            ] {
                let l = if absmax_weights {
                    Int8::quantize_absmax(&w, act).unwrap()
                } else {
                    Int8::quantize(&w, act).unwrap()
                };
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

    #[test]
    fn absmax_weights_match_the_rule_by_hand() {
        // Row 0: absmax 2 → 127/2 per unit; 0.5·63.5 = 31.75 → 32, -1·63.5 → -63.5 → -64
        // (half to even), 2 → 127. Row 1: all zero → codes 0, scale 1.
        let w = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let l = Int8::quantize_absmax(&w, ActQuant::PerToken).unwrap();
        assert_eq!(l.codes, [32, -64, 127, 0, 0, 0]);
        assert_eq!(l.scale, [2.0 / 127.0, 1.0]);
        let bad = Tensor::new(&[[f32::INFINITY, 1.0]], &Device::Cpu).unwrap();
        assert!(Int8::quantize_absmax(&bad, ActQuant::PerToken).is_err());
    }

    #[test]
    fn per_token_rows_by_hand_and_on_every_kernel_path() {
        // Two rows with very different ranges: per-token keeps the small one's precision.
        let xs = [0.01f32, -0.02, 0.005, 100.0, -50.0, 25.0];
        let a = per_token_rows(&xs, 2, 3, 8).unwrap();
        assert_eq!(a.zero_point, [128, 128]);
        assert_eq!(a.scale, [0.02 / 127.0, 100.0 / 127.0]);
        // 0.01·6350 = 63.5 → 64 (even); -127; 0.005·6350 = 31.75 → 32.
        assert_eq!(&a.codes[..8], &[192, 1, 160, 128, 128, 128, 128, 128]);
        // 127, -63.5 → -64 (even), 31.75 → 32.
        assert_eq!(&a.codes[8..11], &[255, 64, 160]);
        assert!(per_token_rows(&[f32::NAN, 0.0], 1, 2, 4).is_err());
        // Each kernel path gives the same bits on per-token rows (integer sums, one epilogue).
        let (m, k, n) = (7, 45, 33);
        let w = random::randn(&[n, k], 8).unwrap();
        let x = random::randn(&[m, k], 9).unwrap().to_vec2::<f32>().unwrap();
        let l = Int8::quantize_absmax(&w, ActQuant::PerToken).unwrap();
        let a = per_token_rows(&x.concat(), m, k, l.packed().kp).unwrap();
        let want =
            kernels::gemm_u8_i8_f32_with(kernels::Isa::Portable, &a, l.packed(), &l.scale, None);
        for isa in kernels::Isa::available() {
            let got = kernels::gemm_u8_i8_f32_with(isa, &a, l.packed(), &l.scale, None);
            assert_eq!(got, want, "{isa:?}");
        }
    }

    #[test]
    fn per_token_survives_a_checkpoint_round_trip() {
        let w = random::randn(&[5, 9], 1).unwrap();
        let l = Int8::quantize_absmax(&w, ActQuant::PerToken).unwrap();
        assert_eq!(l.meta(), serde_json::json!({ "act": "token" }));
        let tensors = l.tensors("p").unwrap();
        assert_eq!(
            tensors.iter().map(|t| t.tensor.bytes.len()).sum::<usize>(),
            l.stored_bytes()
        );
    }
}
