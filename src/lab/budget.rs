//! Per-layer settings under a size budget: a multiple-choice knapsack (one setting per
//! unit; minimise the summed sensitivity, i.e. the KL each setting causes alone, subject
//! to the stored bytes fitting the budget), solved by a Lagrangian sweep.
//!
//! Why Lagrangian: with cost `KL + λ·bytes` each unit picks its setting independently, and
//! as λ falls the picks move along each unit's lower convex hull of (bytes, KL). Sorting
//! every hull step of every unit by its KL saved per byte and taking them in that order
//! visits every λ breakpoint in O(n log n) — the whole Pareto front in one sweep. At a
//! breakpoint the plan is optimal for its own size (a hull point of the summed problem);
//! between breakpoints [`solve`] fills the leftover bytes greedily and reports the dual
//! lower bound `max_λ Σ min(KL + λ·bytes) − λ·budget`, so the remaining gap is known. An
//! exact DP over bytes would be slower and no more trustworthy: the summed KL is itself an
//! assumption (additivity), checked by measuring the chosen plan (`plan --verify`).

use anyhow::{bail, Result};

/// One setting of a unit: its plan method, stored bytes, and sensitivity (KL alone).
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub method: String,
    pub bytes: usize,
    pub cost: f64,
}

/// One unit (a layer or a group of layers) and its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub unit: String,
    pub params: usize,
    pub choices: Vec<Choice>,
}

/// A plan: one choice per item.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub picks: Vec<usize>,
    pub bytes: usize,
    pub cost: f64,
    /// The Lagrange multiplier (KL per byte) of the last hull step taken.
    pub lambda: f64,
    /// A lower bound on the best summed cost within the budget (Lagrangian dual).
    pub lower_bound: f64,
}

/// Indices of `choices` on the lower convex hull of (bytes, cost), by bytes ascending:
/// the only choices any λ ≥ 0 picks.
fn hull(choices: &[Choice]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..choices.len())
        .filter(|&i| choices[i].cost.is_finite())
        .collect();
    idx.sort_by(|&a, &b| {
        choices[a]
            .bytes
            .cmp(&choices[b].bytes)
            .then(choices[a].cost.total_cmp(&choices[b].cost))
    });
    let mut h: Vec<usize> = Vec::new();
    for i in idx {
        let c = &choices[i];
        // More bytes for no less cost is never chosen.
        if let Some(&last) = h.last() {
            if c.cost >= choices[last].cost {
                continue;
            }
        }
        // Drop points above the segment from the one before to this one.
        while h.len() >= 2 {
            let (a, b) = (&choices[h[h.len() - 2]], &choices[h[h.len() - 1]]);
            let s_ab = (a.cost - b.cost) / (b.bytes - a.bytes) as f64;
            let s_bc = (b.cost - c.cost) / (c.bytes - b.bytes) as f64;
            if s_bc >= s_ab {
                h.pop();
            } else {
                break;
            }
        }
        h.push(i);
    }
    h
}

/// One hull step: item `item` moves from hull position `from` to `from + 1`, saving
/// `gain` KL per byte.
#[derive(Debug, Clone, Copy)]
struct Step {
    item: usize,
    from: usize,
    gain: f64,
}

/// The sweep: hulls and every step in order of KL saved per byte (ties: fewer bytes).
struct Sweep {
    hulls: Vec<Vec<usize>>,
    steps: Vec<Step>,
}

fn sweep(items: &[Item]) -> Result<Sweep> {
    let mut hulls = Vec::with_capacity(items.len());
    let mut steps = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let h = hull(&it.choices);
        if h.is_empty() {
            bail!("unit {} has no setting with a finite sensitivity", it.unit);
        }
        for k in 0..h.len() - 1 {
            let (a, b) = (&it.choices[h[k]], &it.choices[h[k + 1]]);
            steps.push(Step {
                item: i,
                from: k,
                gain: (a.cost - b.cost) / (b.bytes - a.bytes) as f64,
            });
        }
        hulls.push(h);
    }
    // Within one item gains decrease along the hull, so this order keeps each item's
    // steps in sequence (ties broken by hull position).
    steps.sort_by(|a, b| {
        b.gain
            .total_cmp(&a.gain)
            .then(a.item.cmp(&b.item))
            .then(a.from.cmp(&b.from))
    });
    Ok(Sweep { hulls, steps })
}

/// Σ min_c (cost + λ·bytes) − λ·budget: a lower bound on the optimum for any λ ≥ 0.
fn dual(items: &[Item], lambda: f64, budget: usize) -> f64 {
    items
        .iter()
        .map(|it| {
            it.choices
                .iter()
                .filter(|c| c.cost.is_finite())
                .map(|c| c.cost + lambda * c.bytes as f64)
                .fold(f64::INFINITY, f64::min)
        })
        .sum::<f64>()
        - lambda * budget as f64
}

/// The plan with the least summed cost found within `budget` bytes: the Lagrangian
/// solution at the last λ breakpoint that fits, then the leftover bytes filled with the
/// best remaining steps that fit.
pub fn solve(items: &[Item], budget: usize) -> Result<Solution> {
    let sw = sweep(items)?;
    let mut pos = vec![0usize; items.len()];
    let choice = |i: usize, k: usize| &items[i].choices[sw.hulls[i][k]];
    let mut bytes: usize = (0..items.len()).map(|i| choice(i, 0).bytes).sum();
    if bytes > budget {
        bail!(
            "the budget of {budget} bytes is below the smallest plan ({bytes} bytes: every unit at its smallest setting)"
        );
    }
    let mut lambda = f64::INFINITY;
    let mut stopped_at: Option<f64> = None;
    for s in &sw.steps {
        if pos[s.item] != s.from {
            continue; // an earlier step of this item did not fit
        }
        let extra = choice(s.item, s.from + 1).bytes - choice(s.item, s.from).bytes;
        if bytes + extra <= budget {
            bytes += extra;
            pos[s.item] += 1;
            if stopped_at.is_none() {
                lambda = s.gain;
            }
        } else if stopped_at.is_none() {
            stopped_at = Some(s.gain);
        }
    }
    let picks: Vec<usize> = (0..items.len()).map(|i| sw.hulls[i][pos[i]]).collect();
    let cost = picks
        .iter()
        .enumerate()
        .map(|(i, &p)| items[i].choices[p].cost)
        .sum();
    // Every step was taken: the budget does not bind and the plan is optimal.
    let lower_bound = match stopped_at {
        None => cost,
        Some(g) => dual(items, g, budget).max(dual(items, 0.0, budget)),
    };
    Ok(Solution {
        picks,
        bytes,
        cost,
        lambda: if lambda.is_finite() { lambda } else { 0.0 },
        lower_bound,
    })
}

/// The Pareto front of the sweep: (bytes, summed cost) at every λ breakpoint, smallest
/// plan first.
pub fn front(items: &[Item]) -> Result<Vec<(usize, f64)>> {
    let sw = sweep(items)?;
    let choice = |i: usize, k: usize| &items[i].choices[sw.hulls[i][k]];
    let mut bytes: usize = (0..items.len()).map(|i| choice(i, 0).bytes).sum();
    let mut cost: f64 = (0..items.len()).map(|i| choice(i, 0).cost).sum();
    let mut out = vec![(bytes, cost)];
    for s in &sw.steps {
        let (a, b) = (choice(s.item, s.from), choice(s.item, s.from + 1));
        bytes += b.bytes - a.bytes;
        cost += b.cost - a.cost;
        out.push((bytes, cost));
    }
    Ok(out)
}

/// Total parameters of the items (bits per weight = bytes × 8 / this).
pub fn params(items: &[Item]) -> usize {
    items.iter().map(|i| i.params).sum()
}

/// Bytes allowed by `bits_per_weight` over the items' parameters.
pub fn budget_for_bits(items: &[Item], bits_per_weight: f64) -> usize {
    (bits_per_weight * params(items) as f64 / 8.0).floor() as usize
}

/// The GGML type llama.cpp's `--tensor-type` would use for a plan method, and whether the
/// mapping is exact. quantlab's RTN groups (f32 scale per group of 64) have no GGML twin:
/// they map to the k-quant of the same bit width (same bits per weight for 4-bit, another
/// scale layout), which is what a llama.cpp user would pick.
pub fn ggml_type(method: &str) -> Option<(&'static str, bool)> {
    let m = method.trim().to_ascii_lowercase();
    let ggml = [
        "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
    ];
    if let Some(g) = ggml.iter().find(|g| **g == m) {
        return Some((g, true));
    }
    match m.as_str() {
        "keep" | "f32" => return Some(("f32", true)),
        "f16" => return Some(("f16", true)),
        "bf16" => return Some(("bf16", true)),
        _ => {}
    }
    // Bit width of a weight-only scheme: `w:i4:...`, `hqq:u4:...`, `rtn-signed-max:i4:...`.
    let bits = m.split(':').find_map(|p| {
        p.strip_prefix('i')
            .or_else(|| p.strip_prefix('u'))
            .and_then(|b| b.parse::<u32>().ok())
    })?;
    let exact = m == "rtn-signed-max:i8:g32";
    Some((
        match bits {
            8 => "q8_0",
            6 | 7 => "q6_k",
            5 => "q5_k",
            4 => "q4_k",
            3 => "q3_k",
            2 | 1 => "q2_k",
            _ => return None,
        },
        exact,
    ))
}

/// A budget problem read from sensitivity rows: one item per unit.
pub struct Problem {
    pub items: Vec<Item>,
    pub model: String,
    pub text: String,
    pub tokens: usize,
    /// Added to every summed cost to give the predicted KL: 0 for sensitivities around
    /// f32; for in-context rows (`sensitivity --background`) the background's own KL, the
    /// choices' costs being each unit's change from it (`KL(unit changed) − KL(background)`,
    /// negative for an upgrade).
    pub offset: f64,
    /// The background plan of in-context rows.
    pub background: Option<String>,
}

impl Problem {
    /// Items from the rows of one sensitivity pass (one model, text and token budget);
    /// with `keep`, every unit may also stay f32 (4 bytes per weight, no KL).
    pub fn from_rows(rows: &[crate::lab::sensitivity::Row], keep: bool) -> Result<Self> {
        Self::with_estimates(rows, keep, &[])
    }

    /// [`Self::from_rows`], plus settings estimated from a measured one where a unit has no
    /// row of its own: `(to, from)` pairs of symmetric RTN methods differing only in bits
    /// (`w:i8:sym:g64` from `w:i4:sym:g64`). The estimate scales the measured KL by the
    /// quantization noise power, 4^-(to - from) (the step halves per bit; KL is quadratic
    /// in a small perturbation), and adds the codes' extra bytes (same scales). A model,
    /// not a measurement: `plan --verify` measures the chosen plan.
    pub fn with_estimates(
        rows: &[crate::lab::sensitivity::Row],
        keep: bool,
        estimates: &[(String, String)],
    ) -> Result<Self> {
        let Some(first) = rows.first() else {
            bail!("the sensitivity file has no rows (run `quantlab sensitivity` first)");
        };
        if let Some(r) = rows.iter().find(|r| {
            (&r.model, &r.tokens_hash, r.tokens, r.ctx, r.kl_top_k)
                != (
                    &first.model,
                    &first.tokens_hash,
                    first.tokens,
                    first.ctx,
                    first.kl_top_k,
                )
        }) {
            bail!(
                "the sensitivity file mixes passes ({} on {} tokens {} vs {} on {} tokens {}): keep one pass per file",
                first.model, first.tokens, first.tokens_hash, r.model, r.tokens, r.tokens_hash
            );
        }
        if let Some(r) = rows
            .iter()
            .find(|r| (&r.background, &r.calibration) != (&first.background, &first.calibration))
        {
            bail!(
                "the sensitivity file mixes passes with different backgrounds or calibration ({:?} vs {:?}): keep one pass per file",
                first.background,
                r.background
            );
        }
        let offset = match (&first.background, first.background_kl) {
            (None, _) => 0.0,
            (Some(_), Some(kl)) if kl.is_finite() => kl,
            (Some(b), _) => bail!("in-context rows (background {b}) without the background's KL"),
        };
        let mut items: Vec<Item> = Vec::new();
        for r in rows {
            let c = Choice {
                method: r.method.clone(),
                bytes: r.bytes,
                cost: r.mean_kl - offset,
            };
            match items.iter_mut().find(|i| i.unit == r.unit) {
                Some(i) => {
                    if i.params != r.params {
                        bail!(
                            "unit {} has rows of {} and {} weights",
                            r.unit,
                            i.params,
                            r.params
                        );
                    }
                    i.choices.retain(|x| x.method != c.method);
                    i.choices.push(c);
                }
                None => items.push(Item {
                    unit: r.unit.clone(),
                    params: r.params,
                    choices: vec![c],
                }),
            }
        }
        if !estimates.is_empty() && first.background.is_some() {
            bail!("--estimate scales a KL measured around f32; in-context rows (--background) hold changes from the background: measure the setting instead");
        }
        for (to, from) in estimates {
            let (bt, rest_t) = rtn_bits(to)?;
            let (bf, rest_f) = rtn_bits(from)?;
            if rest_t != rest_f {
                bail!("--estimate {to}={from}: the two must differ only in bits");
            }
            for i in &mut items {
                if i.choices.iter().any(|c| c.method == *to) {
                    continue; // measured
                }
                let Some(f) = i.choices.iter().find(|c| c.method == *from).cloned() else {
                    bail!("--estimate {to}={from}: unit {} has no {from} row", i.unit);
                };
                let extra = (i.params as f64 * (bt as f64 - bf as f64) / 8.0).round() as i64;
                i.choices.push(Choice {
                    method: to.clone(),
                    bytes: (f.bytes as i64 + extra).max(0) as usize,
                    cost: f.cost * 4f64.powi(bf as i32 - bt as i32),
                });
            }
        }
        // Around a background, f32 for a unit is a change like any other and must be
        // measured; its KL is not 0.
        if keep && first.background.is_none() {
            for i in &mut items {
                i.choices.push(Choice {
                    method: "keep".into(),
                    bytes: i.params * 4,
                    cost: 0.0,
                });
            }
        }
        Ok(Problem {
            items,
            model: first.model.clone(),
            text: first.text.clone(),
            tokens: first.tokens,
            offset,
            background: first.background.clone(),
        })
    }

    /// The plan of a solution in quantlab's plan syntax, one rule per line.
    pub fn plan_text(&self, s: &Solution) -> String {
        let mut out = String::from("lm_head=keep;\n");
        for (it, &p) in self.items.iter().zip(&s.picks) {
            out.push_str(&format!("{}={};\n", it.unit, it.choices[p].method));
        }
        out
    }

    /// llama.cpp `--tensor-type` arguments (one `regex=type` per line, the format of
    /// `llama-quantize --tensor-type-file`), and a note on what is approximate.
    pub fn tensor_types(&self, s: &Solution) -> Result<(String, String)> {
        let mut out = String::new();
        let mut approx: Vec<String> = Vec::new();
        for (it, &p) in self.items.iter().zip(&s.picks) {
            let m = &it.choices[p].method;
            let Some((ty, exact)) = ggml_type(m) else {
                bail!("{m} has no GGML counterpart for llama.cpp");
            };
            let note = format!("{m} → {ty}");
            if !exact && !approx.contains(&note) {
                approx.push(note);
            }
            // Units are layer names or globs over them; GGUF names are regexes in llama.cpp.
            let re = if it.unit.contains('*') {
                let g = crate::arch::llama::gguf_name(
                    &it.unit
                        .replace("*.", "model.layers.0.")
                        .replace(".*", ".self_attn.q_proj"),
                )
                .ok();
                match (&g, it.unit.strip_prefix("*.")) {
                    // `*.mlp.down_proj` → every block's ffn_down.
                    (Some(g), Some(_)) => g
                        .strip_prefix("blk.0.")
                        .unwrap_or(g)
                        .trim_end_matches(".weight")
                        .replace('.', "\\."),
                    // `model.layers.3.*` → every tensor of block 3.
                    _ => {
                        let b = it
                            .unit
                            .trim_start_matches("model.layers.")
                            .trim_end_matches(".*");
                        format!("blk\\.{b}\\.")
                    }
                }
            } else {
                crate::arch::llama::gguf_tensor_name(&format!("{}.weight", it.unit))?
                    .replace('.', "\\.")
            };
            out.push_str(&format!("{re}={ty}\n"));
        }
        let note = if approx.is_empty() {
            "every type exact".to_string()
        } else {
            format!(
                "approximate: {} (RTN with an f32 scale per group has no GGML twin; the k-quant of the same width is the nearest llama.cpp type)",
                approx.join(", ")
            )
        };
        Ok((out, note))
    }

    /// Every setting measured on all units, as a uniform plan: (method, bytes, summed KL).
    pub fn uniform(&self) -> Vec<(String, usize, f64)> {
        let mut out = Vec::new();
        let Some(first) = self.items.first() else {
            return out;
        };
        for c in &first.choices {
            if c.method == "keep" {
                continue;
            }
            let all: Option<Vec<&Choice>> = self
                .items
                .iter()
                .map(|i| i.choices.iter().find(|x| x.method == c.method))
                .collect();
            if let Some(all) = all {
                out.push((
                    c.method.clone(),
                    all.iter().map(|x| x.bytes).sum(),
                    all.iter().map(|x| x.cost).sum(),
                ));
            }
        }
        out
    }
}

/// Bits and the rest of a symmetric RTN spec `w:i<bits>:sym:<grouping>`.
fn rtn_bits(spec: &str) -> Result<(u32, String)> {
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        ["w", b, "sym", g] => match b.strip_prefix('i').and_then(|b| b.parse::<u32>().ok()) {
            Some(bits) if (2..=8).contains(&bits) => Ok((bits, g.to_string())),
            _ => bail!("'{spec}': estimates take w:i<2..8>:sym:<grouping>"),
        },
        _ => bail!("'{spec}': estimates take w:i<2..8>:sym:<grouping>"),
    }
}

/// How many layer rules of a plan use each method (`w:i4:sym:g64 ×120, keep ×3`).
pub fn count_settings(plan: &str) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for rule in plan.split(';').map(str::trim).filter(|r| !r.is_empty()) {
        let (pat, m) = rule.split_once('=').unwrap_or(("*", rule));
        if pat.trim() == "lm_head" {
            continue;
        }
        let m = if pat.trim() == "*" {
            format!("all {}", m.trim())
        } else {
            m.trim().to_string()
        };
        match counts.iter_mut().find(|c| c.0 == m) {
            Some(c) => c.1 += 1,
            None => counts.push((m, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts
        .iter()
        .map(|(m, n)| {
            if m.starts_with("all ") {
                m.clone()
            } else {
                format!("{m} ×{n}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One verified plan.
#[derive(Debug, Clone)]
pub struct Verified {
    pub mean_kl: f64,
    pub perplexity: f64,
    pub top1: f64,
}

/// The held-out measurement of a list of plans.
pub struct Verification {
    pub rows: Vec<Verified>,
    pub text: String,
    pub protocol: String,
    pub base_perplexity: f64,
}

/// Measures each plan's KL to the f32 model on held-out text (llama.cpp chunks, as
/// `perplexity --kl-base`), against `kl_base` or a base computed here (top 256).
#[allow(clippy::too_many_arguments)]
pub fn verify(
    model: &str,
    text: &std::path::Path,
    ctx: usize,
    max_chunks: usize,
    kl_base: Option<&std::path::Path>,
    plans: &[String],
    calibration: Option<&crate::eval::lm::CalibrationSpec>,
    device: &candle_core::Device,
    progress: bool,
) -> Result<Verification> {
    use crate::eval::lm::{self, KlMode};
    use crate::eval::perplexity::Protocol;
    let protocol = Protocol::LlamaCpp { ctx, bos: false };
    let words = lm::read_text(text)?;
    let tmp = tempfile::tempdir()?;
    let base_path = match kl_base {
        Some(p) => p.to_path_buf(),
        None => tmp.path().join("base.kld"),
    };
    let p = lm::prepare(model, crate::arch::llama::LoadAs::F32, None, None, device)?;
    let ids = p.llm.tokenizer.encode(&words)?;
    let bar = crate::progress::bar(0, "f32 base", progress);
    let mode = match kl_base {
        Some(_) => KlMode::None,
        None => KlMode::Save(base_path.clone(), 256),
    };
    let base = lm::score(&p, &ids, protocol, Some(max_chunks), &mode, &bar)?;
    drop(p);
    let mut rows = Vec::new();
    for plan in plans {
        let p = lm::prepare(
            model,
            crate::arch::llama::LoadAs::F32,
            Some(plan),
            calibration,
            device,
        )?;
        let bar = crate::progress::bar(0, "verify", progress);
        let s = lm::score(
            &p,
            &ids,
            protocol,
            Some(max_chunks),
            &KlMode::Compare(base_path.clone()),
            &bar,
        )?;
        let k = s.kl.expect("compare mode gives KL");
        rows.push(Verified {
            mean_kl: k.mean_kl(),
            perplexity: s.ppl.perplexity(),
            top1: k.top1_agreement(),
        });
    }
    Ok(Verification {
        rows,
        text: text.display().to_string(),
        protocol: format!("{protocol}, first {max_chunks} chunks"),
        base_perplexity: base.ppl.perplexity(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_items(rng: &mut rand::rngs::StdRng) -> Vec<Item> {
        let n = rng.gen_range(1..=5);
        (0..n)
            .map(|i| Item {
                unit: format!("u{i}"),
                params: 100,
                choices: (0..rng.gen_range(1..=4))
                    .map(|k| Choice {
                        method: format!("m{k}"),
                        bytes: rng.gen_range(1..=40),
                        cost: rng.gen_range(0.0..10.0f64),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Every combination: the best cost within the budget (None when nothing fits).
    fn brute_force(items: &[Item], budget: usize) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; items.len()];
        loop {
            let bytes: usize = idx
                .iter()
                .zip(items)
                .map(|(&k, it)| it.choices[k].bytes)
                .sum();
            let cost: f64 = idx
                .iter()
                .zip(items)
                .map(|(&k, it)| it.choices[k].cost)
                .sum();
            if bytes <= budget && best.is_none_or(|b| cost < b) {
                best = Some(cost);
            }
            let mut i = 0;
            loop {
                if i == items.len() {
                    return best;
                }
                idx[i] += 1;
                if idx[i] < items[i].choices.len() {
                    break;
                }
                idx[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn lagrangian_against_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut exact_hits, mut cases) = (0, 0);
        for _ in 0..300 {
            let items = random_items(&mut rng);
            let max: usize = items
                .iter()
                .map(|it| it.choices.iter().map(|c| c.bytes).max().unwrap())
                .sum();
            let breakpoints: Vec<usize> = front(&items).unwrap().iter().map(|p| p.0).collect();
            for budget in 0..=max + 1 {
                let opt = brute_force(&items, budget);
                match (solve(&items, budget), opt) {
                    (Err(_), None) => {}
                    (Ok(s), Some(opt)) => {
                        cases += 1;
                        assert!(s.bytes <= budget, "over budget");
                        let recount: f64 = s
                            .picks
                            .iter()
                            .zip(&items)
                            .map(|(&p, it)| it.choices[p].cost)
                            .sum();
                        assert!((recount - s.cost).abs() < 1e-9);
                        assert!(s.cost >= opt - 1e-9, "better than the optimum?");
                        assert!(
                            s.lower_bound <= opt + 1e-9,
                            "bound {} > opt {opt}",
                            s.lower_bound
                        );
                        // At a λ breakpoint the sweep is optimal.
                        if breakpoints.contains(&budget) {
                            assert!(
                                (s.cost - opt).abs() < 1e-9,
                                "breakpoint {budget}: {} vs {opt}",
                                s.cost
                            );
                        }
                        exact_hits += ((s.cost - opt).abs() < 1e-9) as usize;
                    }
                    (s, opt) => panic!("solve {:?} but brute force {opt:?}", s.map(|s| s.cost)),
                }
            }
        }
        // The greedy fill between breakpoints is optimal most of the time.
        assert!(exact_hits * 10 > cases * 8, "{exact_hits} of {cases}");
    }

    #[test]
    fn hull_keeps_only_undominated_convex_points() {
        let c = |bytes, cost| Choice {
            method: String::new(),
            bytes,
            cost,
        };
        // (10, 5) is dominated by (8, 4); (20, 2) lies above the segment (8,4)–(32,0).
        let ch = [c(4, 9.0), c(8, 4.0), c(10, 5.0), c(20, 2.0), c(32, 0.0)];
        let h: Vec<usize> = hull(&ch);
        assert_eq!(h, vec![0, 1, 4]);
    }

    #[test]
    fn estimates_need_sym_rtn_specs_differing_in_bits() {
        assert_eq!(rtn_bits("w:i8:sym:g64").unwrap(), (8, "g64".to_string()));
        assert!(rtn_bits("w:u8:affine:g64").is_err());
        assert!(rtn_bits("hqq:u4:g64").is_err());
        assert!(rtn_bits("w:i9:sym:g64").is_err());
    }

    #[test]
    fn ggml_names() {
        assert_eq!(ggml_type("w:i4:sym:g64"), Some(("q4_k", false)));
        assert_eq!(ggml_type("q8_0"), Some(("q8_0", true)));
        assert_eq!(ggml_type("keep"), Some(("f32", true)));
        assert_eq!(ggml_type("hqq:u3:g64"), Some(("q3_k", false)));
        assert_eq!(ggml_type("nf4"), None);
    }
}
