//! The one swappable linear layer every model is built from. It starts as f32 and is
//! converted in place by a plan; while calibrating it records its inputs.

use super::kernels;
use super::method::Method;
use super::rows;
use crate::quant::{self, FourBit, Observer, ObserverKind, QTensor, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor as GgmlTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::{Arc, Mutex};

/// An int8 weight with per-output-channel symmetric scales, ready for the integer kernel.
#[derive(Debug, Clone)]
pub struct Int8Weight {
    /// `[out, in]` row-major codes.
    pub codes: Vec<i8>,
    pub scale: Vec<f32>,
    pub row_sum: Vec<i32>,
}

/// How the input activations of an int8 layer are quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActQuant {
    /// From each batch's own min/max, at run time.
    Dynamic,
    /// Fixed (scale, zero point) from calibration.
    Static { scale: f32, zero_point: i32 },
}

#[derive(Debug, Clone)]
pub enum Weights {
    F32(Tensor),
    /// f16 or bf16 storage.
    Half(Tensor),
    Int8(Int8Weight, ActQuant),
    Uniform(QTensor),
    FourBit(FourBit),
    /// A GGML block-quantized weight (kept from a GGUF file or quantized by candle).
    Ggml(Arc<GgmlTensor>),
}

/// A named tensor as it is serialized: dtype, shape and little-endian bytes.
pub struct StoredTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[derive(Debug)]
pub struct QLinear {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub weights: Weights,
    pub bias: Option<Tensor>,
    pub method: Method,
    observer: Mutex<Option<Observer>>,
    /// When set, compressed weights are dequantized once and the f32 copy is reused:
    /// the same numbers, traded for memory (for long evaluations, not size measurements).
    dequant_cache: Option<std::sync::OnceLock<Tensor>>,
}

impl Clone for QLinear {
    fn clone(&self) -> Self {
        QLinear {
            name: self.name.clone(),
            in_features: self.in_features,
            out_features: self.out_features,
            weights: self.weights.clone(),
            bias: self.bias.clone(),
            method: self.method.clone(),
            observer: Mutex::new(self.observer.lock().unwrap().clone()),
            dequant_cache: self.dequant_cache.clone(),
        }
    }
}

/// The scheme int8 layers use for weights: symmetric, per output channel (PyTorch's
/// `per_channel_symmetric` qint8).
pub fn int8_weight_scheme() -> Scheme {
    Scheme::new(8, true)
        .expect("8-bit signed is valid")
        .symmetric()
        .per_channel(0)
}

/// Runs `f` on the first `n` elements of a contiguous CPU tensor's storage, borrowed in
/// place; `None` for other devices, layouts or element types.
fn with_cpu_slice<T, R>(
    t: &Tensor,
    n: usize,
    pick: impl Fn(&candle_core::CpuStorage) -> candle_core::Result<&[T]>,
    f: impl FnOnce(&[T]) -> R,
) -> Option<R> {
    if !t.device().is_cpu() || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let all = pick(cpu).ok()?;
    all.get(layout.start_offset()..layout.start_offset() + n)
        .map(f)
}

impl QLinear {
    /// An f32 layer from a `[out, in]` weight and optional `[out]` bias.
    pub fn new(name: &str, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight
            .dims2()
            .with_context(|| format!("linear layer {name}: weight must be 2-D [out, in]"))?;
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
            weights: Weights::F32(weight.to_dtype(DType::F32)?),
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            method: Method::F32,
            observer: Mutex::new(None),
            dequant_cache: None,
        })
    }

    /// A layer that keeps a GGML weight as stored (e.g. Q4_1 from a GGUF file).
    pub fn from_ggml(name: &str, weight: GgmlTensor) -> Result<Self> {
        let (out_features, in_features) = weight
            .shape()
            .dims2()
            .with_context(|| format!("linear layer {name}: weight must be 2-D [out, in]"))?;
        // Float GGML tensors are plain f32 layers; block types stay packed.
        let (weights, method) = match weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => (
                Weights::F32(weight.dequantize(&weight.device())?),
                Method::F32,
            ),
            t => (Weights::Ggml(Arc::new(weight)), Method::Ggml(t)),
        };
        Ok(QLinear {
            name: name.to_string(),
            in_features,
            out_features,
            weights,
            bias: None,
            method,
            observer: Mutex::new(None),
            dequant_cache: None,
        })
    }

    /// The weight as f32 `[out, in]` (dequantized if needed).
    pub fn weight_f32(&self) -> Result<Tensor> {
        if let Weights::F32(w) = &self.weights {
            return Ok(w.clone());
        }
        let (rows, cols) = (self.out_features, self.in_features);
        if let Some(w) = self.with_rows(|src| src.decode_all(rows, cols))? {
            return Ok(Tensor::from_vec(w, (rows, cols), &Device::Cpu)?);
        }
        match &self.weights {
            Weights::F32(w) => Ok(w.clone()),
            Weights::Half(w) => Ok(w.to_dtype(DType::F32)?),
            Weights::Int8(w, _) => {
                let deq: Vec<f32> = w
                    .codes
                    .chunks(self.in_features)
                    .zip(&w.scale)
                    .flat_map(|(row, &s)| row.iter().map(move |&c| c as f32 * s))
                    .collect();
                Ok(Tensor::from_vec(
                    deq,
                    (self.out_features, self.in_features),
                    &Device::Cpu,
                )?)
            }
            Weights::Uniform(q) => q.dequantize(),
            Weights::FourBit(q) => Ok(Tensor::from_vec(
                q.dequantize(),
                (self.out_features, self.in_features),
                &Device::Cpu,
            )?),
            Weights::Ggml(q) => Ok(q.dequantize(&q.device())?),
        }
    }

    /// Runs `f` on a row-decodable view of the compressed weights (fp16, integer codes with
    /// per-tensor/per-row/per-group parameters, 4-bit code books) held on the CPU; `None`
    /// for other layouts, which take the general dequantize path.
    fn with_rows<R>(&self, f: impl FnOnce(&rows::RowSource) -> R) -> Result<Option<R>> {
        use crate::quant::codebook::Absmax;
        use crate::quant::Granularity;
        use candle_core::CpuStorage;
        let n = self.out_features * self.in_features;
        match &self.weights {
            Weights::F32(t) => Ok(with_cpu_slice(t, n, CpuStorage::as_slice::<f32>, |v| {
                f(&rows::RowSource::F32(v))
            })),
            Weights::Half(t) => Ok(with_cpu_slice(
                t,
                n,
                CpuStorage::as_slice::<half::f16>,
                |v| f(&rows::RowSource::Half(v)),
            )),
            Weights::Uniform(q) => {
                let group = match q.scheme.granularity {
                    Granularity::PerTensor => 0,
                    Granularity::PerChannel { axis: 0 } => self.in_features,
                    Granularity::PerGroup { size } => size,
                    Granularity::PerChannel { .. } => return Ok(None),
                };
                Ok(with_cpu_slice(
                    &q.codes,
                    n,
                    CpuStorage::as_slice::<u8>,
                    |codes| {
                        f(&rows::RowSource::Grouped {
                            codes,
                            signed: q.scheme.signed,
                            scale: &q.params.scale,
                            zero: &q.params.zero_point,
                            group,
                        })
                    },
                ))
            }
            Weights::FourBit(q) => {
                // Plain scales are used in place; double-quantized ones are decoded (n/64 values).
                let decoded;
                let absmax: &[f32] = match &q.absmax {
                    Absmax::Plain(v) => v,
                    double => {
                        decoded = double.values();
                        &decoded
                    }
                };
                Ok(Some(f(&rows::RowSource::FourBit {
                    packed: &q.packed,
                    table: q.kind.code(),
                    absmax,
                    blocksize: q.blocksize,
                })))
            }
            _ => Ok(None),
        }
    }

    /// Adds the bias and restores the input's leading dimensions.
    fn finish(&self, y: Tensor, dims: Vec<usize>) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        self.finish_unbiased(y, dims)
    }

    /// Restores the input's leading dimensions (the bias is already in `y`).
    fn finish_unbiased(&self, y: Tensor, mut dims: Vec<usize>) -> Result<Tensor> {
        *dims.last_mut().unwrap() = self.out_features;
        Ok(y.reshape(dims)?)
    }

    /// Reuse one dequantized f32 copy of compressed weights across forward passes.
    pub fn set_cache_dequantized(&mut self, on: bool) {
        self.dequant_cache = on.then(std::sync::OnceLock::new);
    }

    /// Starts recording inputs for static calibration.
    pub fn start_calibration(&self, kind: ObserverKind) {
        let act_scheme = Scheme::new(8, false).expect("u8 is valid");
        *self.observer.lock().unwrap() = Some(Observer::new(kind, act_scheme));
    }

    /// Converts the layer to `method` (from f32 weights). Static int8 needs a finished calibration.
    pub fn convert(&mut self, method: &Method) -> Result<()> {
        if *method == Method::Keep {
            return Ok(());
        }
        let w = self.weight_f32()?;
        quant::uniform::ensure_finite(&w, &format!("weight of layer {}", self.name))?;
        self.weights = match method {
            Method::Keep => unreachable!("handled above"),
            Method::Ggml(t) => {
                let block = t.block_size();
                if !self.in_features.is_multiple_of(block) {
                    bail!(
                        "layer {} cannot use {method}: its {} input features are not a multiple of the {block}-element block",
                        self.name,
                        self.in_features
                    );
                }
                Weights::Ggml(Arc::new(GgmlTensor::quantize(&w, *t)?))
            }
            Method::F32 => Weights::F32(w),
            Method::F16 => Weights::Half(w.to_dtype(DType::F16)?),
            Method::Bf16 => Weights::Half(w.to_dtype(DType::BF16)?),
            Method::DynamicInt8 => Weights::Int8(self.int8_weight(&w)?, ActQuant::Dynamic),
            Method::StaticInt8(_) => {
                let obs = self.observer.lock().unwrap().take().with_context(|| {
                    format!(
                        "layer {}: static int8 needs calibration data first (no observer ran)",
                        self.name
                    )
                })?;
                let (lo, hi) = obs
                    .range()
                    .with_context(|| format!("calibrating layer {}", self.name))?;
                let (scale, zero_point) = kernels::activation_qparams_u8(lo, hi);
                Weights::Int8(
                    self.int8_weight(&w)?,
                    ActQuant::Static { scale, zero_point },
                )
            }
            Method::WeightOnly(s) => {
                s.validate_for_shape(w.dims())
                    .with_context(|| format!("layer {} cannot use {s}", self.name))?;
                Weights::Uniform(quant::quantize(&w, s)?)
            }
            Method::FourBit(f) => {
                let flat = w.flatten_all()?.to_vec1::<f32>()?;
                Weights::FourBit(FourBit::quantize(
                    &flat,
                    f.kind,
                    f.blocksize,
                    f.double_quant,
                )?)
            }
        };
        self.method = method.clone();
        if self.dequant_cache.is_some() {
            self.set_cache_dequantized(true);
        }
        Ok(())
    }

    fn int8_weight(&self, w: &Tensor) -> Result<Int8Weight> {
        let q = quant::quantize(w, &int8_weight_scheme())?;
        let codes: Vec<i8> = q.codes_i32()?.into_iter().map(|c| c as i8).collect();
        let row_sum = kernels::row_sums_i8(&codes, self.out_features, self.in_features);
        Ok(Int8Weight {
            codes,
            scale: q.params.scale,
            row_sum,
        })
    }

    /// `y = x Wᵀ + b` for `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
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
        let x2 = x.reshape(((), self.in_features))?.to_dtype(DType::F32)?;
        if let Some(obs) = self.observer.lock().unwrap().as_mut() {
            obs.observe(&x2)?;
        }
        let y = match &self.weights {
            Weights::Int8(w, act) => {
                return self.finish_unbiased(self.forward_int8(&x2, w, *act)?, dims)
            }
            Weights::Ggml(q) => QMatMul::from_arc(q.clone())?.forward(&x2)?,
            _ => {
                let m = x2.dim(0)?;
                let (o, i) = (self.out_features, self.in_features);
                // Few rows (decoding): multiply straight from the codes, row by row.
                let direct = if m <= rows::SMALL_BATCH && self.dequant_cache.is_none() {
                    let xs = x2.flatten_all()?.to_vec1::<f32>()?;
                    self.with_rows(|src| src.matmul(&xs, m, o, i))?
                } else {
                    None
                };
                match direct {
                    Some(y) => Tensor::from_vec(y, (m, o), x2.device())?,
                    None => {
                        let w = match &self.dequant_cache {
                            _ if matches!(self.weights, Weights::F32(_)) => self.weight_f32()?,
                            Some(cache) => match cache.get() {
                                Some(w) => w.clone(),
                                None => {
                                    let w = self.weight_f32()?;
                                    let _ = cache.set(w.clone());
                                    w
                                }
                            },
                            None => self.weight_f32()?,
                        };
                        x2.matmul(&w.t()?)?
                    }
                }
            }
        };
        self.finish(y, dims)
    }

    fn forward_int8(&self, x: &Tensor, w: &Int8Weight, act: ActQuant) -> Result<Tensor> {
        let m = x.dim(0)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let (scale, zp) = match act {
            ActQuant::Static { scale, zero_point } => (scale, zero_point),
            ActQuant::Dynamic => {
                if xs.iter().any(|v| !v.is_finite()) {
                    bail!(
                        "layer {}: input activations contain NaN or infinite values",
                        self.name
                    );
                }
                let (lo, hi) = kernels::min_max(&xs);
                kernels::activation_qparams_u8(lo, hi)
            }
        };
        let a = kernels::quantize_u8(&xs, scale, zp);
        let acc = kernels::gemm_u8_i8(&a, m, self.in_features, &w.codes, self.out_features);
        let bias = match &self.bias {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        };
        let y = kernels::requantize_f32(
            &acc,
            self.out_features,
            scale,
            zp,
            &w.scale,
            &w.row_sum,
            bias.as_deref(),
        );
        Ok(Tensor::from_vec(y, (m, self.out_features), x.device())?)
    }

    pub fn num_params(&self) -> usize {
        self.in_features * self.out_features + self.bias.as_ref().map_or(0, |_| self.out_features)
    }

    /// The tensors this layer serializes to, under `<name>.<suffix>`.
    pub fn stored_tensors(&self) -> Result<Vec<StoredTensor>> {
        use safetensors::Dtype as D;
        let n = |s: &str| format!("{}.{s}", self.name);
        let (o, i) = (self.out_features, self.in_features);
        let mut out = Vec::new();
        match &self.weights {
            Weights::F32(w) => out.push(StoredTensor {
                name: n("weight"),
                dtype: D::F32,
                shape: vec![o, i],
                bytes: f32_bytes(&w.flatten_all()?.to_vec1::<f32>()?),
            }),
            Weights::Half(w) => {
                let (dtype, bytes): (D, Vec<u8>) = match w.dtype() {
                    DType::F16 => (
                        D::F16,
                        w.flatten_all()?
                            .to_vec1::<half::f16>()?
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                    ),
                    _ => (
                        D::BF16,
                        w.flatten_all()?
                            .to_vec1::<half::bf16>()?
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect(),
                    ),
                };
                out.push(StoredTensor {
                    name: n("weight"),
                    dtype,
                    shape: vec![o, i],
                    bytes,
                });
            }
            Weights::Int8(w, act) => {
                out.push(StoredTensor {
                    name: n("weight"),
                    dtype: D::I8,
                    shape: vec![o, i],
                    bytes: w.codes.iter().map(|&c| c as u8).collect(),
                });
                out.push(StoredTensor {
                    name: n("weight_scale"),
                    dtype: D::F32,
                    shape: vec![o],
                    bytes: f32_bytes(&w.scale),
                });
                if let ActQuant::Static { scale, zero_point } = act {
                    out.push(StoredTensor {
                        name: n("input_scale"),
                        dtype: D::F32,
                        shape: vec![1],
                        bytes: scale.to_le_bytes().to_vec(),
                    });
                    out.push(StoredTensor {
                        name: n("input_zero_point"),
                        dtype: D::I32,
                        shape: vec![1],
                        bytes: zero_point.to_le_bytes().to_vec(),
                    });
                }
            }
            Weights::Uniform(q) => {
                let packed = q.packed_codes()?;
                out.push(StoredTensor {
                    name: n("weight_packed"),
                    dtype: D::U8,
                    shape: vec![packed.len()],
                    bytes: packed,
                });
                out.push(StoredTensor {
                    name: n("weight_scale"),
                    dtype: D::F32,
                    shape: vec![q.params.len()],
                    bytes: f32_bytes(&q.params.scale),
                });
                if q.scheme.mode == quant::Mode::Affine {
                    // Zero points fit in the code width; store them as bytes.
                    let zp: Vec<u8> = q
                        .params
                        .zero_point
                        .iter()
                        .map(|&z| z.clamp(-128, 255) as u8)
                        .collect();
                    out.push(StoredTensor {
                        name: n("weight_zero_point"),
                        dtype: D::U8,
                        shape: vec![zp.len()],
                        bytes: zp,
                    });
                }
            }
            Weights::Ggml(q) => out.push(StoredTensor {
                name: n("weight_ggml"),
                dtype: D::U8,
                shape: vec![q.storage_size_in_bytes()],
                bytes: q.data()?.into_owned(),
            }),
            Weights::FourBit(q) => {
                out.push(StoredTensor {
                    name: n("weight_packed"),
                    dtype: D::U8,
                    shape: vec![q.packed.len()],
                    bytes: q.packed.clone(),
                });
                match &q.absmax {
                    quant::codebook::Absmax::Plain(v) => out.push(StoredTensor {
                        name: n("weight_absmax"),
                        dtype: D::F32,
                        shape: vec![v.len()],
                        bytes: f32_bytes(v),
                    }),
                    quant::codebook::Absmax::Double { quantized, offset } => {
                        out.push(StoredTensor {
                            name: n("weight_absmax_q"),
                            dtype: D::U8,
                            shape: vec![quantized.codes.len()],
                            bytes: quantized.codes.clone(),
                        });
                        out.push(StoredTensor {
                            name: n("weight_absmax_scale"),
                            dtype: D::F32,
                            shape: vec![quantized.absmax.len()],
                            bytes: f32_bytes(&quantized.absmax),
                        });
                        out.push(StoredTensor {
                            name: n("weight_absmax_offset"),
                            dtype: D::F32,
                            shape: vec![1],
                            bytes: offset.to_le_bytes().to_vec(),
                        });
                    }
                }
            }
        }
        if let Some(b) = &self.bias {
            out.push(StoredTensor {
                name: n("bias"),
                dtype: D::F32,
                shape: vec![o],
                bytes: f32_bytes(&b.to_vec1::<f32>()?),
            });
        }
        Ok(out)
    }

    /// Bytes of the stored tensors (payload only).
    pub fn stored_bytes(&self) -> Result<usize> {
        Ok(self.stored_tensors()?.iter().map(|t| t.bytes.len()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        l.convert(&Method::DynamicInt8).unwrap();
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
        assert!(l
            .convert(&Method::StaticInt8(ObserverKind::MinMax))
            .is_err());
        l.start_calibration(ObserverKind::MinMax);
        l.forward(&x).unwrap();
        l.convert(&Method::StaticInt8(ObserverKind::MinMax))
            .unwrap();
        // Calibrated on the same batch: identical to dynamic quantization of that batch.
        let mut d = layer().0;
        d.convert(&Method::DynamicInt8).unwrap();
        let (ys, yd) = (l.forward(&x).unwrap(), d.forward(&x).unwrap());
        assert_eq!(ys.to_vec2::<f32>().unwrap(), yd.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn weight_only_and_half_forward_use_their_stored_weights() {
        for m in ["w:i4:sym:g32", "nf4", "f16", "bf16", "w:u8:affine:ch0"] {
            let (mut l, x) = layer();
            l.convert(&m.parse().unwrap()).unwrap();
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
            l.convert(&m.parse().unwrap()).unwrap();
            let own = match &l.weights {
                Weights::Uniform(q) => q.dequantize().unwrap(),
                Weights::FourBit(q) => {
                    Tensor::from_vec(q.dequantize(), (16, 64), &Device::Cpu).unwrap()
                }
                Weights::Half(w) => w.to_dtype(DType::F32).unwrap(),
                _ => unreachable!(),
            };
            let rows = l
                .with_rows(|src| src.decode_all(16, 64))
                .unwrap()
                .unwrap_or_else(|| panic!("{m} has no row view"));
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
            l.convert(&m.parse().unwrap()).unwrap();
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
            l.convert(&"w:i8:sym:ch0".parse().unwrap()).unwrap();
            assert!(max_diff(&l.forward(&x).unwrap(), &reference(&l, &x)) < 1e-3);
        }
    }

    #[test]
    fn stored_sizes() {
        let (mut l, _) = layer();
        assert_eq!(l.stored_bytes().unwrap(), 16 * 64 * 4 + 16 * 4);
        l.convert(&Method::DynamicInt8).unwrap();
        assert_eq!(l.stored_bytes().unwrap(), 16 * 64 + 16 * 4 + 16 * 4);
        let (mut l, _) = layer();
        l.convert(&"w:i4:sym:g32".parse().unwrap()).unwrap();
        assert_eq!(l.stored_bytes().unwrap(), 16 * 64 / 2 + 32 * 4 + 16 * 4);
    }

    #[test]
    fn nan_weights_and_bad_inputs_are_errors() {
        let w = Tensor::from_vec(vec![1.0f32, f32::NAN], (1, 2), &Device::Cpu).unwrap();
        let mut l = QLinear::new("bad", w, None).unwrap();
        let e = l.convert(&Method::DynamicInt8).unwrap_err().to_string();
        assert!(e.contains("bad"), "{e}");
        let (l, _) = layer();
        assert!(l
            .forward(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}
