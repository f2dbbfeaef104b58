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
