//! LLM.int8() (Dettmers et al. 2022) as bitsandbytes' `Linear8bitLt` runs it at inference
//! (bitsandbytes 0.50.2: `autograd/_functions.py` `MatMul8bitLt.forward`, the default
//! kernels `int8_vectorwise_quant`, `int8_mixed_scaled_mm`, `int8_scaled_mm`):
//!
//! - weights: int8 per output row, `absmax / 127` ([`Int8::quantize_absmax`]);
//! - per call, every input value with `|x| ≥ threshold` is an outlier, and a column holding
//!   one is an outlier column for all rows;
//! - the rest is quantized per row (vector-wise): the row's absmax over its non-outlier
//!   values, codes `round(x · 127 / absmax)`, outlier columns' codes set to 0, and
//!   multiplied on the int8 kernels with i32 accumulation, rescaled by both absmaxes / 127²;
//! - the outlier columns are multiplied in floating point with the *dequantized int8*
//!   weight columns (`code · absmax / 127`, as bitsandbytes does when the layer holds no
//!   fp16 weights) and added.
//!
//! bitsandbytes works in fp16 throughout; here everything stays f32, so results equal it up
//! to fp16 rounding (checked in `tests/bnb_reference.rs` on fp16-exact data).

use super::int8::{quantize_row_symmetric, symmetric_scale, ActQuant, Int8, SYMMETRIC_ZERO_POINT};
use super::{keep_on_cpu, StoredParts, WeightFormat};
use crate::load::NamedTensor;
use crate::nn::kernels::{self, Isa};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const ID: &str = "llm_int8";

/// bitsandbytes' default outlier threshold (`Linear8bitLt(threshold=6.0)`).
pub const DEFAULT_THRESHOLD: f32 = 6.0;

/// How many input columns were outliers, summed over the forward calls of a run.
#[derive(Debug, Default)]
struct OutlierCounter {
    calls: AtomicU64,
    flagged: AtomicU64,
}

/// Outlier columns seen by one layer since its counters were last reset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierStats {
    pub calls: u64,
    /// Outlier columns per call, averaged over the calls.
    pub mean_columns: f64,
    /// `mean_columns / in_features`: the fraction of input columns multiplied in f32.
    pub fraction: f64,
}

#[derive(Debug, Clone)]
pub struct LlmInt8 {
    /// The int8 weight codes and per-row scales (its activation mode is unused here).
    pub weight: Int8,
    pub threshold: f32,
    /// Shared between clones of the layer (one count per layer of a model).
    counter: Arc<OutlierCounter>,
}

impl LlmInt8 {
    pub fn quantize(w: &Tensor, threshold: f32) -> Result<Self> {
        check_threshold(threshold)?;
        Ok(Self::new(
            Int8::quantize_absmax(w, ActQuant::PerToken)?,
            threshold,
        ))
    }

    fn new(weight: Int8, threshold: f32) -> Self {
        LlmInt8 {
            weight,
            threshold,
            counter: Arc::default(),
        }
    }

    /// The outlier columns counted since the last [`Self::reset_outlier_stats`].
    pub fn outlier_stats(&self) -> OutlierStats {
        let calls = self.counter.calls.load(Ordering::Relaxed);
        let flagged = self.counter.flagged.load(Ordering::Relaxed);
        let mean_columns = flagged as f64 / calls.max(1) as f64;
        OutlierStats {
            calls,
            mean_columns,
            fraction: mean_columns / self.weight.in_features.max(1) as f64,
        }
    }

    pub fn reset_outlier_stats(&self) {
        self.counter.calls.store(0, Ordering::Relaxed);
        self.counter.flagged.store(0, Ordering::Relaxed);
    }

    /// `x` (`m` rows of `in_features`) times the weight, plus bias, with kernel path `isa`
    /// (any of [`Isa::available`]). Counts the call's outlier columns.
    pub fn forward_slice(
        &self,
        isa: Isa,
        xs: &[f32],
        m: usize,
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let (n, k) = (self.weight.out_features, self.weight.in_features);
        if xs.len() != m * k {
            bail!(
                "llm.int8 layer expects {m} rows of {k} inputs, got {} values",
                xs.len()
            );
        }
        if bias.is_some_and(|b| b.len() != n) {
            bail!("llm.int8 layer: bias has the wrong length");
        }
        if kernels::act::finite_range(xs).is_none() && !xs.is_empty() {
            bail!("input activations contain NaN or infinite values");
        }
        let (a, cols) = self.quantize_input(xs, m);
        let mut y =
            kernels::gemm_u8_i8_f32_with(isa, &a, self.weight.packed(), &self.weight.scale, bias);
        self.add_outlier_columns(xs, m, &cols, &mut y);
        self.counter.calls.fetch_add(1, Ordering::Relaxed);
        self.counter
            .flagged
            .fetch_add(cols.len() as u64, Ordering::Relaxed);
        Ok(y)
    }

    /// The int8 part's activation rows (outlier columns' codes 0) and the outlier columns,
    /// ascending: bitsandbytes' `int8_vectorwise_quant(x, threshold)`.
    pub fn quantize_input(&self, xs: &[f32], m: usize) -> (kernels::ActRows, Vec<usize>) {
        let k = self.weight.in_features;
        let stride = self.weight.packed().kp;
        let t = self.threshold;
        let mut flagged = vec![false; k];
        let mut absmax = vec![0f32; m];
        if k > 0 {
            for (row, amax) in xs.chunks_exact(k).zip(absmax.iter_mut()) {
                for (f, &v) in flagged.iter_mut().zip(row) {
                    let a = v.abs();
                    if a >= t {
                        *f = true;
                    } else if a > *amax {
                        *amax = a;
                    }
                }
            }
        }
        let cols: Vec<usize> = (0..k).filter(|&j| flagged[j]).collect();
        let mut codes = vec![SYMMETRIC_ZERO_POINT as u8; m * stride];
        if k > 0 {
            for ((dst, src), &amax) in codes
                .chunks_exact_mut(stride)
                .zip(xs.chunks_exact(k))
                .zip(&absmax)
            {
                quantize_row_symmetric(src, amax, &mut dst[..k]);
                for &j in &cols {
                    dst[j] = SYMMETRIC_ZERO_POINT as u8;
                }
            }
        }
        let a = kernels::ActRows {
            m,
            k,
            stride,
            codes,
            scale: absmax.iter().map(|&a| symmetric_scale(a)).collect(),
            zero_point: vec![SYMMETRIC_ZERO_POINT; m],
        };
        (a, cols)
    }

    /// `y += x[:, cols] · deq(W)[:, cols]ᵀ` in f32: one dequantized weight column at a time,
    /// added to every output row (an axpy the compiler vectorises).
    fn add_outlier_columns(&self, xs: &[f32], m: usize, cols: &[usize], y: &mut [f32]) {
        let (n, k) = (self.weight.out_features, self.weight.in_features);
        let mut wcol = vec![0f32; n];
        for &c in cols {
            for (j, w) in wcol.iter_mut().enumerate() {
                *w = self.weight.codes[j * k + c] as f32 * self.weight.scale[j];
            }
            for (i, out) in y.chunks_exact_mut(n).take(m).enumerate() {
                let xv = xs[i * k + c];
                for (o, &w) in out.iter_mut().zip(&wcol) {
                    *o += xv * w;
                }
            }
        }
    }

    pub fn load(
        shape: (usize, usize),
        meta: &serde_json::Value,
        parts: &mut StoredParts,
        _device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let threshold = meta
            .get("threshold")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "layer {}: format metadata lacks 'threshold' (the checkpoint is corrupt)",
                    parts.layer
                )
            })? as f32;
        check_threshold(threshold)?;
        let weight = Int8::load_parts(shape, &serde_json::Value::Null, parts)?;
        Ok(Arc::new(Self::new(weight, threshold)))
    }
}

/// Thresholds must be finite and positive (without outliers, use `w8a8:token`).
pub fn check_threshold(t: f32) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        bail!("llm.int8 threshold must be a positive number, got {t} (for no outlier columns use w8a8:token)");
    }
    Ok(())
}

impl WeightFormat for LlmInt8 {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        "llm.int8".into()
    }

    fn describe(&self) -> String {
        format!("llm.int8 w:ch t{}", self.threshold)
    }

    fn shape(&self) -> (usize, usize) {
        self.weight.shape()
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let m = x.dim(0)?;
        let (n, k) = (self.weight.out_features, self.weight.in_features);
        if x.elem_count() != m * k {
            bail!(
                "llm.int8 layer expects [rows, {k}] input, got shape {:?}",
                x.dims()
            );
        }
        let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
        let isa = Isa::selected();
        let pick = candle_core::CpuStorage::as_slice::<f32>;
        let y = match crate::nn::rows::with_cpu_slice(x, m * k, pick, |xs| {
            self.forward_slice(isa, xs, m, bias.as_deref())
        }) {
            Some(y) => y?,
            None => {
                self.forward_slice(isa, &x.flatten_all()?.to_vec1::<f32>()?, m, bias.as_deref())?
            }
        };
        Ok(Tensor::from_vec(y, (m, n), x.device())?)
    }

    fn dequantize(&self) -> Result<Tensor> {
        self.weight.dequantize()
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        keep_on_cpu(self, "llm.int8", device)
    }

    fn meta(&self) -> serde_json::Value {
        serde_json::json!({ "threshold": self.threshold })
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        self.weight.tensors(prefix)
    }

    fn stored_bytes(&self) -> usize {
        self.weight.stored_bytes()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::random;

    /// LLM.int8 from its definition, in f64 except the activation and weight codes (which
    /// are integers computed with bitsandbytes' f32 rule `round(x · ((1 / absmax) · 127))`).
    /// Returns the output and, per value, the magnitude sum that bounds its rounding error.
    #[allow(clippy::type_complexity)]
    fn reference(
        w: &[f32],
        x: &[f32],
        b: &[f32],
        (m, k, n): (usize, usize, usize),
        t: f32,
    ) -> (Vec<f64>, Vec<f64>, Vec<usize>) {
        let code = |v: f32, amax: f32| -> f64 {
            if amax == 0.0 {
                0.0
            } else {
                (v * ((1.0f32 / amax) * 127.0)).round_ties_even() as f64
            }
        };
        let wamax: Vec<f32> = (0..n)
            .map(|j| (0..k).map(|p| w[j * k + p].abs()).fold(0.0, f32::max))
            .collect();
        let wq: Vec<f64> = (0..n * k).map(|i| code(w[i], wamax[i / k])).collect();
        let cols: Vec<usize> = (0..k)
            .filter(|&p| (0..m).any(|i| x[i * k + p].abs() >= t))
            .collect();
        let mut y = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        for i in 0..m {
            let row = &x[i * k..(i + 1) * k];
            let xamax = row
                .iter()
                .map(|v| v.abs())
                .filter(|&a| a < t)
                .fold(0.0, f32::max);
            for j in 0..n {
                let (mut int, mut flt, mut fmag) = (0f64, 0f64, 0f64);
                for p in 0..k {
                    let wd = wq[j * k + p] * wamax[j] as f64 / 127.0;
                    if cols.contains(&p) {
                        flt += row[p] as f64 * wd;
                        fmag += (row[p] as f64 * wd).abs();
                    } else {
                        int += code(row[p], xamax) * wq[j * k + p];
                    }
                }
                let s = xamax as f64 * wamax[j] as f64 / (127.0 * 127.0);
                y[i * n + j] = s * int + flt + b[j] as f64;
                mag[i * n + j] = (s * int).abs() + fmag + (b[j] as f64).abs();
            }
        }
        (y, mag, cols)
    }

    #[test]
    fn every_kernel_path_equals_the_definition_on_ragged_shapes() {
        // m = 1 (decode), ragged small shapes, and a product over the threading threshold.
        for (m, k, n) in [(1, 37, 19), (5, 70, 33), (9, 301, 130), (40, 1100, 600)] {
            let w = random::randn(&[n, k], 11).unwrap();
            let mut x = random::randn(&[m, k], 12)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // Planted outliers: column 3 large in one row only, the last column in every
            // row, and a value exactly at the threshold (an outlier: |x| ≥ t).
            x[3] = 9.5;
            for i in 0..m {
                x[i * k + k - 1] = -7.0 - i as f32;
            }
            x[(m - 1) * k + 5] = 6.0;
            let b = random::randn(&[n], 13).unwrap().to_vec1::<f32>().unwrap();
            let wf = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let l = LlmInt8::quantize(&w, 6.0).unwrap();
            let (want, mag, cols) = reference(&wf, &x, &b, (m, k, n), 6.0);
            assert_eq!(cols, [3, 5, k - 1], "{m}x{k}x{n}");
            for isa in Isa::available() {
                l.reset_outlier_stats();
                let y = l.forward_slice(isa, &x, m, Some(&b)).unwrap();
                for (idx, ((g, r), mg)) in y.iter().zip(&want).zip(&mag).enumerate() {
                    // f32 rounding of the scales' product, the i32 → f32 sum (exact below
                    // 2^24), the per-column f32 products and the running f32 sum over the
                    // (three) outlier columns and bias: a few ulps of the magnitudes.
                    let tol = 8.0 * f32::EPSILON as f64 * mg + 1e-30;
                    assert!(
                        (*g as f64 - r).abs() <= tol,
                        "{isa:?} {m}x{k}x{n} [{idx}]: {g} vs {r}"
                    );
                }
                let s = l.outlier_stats();
                assert_eq!(s.calls, 1);
                assert_eq!(s.mean_columns, 3.0);
                assert!((s.fraction - 3.0 / k as f64).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn without_outliers_it_is_per_token_w8a8() {
        let (m, k, n) = (6, 50, 21);
        let w = random::randn(&[n, k], 1).unwrap();
        let x = random::randn(&[m, k], 2).unwrap();
        let l = LlmInt8::quantize(&w, 100.0).unwrap();
        let t = Int8::quantize_absmax(&w, ActQuant::PerToken).unwrap();
        let a = l.forward(&x, None).unwrap().to_vec2::<f32>().unwrap();
        let b = t.forward(&x, None).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        assert_eq!(l.outlier_stats().mean_columns, 0.0);
    }

    #[test]
    fn bad_inputs_and_thresholds_are_errors() {
        let w = random::randn(&[4, 8], 3).unwrap();
        assert!(LlmInt8::quantize(&w, 0.0).is_err());
        assert!(LlmInt8::quantize(&w, f32::NAN).is_err());
        let l = LlmInt8::quantize(&w, 6.0).unwrap();
        let mut xs = vec![0.5f32; 16];
        xs[3] = f32::INFINITY;
        let x = Tensor::from_vec(xs, (2, 8), &Device::Cpu).unwrap();
        assert!(l.forward(&x, None).unwrap_err().to_string().contains("NaN"));
        let x = Tensor::zeros((2, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(l.forward(&x, None).is_err());
        let x = Tensor::zeros((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(l.forward(&x, Some(&b)).is_err());
        // All-zero input: every row's absmax is 0, the output is the bias.
        assert_eq!(
            l.forward(&x, None).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0f32; 4]; 2]
        );
    }
}
