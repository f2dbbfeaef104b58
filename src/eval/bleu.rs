//! Corpus BLEU and chrF exactly as sacrebleu 2.x computes them with its defaults: BLEU with
//! the `13a` tokenizer (mteval-v13a), mixed case, `exp` smoothing, one reference per line;
//! chrF with character 6-grams, beta 2, whitespace ignored, effective-order averaging.

use regex::Regex;
use std::collections::HashMap;
use std::sync::OnceLock;

/// sacrebleu's signature for the BLEU settings implemented here.
pub const BLEU_SIGNATURE: &str = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0";
/// sacrebleu's signature for the chrF settings implemented here.
pub const CHRF_SIGNATURE: &str = "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0";

const MAX_ORDER: usize = 4;

/// Python's `str.split()` whitespace: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F that Python also counts.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|w| !w.is_empty())
}

/// The `13a` tokenization of one line (sacrebleu's `Tokenizer13a`).
pub fn tokenize_13a(line: &str) -> String {
    static RULES: OnceLock<[(Regex, &'static str); 4]> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        [
            // Symbols and most ASCII punctuation become separate tokens.
            (Regex::new(r"([\{-~\[-` -&\(-\+:-@/])").unwrap(), " $1 "),
            // Period and comma, unless preceded by a digit...
            (Regex::new(r"([^0-9])([\.,])").unwrap(), "$1 $2 "),
            // ...or unless followed by one.
            (Regex::new(r"([\.,])([^0-9])").unwrap(), " $1 $2"),
            // A dash after a digit.
            (Regex::new(r"([0-9])(-)").unwrap(), "$1 $2 "),
        ]
    });
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut line = format!(" {line} ");
    for (re, rep) in rules {
        line = re.replace_all(&line, *rep).into_owned();
    }
    py_split(&line).collect::<Vec<_>>().join(" ")
}

/// A corpus BLEU score with its sufficient statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Bleu {
    pub score: f64,
    pub counts: [usize; MAX_ORDER],
    pub totals: [usize; MAX_ORDER],
    pub precisions: [f64; MAX_ORDER],
    pub bp: f64,
    pub sys_len: usize,
    pub ref_len: usize,
}

impl std::fmt::Display for Bleu {
    /// sacrebleu's one-line format: `BLEU = 33.29 62.8/39.5/26.9/18.4 (BP = 1.000 ...)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prec: Vec<String> = self.precisions.iter().map(|p| format!("{p:.1}")).collect();
        let ratio = if self.ref_len > 0 {
            self.sys_len as f64 / self.ref_len as f64
        } else {
            0.0
        };
        write!(
            f,
            "BLEU = {:.2} {} (BP = {:.3} ratio = {ratio:.3} hyp_len = {} ref_len = {})",
            self.score,
            prec.join("/"),
            self.bp,
            self.sys_len,
            self.ref_len
        )
    }
}

fn word_ngrams(tokens: &[&str]) -> HashMap<Vec<String>, usize> {
    let mut out = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in tokens.windows(n) {
            *out.entry(w.iter().map(|s| s.to_string()).collect())
                .or_insert(0) += 1;
        }
    }
    out
}

/// Corpus BLEU of `hyps` against one reference each (sacrebleu's `corpus_bleu` defaults).
pub fn corpus_bleu(hyps: &[String], refs: &[String]) -> anyhow::Result<Bleu> {
    if hyps.len() != refs.len() {
        anyhow::bail!(
            "{} hypotheses but {} references: the files must be aligned line by line",
            hyps.len(),
            refs.len()
        );
    }
    let (mut counts, mut totals) = ([0usize; MAX_ORDER], [0usize; MAX_ORDER]);
    let (mut sys_len, mut ref_len) = (0, 0);
    for (h, r) in hyps.iter().zip(refs) {
        let h = tokenize_13a(h.trim_end_matches(is_py_space));
        let r = tokenize_13a(r.trim_end_matches(is_py_space));
        let ht: Vec<&str> = py_split(&h).collect();
        let rt: Vec<&str> = py_split(&r).collect();
        sys_len += ht.len();
        ref_len += rt.len();
        let rn = word_ngrams(&rt);
        for (g, c) in word_ngrams(&ht) {
            let n = g.len() - 1;
            totals[n] += c;
            counts[n] += c.min(rn.get(&g).copied().unwrap_or(0));
        }
    }
    Ok(bleu_from_stats(counts, totals, sys_len, ref_len))
}

/// BLEU from its statistics with `exp` smoothing (sacrebleu's `compute_bleu`).
pub fn bleu_from_stats(
    counts: [usize; MAX_ORDER],
    totals: [usize; MAX_ORDER],
    sys_len: usize,
    ref_len: usize,
) -> Bleu {
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0; MAX_ORDER];
    let mut score = 0.0;
    if counts.iter().any(|&c| c > 0) {
        let mut smooth = 1.0;
        for n in 0..MAX_ORDER {
            if totals[n] == 0 {
                break;
            }
            precisions[n] = if counts[n] == 0 {
                smooth *= 2.0;
                100.0 / (smooth * totals[n] as f64)
            } else {
                100.0 * counts[n] as f64 / totals[n] as f64
            };
        }
        let log = |p: f64| if p == 0.0 { -9999999999.0 } else { p.ln() };
        score = bp * (precisions.iter().map(|&p| log(p)).sum::<f64>() / MAX_ORDER as f64).exp();
    }
    Bleu {
        score,
        counts,
        totals,
        precisions,
        bp,
        sys_len,
        ref_len,
    }
}

const CHAR_ORDER: usize = 6;
const BETA: f64 = 2.0;

/// The characters of a line with whitespace removed (chrF ignores spaces).
fn chrf_chars(line: &str) -> Vec<char> {
    py_split(line).flat_map(str::chars).collect()
}

/// Character n-gram counts of orders 1..=6.
fn char_ngrams(chars: &[char]) -> Vec<HashMap<&[char], usize>> {
    (1..=CHAR_ORDER)
        .map(|n| {
            let mut m = HashMap::new();
            for g in chars.windows(n) {
                *m.entry(g).or_insert(0) += 1;
            }
            m
        })
        .collect()
}

/// Corpus chrF (sacrebleu's `corpus_chrf` defaults).
pub fn corpus_chrf(hyps: &[String], refs: &[String]) -> anyhow::Result<f64> {
    if hyps.len() != refs.len() {
        anyhow::bail!(
            "{} hypotheses but {} references: the files must be aligned line by line",
            hyps.len(),
            refs.len()
        );
    }
    // Per order: hypothesis n-grams, reference n-grams, matches.
    let mut stats = [[0usize; 3]; CHAR_ORDER];
    for (h, r) in hyps.iter().zip(refs) {
        let (hc, rc) = (chrf_chars(h), chrf_chars(r));
        let (hn, rn) = (char_ngrams(&hc), char_ngrams(&rc));
        for (o, (hc, rc)) in hn.iter().zip(&rn).enumerate() {
            let mut matched = 0;
            let mut hyp_count = 0;
            for (g, &c) in hc {
                hyp_count += c;
                matched += c.min(rc.get(g).copied().unwrap_or(0));
            }
            // A reference without n-grams of this order does not count the hypothesis's.
            stats[o][0] += if rc.is_empty() { 0 } else { hyp_count };
            stats[o][1] += rc.values().sum::<usize>();
            stats[o][2] += matched;
        }
    }
    let factor = BETA * BETA;
    let (mut avg_prec, mut avg_rec, mut eff) = (0.0, 0.0, 0);
    for [n_hyp, n_ref, n_match] in stats {
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += n_match as f64 / n_hyp as f64;
            avg_rec += n_match as f64 / n_ref as f64;
            eff += 1;
        }
    }
    if eff == 0 {
        return Ok(0.0);
    }
    avg_prec /= eff as f64;
    avg_rec /= eff as f64;
    if avg_prec + avg_rec == 0.0 {
        return Ok(0.0);
    }
    Ok(100.0 * (1.0 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bleu_by_hand() {
        // hyp "a b c d", ref "a b c e": 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1
        // (exp smoothing: 100 / (2 * 1)), BP 1.
        let b = corpus_bleu(&["a b c d".into()], &["a b c e".into()]).unwrap();
        let expect =
            (((75.0f64).ln() + (200.0f64 / 3.0).ln() + 50f64.ln() + 50f64.ln()) / 4.0).exp();
        assert!((b.score - expect).abs() < 1e-9, "{} vs {expect}", b.score);
        assert_eq!(b.counts, [3, 2, 1, 0]);
    }

    #[test]
    fn tokenizer_splits_punctuation_but_not_decimals() {
        assert_eq!(
            tokenize_13a("Hello, world. 3.14 1-2"),
            "Hello , world . 3.14 1 - 2"
        );
    }

    #[test]
    fn misaligned_files_are_an_error() {
        assert!(corpus_bleu(&["a".into()], &[]).is_err());
        assert!(corpus_chrf(&[], &["a".into()]).is_err());
    }
}
