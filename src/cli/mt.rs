//! Translation commands: `translate` (stdin → stdout) and `eval --task bleu`.

use crate::eval::bleu::{BLEU_SIGNATURE, CHRF_SIGNATURE};
use crate::eval::mt::{self, PreparedMarian};
use crate::eval::seq2seq::{translate, GenerateConfig, Overrides};
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// Decoding flags: changes to the model's `generation_config.json`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DecodingArgs {
    /// Beams (1 = greedy). Default: the model's generation config.
    #[arg(long)]
    pub num_beams: Option<usize>,
    /// Most tokens generated per sentence (EOS included). Default: the model's max_length.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Beam scores are divided by length^length_penalty.
    #[arg(long)]
    pub length_penalty: Option<f64>,
    /// Beam search stopping rule: false (transformers' default heuristic), true, never.
    #[arg(long)]
    pub early_stopping: Option<crate::eval::seq2seq::EarlyStopping>,
}

impl DecodingArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            num_beams: self.num_beams,
            max_new_tokens: self.max_new_tokens,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping,
        }
    }
}

/// Most sentences translated together: every sentence of a batch (times its beams) is a
/// decoder row with its own caches.
pub const MAX_BATCH: usize = 4096;

#[derive(clap::Args, Debug, Clone)]
pub struct MtModelArgs {
    /// A Hugging Face MarianMT folder (config.json, safetensors or pytorch_model.bin,
    /// source.spm, target.spm, vocab.json) or a hub id in the local cache. Default: the
    /// shared marian-multi30k-en-de beside the data folder.
    #[arg(long, env = crate::model::MARIAN_ENV)]
    pub model: Option<String>,
    /// Per-layer plan, `pattern=method;...` (first match wins; unmatched layers stay f32),
    /// e.g. `*=dynamic-int8` or `lm_head=keep;*=w:i4:sym:g64`.
    #[arg(long)]
    pub plan: Option<String>,
    /// Source sentences (one per line) that calibrate static int8 layers.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// Sentences translated together (padded).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

impl MtModelArgs {
    pub fn model_spec(&self) -> Result<String> {
        match &self.model {
            Some(m) => {
                crate::load::expect_model_folder(
                    m,
                    "translation needs a MarianMT folder (config.json, model.safetensors or pytorch_model.bin, source.spm, target.spm, vocab.json)",
                )?;
                Ok(m.clone())
            }
            None => Ok(crate::model::default_marian_dir()?.display().to_string()),
        }
    }

    pub fn prepare(&self, device: &Device) -> Result<(PreparedMarian, GenerateConfig)> {
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            bail!(
                "--batch-size {}: 1 to {MAX_BATCH} sentences are possible",
                self.batch_size
            );
        }
        let calibration = match &self.calibration {
            Some(p) => Some(crate::data::read_lines(p)?),
            None => None,
        };
        let p = mt::prepare(
            &self.model_spec()?,
            self.plan.as_deref(),
            calibration.as_deref(),
            device,
        )?;
        let cfg = self.decoding.overrides().apply(&p.generation)?;
        Ok((p, cfg))
    }
}

/// `quantlab translate`: one source sentence per stdin line, one translation per stdout line.
pub fn translate_stdin(a: &MtModelArgs, device: &Device) -> Result<()> {
    let (p, cfg) = a.prepare(device)?;
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    let mut batch = Vec::with_capacity(a.batch_size);
    let mut lines = stdin.lock().lines();
    let mut lineno = 0usize;
    loop {
        lineno += 1;
        let line = lines.next().transpose().map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                anyhow::anyhow!("stdin line {lineno} is not valid UTF-8; convert the text to UTF-8 first (e.g. iconv -f latin1 -t utf-8)")
            }
            _ => anyhow::Error::from(e).context("reading stdin"),
        })?;
        let end = line.is_none();
        if let Some(l) = line {
            batch.push(l);
        }
        if batch.len() == a.batch_size || (end && !batch.is_empty()) {
            for t in translate(
                &p.mt.model,
                &p.mt.tokenizer,
                &batch,
                &cfg,
                a.batch_size,
                false,
            )? {
                writeln!(stdout, "{}", t.text)?;
            }
            stdout.flush()?;
            batch.clear();
        }
        if end {
            return Ok(());
        }
    }
}

/// `eval --task bleu --hyps F --ref F`: corpus scores of existing translations.
fn score_hypotheses(hyps_path: &std::path::Path, a: &EvalArgs) -> Result<Report> {
    let (hyps, refs) = crate::data::read_aligned(hyps_path, &a.reference, a.limit)?;
    let bleu = crate::eval::bleu::corpus_bleu(&hyps, &refs)?;
    let chrf = crate::eval::bleu::corpus_chrf(&hyps, &refs)?;
    let mut t = Table::new(
        "bleu",
        "Translation quality",
        &["hypotheses", "sentences", "BLEU", "chrF"],
    );
    t.push(vec![
        hyps_path.display().to_string().into(),
        Cell::Int(hyps.len() as i64),
        Cell::f(bleu.score, 2),
        Cell::f(chrf, 2),
    ]);
    t.note(bleu.to_string());
    t.note(format!(
        "BLEU signature: {BLEU_SIGNATURE}; chrF signature: {CHRF_SIGNATURE}"
    ));
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}

/// What `quantlab eval` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalTask {
    /// Translate --src and score against --ref: corpus BLEU and chrF (sacrebleu defaults).
    Bleu,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[arg(long, value_enum)]
    pub task: EvalTask,
    #[command(flatten)]
    pub model: MtModelArgs,
    /// Source sentences, one per line (.gz read transparently).
    #[arg(long, required_unless_present = "hyps")]
    pub src: Option<PathBuf>,
    /// Score these hypotheses (one per line) instead of translating: BLEU/chrF only, like
    /// `sacrebleu REF -i HYPS`.
    #[arg(long, conflicts_with_all = ["src", "hyps_out", "plan"])]
    pub hyps: Option<PathBuf>,
    /// Reference translations aligned with --src.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// Score only the first N sentences.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also write the translations here, one per line (written whole or not at all).
    #[arg(long)]
    pub hyps_out: Option<PathBuf>,
}

pub fn eval_report(a: &EvalArgs, device: &Device, progress: bool) -> Result<Report> {
    match a.task {
        EvalTask::Bleu => {}
    }
    if let Some(h) = &a.hyps {
        return score_hypotheses(h, a);
    }
    let src_path = a
        .src
        .as_ref()
        .context("--src is required unless --hyps is given")?;
    let (src, refs) = crate::data::read_aligned(src_path, &a.reference, a.limit)?;
    let (p, cfg) = a.model.prepare(device)?;
    let run = mt::evaluate(&p, &src, &refs, &cfg, a.model.batch_size, progress)?;
    if let Some(out) = &a.hyps_out {
        let mut text = String::new();
        for t in &run.translations {
            text.push_str(&t.text);
            text.push('\n');
        }
        crate::quant::io::write_atomically(out, text.as_bytes())?;
    }
    let mut t = Table::new(
        "bleu",
        "Translation quality",
        &[
            "model",
            "plan",
            "decoding",
            "sentences",
            "BLEU",
            "chrF",
            "weights MB",
            "sentences/s",
        ],
    );
    t.push(vec![
        p.mt.source.display().to_string().into(),
        p.plan.clone().into(),
        cfg.label().into(),
        Cell::Int(src.len() as i64),
        Cell::f(run.bleu.score, 2),
        Cell::f(run.chrf, 2),
        Cell::f(p.weight_bytes() as f64 / 1e6, 2),
        Cell::f(run.sentences_per_second(), 1),
    ]);
    t.note(run.bleu.to_string());
    t.note(format!("BLEU signature: {BLEU_SIGNATURE}; chrF signature: {CHRF_SIGNATURE} (quantlab's implementation, equal to sacrebleu 2.6.0's on the recorded test corpora)"));
    t.note(format!(
        "batches of {}, CPU; sentences/s = sentences / wall time of the whole translation",
        a.model.batch_size
    ));
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}
