//! Where datasets live: `--data-dir`, else `$QUANTLAB_DATA`, else a `shared/data` folder
//! beside the checkout. A missing file is an error that names the path and the fix.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub mod mnist;

/// The environment variable naming the data folder.
pub const DATA_ENV: &str = "QUANTLAB_DATA";

#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    /// Resolves the data folder: explicit flag, then the environment, then `../shared/data`
    /// next to the current folder or to the crate.
    pub fn resolve(flag: Option<&Path>) -> Result<DataDir> {
        if let Some(p) = flag {
            if !p.is_dir() {
                bail!(
                    "data folder {} (from --data-dir) does not exist",
                    p.display()
                );
            }
            return Ok(DataDir {
                root: p.to_path_buf(),
            });
        }
        if let Some(p) = std::env::var_os(DATA_ENV) {
            let p = PathBuf::from(p);
            if !p.is_dir() {
                bail!(
                    "data folder {} (from ${DATA_ENV}) does not exist",
                    p.display()
                );
            }
            return Ok(DataDir { root: p });
        }
        let candidates = [
            PathBuf::from("../shared/data"),
            PathBuf::from("shared/data"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
        ];
        for c in &candidates {
            if c.is_dir() {
                return Ok(DataDir { root: c.clone() });
            }
        }
        bail!(
            "no data folder found: pass --data-dir DIR or set {DATA_ENV}=DIR (looked in {})",
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// A file or folder inside the data folder that must exist; `how` says how to get it.
    pub fn require(&self, rel: &str, how: &str) -> Result<PathBuf> {
        let p = self.root.join(rel);
        if !p.exists() {
            bail!("missing dataset file {}: {how}", p.display());
        }
        Ok(p)
    }
}

/// Two line-aligned files (source and reference, or hypotheses and reference), cut to the
/// first `limit` lines; files of different lengths are an error naming both.
pub fn read_aligned(
    a: &Path,
    b: &Path,
    limit: Option<usize>,
) -> Result<(Vec<String>, Vec<String>)> {
    if limit == Some(0) {
        bail!("--limit 0 selects no sentences: give at least 1 (or drop --limit)");
    }
    let (mut x, mut y) = (read_lines(a)?, read_lines(b)?);
    if x.len() != y.len() {
        bail!(
            "{} has {} lines but {} has {}: the files must be aligned line by line",
            a.display(),
            x.len(),
            b.display(),
            y.len()
        );
    }
    if let Some(n) = limit {
        x.truncate(n);
        y.truncate(n);
    }
    Ok((x, y))
}

/// The lines of a text file (gzip-compressed when the name ends in `.gz`), without their
/// line endings. An unreadable, non-UTF-8 or empty file is an error naming it.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut text = String::new();
    let read = if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text)
    };
    read.map_err(|e| anyhow::anyhow!("reading {}: {e} (is it UTF-8 text?)", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect();
    if lines.is_empty() {
        bail!("{} is empty: nothing to evaluate", path.display());
    }
    Ok(lines)
}
