//! Dense f32 weights: on the CPU, the packed f32 kernel (`kernels::gemm_f32`: the weight
//! rearranged once, on first use, into the panel layout the kernel streams) for any number
//! of activation rows; candle's matmul on other devices.

use super::{named, StoredParts, WeightFormat};
use crate::load::{raw_f32, NamedTensor};
use crate::nn::kernels::gemm_f32::{self, PackedWeight};
use crate::nn::rows::{self, forward_rows_or_matmul, RowSource};
use anyhow::Result;
use candle_core::{CpuStorage, DType, Device, Tensor};
use std::any::Any;
use std::sync::{Arc, OnceLock};

pub const ID: &str = "f32";

#[derive(Debug, Clone)]
pub struct Dense {
    /// `[out, in]` f32.
    pub weight: Tensor,
    /// The weight in the CPU kernel's panel layout, made on the first CPU forward (a second
    /// copy of the weight: memory traded for a matmul that packs nothing per call).
    packed: Arc<OnceLock<PackedWeight>>,
}

impl Dense {
    pub fn new(weight: Tensor) -> Result<Self> {
        Ok(Dense {
            weight: weight.to_dtype(DType::F32)?,
            packed: Arc::default(),
        })
    }

    /// The weight in the CPU kernel's panel layout (packed on the first call); `None` when
    /// the weight is not a plain contiguous f32 buffer on the CPU.
    pub fn packed_cpu(&self) -> Option<&PackedWeight> {
        if !self.weight.device().is_cpu() {
            return None;
        }
        if let Some(p) = self.packed.get() {
            return Some(p);
        }
        let (o, i) = self.shape();
        let p = rows::with_cpu_slice(&self.weight, o * i, CpuStorage::as_slice::<f32>, |w| {
            PackedWeight::for_selected(w, o, i)
        })?;
        Some(self.packed.get_or_init(|| p))
    }

    /// `x [m, in] · Wᵀ (+ bias)` with the packed CPU kernel; `None` when the weight or `x`
    /// is not on the CPU (or the weight's storage is not a plain contiguous f32 buffer).
    fn forward_packed(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
        if !x.device().is_cpu() {
            return Ok(None);
        }
        let Some(packed) = self.packed_cpu() else {
            return Ok(None);
        };
        let (o, i) = self.shape();
        let m = x.dim(0)?;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let y = rows::with_cpu_slice(&x, m * i, CpuStorage::as_slice::<f32>, |xs| {
            gemm_f32::matmul(xs, m, packed)
        });
        Ok(match y {
            Some(y) => Some(rows::with_bias(y, (m, o), bias, x.device())?),
            None => None,
        })
    }

    pub fn load(
        shape: (usize, usize),
        _meta: &serde_json::Value,
        parts: &mut StoredParts,
        device: &Device,
    ) -> Result<Arc<dyn WeightFormat>> {
        let v = parts.f32("weight", shape.0 * shape.1)?;
        crate::load::ensure_finite_values(&v, &parts.what("weight"))?;
        Ok(Arc::new(Dense::new(Tensor::from_vec(v, shape, device)?)?))
    }
}

impl WeightFormat for Dense {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        "fp32".into()
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    fn device(&self) -> Device {
        self.weight.device().clone()
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if let Some(y) = self.forward_packed(x, bias)? {
            return Ok(y);
        }
        let (o, i) = self.shape();
        forward_rows_or_matmul(
            x,
            bias,
            (o, i),
            |f| {
                rows::with_cpu_slice(&self.weight, o * i, CpuStorage::as_slice::<f32>, |w| {
                    f(&RowSource::F32(w))
                })
            },
            || Ok(self.weight.clone()),
        )
    }

    fn dequantize(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }

    /// `forward` is the matmul with the weight itself: a dequantized copy would only
    /// duplicate it and bypass the packed CPU kernel.
    fn forward_is_dequantized_matmul(&self) -> bool {
        false
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        Dense::new(self.weight.to_device(device)?).map(|d| Arc::new(d) as _)
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        Ok(vec![named(prefix, "weight", raw_f32(&self.weight)?)])
    }

    fn stored_bytes(&self) -> usize {
        self.weight.elem_count() * 4
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    /// The weights stacked (f32 products are per row: the same sums in the same order for
    /// every row, whatever the number of rows around it). On the CPU only the kernel's
    /// panels of the stack are kept ([`StackedPanels`]), packed straight from the parts.
    fn concat_rows(&self, rest: &[&dyn WeightFormat]) -> Option<Arc<dyn WeightFormat>> {
        let parts = super::same_format(self, rest, self.shape().1)?;
        if parts.iter().all(|p| p.weight.device().is_cpu()) {
            let k = self.shape().1;
            let hosts: Vec<Vec<f32>> = parts
                .iter()
                .map(|p| p.weight.flatten_all().and_then(|w| w.to_vec1::<f32>()))
                .collect::<candle_core::Result<_>>()
                .ok()?;
            if k == 0 {
                return None;
            }
            let slices: Vec<&[f32]> = hosts.iter().map(Vec::as_slice).collect();
            let nr = gemm_f32::panel_width(crate::nn::kernels::Isa::selected());
            return Some(Arc::new(StackedPanels {
                packed: PackedWeight::stacked(&slices, k, nr),
            }));
        }
        let ws: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let w = Tensor::cat(&ws, 0).ok()?;
        Some(Arc::new(Dense::new(w).ok()?))
    }
}

/// f32 weights stacked for one fused CPU product (q|k|v, gate|up): only the kernel's panel
/// layout. A `Dense` of the stack kept a row-major copy beside its panels: for SmolLM2,
/// 270 MB duplicating the parts, which stay as they are for saving and reports. The same
/// kernel and panels as a `Dense` of the stack, so the same bits.
#[derive(Debug)]
pub struct StackedPanels {
    packed: PackedWeight,
}

impl StackedPanels {
    /// `x [m, in]` (host rows) times the stack, each part's outputs (`widths`, in order) in
    /// its own row-major buffer, written in place by the kernel; `None` when a part does
    /// not start on a panel boundary (then the caller splits one product's output).
    pub fn forward_split(&self, x: &[f32], m: usize, widths: &[usize]) -> Option<Vec<Vec<f32>>> {
        if x.len() != m * self.packed.k() {
            return None;
        }
        gemm_f32::matmul_split(
            crate::nn::kernels::Isa::selected(),
            x,
            m,
            &self.packed,
            widths,
        )
    }
}

impl WeightFormat for StackedPanels {
    fn id(&self) -> &'static str {
        ID
    }

    fn label(&self) -> String {
        "fp32".into()
    }

    fn shape(&self) -> (usize, usize) {
        (self.packed.n(), self.packed.k())
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (o, i) = self.shape();
        if !x.device().is_cpu() {
            anyhow::bail!("a stacked f32 weight runs on the CPU only");
        }
        let m = x.dim(0)?;
        if x.dims() != [m, i] {
            anyhow::bail!(
                "stacked f32 weight [{o}, {i}]: input of shape {:?}",
                x.dims()
            );
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let y = rows::with_cpu_slice(&x, m * i, CpuStorage::as_slice::<f32>, |xs| {
            gemm_f32::matmul(xs, m, &self.packed)
        })
        .ok_or_else(|| anyhow::anyhow!("input is not a CPU f32 buffer"))?;
        rows::with_bias(y, (m, o), bias, x.device())
    }

    fn dequantize(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.packed.unpack(),
            self.shape(),
            &Device::Cpu,
        )?)
    }

    fn forward_is_dequantized_matmul(&self) -> bool {
        false
    }

    fn to_device(&self, device: &Device) -> Result<Arc<dyn WeightFormat>> {
        Dense::new(self.dequantize()?.to_device(device)?).map(|d| Arc::new(d) as _)
    }

    fn tensors(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        Ok(vec![named(prefix, "weight", raw_f32(&self.dequantize()?)?)])
    }

    fn stored_bytes(&self) -> usize {
        self.packed.n() * self.packed.k() * 4
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Dense layer with a bias gives the product plus the bias, as before.
    #[test]
    fn dense_forward_with_bias_matches_matmul_plus_bias() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 19), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 37, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 19), &dev).unwrap();
        let d = Dense::new(w.clone()).unwrap();
        let got = d.forward(&x, Some(&b)).unwrap().to_vec2::<f32>().unwrap();
        let no_bias = d.forward(&x, None).unwrap();
        let want = no_bias.broadcast_add(&b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, want);
        let reference = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let diff = (reference - Tensor::new(got, &dev).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}
