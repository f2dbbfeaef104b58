//! One `prepare` for every model kind: the plan is parsed and checked before any weight is
//! read, the model is loaded on the device, calibration data is gathered in the form its
//! kind feeds (text windows for an LLM, source sentences for Marian, MNIST images for the
//! MLP) only when some rule needs statistics, and the plan is applied.

use super::lm::{self, CalibrationSpec, PreparedLlm};
use super::mt::{self, PreparedMarian};
use crate::arch::llama::LoadAs;
use crate::arch::mlp::Mlp;
use crate::data::DataDir;
use crate::model::{self, Kind};
use crate::nn::{apply_plan, LayerSummary, Plan};
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::PathBuf;

/// Where calibration data comes from, read only when a plan needs it.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    /// Text (LLM) or one source sentence per line (Marian); the MLP uses MNIST training
    /// images from the data folder. LLM default: WikiText-2 validation.
    pub file: Option<PathBuf>,
    /// LLM windows, Marian sentences (the first N lines), MLP batches of 64 images.
    pub samples: usize,
    /// Tokens per LLM window.
    pub seqlen: usize,
    /// Seed of the LLM window positions.
    pub seed: u64,
    pub data_dir: Option<PathBuf>,
}

impl Calibration {
    /// The LLM text windows: `file`, or WikiText-2 validation (never the test split).
    pub fn text_spec(&self) -> Result<CalibrationSpec> {
        let path = match &self.file {
            Some(p) => p.clone(),
            None => DataDir::resolve(self.data_dir.as_deref())?.require(
                "wikitext-2/valid.txt",
                "calibration defaults to WikiText-2 validation; pass --calibration FILE",
            )?,
        };
        CalibrationSpec::new(path, self.samples, self.seqlen, self.seed)
    }
}

/// An MLP with a plan applied.
pub struct PreparedMlp {
    pub model: Mlp,
    pub source: PathBuf,
    pub layers: Vec<LayerSummary>,
    pub plan: String,
}

/// A model of any kind with a plan applied.
pub enum Prepared {
    Llm(Box<PreparedLlm>),
    Marian(Box<PreparedMarian>),
    Mlp(PreparedMlp),
}

/// Loads `spec` on `device` and applies `plan`.
pub fn prepare(
    spec: &str,
    plan: &str,
    load_as: LoadAs,
    calibration: &Calibration,
    device: &Device,
) -> Result<Prepared> {
    let parsed: Plan = plan
        .parse()
        .with_context(|| format!("in --plan '{plan}'"))?;
    let needs = crate::nn::plan_needs_calibration(&parsed);
    Ok(match model::kind_of(spec)? {
        Kind::Llm => {
            let calib = needs.then(|| calibration.text_spec()).transpose()?;
            Prepared::Llm(Box::new(lm::prepare(
                spec,
                load_as,
                Some(plan),
                calib.as_ref(),
                device,
            )?))
        }
        Kind::Marian => {
            let sentences = if needs {
                let f = calibration.file.as_ref().context(
                    "this plan needs calibration data: pass --calibration FILE (source-language sentences)",
                )?;
                let mut lines = crate::data::read_lines(f)?;
                lines.truncate(calibration.samples.max(1));
                Some(lines)
            } else {
                None
            };
            Prepared::Marian(Box::new(mt::prepare(
                spec,
                Some(plan),
                sentences.as_deref(),
                device,
            )?))
        }
        Kind::Mlp => {
            let source = crate::load::resolve_model_dir(spec)?;
            let mut model = Mlp::load(&source, device)?;
            let layers = apply_plan(&mut model, &parsed, |m| {
                let data = crate::data::mnist::load(
                    &DataDir::resolve(calibration.data_dir.as_deref())?,
                    device,
                )?;
                let n = (calibration.samples * 64).min(data.train.len());
                m.calibrate(&data.train.images.narrow(0, 0, n)?)
            })?;
            Prepared::Mlp(PreparedMlp {
                model,
                source,
                layers,
                plan: plan.into(),
            })
        }
    })
}
