//! Uniform integer codes (1–8 bits) with one scale and zero point per tensor, per output
//! row or per group of input columns: the weight-only int-N format. A few activation rows
//! are multiplied straight from the codes row by row; more rows decode the whole matrix
//! (in parallel) for the f32 matmul.
//!
//! Every weight-only method writes it: RTN in its conventions (PyTorch's, llama.cpp's
//! signed-max with a possibly negative scale, clipped ranges), GPTQ, AWQ, and HQQ, whose
//! zero point is a real number: for that one the integer zero points are replaced by f32
//! ones (metadata `"zero": "f32"`, tensor `weight_zero` of f32, 4 bytes a group instead of
//! 1). The low-bit kernels build each group's values from (scale, zero) either way.

use super::{keep_on_cpu, meta_str, named, StoredParts, WeightFormat};
use crate::load::{NamedTensor, RawTensor};
use crate::nn::kernels::lowbit::LowBit;
use crate::nn::rows::{self, forward_rows_or_matmul, RowSource};
use crate::quant::rtn_variants::{group_columns, tie_count, zero_points_f32};
use crate::quant::{Granularity, Mode, QParams, QTensor, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, Device, Tensor};
use std::any::Any;
use std::sync::Arc;

pub const ID: &str = "intn";

/// The plan suffix (`w:i3:sym:g64:f16-scales`, `gptq:i3:sym:g64:f16-scales`) and the
/// metadata value (`"scale": "f16"`) of f16 group scales.
pub const F16_SCALES: &str = "f16-scales";

#[derive(Debug, Clone)]
pub struct Grouped {
    /// The codes (read-only after construction: the kernel layout is built from them).
    /// With [`Self::float_zero`] set, its integer zero points are not used.
    pub q: QTensor,
    /// Real zero points, one per group, in place of `q`'s integer ones (HQQ; unsigned
    /// affine codes only).
    float_zero: Option<Vec<f32>>,
    /// Weights that sat exactly on a rounding tie when quantized (`x / s + z` a half
    /// integer; see `quant::rtn_variants::tie_count`), where the quantizer knew them.
    ties: Option<usize>,
    /// The codes repacked for the low-bit kernels (built with the format; `None` where the
    /// layout does not fit them, e.g. groups that are not a multiple of 32 columns).
    kernel: Option<Arc<LowBit>>,
    /// The scales are f16 values, stored as f16 (2 bytes each); they are held as f32 here
    /// and the kernels read them as f32, so the arithmetic is the f32 path's, exactly.
    f16_scales: bool,
}

impl Grouped {
    /// Round-to-nearest quantization of layer `layer`'s f32 `[out, in]` weight, counting
    /// the weights that sat on a rounding tie.
    pub fn quantize(w: &Tensor, scheme: &Scheme, layer: &str) -> Result<Self> {
        scheme
            .validate_for_shape(w.dims())
            .with_context(|| format!("layer {layer} cannot use {scheme}"))?;
        let w = w.to_device(&Device::Cpu)?;
        let q = crate::quant::quantize(&w, scheme)?;
        let ties = Self::count_ties(&w, &q.params.scale, &zero_points_f32(&q.params), scheme)?;
        Ok(Grouped::new(q).with_ties(ties))
    }

    /// The rounding ties of `w` under a scheme's parameters (`None` where the scheme's
    /// grouping is not along rows).
    pub fn count_ties(
        w: &Tensor,
        scale: &[f32],
        zero: &[f32],
        scheme: &Scheme,
    ) -> Result<Option<usize>> {
        let (o, i) = w.dims2()?;
        let Some(group) = group_columns(scheme.granularity, i) else {
            return Ok(None);
        };
        let v = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(tie_count(&v, o, i, group, scale, zero)))
    }

    /// Wraps quantized codes, repacking them for the low-bit kernels where they fit.
    pub fn new(q: QTensor) -> Self {
        let mut g = Grouped {
            q,
            float_zero: None,
            ties: None,
            kernel: None,
            f16_scales: false,
        };
        g.build_kernel();
        g
    }

    /// Round-to-nearest with the scales rounded to f16 first (the codes are rounded with
    /// the f16 scale that is stored), marked to store them as f16.
    pub fn quantize_f16_scales(w: &Tensor, scheme: &Scheme, layer: &str) -> Result<Self> {
        scheme
            .validate_for_shape(w.dims())
            .with_context(|| format!("layer {layer} cannot use {scheme}"))?;
        let w = w.to_device(&Device::Cpu)?;
        let mut params = crate::quant::uniform::qparams_for(&w, scheme)?;
        crate::quant::half_scale::round_scales(&mut params.scale)
            .with_context(|| format!("layer {layer}"))?;
        let q = crate::quant::quantize_with(&w, scheme, params)?;
        let ties = Self::count_ties(&w, &q.params.scale, &zero_points_f32(&q.params), scheme)?;
        Grouped::new(q).with_ties(ties).with_f16_scales()
    }

    /// Marks the scales to be stored as f16; refused unless every scale is an f16 value
    /// (the quantizer must round them before it rounds the weights).
    pub fn with_f16_scales(mut self) -> Result<Self> {
        if self.float_zero.is_some() {
            bail!("f16 scales with real zero points are not a stored form");
        }
        if let Some(s) = self
            .q
            .params
            .scale
            .iter()
            .find(|s| !crate::quant::half_scale::is_f16(**s))
        {
            bail!("scale {s} is not an f16 value: the quantizer must round its scales to f16");
        }
        self.f16_scales = true;
        Ok(self)
    }

    /// Whether the scales are stored as f16.
    pub fn has_f16_scales(&self) -> bool {
        self.f16_scales
    }

    /// Unsigned affine codes with a real zero point per group (HQQ).
    pub fn with_float_zero(q: QTensor, zero: Vec<f32>) -> Result<Self> {
        let s = &q.scheme;
        if s.signed || s.mode != Mode::Affine {
            bail!("real zero points need unsigned affine codes, not {s}");
        }
        let d = q.dims();
        if d.len() != 2 {
            bail!("a grouped weight is a matrix, not shape {d:?}");
        }
        if zero.len() != q.params.len() {
            bail!(
                "{} real zero points for {} groups",
                zero.len(),
                q.params.len()
            );
        }
        crate::load::ensure_finite_values(&zero, "zero points")?;
        let mut g = Grouped {
            q,
            float_zero: Some(zero),
            ties: None,
            kernel: None,
            f16_scales: false,
        };
        g.build_kernel();
        Ok(g)
    }

    /// Records the tie count of the quantization that made these codes.
    pub fn with_ties(mut self, ties: Option<usize>) -> Self {
        self.ties = ties;
        self
    }

    /// Weights that sat on a rounding tie when quantized, where known.
    pub fn ties(&self) -> Option<usize> {
        self.ties
    }

    /// Real zero points, when this weight has them.
    pub fn float_zero(&self) -> Option<&[f32]> {
        self.float_zero.as_deref()
    }

    fn build_kernel(&mut self) {
        let (o, i) = self.shape();
        let bits = self.q.scheme.bits;
        self.kernel = match &self.float_zero {
            None => self
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
                .flatten(),
            Some(z) => self.group().and_then(|group| {
                rows::with_cpu_slice(&self.q.codes, o * i, CpuStorage::as_slice::<u8>, |codes| {
                    LowBit::from_int_real_zero(
                        o,
                        i,
                        codes,
                        false,
                        bits,
                        &self.q.params.scale,
                        z,
                        group,
                    )
                })
                .flatten()
            }),
        }
        .map(Arc::new);
    }

    /// `(q − z)·s` with the real zero points, row-major (the fallback where no kernel
    /// layout fits, e.g. groups that are not a multiple of 32 columns).
    fn decode_float_zero(&self, zero: &[f32]) -> Result<Vec<f32>> {
        let (o, i) = self.shape();
        let group = self
            .group()
            .context("real zero points need groups along rows")?;
        let codes = self.q.codes.flatten_all()?.to_vec1::<u8>()?;
        let scale = &self.q.params.scale;
        let mut out = Vec::with_capacity(o * i);
        for (r, row) in codes.chunks(i).enumerate() {
            for (p, &c) in row.iter().enumerate() {
                let k = match p.checked_div(group) {
                    None => 0,
                    Some(g) => r * i.div_ceil(group) + g,
                };
                out.push((c as f32 - zero[k]) * scale[k]);
            }
        }
        Ok(out)
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

    /// The codes as a row source (`None` with real zero points, which it cannot carry).
    fn with_rows<R>(&self, f: impl FnOnce(&RowSource) -> R) -> Option<R> {
        if self.float_zero.is_some() {
            return None;
        }
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
        let f16_scales = match meta.get("scale").map(|v| v.as_str()) {
            None => false,
            Some(Some("f16")) => true,
            Some(other) => bail!(
                "layer {}: unknown scale kind {other:?} in the format metadata (this build reads \"f16\"; no key means f32)",
                parts.layer
            ),
        };
        let scale = if f16_scales {
            let what = parts.what("weight_scale");
            let raw = parts.get("weight_scale")?;
            if raw.dtype != safetensors::Dtype::F16 || raw.numel() != groups {
                bail!(
                    "{what}: expected {groups} f16 scales, found {:?} of shape {:?}",
                    raw.dtype,
                    raw.shape
                );
            }
            crate::quant::half_scale::from_bytes(&raw.bytes)
        } else {
            parts.f32("weight_scale", groups)?
        };
        crate::load::ensure_finite_values(&scale, &parts.what("weight_scale"))?;
        let ties = match meta.get("ties") {
            None => None,
            Some(v) => Some(v.as_u64().with_context(|| {
                format!(
                    "layer {}: 'ties' in the format metadata is not a count",
                    parts.layer
                )
            })? as usize),
        };
        let real_zero = match meta.get("zero").map(|v| v.as_str()) {
            None => false,
            Some(Some("f32")) => true,
            Some(other) => bail!(
                "layer {}: unknown zero point kind {other:?} in the format metadata (this build reads \"f32\")",
                parts.layer
            ),
        };
        if real_zero {
            let zero = parts.f32("weight_zero", groups)?;
            crate::load::ensure_finite_values(&zero, &parts.what("weight_zero"))?;
            let params = QParams {
                scale,
                zero_point: vec![0; groups],
            };
            let q = QTensor::from_packed(scheme, &dims, &packed, params, &Device::Cpu)?;
            let g = Grouped::with_float_zero(q, zero)
                .with_context(|| format!("layer {}", parts.layer))?;
            return Ok(Arc::new(g.with_ties(ties)));
        }
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
        let g = Grouped::new(q).with_ties(ties);
        Ok(Arc::new(if f16_scales { g.with_f16_scales()? } else { g }))
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
        match (&self.float_zero, self.f16_scales) {
            (Some(_), _) => format!("{} real zero", self.q.scheme),
            (None, true) => format!("{} f16 scales", self.q.scheme),
            (None, false) => self.q.scheme.to_string(),
        }
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
        if let Some(z) = &self.float_zero {
            return Ok(Tensor::from_vec(
                self.decode_float_zero(z)?,
                (o, i),
                &Device::Cpu,
            )?);
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
        let mut m = serde_json::json!({ "scheme": self.q.scheme.to_string() });
        if self.float_zero.is_some() {
            m["zero"] = "f32".into();
        }
        if self.f16_scales {
            m["scale"] = "f16".into();
        }
        if let Some(t) = self.ties {
            m["ties"] = t.into();
        }
        m
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        let q = &self.q;
        let mut out = vec![
            named(prefix, "weight_packed", RawTensor::u8s(q.packed_codes()?)),
            if self.f16_scales {
                let b = crate::quant::half_scale::to_bytes(&q.params.scale)?;
                let n = q.params.scale.len();
                named(
                    prefix,
                    "weight_scale",
                    RawTensor::new(safetensors::Dtype::F16, vec![n], b),
                )
            } else {
                named(prefix, "weight_scale", RawTensor::f32s(&q.params.scale))
            },
        ];
        if let Some(z) = &self.float_zero {
            out.push(named(prefix, "weight_zero", RawTensor::f32s(z)));
        } else if q.scheme.mode == Mode::Affine {
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
        match &self.float_zero {
            // Codes, an f32 scale and an f32 zero per group.
            Some(z) => {
                crate::quant::pack::packed_len(self.q.codes.elem_count(), self.q.scheme.bits)
                    + 4 * (self.q.params.len() + z.len())
            }
            // The f32 form less 2 bytes per scale.
            None if self.f16_scales => self.q.nbytes() - 2 * self.q.params.scale.len(),
            None => self.q.nbytes(),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Codes and (scale, zero point) pairs stacked, for parts of one scheme and scale kind
    /// whose pairs run along rows (per output channel or per group of columns; one pair
    /// for the whole tensor only where every part has the same one).
    fn concat_rows(&self, rest: &[&dyn WeightFormat]) -> Option<Arc<dyn WeightFormat>> {
        let (_, i) = self.shape();
        let parts = super::same_format(self, rest, i)?;
        let scheme = &self.q.scheme;
        let same = |p: &Grouped| {
            p.q.scheme == *scheme
                && p.f16_scales == self.f16_scales
                && p.float_zero.is_some() == self.float_zero.is_some()
        };
        if !parts.iter().all(|p| same(p)) {
            return None;
        }
        let params = match scheme.granularity {
            Granularity::PerChannel { axis: 0 } | Granularity::PerGroup { .. } => QParams {
                scale: parts
                    .iter()
                    .flat_map(|p| p.q.params.scale.clone())
                    .collect(),
                zero_point: parts
                    .iter()
                    .flat_map(|p| p.q.params.zero_point.clone())
                    .collect(),
            },
            Granularity::PerTensor
                if parts.iter().all(|p| {
                    p.q.params.scale == self.q.params.scale
                        && p.q.params.zero_point == self.q.params.zero_point
                        && p.float_zero == self.float_zero
                }) =>
            {
                self.q.params.clone()
            }
            _ => return None,
        };
        let codes: Vec<&Tensor> = parts.iter().map(|p| &p.q.codes).collect();
        let q = QTensor {
            scheme: *scheme,
            codes: Tensor::cat(&codes, 0).ok()?,
            params,
        };
        let g = match &self.float_zero {
            None => Grouped::new(q),
            Some(z) => {
                let zero = match scheme.granularity {
                    Granularity::PerTensor => z.clone(),
                    _ => parts
                        .iter()
                        .flat_map(|p| p.float_zero.clone().unwrap_or_default())
                        .collect(),
                };
                Grouped::with_float_zero(q, zero).ok()?
            }
        };
        let g = if self.f16_scales {
            g.with_f16_scales().ok()?
        } else {
            g
        };
        Some(Arc::new(g))
    }
}
