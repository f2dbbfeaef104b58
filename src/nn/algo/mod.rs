//! Quantization algorithms: what a plan rule names. Each turns a layer's weight (and the
//! calibration statistics it asked for) into a stored [`WeightFormat`]. `nn::registry`
//! maps plan spellings to them.

pub mod awq;
pub mod cast;
pub mod fourbit;
pub mod fp8;
pub mod ggml;
pub mod gptq;
pub mod hqq;
pub mod int8;
pub mod keep;
pub mod llm_int8;
pub mod rtn;
pub mod rtn_clip;
pub mod rtn_signed_max;
pub mod smoothquant;
pub mod w8a8;

use super::calib::{Calibration, Statistic};
use super::format::WeightFormat;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::fmt::Debug;
use std::sync::Arc;

/// One layer as an algorithm sees it.
pub struct LayerInput<'a> {
    pub name: &'a str,
    /// The weight as it is now (f32 as loaded, or a GGML type kept from a GGUF file).
    pub weight: &'a Arc<dyn WeightFormat>,
    /// The statistics [`Algorithm::needs`] asked for, gathered on calibration data.
    pub calibration: Option<&'a Calibration>,
}

impl LayerInput<'_> {
    /// The current weight as f32 on the CPU, refused if it holds NaN or infinite values.
    pub fn weight_f32(&self) -> Result<Tensor> {
        let w = self.weight.dequantize()?.to_device(&Device::Cpu)?;
        crate::quant::uniform::ensure_finite(&w, &format!("weight of layer {}", self.name))?;
        Ok(w)
    }
}

/// Checks a scheme a row-grouped weight-only method can produce: PyTorch's convention
/// without `reduce_range`, and one set of parameters per group or per output row.
/// `method` names the method in the errors, `help` says how to spell it.
pub fn ensure_row_grouped(sc: &crate::quant::Scheme, method: &str, help: &str) -> Result<()> {
    use crate::quant::{Convention, Granularity};
    if sc.reduce_range || sc.convention != Convention::Pytorch {
        anyhow::bail!("{method} takes no ':reduce' or ':handout': {help}");
    }
    if !matches!(
        sc.granularity,
        Granularity::PerGroup { .. } | Granularity::PerChannel { axis: 0 }
    ) {
        anyhow::bail!("{method} has its parameters per group or per output row: {help}");
    }
    Ok(())
}

pub trait Algorithm: Debug + Send + Sync {
    /// The plan spelling, which the registry parses back to an equal algorithm.
    fn spec(&self) -> String;
    /// Short dtype label for tables (`fp32`, `qint8`, `int4`, `nf4`, `q4_k`).
    fn label(&self) -> String;
    /// Nominal bits per weight, for sweeps and plots (stored bits come from the format).
    fn nominal_bits(&self) -> u32;
    /// Statistics of the layer's inputs this algorithm needs from calibration data.
    fn needs(&self) -> Vec<Statistic> {
        Vec::new()
    }
    /// Whether its statistics must come from inputs that flowed through the layers quantized
    /// before it (GPTQ's `true_sequential`): the plan then calibrates stage by stage where
    /// the model supports it.
    fn sequential(&self) -> bool {
        false
    }
    /// Whether the layer is left as it was loaded.
    fn keeps_layer(&self) -> bool {
        false
    }
    /// Activation-aware scaling this algorithm folds into its layer groups before any layer
    /// is converted (SmoothQuant, AWQ); `apply` then sees the scaled weight and statistics.
    fn group_scaling(&self) -> Option<&dyn crate::nn::scaling::GroupScaling> {
        None
    }
    /// The layer's new weight.
    fn apply(&self, layer: &LayerInput) -> Result<Arc<dyn WeightFormat>>;
}
