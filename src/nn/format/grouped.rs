//! Uniform integer codes (1–8 bits) with one scale and zero point per tensor, per output
//! row or per group of input columns: the weight-only int-N format. A few activation rows
//! are multiplied straight from the codes row by row; more rows decode the whole matrix
//! (in parallel) for the f32 matmul.

use super::{keep_on_cpu, meta_str, named, StoredParts, WeightFormat};
use crate::load::{NamedTensor, RawTensor};
use crate::nn::kernels::lowbit::LowBit;
use crate::nn::rows::{self, forward_rows_or_matmul, RowSource};
use crate::quant::{Granularity, Mode, QParams, QTensor, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, Device, Tensor};
use std::any::Any;
use std::sync::Arc;

pub const ID: &str = "intn";

#[derive(Debug, Clone)]
pub struct Grouped {
    /// The codes (read-only after construction: the kernel layout is built from them).
    pub q: QTensor,
    /// The codes repacked for the low-bit kernels (built with the format; `None` where the
    /// layout does not fit them, e.g. groups that are not a multiple of 32 columns).
    kernel: Option<Arc<LowBit>>,
}

impl Grouped {
    /// Round-to-nearest quantization of layer `layer`'s f32 `[out, in]` weight.
    pub fn quantize(w: &Tensor, scheme: &Scheme, layer: &str) -> Result<Self> {
        scheme
            .validate_for_shape(w.dims())
            .with_context(|| format!("layer {layer} cannot use {scheme}"))?;
        Ok(Grouped::new(crate::quant::quantize(
            &w.to_device(&Device::Cpu)?,
            scheme,
        )?))
    }

    /// Wraps quantized codes, repacking them for the low-bit kernels where they fit.
    pub fn new(q: QTensor) -> Self {
        let mut g = Grouped { q, kernel: None };
        let (o, i) = g.shape();
        let bits = g.q.scheme.bits;
        g.kernel = g
            .with_rows(|src| match src {
                RowSource::Grouped {
                    codes,
                    signed,
                    scale,
                    zero,
                    group,
                } => LowBit::from_int(o, i, codes, *signed, bits, scale, zero, *group),
                _ => None,
            })
            .flatten()
            .map(Arc::new);
        g
    }

    /// Columns per (scale, zero point) within a row: 0 for one pair for the whole matrix.
    fn group(&self) -> Option<usize> {
        let (_, i) = self.shape();
        match self.q.scheme.granularity {
            Granularity::PerTensor => Some(0),
            Granularity::PerChannel { axis: 0 } => Some(i),
            Granularity::PerGroup { size } => Some(size),
            Granularity::PerChannel { .. } => None,
        }
    }

    fn with_rows<R>(&self, f: impl FnOnce(&RowSource) -> R) -> Option<R> {
        let (o, i) = self.shape();
        let group = self.group()?;
        rows::with_cpu_slice(&self.q.codes, o * i, CpuStorage::as_slice::<u8>, |codes| {
            f(&RowSource::Grouped {
                codes,
                signed: self.q.scheme.signed,
                scale: &self.q.params.scale,
                zero: &self.q.params.zero_point,
                group,
            })
        })
    }

    pub fn load(
        shape: (usize, usize),
        meta: &serde_json::Value,
        parts: &mut StoredParts,
        _device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let scheme: Scheme = meta_str(meta, "scheme", parts.layer)?
            .parse()
            .with_context(|| format!("layer {}: stored scheme", parts.layer))?;
        let dims = [shape.0, shape.1];
        scheme
            .validate_for_shape(&dims)
            .with_context(|| format!("layer {}: stored scheme", parts.layer))?;
        let groups = groups(&scheme, shape);
        let n = shape.0 * shape.1;
        let what = parts.what("weight_packed");
        let packed = parts.get("weight_packed")?.to_bytes(
            &what,
            safetensors::Dtype::U8,
            crate::quant::pack::packed_len(n, scheme.bits),
        )?;
        let scale = parts.f32("weight_scale", groups)?;
        crate::load::ensure_finite_values(&scale, &parts.what("weight_scale"))?;
        let zero_point = if scheme.mode == Mode::Affine {
            let what = parts.what("weight_zero_point");
            parts
                .get("weight_zero_point")?
                .to_bytes(&what, safetensors::Dtype::U8, groups)?
                .into_iter()
                .map(|b| {
                    if scheme.signed {
                        b as i8 as i32
                    } else {
                        b as i32
                    }
                })
                .collect()
        } else {
            let (lo, hi) = scheme.qrange();
            vec![crate::quant::params::symmetric_zero_point(lo, hi, scheme.signed); groups]
        };
        let params = QParams { scale, zero_point };
        let q = QTensor::from_packed(scheme, &dims, &packed, params, &Device::Cpu)?;
        Ok(Arc::new(Grouped::new(q)))
    }
}

/// (scale, zero point) pairs a scheme needs for an `[out, in]` matrix.
fn groups(s: &Scheme, (o, i): (usize, usize)) -> usize {
    match s.granularity {
        Granularity::PerTensor => 1,
        Granularity::PerChannel { axis: 0 } => o,
        Granularity::PerChannel { .. } => i,
        Granularity::PerGroup { size } => o * i.div_ceil(size),
    }
}

impl WeightFormat for Grouped {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        let s = &self.q.scheme;
        format!("{}{}", if s.signed { "int" } else { "uint" }, s.bits)
    }

    fn describe(&self) -> String {
        self.q.scheme.to_string()
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.q.dims();
        (d[0], d[1])
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if let Some(k) = &self.kernel {
            if let Some(y) = rows::forward_lowbit(k, x, bias)? {
                return Ok(y);
            }
        }
        forward_rows_or_matmul(
            x,
            bias,
            self.shape(),
            |f| self.with_rows(|src| f(src)),
            || self.dequantize(),
        )
    }

    fn dequantize(&self) -> Result<Tensor> {
        let (o, i) = self.shape();
        if let Some(k) = &self.kernel {
            return Ok(Tensor::from_vec(k.decode_all(), (o, i), &Device::Cpu)?);
        }
        match self.with_rows(|src| src.decode_all(o, i)) {
            Some(v) => Ok(Tensor::from_vec(v, (o, i), &Device::Cpu)?),
            None => self.q.dequantize(),
        }
    }

    fn forward_is_dequantized_matmul(&self) -> bool {
        // The kernels beat a cached f32 matrix for decoding and prefill alike (see
        // benches/lowbit_kernels.rs) and hold no f32 copy.
        self.kernel.is_none()
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        keep_on_cpu(self, "weight-only int-N", device)
    }

    /// Weight-only: activations multiply as they are.
    fn input_quant(&self) -> super::InputQuant {
        super::InputQuant::None
    }

    fn meta(&self) -> serde_json::Value {
        serde_json::json!({ "scheme": self.q.scheme.to_string() })
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        let q = &self.q;
        let mut out = vec![
            named(prefix, "weight_packed", RawTensor::u8s(q.packed_codes()?)),
            named(prefix, "weight_scale", RawTensor::f32s(&q.params.scale)),
        ];
        if q.scheme.mode == Mode::Affine {
            // Zero points lie in the code range, so one byte holds each.
            if let Some(z) = q
                .params
                .zero_point
                .iter()
                .find(|z| !(-128..=255).contains(*z))
            {
                bail!("zero point {z} of {prefix} does not fit the one byte stored for it");
            }
            let zp = q.params.zero_point.iter().map(|&z| z as u8).collect();
            out.push(named(prefix, "weight_zero_point", RawTensor::u8s(zp)));
        }
        Ok(out)
    }

    fn stored_bytes(&self) -> usize {
        self.q.nbytes()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
