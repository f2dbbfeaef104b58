//! LLM commands: perplexity (with KL to a base model) and generation.

use crate::arch::llama::LoadAs;
use crate::data::DataDir;
use crate::eval::lm::{self, KlMode, PreparedLlm};
use crate::eval::perplexity::Protocol;
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `--load-as`: how GGUF weights are materialised (the flag's spelling of [`LoadAs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadAsArg {
    /// Keep GGUF weights in their GGML types (as llama.cpp runs them).
    Ggml,
    /// Dequantize everything to f32: the reference for quantization studies.
    F32,
}

impl From<LoadAsArg> for LoadAs {
    fn from(a: LoadAsArg) -> Self {
        match a {
            LoadAsArg::Ggml => LoadAs::Ggml,
            LoadAsArg::F32 => LoadAs::F32,
        }
    }
}

/// `--layers`: the flag's spelling of [`Layers`](crate::lab::sweep::Layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayersArg {
    /// Every linear layer of the transformer blocks (lm_head and embeddings stay f32).
    All,
    /// Only the feed-forward layers (`*.mlp.*`).
    Ffn,
    /// Only the attention projections (`*.self_attn.*`).
    Attn,
    /// Every linear layer including lm_head.
    Everything,
}

impl From<LayersArg> for crate::lab::sweep::Layers {
    fn from(l: LayersArg) -> Self {
        use crate::lab::sweep::Layers;
        match l {
            LayersArg::All => Layers::All,
            LayersArg::Ffn => Layers::Ffn,
            LayersArg::Attn => Layers::Attn,
            LayersArg::Everything => Layers::Everything,
        }
    }
}

/// Where the SmolLM2 GGUF lands when fetched by `scripts/fetch-smollm2.sh`.
pub const DEFAULT_LLM: &str = "models/smollm2-135m";

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file, a folder holding one, a Hugging Face folder (config.json, safetensors,
    /// tokenizer.json) or a hub id in the local cache.
    #[arg(long, default_value = DEFAULT_LLM, env = "QUANTLAB_LLM")]
    pub model: String,
    /// GGUF weights: dequantized to f32 (the reference for quantization studies) or kept
    /// in their GGML types.
    #[arg(long, value_enum, default_value_t = LoadAsArg::F32)]
    pub load_as: LoadAsArg,
    /// Per-layer plan, `pattern=method;...` (first match wins; unmatched layers stay as
    /// loaded), e.g. `lm_head=f32;*.mlp.*=w:i4:sym:g64`.
    #[arg(long)]
    pub plan: Option<String>,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
}

/// Calibration data for methods that need statistics of each layer's inputs (static int8,
/// later GPTQ/AWQ/SmoothQuant), read only when a plan rule needs it.
#[derive(clap::Args, Debug, Clone)]
pub struct CalibrationArgs {
    /// Calibration data: a text for LLMs (seeded random windows; default WikiText-2
    /// *validation*, never the test split that perplexity scores), source sentences one per
    /// line for Marian; the MLP calibrates on MNIST training images.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// LLM windows, Marian sentences (the first N), or MLP batches of 64 images.
    #[arg(long, default_value_t = 128)]
    pub calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub calib_seqlen: usize,
    /// Seed for the window positions.
    #[arg(long, default_value_t = 0)]
    pub calib_seed: u64,
}

impl CalibrationArgs {
    /// The flags as the library's calibration source.
    pub fn source(&self, data: Option<&Path>) -> crate::eval::prepare::Calibration {
        crate::eval::prepare::Calibration {
            file: self.calibration.clone(),
            samples: self.calib_samples,
            seqlen: self.calib_seqlen,
            seed: self.calib_seed,
            data_dir: data.map(Path::to_path_buf),
        }
    }
}

impl ModelArgs {
    /// Loads the model and applies the plan (calibrating when the plan needs it).
    pub fn prepare(&self, data: Option<&Path>, device: &Device) -> Result<PreparedLlm> {
        let plan: Option<crate::nn::Plan> = self
            .plan
            .as_deref()
            .map(|p| p.parse().with_context(|| format!("in --plan '{p}'")))
            .transpose()?;
        let calibration = match &plan {
            Some(p) if crate::nn::plan_needs_calibration(p) => {
                Some(self.calibration.source(data).text_spec()?)
            }
            _ => None,
        };
        lm::prepare(
            &self.model,
            self.load_as.into(),
            self.plan.as_deref(),
            calibration.as_ref(),
            device,
        )
    }
}

/// `text` if given, else WikiText-2 test from the data folder (the default text every LLM
/// command and lab scores).
pub fn text_or_wikitext_test(text: Option<PathBuf>, data: Option<&Path>) -> Result<PathBuf> {
    match text {
        Some(p) => Ok(p),
        None => DataDir::resolve(data)?.require(
            "wikitext-2/test.txt",
            "WikiText-2 is expected in the shared data folder; pass --text FILE to score another text",
        ),
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct TextArgs {
    /// Text file to score (read whole). Default: WikiText-2 test from the data folder.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Chunk length of the llama.cpp protocol.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Put BOS in the first position of each chunk (llama.cpp does when the vocabulary's
    /// add_bos_token is true; SmolLM2's GGUF says false).
    #[arg(long)]
    pub bos: bool,
    /// Use Hugging Face's strided protocol instead: `MAX_LEN:STRIDE`, e.g. 1024:512.
    #[arg(long)]
    pub strided: Option<String>,
    /// Score only the first N chunks (windows), for quick runs.
    #[arg(long)]
    pub max_chunks: Option<usize>,
    /// Windows per forward pass (GPU throughput). The numbers do not change, except for
    /// dynamic per-tensor int8 activations, whose range then spans the whole batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

impl TextArgs {
    pub fn protocol(&self) -> Result<Protocol> {
        if self.max_chunks == Some(0) {
            bail!("--max-chunks 0 scores nothing: give at least 1 (or drop it to score the whole text)");
        }
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        Ok(match &self.strided {
            None => Protocol::LlamaCpp {
                ctx: self.ctx,
                bos: self.bos,
            },
            Some(s) => {
                let (a, b) = s.split_once(':').with_context(|| {
                    format!("--strided '{s}': use MAX_LEN:STRIDE, e.g. 1024:512")
                })?;
                Protocol::Strided {
                    max_len: a
                        .trim()
                        .parse()
                        .with_context(|| format!("--strided '{s}'"))?,
                    stride: b
                        .trim()
                        .parse()
                        .with_context(|| format!("--strided '{s}'"))?,
                }
            }
        })
    }

    pub fn text_path(&self, data: Option<&Path>) -> Result<PathBuf> {
        text_or_wikitext_test(self.text.clone(), data)
    }
}

#[derive(clap::Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub text: TextArgs,
    /// Store this (base) model's log-probs for later KL comparisons.
    #[arg(long, conflicts_with = "kl_base")]
    pub save_logprobs: Option<PathBuf>,
    /// Tokens kept per position in --save-logprobs (the rest is one bucket); 0 keeps the
    /// whole vocabulary (exact KL, ~200 KB per position for SmolLM2).
    #[arg(long, default_value_t = 256)]
    pub kl_top_k: usize,
    /// Compare with a base file from --save-logprobs: KL divergence and top-1 agreement.
    #[arg(long)]
    pub kl_base: Option<PathBuf>,
    #[command(flatten)]
    pub measure: MeasureArgs,
}

/// Run files, early stopping and the all-protocols table (issue #16).
#[derive(clap::Args, Debug, Clone)]
pub struct MeasureArgs {
    /// Write the per-token scores (NLL; KL, same top, Δp with --kl-base) and a header to
    /// this JSON-lines file, for `quantlab compare`.
    #[arg(long)]
    pub save_run: Option<PathBuf>,
    /// Stop once the 95% CI half-width of mean KL (with --kl-base) or of mean NLL
    /// (without), from chunk-level standard errors, is at most X (after at least 8 chunks).
    #[arg(long, value_name = "X", conflicts_with = "save_logprobs")]
    pub until_ci: Option<f64>,
    /// Score under several protocols in one command: `all` or a list of llama-bos, llama,
    /// hf-strided, gptq, lm-eval (word and byte perplexity); one table.
    #[arg(long, conflicts_with_all = ["save_logprobs", "kl_base", "save_run", "until_ci"])]
    pub protocols: Option<String>,
    /// Window of the lm-eval protocol (lm-eval uses the model's full context).
    #[arg(long, default_value_t = 2048)]
    pub lm_eval_max_len: usize,
}

pub fn kl_mode(save: &Option<PathBuf>, top_k: usize, base: &Option<PathBuf>) -> KlMode {
    match (save, base) {
        (Some(p), _) => KlMode::Save(p.clone(), top_k),
        (_, Some(p)) => KlMode::Compare(p.clone()),
        _ => KlMode::None,
    }
}

fn mb(bytes: usize) -> Cell {
    Cell::f(bytes as f64 / 1e6, 2)
}

pub fn reference_note(p: &PreparedLlm) -> String {
    format!(
        "model {} ({} params, {} layers), plan '{}'; device {}, activations {}. No unquantized SmolLM is reachable here: \
         for a GGUF file, the f32 weights dequantized from it are the reference model.",
        p.llm.source.display(),
        p.llm.model.num_params(),
        p.llm.model.cfg.num_hidden_layers,
        p.plan,
        crate::device::describe(&p.llm.model.device),
        crate::device::dtype_name(p.llm.model.dtype()),
    )
}

/// The label of scores computed with `--activations`: ` a:q8` where q8 activations ran.
/// On the CPU they run in every product; on a GPU only in decode products (≤ 2 rows,
/// `packed_cuda::q8`), so a scored window (whole rows of a chunk) runs exact there and
/// its row carries no label (a note says so).
fn scored_activations_label(device: &Device) -> &'static str {
    if device.is_cpu() {
        crate::nn::kernels::prefill::label()
    } else {
        ""
    }
}

pub fn perplexity_report(
    a: &PerplexityArgs,
    data: Option<&Path>,
    device: &Device,
    progress: bool,
) -> Result<Report> {
    let protocol = a.text.protocol()?;
    if let Some(out) = &a.save_logprobs {
        crate::quant::io::check_target(out)?;
    }
    let path = a.text.text_path(data)?;
    let text = lm::read_text(&path)?;
    let p = a.model.prepare(data, device)?;
    let ids = p.llm.tokenizer.encode(&text)?;
    let bar = crate::progress::bar(0, "perplexity", progress);
    if let Some(list) = &a.measure.protocols {
        return crate::eval::measure::protocols_report(
            &p,
            &text,
            &ids,
            list,
            &text_spec(&a.text, protocol),
            a.measure.lm_eval_max_len,
            &bar,
        );
    }
    let mode = kl_mode(&a.save_logprobs, a.kl_top_k, &a.kl_base);
    let s = lm::score_with(
        &p,
        &ids,
        protocol,
        a.text.max_chunks,
        a.text.batch,
        &mode,
        &lm::ScoreOptions {
            chunk_lines: progress,
            until_ci: a.measure.until_ci,
        },
        &bar,
    )?;
    if crate::profile::enabled() {
        eprint!(
            "time per section (QUANTLAB_PROFILE):\n{}",
            crate::profile::report()
        );
    }
    let mut t = Table::new(
        "perplexity",
        &format!("Perplexity on {}", path.display()),
        &[
            "plan",
            "bits per weight",
            "weights MB",
            "chunks",
            "tokens scored",
            "perplexity",
            "mean KL",
            "top-1 agreement %",
            "seconds",
            "tokens/s",
        ],
    );
    let (kl, agree) = match &s.kl {
        Some(k) => (
            Cell::f(k.mean_kl(), 5),
            Cell::f(100.0 * k.top1_agreement(), 2),
        ),
        None => (Cell::Missing, Cell::Missing),
    };
    t.push(vec![
        // `a:q8`: weight-only layers ran with q8 activations (`--activations q8`).
        format!(
            "{}{}",
            p.plan,
            scored_activations_label(&p.llm.model.device)
        )
        .into(),
        Cell::f(p.linear_bits_per_weight(), 3),
        mb(p.weight_bytes()),
        s.ppl.windows.into(),
        s.ppl.scored_tokens.into(),
        Cell::f(s.ppl.perplexity(), 4),
        kl,
        agree,
        Cell::f(s.ppl.seconds, 1),
        Cell::f(s.ppl.tokens_per_second(), 1),
    ]);
    t.note(format!(
        "protocol: {protocol}; {} tokens in the text",
        ids.len()
    ));
    t.note(reference_note(&p));
    if !p.llm.model.device.is_cpu() && crate::nn::kernels::prefill::q8_activations() {
        t.note(
            "--activations q8 changes decode products (at most 2 rows) on a GPU only: these windows were scored with exact activations.",
        );
    }
    t.provenance = Some(llm_provenance(&p, &path, &ids, &protocol, &a.model, data)?);
    if let KlMode::Save(f, k) = &mode {
        t.note(format!(
            "base log-probs (top {k}) written to {}",
            f.display()
        ));
    }
    let mut tables = vec![t];
    tables.extend(crate::eval::measure::after_run(
        &p,
        &s,
        &path,
        &text,
        &ids,
        &text_spec(&a.text, protocol),
        a.kl_base.as_deref(),
        a.measure.save_run.as_deref(),
    )?);
    Ok(Report {
        tables,
        notes: vec![],
    })
}

/// The provenance of an LLM measurement: this process, the text and its hash, the
/// tokenizer (with the hash of the ids it gave), the protocol and any calibration.
pub fn llm_provenance(
    p: &PreparedLlm,
    text: &Path,
    ids: &[u32],
    protocol: &Protocol,
    model: &ModelArgs,
    data: Option<&Path>,
) -> Result<crate::report::Provenance> {
    use crate::report::provenance::{self, CalibrationRecord, DataFile};
    let mut prov = crate::report::Provenance::here(&p.llm.model.device);
    prov.dtype = Some(crate::device::dtype_name(p.llm.model.dtype()).into());
    prov.dataset = Some(DataFile::of(text)?);
    prov.tokenizer = Some(provenance::tokenizer_id(&p.llm.tokenizer, ids));
    prov.protocol = Some(protocol.to_string());
    let plan: Option<crate::nn::Plan> = model.plan.as_deref().and_then(|p| p.parse().ok());
    if plan.as_ref().is_some_and(crate::nn::plan_needs_calibration) {
        let spec = model.calibration.source(data).text_spec()?;
        prov.seed = Some(spec.seed);
        prov.calibration = Some(CalibrationRecord::of(
            &spec.text,
            spec.samples,
            spec.seqlen,
            spec.seed,
        )?);
    }
    Ok(prov)
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Run file A (`perplexity --save-run`).
    pub run_a: PathBuf,
    /// Run file B; differences are B − A.
    pub run_b: PathBuf,
    /// Bootstrap resamples (chunks drawn with replacement).
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Confidence level of the intervals.
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f64,
    /// Seed of the resampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn text_spec(t: &TextArgs, protocol: Protocol) -> crate::eval::measure::TextSpec {
    crate::eval::measure::TextSpec {
        protocol,
        ctx: t.ctx,
        bos: t.bos,
        max_chunks: t.max_chunks,
    }
}

pub fn compare_report(a: &CompareArgs) -> Result<Report> {
    crate::eval::measure::compare_files(
        &a.run_a,
        &a.run_b,
        &crate::eval::compare::CompareOptions {
            resamples: a.resamples,
            confidence: a.confidence,
            seed: a.seed,
        },
    )
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (default: read stdin).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Tokens to generate (greedy).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
}

/// Greedy decoding with the KV cache, streaming text to stdout; reports prefill and
/// decode speed on stderr.
pub fn generate(a: &GenerateArgs, device: &Device) -> Result<()> {
    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                .context("reading the prompt from stdin")?;
            utf8_lines("stdin", bytes)?
        }
    };
    let p = a.model.prepare(None, device)?;
    let tok = &p.llm.tokenizer;
    let mut ids = tok.encode(&prompt)?;
    if tok.add_bos {
        if let Some(b) = tok.bos {
            ids.insert(0, b);
        }
    }
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    // Refuse before generating what the model cannot hold (every token is fed back).
    let context = p.llm.model.cfg.max_position_embeddings;
    if ids.len().saturating_add(a.max_new_tokens) > context {
        bail!(
            "--max-new-tokens {} with a prompt of {} tokens needs {} positions, beyond the model's context of {context} (at most {} new tokens for this prompt)",
            a.max_new_tokens,
            ids.len(),
            ids.len().saturating_add(a.max_new_tokens),
            context.saturating_sub(ids.len())
        );
    }
    let out = lm::greedy(&p, &ids, a.max_new_tokens)?;
    let mut stdout = std::io::stdout();
    write!(stdout, "{}", tok.decode(&out.tokens)?)?;
    writeln!(stdout)?;
    eprintln!(
        "prefill {} tokens at {:.1} tokens/s; decoded {} tokens at {:.1} tokens/s ({} threads, kernels {})",
        ids.len(),
        ids.len() as f64 / out.prefill_s.max(1e-9),
        out.tokens.len(),
        out.tokens.len() as f64 / out.decode_s.max(1e-9),
        rayon::current_num_threads(),
        crate::nn::kernels::isa::describe()
    );
    Ok(())
}

/// `bytes` as text, or an error naming the first line that is not valid UTF-8.
pub fn utf8_lines(what: &str, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let good = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = 1 + bytes[..good].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!(
            "{what} line {line} is not valid UTF-8 (byte {} of the line); convert the text to UTF-8 first (e.g. iconv -f latin1 -t utf-8)",
            good - bytes[..good].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1
        )
    })
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SweepArgs {
    /// `sweep merge FILES...` joins shard files instead of running a sweep.
    #[command(subcommand)]
    pub action: Option<SweepCommand>,
    /// A .gguf file, a folder holding one, a Hugging Face folder or a cached hub id.
    #[arg(long, default_value = DEFAULT_LLM, env = "QUANTLAB_LLM")]
    pub model: String,
    /// How GGUF weights are loaded before each configuration is applied.
    #[arg(long, value_enum, default_value_t = LoadAsArg::F32)]
    pub load_as: LoadAsArg,
    /// Methods: `rtn` (round to nearest, PyTorch's scale), `rtn-signed-max` (llama.cpp's
    /// scale), `rtn-clip` (MSE-clipped range), `hqq` (each over --bits and --groups),
    /// `nf4`, `fp4`, `nf4:dq`, `fp4:dq` (over --groups; the table in `lab::sweep`), or any
    /// single method (`q4_k`, `q8_0`, `f16`, `w:u3:affine:g128`...).
    #[arg(long, value_delimiter = ',', default_value = "rtn,nf4,fp4")]
    pub methods: Vec<String>,
    /// Bit widths for `rtn`.
    #[arg(long, value_delimiter = ',', default_value = "8,4,3,2")]
    pub bits: Vec<u32>,
    /// Groupings for `rtn`: `ch` (per output channel) and/or group sizes; NF4/FP4 use the
    /// group sizes as their block size.
    #[arg(
        long = "groups",
        alias = "group",
        value_delimiter = ',',
        default_value = "ch,64"
    )]
    pub groups: Vec<String>,
    /// Symmetric or affine RTN (`rtn`, `rtn-clip`; signed-max is symmetric, HQQ affine).
    #[arg(long, default_value = "sym")]
    pub mode: String,
    /// Which layers are quantized.
    #[arg(long, value_enum, default_value_t = LayersArg::All)]
    pub layers: LayersArg,
    #[command(flatten)]
    pub text: TextArgs,
    /// JSON-lines file the rows are appended to (and resumed from).
    #[arg(long, default_value = "runs/sweep.jsonl")]
    pub out: PathBuf,
    /// Plot of perplexity against bits per weight (.svg or .png by the extension).
    #[arg(long, default_value = "runs/sweep.svg")]
    pub plot: PathBuf,
    /// Also measure KL divergence and top-1 agreement against the f32 baseline.
    #[arg(long)]
    pub kl: bool,
    /// Calibration text for methods that gather statistics (GPTQ, AWQ, static int8); each
    /// such row records the file, its hash, the sample count, window length and seed.
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Run only the I-th of N slices of the configurations (`2/4`; round-robin, each with
    /// the f32 baseline) into `--out` with `.shard-I-of-N` before the extension, plus a
    /// manifest beside it; join the shards with `sweep merge` (see `lab::sweep_shard`).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Start over: remove `--out` (its rows, stored KL base and shard manifest) before
    /// running. Without it a sweep resumes, and refuses a file measured under other
    /// conditions (text, protocol, model, calibration...).
    #[arg(long)]
    pub fresh: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum SweepCommand {
    /// Join the JSON-lines files of `sweep --shard I/N` runs (each with its manifest) into
    /// the table and plot of the unsharded sweep; refuses shards of different sweeps,
    /// duplicate or missing shards, and rows present twice.
    Merge(SweepMergeArgs),
}

#[derive(clap::Args, Debug)]
pub struct SweepMergeArgs {
    /// The shard files (`runs/sweep.shard-*-of-N.jsonl`), all N of them.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Where the merged rows are written (replaced).
    #[arg(long, default_value = "runs/sweep.jsonl")]
    pub out: PathBuf,
    /// SVG plot of the merged sweep.
    #[arg(long, default_value = "runs/sweep.svg")]
    pub plot: PathBuf,
}

/// `sweep merge`: the merged rows, written to `--out`, as the table and plot of a run.
pub fn sweep_merge_report(a: &SweepMergeArgs) -> Result<Report> {
    use crate::lab::sweep_shard;
    let (m, rows) = sweep_shard::merge(&a.files)?;
    sweep_shard::write_rows(&a.out, &rows)?;
    let mut r = sweep_table(
        &rows,
        m.key.layers,
        &m.key.protocol,
        m.key.max_chunks,
        &a.out,
        &a.plot,
    )?;
    if let Some(t) = r.tables.first_mut() {
        t.note(format!(
            "merged from {} shards of {} (text sha256 {})",
            m.shard.count,
            m.key.text,
            &m.key.text_sha256[..16]
        ));
    }
    Ok(r)
}

pub fn sweep_report(
    a: &SweepArgs,
    data: Option<&Path>,
    device: &Device,
    progress: bool,
) -> Result<Report> {
    use crate::lab::sweep;
    if let Some(SweepCommand::Merge(m)) = &a.action {
        return sweep_merge_report(m);
    }
    let shard = a
        .shard
        .as_deref()
        .map(str::parse::<crate::lab::sweep_shard::Shard>)
        .transpose()?;
    let spec = sweep::SweepSpec {
        model: a.model.clone(),
        device: device.clone(),
        load_as: a.load_as.into(),
        configs: sweep::expand(&a.methods, &a.bits, &a.groups, &a.mode)?,
        layers: a.layers.into(),
        text: a.text.text_path(data)?,
        protocol: a.text.protocol()?,
        max_chunks: a.text.max_chunks,
        out: a.out.clone(),
        kl: a.kl,
        calibration: a.calibration.source(data),
        progress,
    };
    let out_path = match shard {
        None => a.out.clone(),
        Some(s) => s.out_path(&a.out),
    };
    crate::quant::io::check_target(&out_path)?;
    crate::quant::io::check_target(&a.plot)?;
    if a.fresh {
        sweep::start_fresh(&match shard {
            None => a.out.clone(),
            Some(s) => s.out_path(&a.out),
        })?;
    }
    let (rows, out, plot) = match shard {
        None => (sweep::run(&spec)?, a.out.clone(), a.plot.clone()),
        Some(s) => {
            let (rows, out) = crate::lab::sweep_shard::run(&spec, s)?;
            (rows, out, s.out_path(&a.plot))
        }
    };
    sweep_table(
        &rows,
        spec.layers,
        &spec.protocol.to_string(),
        spec.max_chunks,
        &out,
        &plot,
    )
}

/// The table and plot of a sweep's rows (a run, a shard or a merge).
fn sweep_table(
    rows: &[crate::lab::sweep::Row],
    layers: crate::lab::sweep::Layers,
    protocol: &str,
    max_chunks: Option<usize>,
    out: &Path,
    plot_path: &Path,
) -> Result<Report> {
    use crate::lab::sweep;
    let mut t = Table::new(
        "sweep",
        &format!(
            "Perplexity against bits ({layers:?} layers){}",
            crate::nn::kernels::prefill::label()
        ),
        &[
            "family",
            "bits",
            "method",
            "bits per weight",
            "weights MB",
            "perplexity",
            "mean KL",
            "top-1 agreement %",
            "seconds",
        ],
    );
    let opt = |v: Option<f64>, scale: f64, d: usize| match v {
        Some(x) => Cell::f(x * scale, d),
        None => Cell::Missing,
    };
    for r in rows {
        t.push(vec![
            r.family.clone().into(),
            (r.bits as usize).into(),
            r.method.clone().into(),
            Cell::f(r.bits_per_weight, 3),
            Cell::f(r.weights_mb, 2),
            Cell::f(r.perplexity, 3),
            opt(r.mean_kl, 1.0, 4),
            opt(r.top1_agreement, 100.0, 2),
            Cell::f(r.seconds, 1),
        ]);
    }
    t.note(format!(
        "protocol: {}{}; rows appended to {} (re-running resumes)",
        protocol,
        match max_chunks {
            Some(n) => format!(", first {n} chunks"),
            None => String::new(),
        },
        out.display()
    ));
    let mut calibrations: Vec<&sweep::CalibrationRecord> = Vec::new();
    for c in rows.iter().filter_map(|r| r.calibration.as_ref()) {
        if !calibrations.contains(&c) {
            calibrations.push(c);
        }
    }
    for c in calibrations {
        t.note(format!(
            "calibrated rows: {} (sha256 {}), {} windows of {} tokens, seed {}",
            c.file,
            &c.text_hash[..c.text_hash.len().min(16)],
            c.samples,
            c.seqlen,
            c.seed
        ));
    }
    t.note("bits per weight: stored bytes of the quantized linear layers (scales and zero points included) × 8 / their weights (lm_head stays f32 unless --layers everything); weights MB counts every weight held, f32 embeddings and norms included.");
    t.note("No unquantized SmolLM is reachable here: the baseline is the f32 model dequantized from the Q4_1 GGUF.");
    let mut families: Vec<String> = Vec::new();
    for r in rows.iter().filter(|r| r.method != "keep") {
        if !families.contains(&r.family) {
            families.push(r.family.clone());
        }
    }
    let plot = crate::report::plot::LinePlot {
        title: format!("Perplexity vs bits per weight ({layers:?} layers)"),
        x_label: "bits per weight (quantized layers)".into(),
        y_label: "perplexity (log scale)".into(),
        series: families
            .iter()
            .map(|f| crate::report::plot::Series {
                name: f.clone(),
                points: rows
                    .iter()
                    .filter(|r| &r.family == f)
                    .map(|r| (r.bits_per_weight, r.perplexity))
                    .collect(),
            })
            .collect(),
        baseline: rows
            .iter()
            .find(|r| r.method == "keep")
            .map(|r| (r.perplexity, format!("f32 ({:.3})", r.perplexity))),
        log_y: true,
    };
    plot.write(plot_path)?;
    t.note(format!("plot: {}", plot_path.display()));
    let mut commits: Vec<&str> = Vec::new();
    for p in rows.iter().filter_map(|r| r.provenance.as_ref()) {
        if !commits.contains(&p.git.as_str()) {
            commits.push(&p.git);
        }
    }
    if commits.len() > 1 {
        t.note(format!(
            "rows measured by quantlab commits {} (each row's provenance is in {})",
            commits.join(", "),
            out.display()
        ));
    }
    t.provenance = rows.iter().rev().find_map(|r| {
        r.provenance.clone().map(|mut p| {
            // Per-row fields (calibration, seed) differ between rows: each row keeps its own.
            p.calibration = None;
            p.seed = None;
            p
        })
    });
    // KL against bits beside it, when the rows have KL.
    if rows.iter().any(|r| r.mean_kl.is_some_and(|k| k > 0.0)) {
        let kl_path = plot_path.with_file_name(format!(
            "{}-kl.{}",
            plot_path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("sweep"),
            plot_path
                .extension()
                .and_then(|s| s.to_str())
                .unwrap_or("svg")
        ));
        let kl_plot = crate::report::plot::LinePlot {
            title: format!("KL to f32 vs bits per weight ({layers:?} layers)"),
            x_label: "bits per weight (quantized layers)".into(),
            y_label: "mean KL to f32 (nats, log scale)".into(),
            series: families
                .iter()
                .map(|f| crate::report::plot::Series {
                    name: f.clone(),
                    points: rows
                        .iter()
                        .filter(|r| &r.family == f)
                        .filter_map(|r| r.mean_kl.map(|k| (r.bits_per_weight, k)))
                        .filter(|p| p.1 > 0.0)
                        .collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect(),
            baseline: None,
            log_y: true,
        };
        kl_plot.write(&kl_path)?;
        t.note(format!("KL plot: {}", kl_path.display()));
    }
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}
