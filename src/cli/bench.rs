//! `quantlab bench`: llama-bench-style throughput rows for several plans of one LLM in one
//! run, each with its ratio to the f32 model measured in the same run.

use super::llm::{CalibrationArgs, LoadAsArg, DEFAULT_LLM};
use crate::arch::llama::LoadAs;
use crate::eval::lm;
use crate::eval::speed::{self, SpeedTest, Throughput};
use crate::nn::kernels::isa;
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A .gguf file, a folder holding one, a Hugging Face folder or a hub id in the local cache.
    #[arg(long, default_value = DEFAULT_LLM, env = "QUANTLAB_LLM")]
    pub model: String,
    /// How GGUF weights are held by the plans (the f32 baseline is always dequantized).
    #[arg(long, value_enum, default_value_t = LoadAsArg::F32)]
    pub load_as: LoadAsArg,
    /// A plan to measure (repeat the flag for several), e.g. `--plan '*=q8_0' --plan
    /// '*=w:i4:sym:g64'`; `keep` runs the weights as loaded. The f32 model is always measured
    /// first as the baseline of the ratios.
    #[arg(long = "plan")]
    pub plans: Vec<String>,
    /// Prompt tokens of the prompt-processing test (0 skips it), as llama-bench's -p.
    #[arg(short = 'p', long, default_value_t = 512)]
    pub n_prompt: usize,
    /// Generated tokens of the text-generation test (0 skips it), as llama-bench's -n.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub n_gen: usize,
    /// Timed repetitions of each test (after one untimed warm-up), as llama-bench's -r.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub reps: usize,
    /// Seed of the random token ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the f32 baseline (its decode dominates a profile of the plans): rows then have
    /// no ratio to f32. For `perf record` / `perf stat` of one plan's decode.
    #[arg(long)]
    pub no_baseline: bool,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
}

/// One measured configuration.
struct Measured {
    plan: String,
    weights: String,
    bytes: usize,
    params: usize,
    results: Vec<Throughput>,
}

/// The unquantized model's row: `f32 (baseline)` on the CPU, `bf16 (baseline)` on a GPU
/// (named by the activation dtype it runs in, `--dtype`).
fn baseline_label(device: &Device) -> String {
    let dtype = crate::device::activation_dtype(device);
    format!("{} (baseline)", crate::device::dtype_name(dtype))
}

pub fn report(
    a: &BenchArgs,
    data: Option<&Path>,
    device: &Device,
    progress: bool,
) -> Result<Report> {
    let mut tests = Vec::new();
    if a.n_prompt > 0 {
        tests.push(SpeedTest::Prompt(a.n_prompt));
    }
    if a.n_gen > 0 {
        tests.push(SpeedTest::Generate(a.n_gen));
    }
    if tests.is_empty() {
        bail!("-p 0 and -n 0 leave nothing to measure: give at least one of them a token count");
    }
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    // Every plan is parsed before the first model is loaded: a typo fails at once.
    for p in &a.plans {
        p.parse::<crate::nn::Plan>()
            .with_context(|| format!("in --plan '{p}'"))?;
    }
    if a.no_baseline && a.plans.is_empty() {
        bail!("--no-baseline with no --plan leaves nothing to measure");
    }
    let mut configs = if a.no_baseline {
        Vec::new()
    } else {
        vec![(baseline_label(device), None, LoadAs::F32)]
    };
    for p in &a.plans {
        configs.push((p.clone(), Some(p.as_str()), a.load_as.into()));
    }
    let mut rows = Vec::new();
    for (label, plan, load_as) in configs {
        let calibration = match plan {
            Some(p) if crate::nn::plan_needs_calibration(&p.parse()?) => {
                Some(a.calibration.source(data).text_spec()?)
            }
            _ => None,
        };
        let prepared = lm::prepare(&a.model, load_as, plan, calibration.as_ref(), device)
            .with_context(|| format!("preparing plan '{label}'"))?;
        let mut results = Vec::new();
        for &t in &tests {
            if progress {
                eprintln!("bench: {label}: {} × {} reps", t.name(), a.reps);
            }
            results.push(speed::measure(&prepared.llm.model, t, a.reps, a.seed)?);
        }
        rows.push(Measured {
            plan: label,
            weights: weights_label(&prepared),
            bytes: prepared.weight_bytes(),
            params: prepared.llm.model.num_params(),
            results,
        });
    }
    if crate::profile::enabled() {
        eprint!(
            "time per section (QUANTLAB_PROFILE, all tests and plans):\n{}",
            crate::profile::report()
        );
    }
    Ok(table(a, &rows, device))
}

/// `fp32`, `q8_0`, `int4 (4.50 bpw)`: the linear layers' formats at a glance.
fn weights_label(p: &lm::PreparedLlm) -> String {
    let mut labels: Vec<&str> = p.layers.iter().map(|l| l.describe.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    let bpw = p.linear_bits_per_weight();
    format!("{} ({bpw:.2} bpw)", labels.join("+"))
}

fn table(a: &BenchArgs, rows: &[Measured], device: &Device) -> Report {
    let threads = rayon::current_num_threads();
    let dtype = crate::device::dtype_name(crate::device::activation_dtype(device));
    let backend = if device.is_cpu() {
        // `a:q8`: weight-only int-N / NF4 / FP4 layers quantize their activations to q8
        // blocks (`--activations q8`, decode and prefill); other formats are unaffected.
        format!(
            "cpu {} {dtype} a:{}",
            isa::Isa::selected().name(),
            crate::nn::kernels::prefill::activations().name(),
        )
    } else {
        // On a GPU `--activations q8` changes the decode products only (≤ 2 rows:
        // `packed_cuda::q8`); prefill stays exact.
        let q8 = if crate::nn::kernels::prefill::q8_activations() {
            " a:q8 (decode)"
        } else {
            ""
        };
        format!("{} {dtype}{q8}", crate::device::describe(device))
    };
    let ratio = format!("ratio vs {dtype}");
    let mut t = Table::new(
        "bench",
        "Throughput (llama-bench protocol)",
        &[
            "plan", "weights", "size MiB", "params M", "backend", "threads", "test", "t/s",
            "± std", "best t/s", &ratio,
        ],
    );
    // Without the baseline (`--no-baseline`) the ratio column is empty.
    let baseline = (!a.no_baseline).then(|| &rows[0].results);
    for r in rows {
        for (i, res) in r.results.iter().enumerate() {
            let ratio = match baseline {
                Some(base) => Cell::f(res.mean() / base[i].mean(), 2),
                None => Cell::Missing,
            };
            t.push(vec![
                Cell::Text(r.plan.clone()),
                Cell::Text(r.weights.clone()),
                Cell::f(r.bytes as f64 / (1 << 20) as f64, 1),
                Cell::f(r.params as f64 / 1e6, 1),
                Cell::Text(backend.clone()),
                Cell::Int(threads as i64),
                Cell::Text(res.test.name()),
                Cell::f(res.mean(), 1),
                Cell::f(res.std(), 1),
                // The fastest repetition: on a loaded machine the least disturbed one.
                Cell::f(res.samples.iter().copied().fold(0.0, f64::max), 1),
                ratio,
            ]);
        }
    }
    t.note(format!(
        "{}: model {}; mean ± sample std over {} timed repetitions after one warm-up, seeded random tokens (seed {}). pp = one forward over the prompt from an empty cache, last-position logits only; tg = one-token steps from an empty cache (llama-bench's protocol). The ratio is against the unquantized {dtype} model measured first in this run.",
        "quantlab bench", a.model, a.reps, a.seed
    ));
    t.note(format!("CPU kernels: {}.", isa::describe()));
    Report {
        tables: vec![t],
        notes: Vec::new(),
    }
}
