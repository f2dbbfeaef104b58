//! FP8 E4M3 weights with an f32 scale per output channel or per tensor (torchao's
//! float8 weight-only, vLLM's FP8 checkpoints), optionally with activations cast to E4M3
//! per token on every call (W8A8-FP8, vLLM's "dynamic" scheme). On the CPU the codes are
//! decoded through a 256-entry table, row by row for a few activation rows and as a whole
//! matrix for more; other devices run a dequantized copy with the activations
//! fake-quantized the same way ([`super::on_device`]).

use super::{keep_on_cpu, meta_str, named, InputQuant, StoredParts, WeightFormat};
use crate::load::{NamedTensor, RawTensor};
use crate::nn::rows::{forward_rows_or_matmul, RowSource};
use crate::quant::fp8::{self, Fp8Scaling};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::any::Any;
use std::sync::{Arc, OnceLock};

pub const ID: &str = "fp8";

#[derive(Debug, Clone)]
pub struct Fp8 {
    rows: usize,
    cols: usize,
    /// E4M3 codes, row-major `[rows, cols]`.
    codes: Vec<u8>,
    /// One scale per row, or one for the whole tensor.
    scales: Vec<f32>,
    /// Whether each call casts its activations to E4M3 per row first (W8A8-FP8).
    dynamic_activations: bool,
}

fn table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(fp8::decode_table)
}

impl Fp8 {
    /// Quantizes an f32 `[out, in]` weight.
    pub fn quantize(w: &Tensor, scaling: Fp8Scaling, dynamic_activations: bool) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let v = w.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let (codes, scales) = fp8::quantize_matrix(&v, rows, cols, scaling)?;
        Ok(Fp8 {
            rows,
            cols,
            codes,
            scales,
            dynamic_activations,
        })
    }

    /// E4M3 codes, row-major `[rows, cols]`.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// One scale per row, or one for the whole tensor.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Whether activations are cast to E4M3 per row (W8A8-FP8).
    pub fn dynamic_activations(&self) -> bool {
        self.dynamic_activations
    }

    pub fn scaling(&self) -> Fp8Scaling {
        if self.scales.len() == 1 && self.rows != 1 {
            Fp8Scaling::PerTensor
        } else {
            Fp8Scaling::PerChannel
        }
    }

    pub fn load(
        shape: (usize, usize),
        meta: &serde_json::Value,
        parts: &mut StoredParts,
        _device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let (rows, cols) = shape;
        let n_scales = match meta_str(meta, "scale", parts.layer)? {
            "channel" => rows,
            "tensor" => 1,
            other => bail!(
                "layer {}: unknown fp8 scale granularity '{other}' (channel or tensor)",
                parts.layer
            ),
        };
        let dynamic_activations = match meta_str(meta, "activations", parts.layer)? {
            "f32" => false,
            "fp8-token" => true,
            other => bail!(
                "layer {}: unknown fp8 activation mode '{other}' (f32 or fp8-token)",
                parts.layer
            ),
        };
        let what = parts.what("weight");
        let codes =
            parts
                .get("weight")?
                .to_bytes(&what, safetensors::Dtype::F8_E4M3, rows * cols)?;
        if let Some(i) = codes.iter().position(|&c| c & 0x7f == 0x7f) {
            bail!("{what} holds a NaN code at element {i}: the checkpoint is corrupt");
        }
        let scales = parts.f32("weight_scale", n_scales)?;
        if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!(
                "{} holds the scale {s}: scales must be positive and finite",
                parts.what("weight_scale")
            );
        }
        Ok(Arc::new(Fp8 {
            rows,
            cols,
            codes,
            scales,
            dynamic_activations,
        }))
    }

    fn source(&self) -> RowSource<'_> {
        RowSource::Fp8 {
            codes: &self.codes,
            table: table(),
            scale: &self.scales,
        }
    }
}

impl WeightFormat for Fp8 {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        if self.dynamic_activations {
            "w8a8-fp8".into()
        } else {
            "fp8".into()
        }
    }

    fn describe(&self) -> String {
        let scale = match self.scaling() {
            Fp8Scaling::PerChannel => "per channel",
            Fp8Scaling::PerTensor => "per tensor",
        };
        let acts = if self.dynamic_activations {
            ", activations e4m3 per token"
        } else {
            ""
        };
        format!("fp8 e4m3, scale {scale}{acts}")
    }

    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let x = if self.dynamic_activations {
            let (m, k) = x.dims2()?;
            let mut v = x.flatten_all()?.to_vec1::<f32>()?;
            for row in v.chunks_mut(k.max(1)) {
                fp8::fake_quantize_row(row);
            }
            Tensor::from_vec(v, (m, k), x.device())?
        } else {
            x.clone()
        };
        forward_rows_or_matmul(
            &x,
            bias,
            self.shape(),
            |f| Some(f(&self.source())),
            || self.dequantize(),
        )
    }

    fn dequantize(&self) -> Result<Tensor> {
        let v = self.source().decode_all(self.rows, self.cols);
        Ok(Tensor::from_vec(v, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// Weight-only FP8 is exactly a matmul with the decoded matrix; W8A8 is not.
    fn forward_is_dequantized_matmul(&self) -> bool {
        !self.dynamic_activations
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        if let Some(tc) = super::tensor_core::TensorCore::try_new(self, device)? {
            return Ok(Arc::new(tc));
        }
        keep_on_cpu(self, "fp8", device)
    }

    fn input_quant(&self) -> InputQuant {
        if self.dynamic_activations {
            InputQuant::Fp8PerRow
        } else {
            InputQuant::None
        }
    }

    fn meta(&self) -> serde_json::Value {
        let scale = match self.scaling() {
            Fp8Scaling::PerChannel => "channel",
            Fp8Scaling::PerTensor => "tensor",
        };
        let activations = if self.dynamic_activations {
            "fp8-token"
        } else {
            "f32"
        };
        serde_json::json!({ "scale": scale, "activations": activations })
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        Ok(vec![
            named(
                prefix,
                "weight",
                RawTensor::new(
                    safetensors::Dtype::F8_E4M3,
                    vec![self.rows, self.cols],
                    self.codes.clone(),
                ),
            ),
            named(
                prefix,
                "weight_scale",
                RawTensor::new(
                    safetensors::Dtype::F32,
                    vec![self.scales.len()],
                    self.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                ),
            ),
        ])
    }

    fn stored_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight() -> Tensor {
        let v: Vec<f32> = (0..5 * 37)
            .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 17.0)
            .collect();
        Tensor::from_vec(v, (5, 37), &Device::Cpu).unwrap()
    }

    /// f64 reference: decode each code by the E4M3 definition and multiply.
    fn reference(f: &Fp8, x: &[f32], m: usize) -> Vec<f64> {
        let (o, k) = f.shape();
        let w: Vec<f64> = f
            .codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let s = f.scales[if f.scales.len() == 1 { 0 } else { i / k }] as f64;
                fp8::decode(c) as f64 * s
            })
            .collect();
        let mut y = vec![0f64; m * o];
        for r in 0..m {
            for j in 0..o {
                y[r * o + j] = (0..k)
                    .map(|t| x[r * k + t] as f64 * w[j * k + t])
                    .sum::<f64>();
            }
        }
        y
    }

    #[test]
    fn forward_matches_the_decoded_reference_for_few_and_many_rows() {
        for scaling in [Fp8Scaling::PerChannel, Fp8Scaling::PerTensor] {
            let f = Fp8::quantize(&weight(), scaling, false).unwrap();
            for m in [1, 3, 20] {
                let x: Vec<f32> = (0..m * 37).map(|i| ((i % 11) as f32 - 5.0) / 3.0).collect();
                let xt = Tensor::from_vec(x.clone(), (m, 37), &Device::Cpu).unwrap();
                let y = f.forward(&xt, None).unwrap().flatten_all().unwrap();
                let y = y.to_vec1::<f32>().unwrap();
                for (a, b) in y.iter().zip(reference(&f, &x, m)) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn dynamic_activations_are_cast_per_row() {
        let f = Fp8::quantize(&weight(), Fp8Scaling::PerChannel, true).unwrap();
        let x: Vec<f32> = (0..2 * 37).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut xq = x.clone();
        for row in xq.chunks_mut(37) {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for v in row.iter_mut() {
                *v = fp8::decode(fp8::encode(*v * 448.0 / amax)) * (amax / 448.0);
            }
        }
        let xt = Tensor::from_vec(x, (2, 37), &Device::Cpu).unwrap();
        let y = f.forward(&xt, None).unwrap().flatten_all().unwrap();
        for (a, b) in y
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(reference(&f, &xq, 2))
        {
            assert!(
                (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{a} vs {b}"
            );
        }
        assert_eq!(f.input_quant(), InputQuant::Fp8PerRow);
        assert!(!f.forward_is_dequantized_matmul());
    }

    #[test]
    fn stored_bytes_are_the_bytes_written() {
        for (scaling, dynamic) in [
            (Fp8Scaling::PerChannel, false),
            (Fp8Scaling::PerTensor, true),
        ] {
            let f = Fp8::quantize(&weight(), scaling, dynamic).unwrap();
            let parts = f.tensors("l").unwrap();
            let written: usize = parts.iter().map(|t| t.tensor.bytes.len()).sum();
            assert_eq!(written, f.stored_bytes());
        }
    }

    #[test]
    fn relative_error_is_that_of_three_mantissa_bits() {
        let w = weight();
        let f = Fp8::quantize(&w, Fp8Scaling::PerChannel, false).unwrap();
        let d = f.dequantize().unwrap().flatten_all().unwrap();
        let d = d.to_vec1::<f32>().unwrap();
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in w.iter().zip(&d) {
            // Half a step of 3 mantissa bits is 2^-4 relative for normal values; values
            // below the row's smallest normal (amax·2^-6/448) have an absolute error bound.
            let bound = (a.abs() / 16.0).max(3.5 / 448.0 * 2f32.powi(-9) * 2.0);
            assert!((a - b).abs() <= bound, "{a} vs {b}");
        }
    }
}
