//! Statistics of per-token scores as llama.cpp's `llama-perplexity --kl-divergence` prints
//! them (tools/perplexity/perplexity.cpp, `kl_divergence`), computed from the per-token
//! arrays of a run rather than from running sums.
//!
//! Definitions follow llama.cpp:
//! - a mean's uncertainty is `sqrt(var / (n - 1))` with `var` the population variance
//!   (= the usual standard error), and 0 for `n <= 10`;
//! - PPL = exp(mean NLL) with error `PPL · se(NLL)`; the ln ratio ln(PPL(Q)/PPL(base)) is
//!   the difference of the mean NLLs, its error uses the covariance of the paired
//!   per-token NLLs, `sqrt(se_q² + se_b² − 2 cov)`; the ratio's error is `ratio · se(ln
//!   ratio)`; the difference's error `sqrt(e_q² + e_b² − 2 PPL_q PPL_b cov)`;
//! - the correlation is Pearson's r of the per-token NLLs of Q and base (llama.cpp's
//!   `Cor(ln(PPL(Q)), ln(PPL(base)))`; equal to r of the log-probs of the correct token);
//! - Δp = p_Q(correct token) − p_base(correct token); RMS Δp's error by the delta method
//!   from the error of mean(Δp²);
//! - percentiles interpolate linearly between order statistics at `f · (n − 1)` (NumPy's
//!   default), the median is the middle value or the mean of the two middle values;
//! - "same top" is the share of positions whose argmax agrees, error `sqrt(p(1−p)/(n−1))`.
//!
//! Deviations: everything is in f64 with two-pass (mean first) variances, where llama.cpp
//! keeps f32 per-token values and one-pass sums; KL is over the base file's top-k buckets
//! (exact with `--kl-top-k 0`) where llama.cpp uses the full vocabulary quantized to 16 bits
//! and drops base probabilities below e^-16.
//!
//! These token-level errors treat tokens as independent. Tokens of one chunk are not, so
//! [`chunk_se`] gives the error of a mean from per-chunk sums instead (used by
//! `--until-ci` and, as a bootstrap over chunks, by `compare`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Per-token scores of one window (chunk), in order of position.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkTokens {
    /// −log p_Q(correct token).
    pub nll: Vec<f64>,
    /// −log p_base(correct token) (empty without a base).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nll_base: Vec<f64>,
    /// KL(base ‖ Q) (empty without a base).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kl: Vec<f64>,
    /// Whether the argmaxes of base and Q agree (empty without a base).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub same_top: Vec<bool>,
    /// Δp = p_Q − p_base of the correct token (empty without a base; derived, stored for
    /// readers of the run file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dp: Vec<f64>,
}

impl ChunkTokens {
    pub fn len(&self) -> usize {
        self.nll.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nll.is_empty()
    }

    pub fn has_base(&self) -> bool {
        !self.kl.is_empty()
    }

    /// Adds one position; `base` = (nll_base, kl, same_top).
    pub fn push(&mut self, nll: f64, base: Option<(f64, f64, bool)>) {
        self.nll.push(nll);
        if let Some((nb, kl, top)) = base {
            self.nll_base.push(nb);
            self.kl.push(kl);
            self.same_top.push(top);
            self.dp.push((-nll).exp() - (-nb).exp());
        }
    }

    /// Checks that the arrays have one entry per position.
    pub fn validate(&self) -> Result<()> {
        let n = self.nll.len();
        let b = self.kl.len();
        if b != 0
            && (b != n
                || self.nll_base.len() != n
                || self.same_top.len() != n
                || self.dp.len() != n)
        {
            bail!("a chunk's per-token arrays have different lengths");
        }
        if b == 0 && (!self.nll_base.is_empty() || !self.same_top.is_empty()) {
            bail!("a chunk has base scores but no KL values");
        }
        Ok(())
    }
}

/// Mean and its uncertainty as llama.cpp's `mean_and_uncertainty` defines them.
pub fn mean_and_err(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let (mut n, mut sum) = (0usize, 0.0);
    for x in xs.clone() {
        n += 1;
        sum += x;
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    let var = xs.map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    let err = if var > 0.0 && n > 10 {
        (var / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    (mean, err)
}

/// `a − b` of two correlated estimates `(value, error)` with covariance `cov`.
fn paired_difference(a: (f64, f64), b: (f64, f64), cov: f64) -> (f64, f64) {
    (
        a.0 - b.0,
        (a.1 * a.1 + b.1 * b.1 - 2.0 * cov).max(0.0).sqrt(),
    )
}

/// RMS of the Δp values and its error (from the error of the mean square).
fn rms_and_err(dp: &[f64]) -> (f64, f64) {
    let mse = mean_and_err(dp.iter().map(|d| d * d));
    let rms = mse.0.sqrt();
    (rms, if rms > 0.0 { 0.5 / rms * mse.1 } else { 0.0 })
}

/// Fraction of the `n` positions whose top tokens agree, with its binomial error.
fn same_top_and_err(chunks: &[ChunkTokens], n: usize) -> (f64, f64) {
    let same = chunks
        .iter()
        .flat_map(|c| c.same_top.iter())
        .filter(|&&t| t)
        .count() as f64
        / n as f64;
    let err = if n > 1 {
        (same * (1.0 - same) / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    (same, err)
}

/// Covariance of the two means (llama.cpp's `covariance`): Σ(a−ā)(b−b̄)/n/(n−1); 0 for n < 10.
pub fn cov_of_means(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 10 {
        return 0.0;
    }
    let ma = a[..n].iter().sum::<f64>() / n as f64;
    let mb = b[..n].iter().sum::<f64>() / n as f64;
    let s: f64 = a[..n]
        .iter()
        .zip(&b[..n])
        .map(|(x, y)| (x - ma) * (y - mb))
        .sum();
    s / n as f64 / (n - 1) as f64
}

/// Linear-interpolation percentile of sorted values (`fraction` in 0..=1; NumPy's default).
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let p = fraction * (sorted.len() - 1) as f64;
    let i = p.floor() as usize;
    let t = p - i as f64;
    let j = (i + 1).min(sorted.len() - 1);
    (1.0 - t) * sorted[i] + t * sorted[j]
}

/// The percentiles llama.cpp prints for KL (besides max, median, min).
pub const KL_PERCENTILES: [f64; 8] = [0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001];
/// The percentiles llama.cpp prints for Δp (besides max, median, min).
pub const DP_PERCENTILES: [f64; 10] =
    [0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001];

/// Max, the given percentiles, median and min of `values`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub max: f64,
    /// (fraction, value), in the order asked.
    pub percentiles: Vec<(f64, f64)>,
    pub median: f64,
    pub min: f64,
}

impl Distribution {
    pub fn of(values: &[f64], fractions: &[f64]) -> Distribution {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Distribution {
            max: v.last().copied().unwrap_or(f64::NAN),
            percentiles: fractions.iter().map(|&f| (f, percentile(&v, f))).collect(),
            median: percentile(&v, 0.5),
            min: v.first().copied().unwrap_or(f64::NAN),
        }
    }
}

/// A value with its uncertainty (one standard error).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Est {
    pub value: f64,
    pub err: f64,
}

impl Est {
    fn new((value, err): (f64, f64)) -> Est {
        Est { value, err }
    }
}

/// Perplexity alone (runs without a base).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PplSummary {
    pub tokens: usize,
    pub chunks: usize,
    pub mean_nll: Est,
    pub ppl: Est,
    /// Standard error of the mean NLL from per-chunk sums (tokens within a chunk correlate).
    pub mean_nll_chunk_se: f64,
}

/// Everything llama.cpp's KL-divergence mode prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KlSummary {
    pub tokens: usize,
    pub ppl_q: Est,
    pub ppl_base: Est,
    /// Pearson r of the per-token NLLs (= of the correct token's log-probs).
    pub cor: f64,
    pub ln_ratio: Est,
    pub ratio: Est,
    pub diff: Est,
    pub kl: Est,
    pub kl_dist: Distribution,
    /// Standard error of mean KL from per-chunk sums.
    pub kl_chunk_se: f64,
    pub dp: Est,
    pub dp_dist: Distribution,
    pub dp_rms: Est,
    pub same_top: Est,
}

fn flat(chunks: &[ChunkTokens], f: impl Fn(&ChunkTokens) -> &Vec<f64>) -> Vec<f64> {
    chunks.iter().flat_map(|c| f(c).iter().copied()).collect()
}

pub fn ppl_summary(chunks: &[ChunkTokens]) -> PplSummary {
    let nll = flat(chunks, |c| &c.nll);
    let m = Est::new(mean_and_err(nll.iter().copied()));
    PplSummary {
        tokens: nll.len(),
        chunks: chunks.len(),
        mean_nll: m,
        ppl: Est {
            value: m.value.exp(),
            err: m.value.exp() * m.err,
        },
        mean_nll_chunk_se: chunk_se(
            &chunks
                .iter()
                .map(|c| c.nll.iter().sum())
                .collect::<Vec<_>>(),
            &chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
        ),
    }
}

/// The full KL statistics; None when the chunks carry no base scores.
pub fn kl_summary(chunks: &[ChunkTokens]) -> Result<Option<KlSummary>> {
    for c in chunks {
        c.validate()?;
    }
    if chunks.is_empty() || chunks.iter().any(|c| !c.has_base() && !c.is_empty()) {
        return Ok(None);
    }
    let nll = flat(chunks, |c| &c.nll);
    let nb = flat(chunks, |c| &c.nll_base);
    let kl = flat(chunks, |c| &c.kl);
    let dp = flat(chunks, |c| &c.dp);
    let n = nll.len();
    if n == 0 {
        return Ok(None);
    }
    let q = mean_and_err(nll.iter().copied());
    let b = mean_and_err(nb.iter().copied());
    let cov = cov_of_means(&nll, &nb);
    let ppl_q = (q.0.exp(), q.0.exp() * q.1);
    let ppl_b = (b.0.exp(), b.0.exp() * b.1);
    let ln_ratio = paired_difference(q, b, cov);
    let ratio = (ln_ratio.0.exp(), ln_ratio.0.exp() * ln_ratio.1);
    let ppl_cov = ppl_q.0 * ppl_b.0 * cov;
    let diff = paired_difference(ppl_q, ppl_b, ppl_cov);
    let (rms, rms_err) = rms_and_err(&dp);
    let (same, same_err) = same_top_and_err(chunks, n);
    Ok(Some(KlSummary {
        tokens: n,
        ppl_q: Est::new(ppl_q),
        ppl_base: Est::new(ppl_b),
        cor: cov / (q.1 * b.1),
        ln_ratio: Est::new(ln_ratio),
        ratio: Est::new(ratio),
        diff: Est::new(diff),
        kl: Est::new(mean_and_err(kl.iter().copied())),
        kl_dist: Distribution::of(&kl, &KL_PERCENTILES),
        kl_chunk_se: chunk_se(
            &chunks.iter().map(|c| c.kl.iter().sum()).collect::<Vec<_>>(),
            &chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
        ),
        dp: Est::new(mean_and_err(dp.iter().copied())),
        dp_dist: Distribution::of(&dp, &DP_PERCENTILES),
        dp_rms: Est {
            value: rms,
            err: rms_err,
        },
        same_top: Est {
            value: same,
            err: same_err,
        },
    }))
}

/// Standard error of a ratio mean Σsums/Σcounts with chunks as the sampling unit
/// (linearization: sqrt(Σ(s_c − m·n_c)² / (C(C−1))) / n̄); NaN for fewer than 2 chunks.
pub fn chunk_se(sums: &[f64], counts: &[usize]) -> f64 {
    let c = sums.len().min(counts.len());
    if c < 2 {
        return f64::NAN;
    }
    let total: f64 = sums[..c].iter().sum();
    let n: usize = counts[..c].iter().sum();
    if n == 0 {
        return f64::NAN;
    }
    let m = total / n as f64;
    let nbar = n as f64 / c as f64;
    let ss: f64 = sums[..c]
        .iter()
        .zip(&counts[..c])
        .map(|(s, &k)| (s - m * k as f64).powi(2))
        .sum();
    (ss / (c * (c - 1)) as f64).sqrt() / nbar
}

/// Two-sided standard normal quantile for a confidence level (Acklam's rational
/// approximation of the inverse normal CDF, relative error < 1.2e-9).
pub fn z_for_confidence(confidence: f64) -> Result<f64> {
    if !(confidence > 0.0 && confidence < 1.0) {
        bail!("confidence must be between 0 and 1 (got {confidence})");
    }
    Ok(inv_norm(0.5 + confidence / 2.0))
}

#[allow(clippy::excessive_precision)]
fn inv_norm(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.383577518672690e+02,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-03,
        3.224671290700398e-01,
        2.445134137142996e+00,
        3.754408661907416e+00,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The final tables: llama.cpp's perplexity, KL and token-probability statistics.
pub fn summary_tables(s: &KlSummary) -> Vec<crate::report::Table> {
    use crate::report::{Cell, Table};
    let pm = |e: Est, scale: f64, d: usize| -> Vec<Cell> {
        vec![Cell::f(scale * e.value, d), Cell::f(scale * e.err, d)]
    };
    let mut ppl = Table::new(
        "ppl_stats",
        "Perplexity statistics (llama.cpp --kl-divergence)",
        &["statistic", "value", "± (standard error)"],
    );
    let row = |t: &mut Table, name: &str, cells: Vec<Cell>| {
        let mut r: Vec<Cell> = vec![name.into()];
        r.extend(cells);
        while r.len() < 3 {
            r.push(Cell::Missing);
        }
        t.push(r);
    };
    row(&mut ppl, "Mean PPL(Q)", pm(s.ppl_q, 1.0, 6));
    row(&mut ppl, "Mean PPL(base)", pm(s.ppl_base, 1.0, 6));
    row(
        &mut ppl,
        "Cor(ln(PPL(Q)), ln(PPL(base))) %",
        vec![Cell::f(100.0 * s.cor, 2)],
    );
    row(
        &mut ppl,
        "Mean ln(PPL(Q)/PPL(base))",
        pm(s.ln_ratio, 1.0, 6),
    );
    row(&mut ppl, "Mean PPL(Q)/PPL(base)", pm(s.ratio, 1.0, 6));
    row(&mut ppl, "Mean PPL(Q)-PPL(base)", pm(s.diff, 1.0, 6));
    ppl.note(format!(
        "{} tokens; errors are one standard error treating tokens as independent (as llama.cpp); Cor is Pearson's r of the per-token NLLs (= of the correct token's log-probs)",
        s.tokens
    ));
    let mut kl = Table::new(
        "kl_stats",
        "KL divergence statistics",
        &["statistic", "value", "± (standard error)"],
    );
    row(&mut kl, "Mean KLD", pm(s.kl, 1.0, 6));
    row(&mut kl, "Maximum KLD", vec![Cell::f(s.kl_dist.max, 6)]);
    let pname = |f: f64| format!("{:.1}%", 100.0 * f);
    for &(f, v) in s.kl_dist.percentiles.iter().filter(|p| p.0 > 0.5) {
        row(&mut kl, &format!("{} KLD", pname(f)), vec![Cell::f(v, 6)]);
    }
    row(&mut kl, "Median KLD", vec![Cell::f(s.kl_dist.median, 6)]);
    for &(f, v) in s.kl_dist.percentiles.iter().filter(|p| p.0 < 0.5) {
        row(&mut kl, &format!("{} KLD", pname(f)), vec![Cell::f(v, 6)]);
    }
    row(&mut kl, "Minimum KLD", vec![Cell::f(s.kl_dist.min, 6)]);
    kl.note(format!(
        "standard error of mean KL from per-chunk sums (chunks as the sampling unit): {:.6}",
        s.kl_chunk_se
    ));
    let mut tp = Table::new(
        "token_prob_stats",
        "Token probability statistics (Δp = p_Q − p_base of the correct token, %)",
        &["statistic", "value", "± (standard error)"],
    );
    row(&mut tp, "Mean Δp %", pm(s.dp, 100.0, 3));
    row(
        &mut tp,
        "Maximum Δp %",
        vec![Cell::f(100.0 * s.dp_dist.max, 3)],
    );
    for &(f, v) in s.dp_dist.percentiles.iter().filter(|p| p.0 > 0.5) {
        row(
            &mut tp,
            &format!("{} Δp %", pname(f)),
            vec![Cell::f(100.0 * v, 3)],
        );
    }
    row(
        &mut tp,
        "Median Δp %",
        vec![Cell::f(100.0 * s.dp_dist.median, 3)],
    );
    for &(f, v) in s.dp_dist.percentiles.iter().filter(|p| p.0 < 0.5) {
        row(
            &mut tp,
            &format!("{} Δp %", pname(f)),
            vec![Cell::f(100.0 * v, 3)],
        );
    }
    row(
        &mut tp,
        "Minimum Δp %",
        vec![Cell::f(100.0 * s.dp_dist.min, 3)],
    );
    row(&mut tp, "RMS Δp %", pm(s.dp_rms, 100.0, 3));
    row(&mut tp, "Same top p %", pm(s.same_top, 100.0, 3));
    vec![ppl, kl, tp]
}

/// One per-chunk progress line in llama.cpp's layout (chunk, PPL, ln ratio, KL, Δp RMS,
/// same top), from all chunks so far.
pub fn chunk_line(chunks: &[ChunkTokens]) -> String {
    let i = chunks.len();
    let nll = flat(chunks, |c| &c.nll);
    let q = mean_and_err(nll.iter().copied());
    let mut line = format!("{i:4}    {:9.4} ± {:9.4}", q.0.exp(), q.0.exp() * q.1);
    // Moments only (no percentiles): this runs after every chunk.
    if !chunks.is_empty() && chunks.iter().all(|c| c.has_base()) {
        let nb = flat(chunks, |c| &c.nll_base);
        let kl = flat(chunks, |c| &c.kl);
        let dp = flat(chunks, |c| &c.dp);
        let b = mean_and_err(nb.iter().copied());
        let cov = cov_of_means(&nll, &nb);
        let lr = paired_difference(q, b, cov);
        let k = mean_and_err(kl.iter().copied());
        let (rms, rms_err) = rms_and_err(&dp);
        let (same, same_err) = same_top_and_err(chunks, nll.len());
        line += &format!(
            "    {:10.5} ± {:10.5}    {:10.5} ± {:10.5}    {:6.3} ± {:6.3} %    {:6.3} ± {:6.3} %",
            lr.0,
            lr.1,
            k.0,
            k.1,
            100.0 * rms,
            100.0 * rms_err,
            100.0 * same,
            100.0 * same_err
        );
    }
    line
}

/// Header of [`chunk_line`]s.
pub fn chunk_header(with_base: bool) -> String {
    if with_base {
        "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p".into()
    } else {
        "chunk             PPL".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 8.0);
        assert!((percentile(&v, 0.9) - 6.8).abs() < 1e-12);
    }

    #[test]
    fn normal_quantiles() {
        assert!((z_for_confidence(0.95).unwrap() - 1.959963984540054).abs() < 1e-8);
        assert!((z_for_confidence(0.99).unwrap() - 2.5758293035489).abs() < 1e-8);
        assert!(z_for_confidence(1.0).is_err());
    }

    #[test]
    fn chunk_se_of_equal_chunks_is_the_se_of_chunk_means() {
        let sums = [2.0, 4.0, 3.0, 7.0];
        let counts = [2, 2, 2, 2];
        let means = [1.0, 2.0, 1.5, 3.5];
        let m = 2.0;
        let sd = (means.iter().map(|x: &f64| (x - m).powi(2)).sum::<f64>() / 3.0).sqrt();
        assert!((chunk_se(&sums, &counts) - sd / 2.0).abs() < 1e-12);
        assert!(chunk_se(&sums[..1], &counts[..1]).is_nan());
    }

    #[test]
    fn chunk_lines_agree_with_the_summary() {
        let mut c = ChunkTokens::default();
        for i in 0..40 {
            let x = i as f64 / 40.0;
            c.push(1.0 + x, Some((1.0 + x * x, 0.01 * x, i % 3 != 0)));
        }
        let cs = vec![c.clone(), c];
        let s = kl_summary(&cs).unwrap().unwrap();
        let line = chunk_line(&cs);
        for v in [
            format!("{:10.5} ± {:10.5}", s.ln_ratio.value, s.ln_ratio.err),
            format!("{:10.5} ± {:10.5}", s.kl.value, s.kl.err),
            format!(
                "{:6.3} ± {:6.3} %",
                100.0 * s.dp_rms.value,
                100.0 * s.dp_rms.err
            ),
            format!(
                "{:6.3} ± {:6.3} %",
                100.0 * s.same_top.value,
                100.0 * s.same_top.err
            ),
        ] {
            assert!(line.contains(&v), "{line} lacks {v}");
        }
    }
}
