//! The one swappable linear layer every model is built from. It holds its weight in some
//! [`WeightFormat`]; a plan converts it in place through an [`Algorithm`](super::algo),
//! after the layer has gathered the input statistics that algorithm asked for.

use super::algo::LayerInput;
use super::calib::{Calibration, Collector, Statistic};
use super::format::{dense::Dense, ggml::Ggml, WeightFormat};
use super::method::Method;
use crate::load::{raw_f32, NamedTensor, TensorSource};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor as GgmlTensor};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug)]
pub struct QLinear {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Arc<dyn WeightFormat>,
    pub bias: Option<Tensor>,
    /// The plan method that produced the weight (`keep` when loaded as stored).
    pub method: Method,
    collector: Mutex<Option<Collector>>,
    /// When set, compressed weights are dequantized once and the f32 copy is reused:
    /// the same numbers, traded for memory (for long evaluations, not size measurements).
    dequant_cache: Option<OnceLock<Tensor>>,
}

impl Clone for QLinear {
    fn clone(&self) -> Self {
        QLinear {
            name: self.name.clone(),
            in_features: self.in_features,
            out_features: self.out_features,
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            method: self.method.clone(),
            collector: Mutex::new(self.collector.lock().unwrap().clone()),
            dequant_cache: self.dequant_cache.clone(),
        }
    }
}

impl QLinear {
    /// An f32 layer from a `[out, in]` weight and optional `[out]` bias.
    pub fn new(name: &str, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        weight
            .dims2()
            .with_context(|| format!("linear layer {name}: weight must be 2-D [out, in]"))?;
        Self::from_format(name, Arc::new(Dense::new(weight)?), bias, "f32".parse()?)
    }

    /// A layer around an existing weight format.
    pub fn from_format(
        name: &str,
        weight: Arc<dyn WeightFormat>,
        bias: Option<Tensor>,
        method: Method,
    ) -> Result<Self> {
        let (out_features, in_features) = weight.shape();
        if let Some(b) = &bias {
            if b.dims() != [out_features] {
                bail!(
                    "linear layer {name}: bias has shape {:?}, expected [{out_features}]",
                    b.dims()
                );
            }
        }
        Ok(QLinear {
            name: name.to_string(),
            in_features,
            out_features,
            weight,
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            method,
            collector: Mutex::new(None),
            dequant_cache: None,
        })
    }

    /// A layer that keeps a GGML weight as stored (e.g. Q4_1 from a GGUF file); float
    /// GGML tensors become plain f32 layers.
    pub fn from_ggml(name: &str, weight: GgmlTensor) -> Result<Self> {
        weight
            .shape()
            .dims2()
            .with_context(|| format!("linear layer {name}: weight must be 2-D [out, in]"))?;
        match weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Self::new(name, weight.dequantize(&weight.device())?, None)
            }
            _ => Self::from_format(name, Arc::new(Ggml::new(weight)?), None, Method::keep()),
        }
    }

    /// Reads layer `name` from a checkpoint: in the format recorded for it in a quantlab
    /// checkpoint's metadata, as a GGML block type when `keep_ggml` and the source holds
    /// one, f32 otherwise. The bias `<name>.bias` is read when present.
    pub fn load(
        name: &str,
        src: &mut dyn TensorSource,
        keep_ggml: bool,
        device: &Device,
    ) -> Result<Self> {
        let bias_name = format!("{name}.bias");
        let bias = if src.has(&bias_name) {
            Some(src.tensor(&bias_name, device)?)
        } else {
            None
        };
        if let Some(stored) = super::checkpoint::stored_layer(src, name)? {
            let loader = super::registry::format_loader(&stored.format)
                .with_context(|| format!("layer {name} in {}", src.origin()))?;
            let mut parts = super::format::StoredParts::new(name, src);
            // Loaders may read onto the device directly; CPU-only formats say so here.
            let weight = loader(stored.shape, &stored.meta, &mut parts, device)
                .and_then(|w| w.to_device(device))
                .with_context(|| format!("reading layer {name}"))?;
            if weight.shape() != stored.shape {
                bail!(
                    "layer {name}: stored weight has shape {:?}, metadata says {:?}",
                    weight.shape(),
                    stored.shape
                );
            }
            let method = stored
                .method
                .parse()
                .with_context(|| format!("layer {name}: stored method"))?;
            return Self::from_format(name, weight, bias, method);
        }
        let weight_name = format!("{name}.weight");
        if keep_ggml {
            if let Some(q) = src.ggml(&weight_name, device)? {
                let l = Self::from_ggml(name, q)?;
                return Self::from_format(name, l.weight, bias, l.method);
            }
        }
        Self::new(name, src.tensor(&weight_name, device)?, bias)
    }

    /// The weight as f32 `[out, in]` (dequantized if needed).
    pub fn weight_f32(&self) -> Result<Tensor> {
        self.weight.dequantize()
    }

    /// Replaces the weight (same shape), dropping a stale dequantized copy.
    pub fn set_weight(&mut self, w: Arc<dyn WeightFormat>) {
        debug_assert_eq!(w.shape(), (self.out_features, self.in_features));
        self.weight = w;
        if self.dequant_cache.is_some() {
            self.set_cache_dequantized(true);
        }
    }

    /// Reuse one dequantized f32 copy of compressed weights across forward passes.
    pub fn set_cache_dequantized(&mut self, on: bool) {
        self.dequant_cache = on.then(OnceLock::new);
    }

    /// Computes in `dtype` where the weight's format offers a choice on its device (a GPU
    /// copy of a compressed weight dequantized to bf16); unchanged otherwise.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if let Some(w) = self
            .weight
            .with_compute_dtype(dtype)
            .with_context(|| format!("layer {}: computing in {dtype:?}", self.name))?
        {
            self.weight = w;
        }
        Ok(())
    }

    /// Starts gathering statistics of this layer's inputs.
    pub fn start_calibration(&self, needs: &[Statistic]) {
        *self.collector.lock().unwrap() = Some(Collector::new(needs, self.in_features));
    }

    /// The statistics gathered since [`Self::start_calibration`], if it was called.
    pub fn take_calibration(&self) -> Result<Option<Calibration>> {
        self.collector
            .lock()
            .unwrap()
            .take()
            .map(|c| {
                c.finish()
                    .with_context(|| format!("calibrating layer {}", self.name))
            })
            .transpose()
    }

    /// Converts the weight with `method`'s algorithm, on the layer's device.
    pub fn convert(&mut self, method: &Method, calibration: Option<&Calibration>) -> Result<()> {
        let alg = method.algorithm();
        if alg.keeps_layer() {
            return Ok(());
        }
        if !alg.needs().is_empty() && calibration.is_none() {
            bail!(
                "layer {}: {method} needs calibration data first (no statistics were gathered)",
                self.name
            );
        }
        let device = self.weight.device();
        let input = LayerInput {
            name: &self.name,
            weight: &self.weight,
            calibration,
        };
        let w = alg.apply(&input)?;
        self.weight = w
            .to_device(&device)
            .with_context(|| format!("layer {} ({method})", self.name))?;
        self.method = method.clone();
        if self.dequant_cache.is_some() {
            self.set_cache_dequantized(true);
        }
        Ok(())
    }

    /// Whether [`Self::forward`] of an f32 input is now exactly `weight.forward(x, bias)`:
    /// no statistics are being gathered and no dequantized copy stands in. Only then may a
    /// forward engine multiply with a weight that stacks this layer's rows with others'.
    pub fn forwards_through_format(&self) -> bool {
        let cached = self.dequant_cache.is_some() && self.weight.forward_is_dequantized_matmul();
        !cached && self.collector.lock().unwrap().is_none()
    }

    /// `y = x Wᵀ + b` for `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let last = *dims
            .last()
            .context("linear input must have at least one dimension")?;
        if last != self.in_features {
            bail!(
                "layer {} expects {} input features, got shape {dims:?}",
                self.name,
                self.in_features
            );
        }
        // Activations in another dtype (bf16 on a GPU) go in as they are where the format
        // takes them, as f32 otherwise; the output comes back in the input's dtype.
        let in_dtype = x.dtype();
        let x2 = x.reshape(((), self.in_features))?;
        let x2 = if self.weight.native_input(in_dtype) {
            x2
        } else {
            x2.to_dtype(DType::F32)?
        };
        if let Some(c) = self.collector.lock().unwrap().as_mut() {
            c.observe(&x2.to_dtype(DType::F32)?)
                .with_context(|| format!("calibrating layer {}", self.name))?;
        }
        let y = match &self.dequant_cache {
            Some(cache) if self.weight.forward_is_dequantized_matmul() => {
                let w = match cache.get() {
                    Some(w) => w.clone(),
                    None => {
                        let w = self.weight.dequantize()?;
                        let _ = cache.set(w.clone());
                        w
                    }
                };
                let y = x2.to_dtype(w.dtype())?.matmul(&w.t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            _ => self
                .weight
                .forward(&x2, self.bias.as_ref())
                .with_context(|| format!("layer {}", self.name))?,
        };
        *dims.last_mut().unwrap() = self.out_features;
        Ok(y.reshape(dims)?.to_dtype(in_dtype)?)
    }

    pub fn num_params(&self) -> usize {
        self.in_features * self.out_features + self.bias.as_ref().map_or(0, |_| self.out_features)
    }

    /// The tensors this layer serializes to, under `<name>.<part>`.
    pub fn stored_tensors(&self) -> Result<Vec<NamedTensor>> {
        let mut out = self.weight.tensors(&self.name)?;
        if let Some(b) = &self.bias {
            out.push(NamedTensor {
                name: format!("{}.bias", self.name),
                tensor: raw_f32(b)?,
            });
        }
        Ok(out)
    }

    /// Bytes of the stored tensors (payload only), by arithmetic.
    pub fn stored_bytes(&self) -> usize {
        self.weight.stored_bytes() + self.bias.as_ref().map_or(0, |_| self.out_features * 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels;
    use crate::quant::{self, ObserverKind};

    fn m(s: &str) -> Method {
        s.parse().unwrap()
    }

    fn layer() -> (QLinear, Tensor) {
        let w = quant::random::randn(&[16, 64], 1).unwrap();
        let b = quant::random::randn(&[16], 2).unwrap();
        let x = quant::random::randn(&[5, 64], 3).unwrap();
        (QLinear::new("fc", w, Some(b)).unwrap(), x)
    }

    /// f64 reference: x·Wᵀ + b computed from the layer's own (dequantized) weights.
    fn reference(l: &QLinear, x: &Tensor) -> Vec<f64> {
        let w = l.weight_f32().unwrap().to_vec2::<f32>().unwrap();
        let b = l.bias.as_ref().unwrap().to_vec1::<f32>().unwrap();
        let xs = x.to_vec2::<f32>().unwrap();
        let mut out = Vec::new();
        for r in &xs {
            for (j, wr) in w.iter().enumerate() {
                out.push(
                    r.iter()
                        .zip(wr)
                        .map(|(a, c)| *a as f64 * *c as f64)
                        .sum::<f64>()
                        + b[j] as f64,
                );
            }
        }
        out
    }

    fn max_diff(y: &Tensor, r: &[f64]) -> f64 {
        y.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(r)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn f32_matches_f64_reference() {
        let (l, x) = layer();
        assert!(max_diff(&l.forward(&x).unwrap(), &reference(&l, &x)) < 1e-4);
    }

    #[test]
    fn dynamic_int8_error_is_bounded_by_activation_rounding() {
        let (mut l, x) = layer();
        l.convert(&m("dynamic-int8"), None).unwrap();
        // Against the dequantized int8 weights, the only remaining error is activation
        // rounding: at most scale_x/2 per input times Σ|w|.
        let y = l.forward(&x).unwrap();
        let r = reference(&l, &x);
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (lo, hi) = kernels::min_max(&xs);
        let (sx, _) = kernels::activation_qparams_u8(lo, hi);
        let w = l.weight_f32().unwrap().to_vec2::<f32>().unwrap();
        let max_row_l1 = w
            .iter()
            .map(|r| r.iter().map(|v| v.abs() as f64).sum::<f64>())
            .fold(0.0, f64::max);
        let bound = sx as f64 / 2.0 * max_row_l1 + 1e-4;
        let d = max_diff(&y, &r);
        assert!(d <= bound, "{d} > {bound}");
        assert!(d > 0.0, "activations really are quantized");
    }

    #[test]
    fn static_int8_needs_calibration_and_uses_it() {
        let (mut l, x) = layer();
        let e = l
            .convert(&m("static-int8:minmax"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc") && e.contains("calibration"), "{e}");
        l.start_calibration(&[crate::nn::calib::Statistic::InputRange(
            ObserverKind::MinMax,
        )]);
        l.forward(&x).unwrap();
        let c = l.take_calibration().unwrap().unwrap();
        l.convert(&m("static-int8:minmax"), Some(&c)).unwrap();
        // Calibrated on the same batch: identical to dynamic quantization of that batch.
        let mut d = layer().0;
        d.convert(&m("dynamic-int8"), None).unwrap();
        let (ys, yd) = (l.forward(&x).unwrap(), d.forward(&x).unwrap());
        assert_eq!(ys.to_vec2::<f32>().unwrap(), yd.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn weight_only_and_half_forward_use_their_stored_weights() {
        for m in ["w:i4:sym:g32", "nf4", "f16", "bf16", "w:u8:affine:ch0"] {
            let (mut l, x) = layer();
            l.convert(&m.parse().unwrap(), None).unwrap();
            assert!(
                max_diff(&l.forward(&x).unwrap(), &reference(&l, &x)) < 1e-3,
                "{m}"
            );
        }
    }

    #[test]
    fn row_decoding_equals_the_schemes_own_dequantization() {
        for m in [
            "w:i4:sym:g32",
            "w:i3:affine:g24",
            "w:u8:affine:ch0",
            "w:i8:sym:tensor",
            "nf4",
            "fp4:dq",
            "f16",
        ] {
            let (mut l, x) = layer();
            l.convert(&m.parse().unwrap(), None).unwrap();
            // The schemes' own dequantization (tensor ops / the code book), against the
            // row decoder the formats use.
            let any = l.weight.as_any();
            let own = if let Some(g) = any.downcast_ref::<crate::nn::format::grouped::Grouped>() {
                g.q.dequantize().unwrap()
            } else if let Some(f) = any.downcast_ref::<crate::nn::format::fourbit::FourBitWeight>()
            {
                Tensor::from_vec(f.q.dequantize(), (16, 64), &Device::Cpu).unwrap()
            } else if let Some(h) = any.downcast_ref::<crate::nn::format::half::Half>() {
                h.weight.to_dtype(DType::F32).unwrap()
            } else {
                unreachable!("{m}")
            };
            let rows = l
                .weight_f32()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(
                rows,
                own.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{m}"
            );
            // Many rows take the decode-then-matmul path; both match the f64 reference.
            let big = Tensor::cat(&[&x, &x, &x], 0).unwrap();
            assert!(
                max_diff(&l.forward(&big).unwrap(), &reference(&l, &big)) < 1e-3,
                "{m}"
            );
        }
    }

    #[test]
    fn cached_dequantization_gives_the_same_outputs() {
        for m in ["w:i3:sym:g32", "nf4", "f16"] {
            let (mut l, x) = layer();
            l.convert(&m.parse().unwrap(), None).unwrap();
            // Uncached, few rows multiply straight from the codes: same values, another
            // summation order.
            let plain = l.forward(&x).unwrap();
            l.set_cache_dequantized(true);
            let cached = l.forward(&x).unwrap();
            let plain: Vec<f64> = plain
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            assert!(max_diff(&cached, &plain) < 1e-5, "{m}");
            assert_eq!(
                l.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
                cached.to_vec2::<f32>().unwrap(),
                "{m}"
            );
            // A later conversion drops the stale copy.
            l.convert(&"w:i8:sym:ch0".parse().unwrap(), None).unwrap();
            assert!(max_diff(&l.forward(&x).unwrap(), &reference(&l, &x)) < 1e-3);
        }
    }

    #[test]
    fn stored_sizes() {
        let (mut l, _) = layer();
        assert_eq!(l.stored_bytes(), 16 * 64 * 4 + 16 * 4);
        l.convert(&m("dynamic-int8"), None).unwrap();
        assert_eq!(l.stored_bytes(), 16 * 64 + 16 * 4 + 16 * 4);
        let (mut l, _) = layer();
        l.convert(&m("w:i4:sym:g32"), None).unwrap();
        assert_eq!(l.stored_bytes(), 16 * 64 / 2 + 32 * 4 + 16 * 4);
        // Affine: one zero-point byte per group on top.
        let (mut l, _) = layer();
        l.convert(&m("w:u4:affine:g32"), None).unwrap();
        assert_eq!(l.stored_bytes(), 16 * 64 / 2 + 32 * 5 + 16 * 4);
    }

    #[test]
    fn nan_weights_and_bad_inputs_are_errors() {
        let w = Tensor::from_vec(vec![1.0f32, f32::NAN], (1, 2), &Device::Cpu).unwrap();
        let mut l = QLinear::new("bad", w, None).unwrap();
        let e = l.convert(&m("dynamic-int8"), None).unwrap_err().to_string();
        assert!(e.contains("bad"), "{e}");
        let (l, _) = layer();
        assert!(l
            .forward(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}
