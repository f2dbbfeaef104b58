//! The measurement side of the `perplexity` and `compare` commands: KL statistics tables,
//! run files, the all-protocols table. Kept out of `cli` so the commands stay thin.

use super::compare::{self, CompareOptions};
use super::lm::{LmScores, PreparedLlm};
use super::perplexity::Protocol;
use super::protocols;
use super::runfile::{self, RunHeader};
use super::stats;
use crate::report::{Report, Table};
use anyhow::Result;
use std::path::Path;

/// The text protocol flags of a `perplexity` run.
#[derive(Debug, Clone, Copy)]
pub struct TextSpec {
    pub protocol: Protocol,
    pub ctx: usize,
    pub bos: bool,
    pub max_chunks: Option<usize>,
}

/// How the tokenizer is named in reports and run headers.
pub fn tokenizer_name(p: &PreparedLlm) -> String {
    format!(
        "{} (vocab {})",
        p.llm.tokenizer.pre, p.llm.model.cfg.vocab_size
    )
}

/// After a scored run: say why it stopped early, tabulate the KL statistics, write the
/// run file.
#[allow(clippy::too_many_arguments)]
pub fn after_run(
    p: &PreparedLlm,
    s: &LmScores,
    text_path: &Path,
    text: &str,
    ids: &[u32],
    spec: &TextSpec,
    kl_base: Option<&Path>,
    save_run: Option<&Path>,
) -> Result<Vec<Table>> {
    let mut tables = Vec::new();
    let ppl = stats::ppl_summary(&s.chunks);
    let mut t = Table::new(
        "ppl_error",
        "Perplexity with its uncertainty",
        &[
            "chunks",
            "tokens",
            "perplexity",
            "perplexity error (token-level)",
            "mean NLL",
            "mean NLL error (token-level)",
            "mean NLL error (chunk-level)",
        ],
    );
    t.push(vec![
        ppl.chunks.into(),
        ppl.tokens.into(),
        crate::report::Cell::f(ppl.ppl.value, 4),
        crate::report::Cell::f(ppl.ppl.err, 4),
        crate::report::Cell::f(ppl.mean_nll.value, 5),
        crate::report::Cell::f(ppl.mean_nll.err, 5),
        crate::report::Cell::f(ppl.mean_nll_chunk_se, 5),
    ]);
    t.note("token-level errors treat tokens as independent (llama.cpp's); chunk-level ones use per-chunk sums, since tokens within a chunk are correlated");
    if let Some(why) = &s.ppl.stopped_early {
        eprintln!("{why}");
        t.note(why.clone());
    }
    tables.push(t);
    if let Some(k) = stats::kl_summary(&s.chunks)? {
        tables.extend(stats::summary_tables(&k));
    }
    if let Some(out) = save_run {
        let ws =
            super::perplexity::windows(ids, spec.protocol, p.llm.tokenizer.bos, spec.max_chunks)?;
        let hash = ws
            .iter()
            .take(s.chunks.len())
            .fold(super::kl::HASH_SEED, |h, w| {
                super::kl::hash_tokens(h, &w.tokens)
            });
        let header = RunHeader {
            format: runfile::FORMAT.into(),
            quantlab_version: env!("CARGO_PKG_VERSION").into(),
            model: p.llm.source.display().to_string(),
            plan: p.plan.clone(),
            text: text_path.display().to_string(),
            text_hash: format!(
                "{:016x}",
                super::kl::fnv1a(super::kl::HASH_SEED, text.as_bytes())
            ),
            tokens_hash: hash,
            protocol: spec.protocol.to_string(),
            ctx: spec.ctx,
            bos: spec.bos,
            tokenizer: tokenizer_name(p),
            kl_base: kl_base.map(|b| b.display().to_string()),
            kl_base_id: s.base.as_ref().map(|h| {
                format!(
                    "{}:{:016x}:{}:top{}",
                    h.model, h.tokens_hash, h.positions, h.top_k
                )
            }),
            chunks: s.chunks.len(),
            tokens: s.chunks.iter().map(|c| c.len()).sum(),
            stopped_early: s.ppl.stopped_early.clone(),
        };
        runfile::write(out, &header, &s.chunks)?;
        if let Some(t) = tables.first_mut() {
            t.note(format!("per-token run written to {}", out.display()));
        }
    }
    Ok(tables)
}

/// `perplexity --protocols LIST`: one table over the protocols.
pub fn protocols_report(
    p: &PreparedLlm,
    text: &str,
    ids: &[u32],
    list: &str,
    spec: &TextSpec,
    lm_eval_max_len: usize,
    progress: &indicatif::ProgressBar,
) -> Result<Report> {
    let names = protocols::parse_list(list)?;
    let strided = match spec.protocol {
        Protocol::Strided { max_len, stride } => Some((max_len, stride)),
        _ => None,
    };
    let encode = |s: &str| p.llm.tokenizer.encode(s);
    let inputs = protocols::ProtocolInputs {
        text,
        ids,
        encode: &encode,
        bos: p.llm.tokenizer.bos,
        eos: p.llm.tokenizer.eos,
        ctx: spec.ctx,
        strided,
        lm_eval_max_len,
        max_windows: spec.max_chunks,
        model_ctx: p.llm.model.cfg.max_position_embeddings,
    };
    let ws = names
        .iter()
        .map(|&n| protocols::build(n, &inputs))
        .collect::<Result<Vec<_>>>()?;
    let mut t = protocols::run(&p.llm.model, &ws, &tokenizer_name(p), progress)?;
    t.note(format!(
        "model {}, plan '{}'; --max-chunks limits each protocol's windows (lm-eval: whole documents only), so the rows may cover different tokens",
        p.llm.source.display(),
        p.plan
    ));
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}

/// `quantlab compare A B`.
pub fn compare_files(a: &Path, b: &Path, opts: &CompareOptions) -> Result<Report> {
    let (ha, ca) = runfile::read(a)?;
    let (hb, cb) = runfile::read(b)?;
    compare::compare_runs(
        (&ha, &ca),
        (&hb, &cb),
        (&a.display().to_string(), &b.display().to_string()),
        opts,
    )
}
