//! `quantlab compare RUN_A RUN_B`: paired differences of two runs on the same tokens, with
//! bootstrap confidence intervals.
//!
//! The bootstrap resamples *chunks* (windows), not tokens: the tokens of one chunk share
//! their context and their errors correlate, so resampling tokens would treat correlated
//! values as independent and give intervals that are too narrow. Each resample draws
//! `C` chunk indices with replacement (seeded), takes the same chunks from both runs
//! (paired: the chunk-to-chunk variation common to both runs cancels), and recomputes
//! each statistic as a ratio of sums over the drawn chunks. The interval is the percentile
//! interval of the resampled differences (NumPy's linear interpolation). The token-level
//! standard error (llama.cpp's, tokens as independent) is shown next to it for contrast.

use super::runfile::RunHeader;
use super::stats::{self, ChunkTokens};
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub resamples: usize,
    pub confidence: f64,
    pub seed: u64,
}

/// Refuses runs that were not measured on the same tokens, text and protocol, naming the
/// fields that differ.
pub fn check_comparable(
    a: &RunHeader,
    b: &RunHeader,
    ca: &[ChunkTokens],
    cb: &[ChunkTokens],
) -> Result<()> {
    let mut diffs = Vec::new();
    let mut cmp = |name: &str, x: String, y: String| {
        if x != y {
            diffs.push(format!("{name}: '{x}' vs '{y}'"));
        }
    };
    cmp("text hash", a.text_hash.clone(), b.text_hash.clone());
    cmp("protocol", a.protocol.clone(), b.protocol.clone());
    cmp("ctx", a.ctx.to_string(), b.ctx.to_string());
    cmp("BOS", a.bos.to_string(), b.bos.to_string());
    cmp("tokenizer", a.tokenizer.clone(), b.tokenizer.clone());
    cmp("chunks", a.chunks.to_string(), b.chunks.to_string());
    cmp(
        "tokens hash",
        a.tokens_hash.to_string(),
        b.tokens_hash.to_string(),
    );
    if !diffs.is_empty() {
        bail!(
            "the runs were not measured on the same tokens: {} (use the same text, --ctx, --bos, --max-chunks and model tokenizer; runs stopped by --until-ci cover different chunk counts)",
            diffs.join("; ")
        );
    }
    if ca.len() != cb.len() || ca.iter().zip(cb).any(|(x, y)| x.len() != y.len()) {
        bail!("the runs score different positions per chunk");
    }
    Ok(())
}

/// `resamples` lists of `chunks` indices drawn with replacement from a seeded generator.
pub fn bootstrap_indices(chunks: usize, resamples: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..resamples)
        .map(|_| (0..chunks).map(|_| rng.gen_range(0..chunks)).collect())
        .collect()
}

/// A statistic of one run from its per-chunk sums: (Σ value, Σ tokens) → number.
pub type Stat = fn(f64, f64) -> f64;

pub fn mean_stat(s: f64, n: f64) -> f64 {
    s / n
}

pub fn exp_mean_stat(s: f64, n: f64) -> f64 {
    (s / n).exp()
}

/// One paired difference with its bootstrap interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub a: f64,
    pub b: f64,
    /// b − a on all chunks.
    pub diff: f64,
    pub ci: (f64, f64),
    /// Share of resamples where b − a < 0 (B lower than A).
    pub share_negative: f64,
}

/// Paired bootstrap of `stat(B) − stat(A)` over chunks, from per-chunk sums and counts.
pub fn paired_bootstrap(
    sums_a: &[f64],
    sums_b: &[f64],
    counts: &[usize],
    stat: Stat,
    indices: &[Vec<usize>],
    confidence: f64,
) -> Result<Delta> {
    let c = counts.len();
    if sums_a.len() != c || sums_b.len() != c || c == 0 {
        bail!("paired bootstrap needs the same chunks in both runs");
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        bail!("--confidence must be between 0 and 1 (got {confidence})");
    }
    if indices.is_empty() {
        bail!("--resamples must be at least 1");
    }
    let total = |s: &[f64], idx: &mut dyn Iterator<Item = usize>| -> (f64, f64) {
        idx.fold((0.0, 0.0), |(x, n), i| (x + s[i], n + counts[i] as f64))
    };
    let (sa, n) = total(sums_a, &mut (0..c));
    let (sb, _) = total(sums_b, &mut (0..c));
    let (a, b) = (stat(sa, n), stat(sb, n));
    let mut diffs = Vec::with_capacity(indices.len());
    for idx in indices {
        if idx.iter().any(|&i| i >= c) {
            bail!("bootstrap index out of range");
        }
        let (sa, n) = total(sums_a, &mut idx.iter().copied());
        let (sb, _) = total(sums_b, &mut idx.iter().copied());
        diffs.push(stat(sb, n) - stat(sa, n));
    }
    let negative = diffs.iter().filter(|&&d| d < 0.0).count() as f64 / diffs.len() as f64;
    diffs.sort_by(f64::total_cmp);
    let tail = (1.0 - confidence) / 2.0;
    Ok(Delta {
        a,
        b,
        diff: b - a,
        ci: (
            stats::percentile(&diffs, tail),
            stats::percentile(&diffs, 1.0 - tail),
        ),
        share_negative: negative,
    })
}

fn sums(chunks: &[ChunkTokens], f: impl Fn(&ChunkTokens) -> f64) -> Vec<f64> {
    chunks.iter().map(f).collect()
}

/// The comparison report of two runs.
pub fn compare_runs(
    (ha, ca): (&RunHeader, &[ChunkTokens]),
    (hb, cb): (&RunHeader, &[ChunkTokens]),
    names: (&str, &str),
    opts: &CompareOptions,
) -> Result<Report> {
    check_comparable(ha, hb, ca, cb)?;
    let counts: Vec<usize> = ca.iter().map(|c| c.len()).collect();
    let indices = bootstrap_indices(ca.len(), opts.resamples, opts.seed);
    let pct = 100.0 * opts.confidence;
    let mut t = Table::new(
        "compare",
        &format!("B − A: {} vs {}", names.1, names.0),
        &[
            "quantity",
            "A",
            "B",
            "B - A",
            "CI low (chunk bootstrap)",
            "CI high (chunk bootstrap)",
            "token-level SE of B - A",
            "resamples where B is lower %",
        ],
    );
    let nll_a = sums(ca, |c| c.nll.iter().sum());
    let nll_b = sums(cb, |c| c.nll.iter().sum());
    let token_diff = |f: &dyn Fn(&ChunkTokens) -> &Vec<f64>| {
        let d: Vec<f64> = ca
            .iter()
            .zip(cb)
            .flat_map(|(x, y)| f(x).iter().zip(f(y)).map(|(p, q)| q - p))
            .collect::<Vec<_>>();
        stats::mean_and_err(d.into_iter()).1
    };
    let nll_se = token_diff(&|c| &c.nll);
    let mut row = |name: &str, d: Delta, se: Option<f64>, dec: usize| {
        t.push(vec![
            name.into(),
            Cell::f(d.a, dec),
            Cell::f(d.b, dec),
            Cell::f(d.diff, dec),
            Cell::f(d.ci.0, dec),
            Cell::f(d.ci.1, dec),
            se.map_or(Cell::Missing, |s| Cell::f(s, dec)),
            Cell::f(100.0 * d.share_negative, 1),
        ]);
    };
    let ppl = paired_bootstrap(
        &nll_a,
        &nll_b,
        &counts,
        exp_mean_stat,
        &indices,
        opts.confidence,
    )?;
    // llama.cpp's error of a PPL difference: sqrt(e_a² + e_b² − 2 PPL_a PPL_b cov).
    let flat = |c: &[ChunkTokens]| -> Vec<f64> { c.iter().flat_map(|x| x.nll.clone()).collect() };
    let (fa, fb) = (flat(ca), flat(cb));
    let (ea, eb) = (
        stats::mean_and_err(fa.iter().copied()).1,
        stats::mean_and_err(fb.iter().copied()).1,
    );
    let cov = stats::cov_of_means(&fa, &fb);
    let ppl_se = ((ppl.a * ea).powi(2) + (ppl.b * eb).powi(2) - 2.0 * ppl.a * ppl.b * cov)
        .max(0.0)
        .sqrt();
    row("perplexity", ppl, Some(ppl_se), 4);
    let ln = paired_bootstrap(
        &nll_a,
        &nll_b,
        &counts,
        mean_stat,
        &indices,
        opts.confidence,
    )?;
    row("mean NLL = ln PPL (B - A = ln ratio)", ln, Some(nll_se), 5);
    let both_kl = ca.iter().chain(cb).all(|c| c.has_base());
    let mut notes = Vec::new();
    if both_kl && ha.kl_base_id.is_some() && ha.kl_base_id == hb.kl_base_id {
        let kl_a = sums(ca, |c| c.kl.iter().sum());
        let kl_b = sums(cb, |c| c.kl.iter().sum());
        let d = paired_bootstrap(&kl_a, &kl_b, &counts, mean_stat, &indices, opts.confidence)?;
        row("mean KL to base", d, Some(token_diff(&|c| &c.kl)), 5);
        let top = |c: &ChunkTokens| c.same_top.iter().filter(|&&x| x).count() as f64;
        let d = paired_bootstrap(
            &sums(ca, top),
            &sums(cb, top),
            &counts,
            |s, n| 100.0 * s / n,
            &indices,
            opts.confidence,
        )?;
        row("same top token %", d, None, 3);
    } else if both_kl {
        notes.push("KL not compared: the runs were measured against different KL bases".into());
    } else {
        notes.push(
            "KL not compared: run both with --kl-base (the same base file) to compare KL"
                .to_string(),
        );
    }
    t.note(format!(
        "A = {} (plan '{}'), B = {} (plan '{}'); {} chunks, {} tokens; protocol: {}; tokenizer {}",
        names.0,
        ha.plan,
        names.1,
        hb.plan,
        ca.len(),
        counts.iter().sum::<usize>(),
        ha.protocol,
        ha.tokenizer
    ));
    t.note(format!(
        "{pct}% confidence intervals from a paired bootstrap over chunks (tokens within a chunk are correlated, so chunks are the resampling unit): {} resamples, seed {}, percentile interval",
        opts.resamples, opts.seed
    ));
    for n in notes {
        t.note(n);
    }
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}
