//! `quantlab sensitivity` (per-layer KL when only that layer is quantized) and
//! `quantlab plan` (per-layer settings under a size budget): flags and reports; the work is
//! in `lab::sensitivity` and `lab::budget`.

use crate::data::DataDir;
use crate::lab::sensitivity::{self, Granularity};
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// `--granularity`: the flag's spelling of [`Granularity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GranularityArg {
    /// Each linear layer of the blocks alone.
    Layer,
    /// All linear layers of one block together.
    Block,
    /// One layer type in every block together.
    Type,
}

impl From<GranularityArg> for Granularity {
    fn from(g: GranularityArg) -> Self {
        match g {
            GranularityArg::Layer => Granularity::Layer,
            GranularityArg::Block => Granularity::Block,
            GranularityArg::Type => Granularity::Type,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct SensitivityArgs {
    /// A .gguf file, a folder holding one, a Hugging Face folder or a cached hub id
    /// (loaded as f32: the reference the KL is measured against).
    #[arg(long, default_value = super::llm::DEFAULT_LLM, env = "QUANTLAB_LLM")]
    pub model: String,
    /// Methods as `sweep --methods` names them (`rtn`, `rtn-signed-max`, `rtn-clip`, `hqq`,
    /// `nf4`, `gptq`...) or single methods (`q8_0`, `f16`, `w:i8:sym:g64`); per-layer
    /// methods only (AWQ and SmoothQuant fold scales across layers).
    #[arg(long, value_delimiter = ',', default_value = "rtn")]
    pub methods: Vec<String>,
    /// Bit widths for the methods that take them.
    #[arg(long, value_delimiter = ',', default_value = "4,3,2")]
    pub bits: Vec<u32>,
    /// Groupings: `ch` and/or group sizes.
    #[arg(
        long = "groups",
        alias = "group",
        value_delimiter = ',',
        default_value = "64"
    )]
    pub groups: Vec<String>,
    /// Symmetric or affine RTN.
    #[arg(long, default_value = "sym")]
    pub mode: String,
    /// What one measurement quantizes.
    #[arg(long, value_enum, default_value_t = GranularityArg::Layer)]
    pub granularity: GranularityArg,
    /// Tokens run: consecutive --ctx windows from the start of the text, the second half
    /// of each compared (llama.cpp's perplexity protocol, as `perplexity --kl-base`).
    #[arg(long, default_value_t = 1024)]
    pub tokens: usize,
    /// Window length.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Text measured. Default: WikiText-2 *validation* (the test split stays held out for
    /// `plan --verify`).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Base tokens kept per position for KL (the rest is one bucket, as `perplexity
    /// --save-logprobs`); 0 keeps the whole vocabulary.
    #[arg(long, default_value_t = 256)]
    pub kl_top_k: usize,
    /// JSON-lines file the rows are appended to (and resumed from).
    #[arg(long, default_value = "runs/sensitivity.jsonl")]
    pub out: PathBuf,
    /// Heat map (layers × settings), .png or .svg.
    #[arg(long, default_value = "runs/sensitivity.png")]
    pub plot: PathBuf,
    /// Only report and plot the rows already in --out (measure nothing).
    #[arg(long)]
    pub report_only: bool,
    /// In-context sensitivity: quantize every layer with this plan first (e.g.
    /// `*=gptq:i3:sym:g64`) and measure each unit × setting as a change of that unit alone
    /// from it (the KL *with* the background; `plan` then sums the changes).
    #[arg(long)]
    pub background: Option<String>,
    /// Calibration for settings that need statistics (GPTQ): gathered once on the f32
    /// model (default 128 × 512 tokens of WikiText-2 validation, seed 0).
    #[command(flatten)]
    pub calibration: super::llm::CalibrationArgs,
}

/// WikiText-2 validation from the data folder unless `text` is given.
fn text_or_wikitext_valid(text: Option<PathBuf>, data: Option<&Path>) -> Result<PathBuf> {
    match text {
        Some(p) => Ok(p),
        None => DataDir::resolve(data)?.require(
            "wikitext-2/valid.txt",
            "sensitivity defaults to WikiText-2 validation; pass --text FILE",
        ),
    }
}

/// Whether a setting or the background plan needs statistics of the layers' inputs.
fn needs_calibration(
    settings: &[crate::lab::sweep::Config],
    background: Option<&str>,
) -> Result<bool> {
    for c in settings {
        let m: crate::nn::Method = c.method.parse()?;
        if !m.algorithm().needs().is_empty() {
            return Ok(true);
        }
    }
    match background {
        Some(b) => {
            let p: crate::nn::Plan = b
                .parse()
                .map_err(|e| anyhow::anyhow!("in --background '{b}': {e}"))?;
            Ok(crate::nn::plan_needs_calibration(&p))
        }
        None => Ok(false),
    }
}

pub fn sensitivity_report(
    a: &SensitivityArgs,
    data: Option<&Path>,
    device: &candle_core::Device,
    progress: bool,
) -> Result<Report> {
    if !device.is_cpu() {
        bail!("sensitivity runs on the cpu only (it resumes forward passes from host buffers)");
    }
    let settings: Vec<_> = crate::lab::sweep::expand(&a.methods, &a.bits, &a.groups, &a.mode)?
        .into_iter()
        .filter(|c| c.method != "keep")
        .collect();
    let spec = sensitivity::SensitivitySpec {
        model: a.model.clone(),
        text: text_or_wikitext_valid(a.text.clone(), data)?,
        tokens: a.tokens,
        ctx: a.ctx,
        kl_top_k: a.kl_top_k,
        settings: settings.clone(),
        granularity: a.granularity.into(),
        out: a.out.clone(),
        measure: !a.report_only,
        progress,
        calibration: if needs_calibration(&settings, a.background.as_deref())? {
            Some(a.calibration.source(data).text_spec()?)
        } else {
            None
        },
        background: a.background.clone(),
    };
    let start = std::time::Instant::now();
    let (rows, timing) = sensitivity::run(&spec)?;
    let total = start.elapsed().as_secs_f64();
    let mut cols: Vec<String> = vec!["unit".into(), "params".into()];
    for c in &settings {
        cols.push(format!("KL {}", c.method));
    }
    for c in &settings {
        cols.push(format!("ppl {}", c.method));
    }
    let col_refs: Vec<&str> = cols.iter().map(String::as_str).collect();
    let mut t = Table::new(
        "sensitivity",
        &format!(
            "Sensitivity: mean KL to f32 (nats) and perplexity with only that unit quantized ({:?})",
            spec.granularity
        ),
        &col_refs,
    );
    let mut units: Vec<&str> = Vec::new();
    for r in &rows {
        if !units.contains(&r.unit.as_str()) {
            units.push(&r.unit);
        }
    }
    for u in &units {
        let of = |m: &str| rows.iter().find(|r| r.unit == *u && r.method == m);
        let params = rows.iter().find(|r| r.unit == *u).map_or(0, |r| r.params);
        let mut row: Vec<Cell> = vec![u.to_string().into(), params.into()];
        for c in &settings {
            row.push(of(&c.method).map_or(Cell::Missing, |r| Cell::f(r.mean_kl, 6)));
        }
        for c in &settings {
            row.push(of(&c.method).map_or(Cell::Missing, |r| Cell::f(r.perplexity, 3)));
        }
        t.push(row);
    }
    if let Some(r) = rows.first() {
        t.note(format!(
            "{} tokens ({} windows of {}, second halves compared) of {} (token FNV-1a {}), against the f32 model's top-{} distribution; f32 perplexity on them {:.3}",
            r.tokens,
            r.tokens / r.ctx.max(1),
            r.ctx,
            r.text,
            r.tokens_hash,
            r.kl_top_k,
            r.base_perplexity
        ));
    }
    t.note(format!(
        "{} measured, {} resumed from {}; {:.1} s in all: load {:.1} s, calibration statistics {:.1} s, f32 (and background) pass caching every half-block's input {:.1} s, resumed forward passes + KL {:.1} s, quantizing and restoring {:.1} s",
        timing.measured,
        timing.resumed,
        a.out.display(),
        total,
        timing.load_s,
        timing.calibrate_s,
        timing.base_s,
        timing.forward_s,
        timing.quantize_s
    ));
    t.note("No unquantized SmolLM is reachable here: for a GGUF file the f32 weights dequantized from it are the reference.");
    sensitivity::heat_map(&rows).write(&a.plot)?;
    t.note(format!("heat map: {}", a.plot.display()));
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// JSON-lines file written by `quantlab sensitivity`.
    #[arg(long)]
    pub sensitivity: PathBuf,
    /// Bits per weight over the planned layers (stored bytes × 8 / weights, scales and
    /// zero points included; a layer kept in f32 counts 32).
    #[arg(long, conflicts_with = "max_mb", required_unless_present = "max_mb")]
    pub budget: Option<f64>,
    /// Or: megabytes (10^6 bytes) of the planned layers' stored weights.
    #[arg(long)]
    pub max_mb: Option<f64>,
    /// Do not offer "keep" (f32, no KL) as a setting.
    #[arg(long)]
    pub no_keep: bool,
    /// Offer a setting no row measured, estimated from a measured one: `TO=FROM`, e.g.
    /// `w:i8:sym:g64=w:i4:sym:g64` (KL scaled by the noise power 4^-(bits difference),
    /// bytes by arithmetic; measured rows of TO take precedence). Repeatable.
    #[arg(long)]
    pub estimate: Vec<String>,
    /// Only these plan methods from the file (default: all of them).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the chosen plan is written (quantlab plan syntax, usable as --plan "$(cat FILE)").
    #[arg(long, default_value = "runs/plan.txt")]
    pub out: PathBuf,
    /// Where the llama.cpp tensor types are written (`llama-quantize --tensor-type-file`).
    #[arg(long, default_value = "runs/plan.tensor-types.txt")]
    pub tensor_types: PathBuf,
    /// Budgets (bits per weight) of the Pareto table and plot.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2.75,3,3.25,3.5,4,4.5,5,6"
    )]
    pub pareto: Vec<f64>,
    /// Pareto plot (.png or .svg).
    #[arg(long, default_value = "runs/pareto.png")]
    pub plot: PathBuf,
    /// Measure the real KL of the chosen plans and of the uniform plans on held-out text.
    #[arg(long)]
    pub verify: bool,
    /// The model for --verify (default: the one the sensitivity file names).
    #[arg(long)]
    pub model: Option<String>,
    /// Held-out text for --verify. Default: WikiText-2 test.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Chunk length of the held-out measurement (llama.cpp protocol).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Chunks of the held-out measurement.
    #[arg(long, default_value_t = 8)]
    pub max_chunks: usize,
    /// Stored f32 log-probs (`perplexity --save-logprobs`) of the held-out chunks; computed
    /// (top 256) when absent.
    #[arg(long)]
    pub kl_base: Option<PathBuf>,
    /// Calibration for --verify of plans with calibrated methods (GPTQ: applied
    /// sequentially, as `perplexity --plan` does).
    #[command(flatten)]
    pub calibration: super::llm::CalibrationArgs,
}

pub fn plan_report(
    a: &PlanArgs,
    data: Option<&Path>,
    device: &candle_core::Device,
    progress: bool,
) -> Result<Report> {
    use crate::lab::budget;
    let rows = sensitivity::read_rows(&a.sensitivity)?;
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| a.only.is_empty() || a.only.contains(&r.method))
        .collect();
    let estimates = a
        .estimate
        .iter()
        .map(|e| {
            e.split_once('=')
                .map(|(t, f)| (t.trim().to_string(), f.trim().to_string()))
                .ok_or_else(|| anyhow::anyhow!("--estimate '{e}': use TO=FROM"))
        })
        .collect::<Result<Vec<_>>>()?;
    let problem = crate::lab::budget::Problem::with_estimates(&rows, !a.no_keep, &estimates)?;
    let params = budget::params(&problem.items);
    let budget_bytes = match (a.budget, a.max_mb) {
        (Some(b), _) => budget::budget_for_bits(&problem.items, b),
        (_, Some(mb)) => (mb * 1e6).floor() as usize,
        _ => bail!("give --budget BITS or --max-mb MB"),
    };
    let bpw = |bytes: usize| bytes as f64 * 8.0 / params.max(1) as f64;
    let chosen = budget::solve(&problem.items, budget_bytes)?;
    let plan = problem.plan_text(&chosen);
    crate::quant::io::write_atomically(&a.out, plan.as_bytes())?;
    let (types, approx) = problem.tensor_types(&chosen)?;
    crate::quant::io::write_atomically(&a.tensor_types, types.as_bytes())?;
    // Plans to compare: the Pareto budgets, the asked one, and every uniform setting.
    let mut plans: Vec<(String, String, f64, usize, f64)> = Vec::new(); // kind, plan, target, bytes, predicted
    let mut targets = a.pareto.clone();
    targets.push(bpw(budget_bytes));
    targets.sort_by(f64::total_cmp);
    targets.dedup_by(|x, y| (*x - *y).abs() < 1e-9);
    for t in targets {
        match budget::solve(&problem.items, budget::budget_for_bits(&problem.items, t)) {
            Ok(s) => plans.push((
                format!("mixed ≤ {t:.3}"),
                problem.plan_text(&s),
                t,
                s.bytes,
                s.cost + problem.offset,
            )),
            Err(e) => eprintln!("budget {t}: {e}"),
        }
    }
    for (m, bytes, cost) in problem.uniform() {
        plans.push((
            format!("uniform {m}"),
            format!("lm_head=keep;*={m}"),
            bpw(bytes),
            bytes,
            cost + problem.offset,
        ));
    }
    let calibration = {
        let plans: Vec<crate::nn::Plan> =
            plans.iter().map(|p| p.1.parse()).collect::<Result<_>>()?;
        if a.verify && plans.iter().any(crate::nn::plan_needs_calibration) {
            Some(a.calibration.source(data).text_spec()?)
        } else {
            None
        }
    };
    let verified = if a.verify {
        let model = a.model.clone().unwrap_or_else(|| problem.model.clone());
        let text = super::llm::text_or_wikitext_test(a.text.clone(), data)?;
        Some(crate::lab::budget::verify(
            &model,
            &text,
            a.ctx,
            a.max_chunks,
            a.kl_base.as_deref(),
            &plans.iter().map(|p| p.1.clone()).collect::<Vec<_>>(),
            calibration.as_ref(),
            device,
            progress,
        )?)
    } else {
        None
    };
    let mut t = Table::new(
        "plan",
        "Mixed-precision plans under a budget, and uniform plans",
        &[
            "plan",
            "target bits/weight",
            "bits per weight",
            "MB",
            "predicted KL (sum)",
            "measured KL",
            "measured / predicted",
            "perplexity",
            "top-1 agreement %",
            "settings",
        ],
    );
    for (i, (kind, text, target, bytes, predicted)) in plans.iter().enumerate() {
        let v = verified.as_ref().map(|v| &v.rows[i]);
        t.push(vec![
            kind.clone().into(),
            Cell::f(*target, 3),
            Cell::f(bpw(*bytes), 3),
            Cell::f(*bytes as f64 / 1e6, 2),
            Cell::f(*predicted, 5),
            v.map_or(Cell::Missing, |v| Cell::f(v.mean_kl, 5)),
            v.map_or(Cell::Missing, |v| {
                Cell::f(v.mean_kl / predicted.max(1e-12), 2)
            }),
            v.map_or(Cell::Missing, |v| Cell::f(v.perplexity, 3)),
            v.map_or(Cell::Missing, |v| Cell::f(100.0 * v.top1, 2)),
            crate::lab::budget::count_settings(text).into(),
        ]);
    }
    t.note(format!(
        "chosen at {} bits/weight ({} bytes): {:.3} bits/weight, predicted KL {:.5} (Lagrangian lower bound {:.5}, λ = {:.3e} KL/byte); plan written to {}, llama.cpp tensor types to {} ({})",
        a.budget.map_or_else(|| format!("{:.3}", bpw(budget_bytes)), |b| format!("{b:.3}")),
        budget_bytes,
        bpw(chosen.bytes),
        chosen.cost + problem.offset,
        chosen.lower_bound + problem.offset,
        chosen.lambda,
        a.out.display(),
        a.tensor_types.display(),
        approx
    ));
    t.note(format!(
        "sensitivities from {} ({} units, {} tokens of {}); {} Bits per weight over the {} planned weights (lm_head and embeddings stay f32, as `sweep --layers all`).",
        a.sensitivity.display(),
        problem.items.len(),
        problem.tokens,
        problem.text,
        if problem.background.is_none() {
            "predicted KL = sum of the units' KL measured alone (additivity assumed; the measured column checks it)."
        } else {
            "the changes are assumed to add up (the measured column checks it)."
        },
        params
    ));
    if let Some(b) = &problem.background {
        t.note(format!(
            "in-context sensitivities: every unit's KL was measured with all other layers at the background `{b}` (KL {:.5} alone); predicted KL = background KL + Σ (unit's KL − background KL), a linearisation around the background rather than around f32",
            problem.offset
        ));
    }
    if !estimates.is_empty() {
        t.note(format!(
            "estimated (not measured) settings offered: {} — KL of the measured setting × 4^-(bits difference); the measured column is the check",
            a.estimate.join(", ")
        ));
    }
    if let Some(v) = &verified {
        t.note(format!(
            "measured: mean KL against the f32 model on {} ({}), as `perplexity --kl-base` measures it; f32 perplexity {:.3}",
            v.text, v.protocol, v.base_perplexity
        ));
    }
    // Pareto plot.
    let front: Vec<(f64, f64)> = budget::front(&problem.items)?
        .into_iter()
        .map(|(b, c)| (bpw(b), c + problem.offset))
        .filter(|p| p.0 <= 9.0 && p.1 > 0.0)
        .collect();
    let mut series = vec![crate::report::plot::Series {
        name: "mixed: predicted (sum of sensitivities)".into(),
        points: front,
    }];
    let uniform_pred: Vec<(f64, f64)> = plans
        .iter()
        .filter(|p| p.0.starts_with("uniform"))
        .map(|p| (bpw(p.3), p.4))
        .collect();
    series.push(crate::report::plot::Series {
        name: "uniform: predicted".into(),
        points: uniform_pred,
    });
    if let Some(v) = &verified {
        for (name, prefix) in [
            ("mixed: measured", "mixed"),
            ("uniform: measured", "uniform"),
        ] {
            series.push(crate::report::plot::Series {
                name: name.into(),
                points: plans
                    .iter()
                    .zip(&v.rows)
                    .filter(|(p, _)| p.0.starts_with(prefix))
                    .map(|(p, r)| (bpw(p.3), r.mean_kl))
                    .collect(),
            });
        }
    }
    let plot = crate::report::plot::LinePlot {
        title: "KL to f32 against bits per weight: mixed plans vs uniform".into(),
        x_label: "bits per weight (planned layers, scales included)".into(),
        y_label: "mean KL to f32 (nats, log scale)".into(),
        series: series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect(),
        baseline: None,
        log_y: true,
    };
    plot.write(&a.plot)?;
    t.note(format!("Pareto plot: {}", a.plot.display()));
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}
