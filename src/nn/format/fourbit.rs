//! NF4 / FP4 (bitsandbytes): 4-bit code-book indices packed two per byte with one absmax
//! per block, optionally double-quantized. Decoded row by row for a few activation rows,
//! as a whole matrix otherwise.

use super::{keep_on_cpu, meta_str, named, StoredParts, WeightFormat};
use crate::load::{NamedTensor, RawTensor};
use crate::nn::kernels::lowbit::LowBit;
use crate::nn::rows::{self, forward_rows_or_matmul, RowSource};
use crate::quant::codebook::{Absmax, Blockwise8, DOUBLE_QUANT_BLOCKSIZE};
use crate::quant::{FourBit, FourBitType};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::any::Any;
use std::sync::Arc;

pub const ID: &str = "fourbit";

#[derive(Debug, Clone)]
pub struct FourBitWeight {
    pub out_features: usize,
    pub in_features: usize,
    /// The codes (read-only after construction: the kernel layout is built from them).
    pub q: FourBit,
    /// The codes repacked for the low-bit kernels (`None` where rows are not a whole
    /// number of 32-column chunks or blocks not a multiple of 32).
    kernel: Option<Arc<LowBit>>,
}

impl FourBitWeight {
    pub fn quantize(
        w: &Tensor,
        kind: FourBitType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let (out_features, in_features) = w.dims2()?;
        let flat = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(FourBitWeight::new(
            out_features,
            in_features,
            FourBit::quantize(&flat, kind, blocksize, double_quant)?,
        ))
    }

    /// Wraps quantized codes, repacking them for the low-bit kernels where they fit.
    pub fn new(out_features: usize, in_features: usize, q: FourBit) -> Self {
        let mut w = FourBitWeight {
            out_features,
            in_features,
            q,
            kernel: None,
        };
        w.kernel = w
            .with_rows(|src| match src {
                RowSource::FourBit {
                    packed,
                    table,
                    absmax,
                    blocksize,
                } => {
                    LowBit::from_table(out_features, in_features, packed, table, absmax, *blocksize)
                }
                _ => None,
            })
            .map(Arc::new);
        w
    }

    fn with_rows<R>(&self, f: impl FnOnce(&RowSource) -> R) -> R {
        // Plain scales are used in place; double-quantized ones are decoded (n/64 values).
        let decoded;
        let absmax: &[f32] = match &self.q.absmax {
            Absmax::Plain(v) => v,
            double => {
                decoded = double.values();
                &decoded
            }
        };
        f(&RowSource::FourBit {
            packed: &self.q.packed,
            table: self.q.kind.code(),
            absmax,
            blocksize: self.q.blocksize,
        })
    }

    fn kind_name(&self) -> &'static str {
        match self.q.kind {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }

    pub fn load(
        shape: (usize, usize),
        meta: &serde_json::Value,
        parts: &mut StoredParts,
        _device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let layer = parts.layer.to_string();
        let kind = match meta_str(meta, "kind", &layer)? {
            "nf4" => FourBitType::Nf4,
            "fp4" => FourBitType::Fp4,
            other => bail!("layer {layer}: unknown 4-bit code book '{other}'"),
        };
        let blocksize = meta
            .get("blocksize")
            .and_then(|v| v.as_u64())
            .filter(|&b| b > 0)
            .ok_or_else(|| anyhow::anyhow!("layer {layer}: format metadata lacks 'blocksize'"))?
            as usize;
        let len = shape.0 * shape.1;
        let blocks = len.div_ceil(blocksize);
        let what = parts.what("weight_packed");
        let packed =
            parts
                .get("weight_packed")?
                .to_bytes(&what, safetensors::Dtype::U8, len.div_ceil(2))?;
        let absmax = if parts.has("weight_absmax") {
            let v = parts.f32("weight_absmax", blocks)?;
            crate::load::ensure_finite_values(&v, &parts.what("weight_absmax"))?;
            Absmax::Plain(v)
        } else {
            let what = parts.what("weight_absmax_q");
            let codes =
                parts
                    .get("weight_absmax_q")?
                    .to_bytes(&what, safetensors::Dtype::U8, blocks)?;
            let scales = parts.f32(
                "weight_absmax_scale",
                blocks.div_ceil(DOUBLE_QUANT_BLOCKSIZE),
            )?;
            let offset = parts.f32("weight_absmax_offset", 1)?[0];
            crate::load::ensure_finite_values(&scales, &parts.what("weight_absmax_scale"))?;
            crate::load::ensure_finite_values(&[offset], &parts.what("weight_absmax_offset"))?;
            Absmax::Double {
                quantized: Blockwise8 {
                    codes,
                    absmax: scales,
                    blocksize: DOUBLE_QUANT_BLOCKSIZE,
                },
                offset,
            }
        };
        Ok(Arc::new(FourBitWeight::new(
            shape.0,
            shape.1,
            FourBit {
                kind,
                len,
                blocksize,
                packed,
                absmax,
            },
        )))
    }
}

impl WeightFormat for FourBitWeight {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        self.kind_name().into()
    }

    fn describe(&self) -> String {
        let dq = matches!(self.q.absmax, Absmax::Double { .. });
        format!(
            "{} b{}{}",
            self.kind_name(),
            self.q.blocksize,
            if dq { " dq" } else { "" }
        )
    }

    fn shape(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
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
            |f| Some(self.with_rows(|src| f(src))),
            || self.dequantize(),
        )
    }

    fn dequantize(&self) -> Result<Tensor> {
        let (o, i) = self.shape();
        if let Some(k) = &self.kernel {
            return Ok(Tensor::from_vec(k.decode_all(), (o, i), &Device::Cpu)?);
        }
        let v = self.with_rows(|src| src.decode_all(o, i));
        Ok(Tensor::from_vec(v, (o, i), &Device::Cpu)?)
    }

    fn forward_is_dequantized_matmul(&self) -> bool {
        // See `Grouped`: the kernels need no cached f32 matrix.
        self.kernel.is_none()
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        keep_on_cpu(self, "nf4/fp4", device)
    }

    /// Weight-only: activations multiply as they are.
    fn input_quant(&self) -> super::InputQuant {
        super::InputQuant::None
    }

    fn meta(&self) -> serde_json::Value {
        serde_json::json!({ "kind": self.kind_name(), "blocksize": self.q.blocksize })
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        let mut out = vec![named(
            prefix,
            "weight_packed",
            RawTensor::u8s(self.q.packed.clone()),
        )];
        match &self.q.absmax {
            Absmax::Plain(v) => out.push(named(prefix, "weight_absmax", RawTensor::f32s(v))),
            Absmax::Double { quantized, offset } => {
                out.push(named(
                    prefix,
                    "weight_absmax_q",
                    RawTensor::u8s(quantized.codes.clone()),
                ));
                out.push(named(
                    prefix,
                    "weight_absmax_scale",
                    RawTensor::f32s(&quantized.absmax),
                ));
                out.push(named(
                    prefix,
                    "weight_absmax_offset",
                    RawTensor::f32s(&[*offset]),
                ));
            }
        }
        Ok(out)
    }

    fn stored_bytes(&self) -> usize {
        self.q.nbytes()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Codes and block absmax values stacked, for parts of one code book and block size
    /// whose blocks end with the part (so no block straddles two parts). Double-quantized
    /// absmax values are decoded, as the kernels read them: the stacked weight holds the
    /// same values as plain absmax, for the forward pass only.
    fn concat_rows(&self, rest: &[&dyn WeightFormat]) -> Option<Arc<dyn WeightFormat>> {
        let parts = super::same_format(self, rest, self.in_features)?;
        let (kind, bs) = (self.q.kind, self.q.blocksize);
        let fits = |p: &FourBitWeight| {
            p.q.kind == kind
                && p.q.blocksize == bs
                && p.q.len.is_multiple_of(bs)
                && p.q.len.is_multiple_of(2)
        };
        if !parts.iter().all(|p| fits(p)) {
            return None;
        }
        let o = parts.iter().map(|p| p.out_features).sum();
        let q = FourBit {
            kind,
            len: parts.iter().map(|p| p.q.len).sum(),
            blocksize: bs,
            packed: parts
                .iter()
                .flat_map(|p| p.q.packed.iter().copied())
                .collect(),
            absmax: Absmax::Plain(parts.iter().flat_map(|p| p.q.absmax.values()).collect()),
        };
        Some(Arc::new(FourBitWeight::new(o, self.in_features, q)))
    }
}
