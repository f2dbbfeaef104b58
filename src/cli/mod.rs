//! The command line: argument definitions and dispatch to library functions.

pub mod bench;
pub mod bench_gemv;
pub mod checkpoint;
pub mod llm;
pub mod mt;
pub mod sensitivity;

use crate::data::DataDir;
use crate::report::{Cell, Format, Report, Table};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "quantlab",
    version,
    about = "Quantize models per layer and measure what it does: size, speed and accuracy.",
    long_about = "quantlab loads models into Candle, quantizes them per layer (dynamic and static int8, \
weight-only 8/4/3/2-bit, NF4/FP4, GGML types, fp16/bf16) and reports size, latency and quality \
as markdown, CSV or JSON lines."
)]
pub struct Cli {
    /// Output format for everything that reports numbers.
    #[arg(long, value_enum, global = true, default_value_t = FormatArg::Table)]
    pub format: FormatArg,
    /// Folder holding datasets (MNIST, WikiText-2, lab inputs...). Default: ../shared/data.
    #[arg(long, global = true, env = crate::data::DATA_ENV)]
    pub data_dir: Option<PathBuf>,
    /// Where models run: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu", env = "QUANTLAB_DEVICE")]
    pub device: String,
    /// Activation dtype of LLMs: f32, bf16, f16, or auto (f32 on the CPU, bf16 on a GPU,
    /// as transformers usually runs there). Printed with every number.
    #[arg(long, global = true, default_value = "auto", env = "QUANTLAB_DTYPE")]
    pub dtype: String,
    /// Hide progress bars.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Activations of weight-only int-N / NF4 / FP4 layers, decode and prefill alike: f32
    /// (exact, the default) or q8 (quantized to 8 bits per 32 values, integer dot products,
    /// as llama.cpp runs Q4_0/Q8_0: faster, slightly different numbers; reports say `a:q8`).
    /// Unset: QUANTLAB_ACTIVATIONS (or the old QUANTLAB_DECODE_ACTIVATIONS /
    /// QUANTLAB_PREFILL_ACT), else f32.
    #[arg(long, global = true, alias = "decode-activations")]
    pub activations: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--format`: the flag's spelling of [`Format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// Markdown tables for people.
    Table,
    /// Comma-separated values, one header line per table.
    Csv,
    /// JSON lines: one object per row, with "table" naming its table.
    Json,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Table => Format::Table,
            FormatArg::Csv => Format::Csv,
            FormatArg::Json => Format::Json,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Reproduce an exercise or table of the quantization lab.
    Lab {
        #[command(subcommand)]
        which: LabCommand,
    },
    /// Quantize a whole model by a plan into a checkpoint folder (--model M --plan P --out
    /// DIR), or one tensor with one or more schemes and report the error of each (--scheme).
    Quantize(QuantizeArgs),
    /// List the layers of a quantized folder (format, bits/weight, bytes, the plan), or the
    /// tensors of a GGUF or safetensors file.
    Inspect {
        /// A .gguf file, a .safetensors file or a model folder.
        path: PathBuf,
    },
    /// Perplexity of an LLM (optionally quantized by a plan) over a text file, with KL
    /// divergence to a stored base model.
    Perplexity(llm::PerplexityArgs),
    /// Paired comparison of two runs saved with `perplexity --save-run`: differences in
    /// perplexity, ln ratio and mean KL with paired bootstrap confidence intervals.
    Compare(llm::CompareArgs),
    /// Perplexity against bits: one row per configuration, appended to a JSON-lines file
    /// (resumable), a markdown table and an SVG plot.
    Sweep(llm::SweepArgs),
    /// Per-layer sensitivity: the KL to the f32 model (and perplexity) with only one layer
    /// (or block, or layer type) quantized, per setting; JSON lines (resumable), a table
    /// and a heat map.
    Sensitivity(sensitivity::SensitivityArgs),
    /// Per-layer settings under a size budget from a sensitivity file (Lagrangian sweep of
    /// the multiple-choice knapsack): the plan, llama.cpp --tensor-type arguments, the
    /// Pareto front, and with --verify the real KL of the chosen plans.
    Plan(sensitivity::PlanArgs),
    /// Greedy text generation with the KV cache (prompt from --prompt or stdin).
    Generate(llm::GenerateArgs),
    /// Throughput as llama-bench measures it (pp512, tg128; mean ± std) for several plans
    /// in one run, each with its ratio to the f32 model measured in the same run.
    Bench(bench::BenchArgs),
    /// The packed decode GEMV (4-/8-bit codes read on the device) against the dense
    /// product on the same shapes: µs, GB/s and ratio (GPU kernels; the CPU runs their
    /// reference).
    BenchGemv(bench_gemv::BenchGemvArgs),
    /// Translate with a MarianMT model: one sentence per stdin line, one per stdout line.
    Translate(mt::MtModelArgs),
    /// Evaluate a model on a task: `--task bleu` translates --src and scores it against --ref.
    Eval(mt::EvalArgs),
}

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Exercise 0: a 4x3 tensor affinely quantized to 2 bits by hand.
    Ex0,
    /// Exercise 1: 8-bit affine quantization of seeded randn(4,4) and randn(8,8).
    Ex1,
    /// The MNIST table: train (or reuse) the MLP, then fp32 / dynamic / static / weight-only rows.
    Mnist(MnistArgs),
    /// The SmolLM2 tables: (a) f32 vs 8-bit whole model vs 8-bit FFN only; (b) int8/int4/int2
    /// g64 last-word accuracy, decode speed and memory.
    Smollm(SmollmArgs),
    /// The bitsandbytes study: f32, LLM.int8(), FP4, NF4 (+ double quant) next to 8-bit RTN
    /// (whole model, FFN only) and W8A8 (per token, static): size, prefill/decode tokens/s,
    /// perplexity, KL; and LLM.int8's outlier columns per layer.
    Bnb(BnbArgs),
    /// The GPTQ study: GPTQ vs round-to-nearest at int8/int4/int2 group 64 (last-word
    /// top-1/top-5, decode tokens/s, memory) and its two plots.
    Gptq(GptqLabArgs),
    /// The translation table: MarianMT in fp32, dynamic int8, dynamic fp16, int4 and NF4 on
    /// Multi30k test_2016_flickr (BLEU, diff vs fp32, size, latency, samples/s).
    Marian(MarianArgs),
}

#[derive(clap::Args, Debug)]
pub struct MarianArgs {
    /// The MarianMT model (default: the shared marian-multi30k-en-de).
    #[arg(long, env = crate::model::MARIAN_ENV)]
    pub model: Option<String>,
    /// Source sentences. Default: multi30k/test_2016_flickr.en.gz in the data folder.
    #[arg(long)]
    pub src: Option<PathBuf>,
    /// References aligned with --src. Default: multi30k/test_2016_flickr.de.gz.
    #[arg(long = "ref")]
    pub reference: Option<PathBuf>,
    /// Score only the first N sentences.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Decoding overrides (the model's generation config otherwise; --max-new-tokens
    /// defaults to 128 here, as in the model card's BLEU).
    #[command(flatten)]
    pub decoding: mt::DecodingArgs,
    /// Sentences translated together for BLEU and samples/s.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Sentences timed one at a time for the latency column.
    #[arg(long, default_value_t = 100)]
    pub latency_sentences: usize,
}

#[derive(clap::Args, Debug)]
pub struct GptqLabArgs {
    /// The SmolLM2 GGUF (or any Llama-family model).
    #[arg(long, default_value = llm::DEFAULT_LLM, env = "QUANTLAB_LLM")]
    pub model: String,
    /// Text of the last-word passages. Default: WikiText-2 test.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// LAMBADA jsonl (`{"text": ...}` per line); default: the WikiText-2 rule.
    #[arg(long)]
    pub lambada: Option<PathBuf>,
    /// Last-word passages scored.
    #[arg(long, default_value_t = 100)]
    pub last_word_examples: usize,
    /// Tokens generated to measure decode speed.
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
    /// Bit widths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8u8, 4, 2])]
    pub bits: Vec<u8>,
    /// Columns per scale.
    #[arg(long, default_value_t = 64)]
    pub group: usize,
    /// GPTQ with act-order (static groups).
    #[arg(long)]
    pub act_order: bool,
    /// Calibration text (default WikiText-2 validation).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Calibration windows (the study: 100).
    #[arg(long, default_value_t = 100)]
    pub calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub calib_seqlen: usize,
    #[arg(long, default_value_t = 0)]
    pub calib_seed: u64,
    /// Folder for the plots (gptq_accuracy and gptq_speed, each .svg and .png).
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct SmollmArgs {
    /// The SmolLM2 GGUF (or any Llama-family model).
    #[arg(long, default_value = llm::DEFAULT_LLM, env = "QUANTLAB_LLM")]
    pub model: String,
    /// Text for perplexity and last-word passages. Default: WikiText-2 test.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// 512-token chunks scored for perplexity in table (a).
    #[arg(long, default_value_t = 8)]
    pub max_chunks: usize,
    /// LAMBADA jsonl (`{"text": ...}` per line) for table (b); default: the WikiText-2 rule.
    #[arg(long)]
    pub lambada: Option<PathBuf>,
    /// Last-word passages scored in table (b).
    #[arg(long, default_value_t = 100)]
    pub last_word_examples: usize,
    /// Tokens generated to measure decode speed.
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
}

#[derive(clap::Args, Debug)]
pub struct BnbArgs {
    /// The LLM (SmolLM2 GGUF by default; any Llama-family model).
    #[arg(long, default_value = llm::DEFAULT_LLM, env = "QUANTLAB_LLM")]
    pub model: String,
    /// Text for perplexity. Default: WikiText-2 test.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Perplexity window (llama.cpp chunks).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Windows scored for perplexity.
    #[arg(long, default_value_t = 8)]
    pub max_chunks: usize,
    /// Calibration for the static W8A8 row.
    #[command(flatten)]
    pub calibration: llm::CalibrationArgs,
    /// Prompt tokens of the prefill test (pp N).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// One-token steps of the decode test (tg N).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Timed repetitions per speed test (after one warm-up).
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
}

#[derive(clap::Args, Debug)]
pub struct MnistArgs {
    /// The MLP folder (model.safetensors + config.json), as every command names a model;
    /// trained and written there if missing. `--checkpoint` is the older spelling.
    #[arg(
        long = "model",
        alias = "checkpoint",
        default_value = "models/mnist-mlp"
    )]
    pub model: PathBuf,
    /// Train again even if the checkpoint exists.
    #[arg(long)]
    pub retrain: bool,
    /// Training epochs. The lab trains 2 epochs on 60k images; on the 5k sample available
    /// here 10 epochs (about the lab's step count of one epoch) reach ~94.5%.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Observer for static int8: minmax, ema[:c], percentile[:p], mse, entropy.
    #[arg(long, default_value = "minmax")]
    pub observer: String,
    /// Training batches of 64 used for static calibration.
    #[arg(long, default_value_t = 32)]
    pub calibration_batches: usize,
    /// Timed runs per latency figure.
    #[arg(long, default_value_t = 200)]
    pub latency_runs: usize,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
}

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Schemes to compare: uniform `i8:sym:ch0`, `u4:affine:g64`, ... or `nf4`, `fp4`,
    /// `nf4:dq` (double-quantized absmax), `nf4:b128` (block size).
    #[arg(long = "scheme", num_args = 1.., required_unless_present = "model", conflicts_with = "model")]
    pub schemes: Vec<String>,
    /// A model to quantize whole (any kind quantlab loads); needs --plan and --out.
    #[arg(long, requires_all = ["plan", "out"])]
    pub model: Option<String>,
    /// The per-layer plan for --model, `pattern=method;...`.
    #[arg(long, requires = "model")]
    pub plan: Option<String>,
    /// Folder to write the quantized checkpoint to (must not exist).
    #[arg(long, requires = "model")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub model_args: checkpoint::ModelQuantizeArgs,
    /// A safetensors file to read the tensor from (with --tensor).
    #[arg(long, requires = "tensor", conflicts_with = "randn")]
    pub input: Option<PathBuf>,
    /// Name of the tensor inside --input.
    #[arg(long, requires = "input")]
    pub tensor: Option<String>,
    /// Instead of --input: quantize a standard-normal matrix of this shape, e.g. 4096x4096.
    #[arg(long)]
    pub randn: Option<String>,
    /// Seed for --randn.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cli: Cli) -> Result<()> {
    let device = crate::device::parse(&cli.device)?;
    crate::device::set_activation_dtype(crate::device::parse_dtype(&cli.dtype)?);
    if let Some(a) = &cli.activations {
        crate::nn::kernels::prefill::set_activations(a.parse()?);
    }
    let progress = !cli.quiet;
    let cpu_only = |what: &str| -> Result<()> {
        if !device.is_cpu() {
            bail!("{what} runs on the cpu only: drop --device {}", cli.device);
        }
        Ok(())
    };
    let report = match cli.command {
        Command::Lab { which } => match which {
            LabCommand::Ex0 => {
                cpu_only("lab ex0")?;
                crate::lab::ex0::report(&crate::lab::ex0::run()?)
            }
            LabCommand::Ex1 => {
                cpu_only("lab ex1")?;
                let data = DataDir::resolve(cli.data_dir.as_deref())?;
                crate::lab::ex1::report(&crate::lab::ex1::run(&data)?)
            }
            LabCommand::Mnist(a) => {
                let data = DataDir::resolve(cli.data_dir.as_deref())?;
                let cfg = crate::lab::mnist::MnistLabConfig {
                    checkpoint: a.model,
                    retrain: a.retrain,
                    train: crate::arch::train::TrainConfig {
                        epochs: a.epochs,
                        seed: a.seed,
                        progress,
                        ..Default::default()
                    },
                    observer: a.observer.parse()?,
                    calibration_batches: a.calibration_batches,
                    latency_runs: a.latency_runs,
                    test_limit: a.test_limit,
                    device: device.clone(),
                };
                let lab = crate::lab::mnist::run(&data, &cfg)?;
                let n = a.test_limit.unwrap_or(10_000).min(10_000);
                crate::lab::mnist::report(&lab, &cfg, n)
            }
            LabCommand::Smollm(a) => {
                at_least("--max-chunks", a.max_chunks, 1)?;
                at_least("--last-word-examples", a.last_word_examples, 1)?;
                at_least("--decode-tokens", a.decode_tokens, 1)?;
                let text = llm::text_or_wikitext_test(a.text, cli.data_dir.as_deref())?;
                crate::lab::smollm::run(&crate::lab::smollm::SmollmLabConfig {
                    model: a.model,
                    text,
                    max_chunks: a.max_chunks,
                    last_word_examples: a.last_word_examples,
                    lambada: a.lambada,
                    decode_tokens: a.decode_tokens,
                    progress,
                    device: device.clone(),
                })?
            }
            LabCommand::Bnb(a) => {
                at_least("--max-chunks", a.max_chunks, 1)?;
                at_least("--prompt-tokens", a.prompt_tokens, 1)?;
                at_least("--gen-tokens", a.gen_tokens, 1)?;
                at_least("--reps", a.reps, 1)?;
                let text = llm::text_or_wikitext_test(a.text, cli.data_dir.as_deref())?;
                crate::lab::bnb::run(&crate::lab::bnb::BnbLabConfig {
                    model: a.model,
                    text,
                    ctx: a.ctx,
                    max_chunks: a.max_chunks,
                    calibration: a.calibration.source(cli.data_dir.as_deref()).text_spec()?,
                    prompt_tokens: a.prompt_tokens,
                    gen_tokens: a.gen_tokens,
                    reps: a.reps,
                    progress,
                    device: device.clone(),
                })?
            }
            LabCommand::Gptq(a) => {
                at_least("--last-word-examples", a.last_word_examples, 1)?;
                at_least("--decode-tokens", a.decode_tokens, 1)?;
                at_least("--group", a.group, 1)?;
                at_least("--bits (widths given)", a.bits.len(), 1)?;
                let data = || DataDir::resolve(cli.data_dir.as_deref());
                let text = llm::text_or_wikitext_test(a.text, cli.data_dir.as_deref())?;
                let calib = match a.calibration {
                    Some(t) => t,
                    None => data()?.require(
                        "wikitext-2/valid.txt",
                        "calibration defaults to WikiText-2 validation; pass --calibration FILE",
                    )?,
                };
                crate::lab::gptq::run(&crate::lab::gptq::GptqLabConfig {
                    model: a.model,
                    text,
                    lambada: a.lambada,
                    last_word_examples: a.last_word_examples,
                    decode_tokens: a.decode_tokens,
                    bits: a.bits,
                    group: a.group,
                    act_order: a.act_order,
                    calibration: crate::eval::lm::CalibrationSpec::new(
                        calib,
                        a.calib_samples,
                        a.calib_seqlen,
                        a.calib_seed,
                    )?,
                    plot_dir: a.plot_dir,
                    progress,
                    device: device.clone(),
                })?
            }
            LabCommand::Marian(a) => {
                at_least("--latency-sentences", a.latency_sentences, 1)?;
                marian_lab(a, cli.data_dir.as_deref(), &device, progress)?
            }
        },
        Command::Quantize(args) => match (&args.model, &args.plan, &args.out) {
            (Some(m), Some(p), Some(o)) => checkpoint::quantize_model(
                m,
                p,
                o,
                &args.model_args,
                cli.data_dir.as_deref(),
                &device,
            )?,
            _ => {
                cpu_only("quantize --scheme")?;
                quantize_report(&args)?
            }
        },
        Command::Inspect { path } => checkpoint::inspect(&path)?,
        Command::Perplexity(a) => {
            llm::perplexity_report(&a, cli.data_dir.as_deref(), &device, progress)?
        }
        Command::Compare(a) => llm::compare_report(&a)?,
        Command::Generate(a) => {
            text_only("generate", cli.format.into())?;
            return llm::generate(&a, &device);
        }
        Command::Sensitivity(a) => {
            sensitivity::sensitivity_report(&a, cli.data_dir.as_deref(), &device, progress)?
        }
        Command::Plan(a) => {
            sensitivity::plan_report(&a, cli.data_dir.as_deref(), &device, progress)?
        }
        Command::Bench(a) => bench::report(&a, cli.data_dir.as_deref(), &device, progress)?,
        Command::BenchGemv(a) => bench_gemv::report(&a, &device)?,
        Command::Sweep(a) => llm::sweep_report(&a, cli.data_dir.as_deref(), &device, progress)?,
        Command::Translate(a) => {
            text_only("translate", cli.format.into())?;
            return mt::translate_stdin(&a, &device);
        }
        Command::Eval(a) => mt::eval_report(&a, &device, progress)?,
    };
    let mut report = report;
    report.fill_provenance(&crate::report::Provenance::here(&device));
    print!("{}", report.render(cli.format.into()));
    Ok(())
}

/// Refuses a count below `min` (a run over nothing reports numbers that mean nothing).
fn at_least(flag: &str, value: usize, min: usize) -> Result<()> {
    if value < min {
        bail!("{flag} {value} is too few: give at least {min}");
    }
    Ok(())
}

/// Commands that write text rather than tables refuse `--format`.
fn text_only(command: &str, format: Format) -> Result<()> {
    if format != Format::Table {
        bail!("{command} writes plain text, not tables: drop --format");
    }
    Ok(())
}

fn marian_lab(
    a: MarianArgs,
    data_dir: Option<&std::path::Path>,
    device: &Device,
    progress: bool,
) -> Result<Report> {
    let file = |flag: Option<PathBuf>, rel: &str, how: &str| -> Result<PathBuf> {
        match flag {
            Some(p) => Ok(p),
            None => DataDir::resolve(data_dir)?.require(rel, how),
        }
    };
    let (src, refs) = crate::data::read_aligned(
        &file(a.src, "multi30k/test_2016_flickr.en.gz", "pass --src FILE")?,
        &file(
            a.reference,
            "multi30k/test_2016_flickr.de.gz",
            "pass --ref FILE",
        )?,
        a.limit,
    )?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let model = match a.model {
        Some(m) => m,
        None => crate::model::default_marian_dir()?.display().to_string(),
    };
    let mut decoding = a.decoding.overrides();
    // The model card's protocol: generate(max_new_tokens=128); the config's max_length lets a
    // few degenerate beams run on to 255 tokens, which moves BLEU by half a point.
    decoding.max_new_tokens.get_or_insert(128);
    crate::lab::marian::run(&crate::lab::marian::MarianLabConfig {
        model,
        src,
        refs,
        decoding,
        batch_size: a.batch_size,
        latency_sentences: a.latency_sentences,
        progress,
        device: device.clone(),
    })
}

/// Most elements `quantize --randn` generates: 2^28 (1 GiB as f32; the report holds a few
/// copies of the tensor).
pub const MAX_RANDN_ELEMENTS: usize = 1 << 28;

fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let dims: Result<Vec<usize>, _> = s.split('x').map(str::parse).collect();
    let d = match dims {
        Ok(d) if !d.is_empty() && d.len() <= 8 && d.iter().all(|&v| v > 0) => d,
        _ => bail!("invalid --randn shape '{s}': use 1 to 8 positive dimensions joined by 'x', e.g. 1024x1024"),
    };
    match d.iter().try_fold(1usize, |a, &x| a.checked_mul(x)) {
        Some(n) if n <= MAX_RANDN_ELEMENTS => Ok(d),
        _ => bail!(
            "--randn {s} asks for more than {MAX_RANDN_ELEMENTS} elements (2^28, 1 GiB as f32): pick a smaller shape"
        ),
    }
}

fn load_tensor(args: &QuantizeArgs) -> Result<(String, Tensor)> {
    match (&args.input, &args.tensor) {
        (Some(path), Some(name)) => Ok((name.clone(), crate::load::read_input_tensor(path, name)?)),
        _ => match &args.randn {
            Some(r) => {
                let shape = parse_shape(r)?;
                Ok((
                    format!("randn {r} (seed {})", args.seed),
                    crate::quant::random::randn(&shape, args.seed)?,
                ))
            }
            None => bail!(
                "quantize --scheme needs a tensor: --input FILE.safetensors --tensor NAME, or --randn SHAPE (e.g. 1024x1024) for a seeded random matrix"
            ),
        },
    }
}

/// One `--scheme` of `quantize`: a 4-bit codebook (NF4/FP4) or a uniform scheme.
enum SchemeChoice {
    FourBit(crate::quant::FourBitSpec),
    Uniform(crate::quant::Scheme),
}

impl SchemeChoice {
    fn parse_exact(spec: &str) -> Result<Self> {
        if let Some(fb) = crate::quant::FourBitSpec::parse(spec)? {
            return Ok(SchemeChoice::FourBit(fb));
        }
        Ok(SchemeChoice::Uniform(spec.parse()?))
    }

    /// Parses `spec`; a spelling that only fails by case says which one was meant.
    fn parse(spec: &str) -> Result<Self> {
        Self::parse_exact(spec).map_err(|e| {
            let lower = spec.to_ascii_lowercase();
            if lower != spec && Self::parse_exact(&lower).is_ok() {
                anyhow::anyhow!(
                    "--scheme '{spec}': did you mean '{lower}'? (scheme names are lowercase)"
                )
            } else {
                e.context(format!("--scheme '{spec}'"))
            }
        })
    }
}

fn quantize_report(args: &QuantizeArgs) -> Result<Report> {
    use crate::quant::{ErrorStats, FourBit};
    // Every scheme is checked before a tensor is read or made.
    let schemes = args
        .schemes
        .iter()
        .map(|s| SchemeChoice::parse(s).map(|c| (s, c)))
        .collect::<Result<Vec<_>>>()?;
    let (name, x) = load_tensor(args)?;
    let mut t = Table::new(
        "quantize",
        &format!("Quantization error of {name} {:?}", x.dims()),
        &[
            "scheme",
            "bits per weight",
            "bytes",
            "mean abs error",
            "max abs error",
            "MSE",
            "SQNR (dB)",
        ],
    );
    let n = x.elem_count();
    let flat = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    t.push(vec![
        "f32".into(),
        Cell::f(32.0, 3),
        (n * 4).into(),
        Cell::f(0.0, 6),
        Cell::f(0.0, 6),
        Cell::f(0.0, 9),
        Cell::f(f64::INFINITY, 2),
    ]);
    for (spec, choice) in schemes {
        let (approx, bytes) = match choice {
            SchemeChoice::FourBit(fb) => {
                let q = FourBit::quantize(&flat, fb.kind, fb.blocksize, fb.double_quant)?;
                (q.dequantize(), q.nbytes())
            }
            SchemeChoice::Uniform(scheme) => {
                let q = crate::quant::quantize(&x, &scheme)?;
                (q.dequantize()?.flatten_all()?.to_vec1::<f32>()?, q.nbytes())
            }
        };
        let e = ErrorStats::between_slices(&flat, &approx)?;
        t.push(vec![
            spec.clone().into(),
            Cell::f(bytes as f64 * 8.0 / n as f64, 3),
            bytes.into(),
            Cell::f(e.mean_abs, 6),
            Cell::f(e.max_abs, 6),
            Cell::f(e.mse, 9),
            Cell::f(e.sqnr_db, 2),
        ]);
    }
    if args.input.is_none() {
        let mut p = crate::report::Provenance::here(&Device::Cpu);
        p.seed = Some(args.seed);
        t.provenance = Some(p);
    }
    t.note(format!(
        "bytes: as a quantized layer stores them: packed codes plus parameters (uniform: f32 scale per group, plus a one-byte zero point when affine; {}: f32 absmax per block, or 8-bit codes + f32 per 256 with double quant).",
        "nf4/fp4"
    ));
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}
