//! Per-token run files (`perplexity --save-run FILE`), read by `quantlab compare`.
//!
//! JSON lines: a header object, then one object per chunk (window) with its per-token
//! arrays. JSON rather than binary because the files are small next to a KL base (8 bytes
//! of f64 per value become ~20 characters: ~12 MB for all of WikiText-2 with a base), any
//! tool can read them, and serde_json writes f64 so it reads back bit-exact. One line per
//! chunk because the chunk is the sampling unit of `compare`'s bootstrap. Written
//! atomically (temporary file, then rename).

use super::stats::ChunkTokens;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;

pub const FORMAT: &str = "quantlab-run-1";

/// What a run measured; `compare` refuses runs whose tokens, text or protocol differ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunHeader {
    pub format: String,
    pub quantlab_version: String,
    pub model: String,
    pub plan: String,
    pub text: String,
    /// FNV-1a (64-bit, hex) of the text file's bytes.
    pub text_hash: String,
    /// FNV-1a of the scored windows' token ids (as in KL base files).
    pub tokens_hash: u64,
    pub protocol: String,
    pub ctx: usize,
    pub bos: bool,
    /// Tokenizer: pre-tokenizer and vocabulary size.
    pub tokenizer: String,
    /// The KL base compared with (path), if any.
    pub kl_base: Option<String>,
    /// The KL base's token hash and top-k, if any (KL is comparable only between runs
    /// against the same base).
    pub kl_base_id: Option<String>,
    pub chunks: usize,
    pub tokens: usize,
    /// Why the run stopped before the protocol's end (`--until-ci`), if it did.
    pub stopped_early: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ChunkLine {
    chunk: usize,
    #[serde(flatten)]
    tokens: ChunkTokens,
}

/// Writes a run file atomically.
pub fn write(path: &Path, header: &RunHeader, chunks: &[ChunkTokens]) -> Result<()> {
    crate::quant::io::write_atomically_with(path, |w| {
        serde_json::to_writer(&mut *w, header)?;
        w.write_all(b"\n")?;
        for (i, c) in chunks.iter().enumerate() {
            serde_json::to_writer(
                &mut *w,
                &ChunkLine {
                    chunk: i,
                    tokens: c.clone(),
                },
            )?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
    .map(|_| ())
}

/// Reads a run file written by [`write`].
pub fn read(path: &Path) -> Result<(RunHeader, Vec<ChunkTokens>)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open run file {}", path.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let first = lines
        .next()
        .with_context(|| format!("run file {} is empty", path.display()))??;
    let header: RunHeader = serde_json::from_str(&first).with_context(|| {
        format!(
            "{} is not a quantlab run file (write one with `perplexity --save-run`)",
            path.display()
        )
    })?;
    if header.format != FORMAT {
        bail!(
            "{} is a run file of format '{}', this quantlab reads '{FORMAT}'",
            path.display(),
            header.format
        );
    }
    let mut chunks = Vec::with_capacity(header.chunks);
    for (i, line) in lines.enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let c: ChunkLine = serde_json::from_str(&line)
            .with_context(|| format!("{}: chunk line {} is damaged", path.display(), i + 1))?;
        if c.chunk != i {
            bail!(
                "{}: chunk {} out of order (expected {i})",
                path.display(),
                c.chunk
            );
        }
        c.tokens
            .validate()
            .with_context(|| format!("{}: chunk {i}", path.display()))?;
        chunks.push(c.tokens);
    }
    let tokens: usize = chunks.iter().map(|c| c.len()).sum();
    if chunks.len() != header.chunks || tokens != header.tokens {
        bail!(
            "{} is truncated: the header says {} chunks / {} tokens, the file holds {} / {}",
            path.display(),
            header.chunks,
            header.tokens,
            chunks.len(),
            tokens
        );
    }
    Ok((header, chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_files_round_trip_bit_exact_and_reject_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.jsonl");
        let mut a = ChunkTokens::default();
        a.push(0.1 + 0.2, Some((1.0 / 3.0, 1e-7, true)));
        a.push(2.5, Some((2.0, 0.25, false)));
        let h = RunHeader {
            format: FORMAT.into(),
            quantlab_version: "x".into(),
            model: "m".into(),
            plan: "keep".into(),
            text: "t".into(),
            text_hash: "00".into(),
            tokens_hash: 7,
            protocol: "p".into(),
            ctx: 8,
            bos: false,
            tokenizer: "tok".into(),
            kl_base: None,
            kl_base_id: None,
            chunks: 1,
            tokens: 2,
            stopped_early: None,
        };
        write(&path, &h, std::slice::from_ref(&a)).unwrap();
        let (h2, c) = read(&path).unwrap();
        assert_eq!(h2, h);
        assert_eq!(c, vec![a]);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.lines().next().unwrap()).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
