//! Sharded sweeps: `sweep --shard I/N` measures the I-th of N deterministic slices of a
//! sweep's configurations (one process per GPU, or one task of a cluster job array), and
//! `sweep merge` joins the shard files into the rows an unsharded run would have produced.
//!
//! Choices, and why:
//! - Slices are round-robin by configuration index (configuration `j ≥ 1` goes to shard
//!   `(j - 1) mod N + 1`). `expand` lists a method's bit widths and groupings next to each
//!   other, so contiguous slices would give one shard all of an expensive method (GPTQ,
//!   HQQ) while another gets only cheap RTN rows; dealing them out like cards balances
//!   the shards without any cost model.
//! - Every shard measures the f32 baseline itself. KL and top-1 agreement compare each row
//!   with the baseline's stored distributions, and a cluster task cannot read another
//!   node's file; one extra baseline per shard is the price of shards that need nothing
//!   from each other. Merge takes shard 1's baseline row (so the merged file is the same
//!   whichever shard finished first).
//! - A shard's files are always derived from `--out`: `runs/sweep.jsonl` with `--shard
//!   2/4` writes `runs/sweep.shard-2-of-4.jsonl` (and `.svg`, `.base.kld`), so every task
//!   of a job array can run the same command line without clobbering the others.
//! - Each shard writes a manifest next to its rows (`….shard-2-of-4.manifest.json`): the
//!   sweep's [`RunKey`] (model, SHA-256 of the text, protocol, layers...), the calibration
//!   and the full configuration list. Rows alone cannot show that two shards belong to
//!   one sweep (a row does not carry the configuration list), so merge compares the
//!   manifests and refuses shards of different sweeps. Shards may run on different
//!   machines and GPUs, so merge ignores where the model files lie (path, mtime), the
//!   text's path and the device; everything else must be equal.

use super::sweep::{self, CalibrationRecord, Config, Row, SweepSpec};
use super::sweep_key::RunKey;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `--shard I/N`: the I-th (1-based) of N slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("--shard takes I/N with 1 ≤ I ≤ N (e.g. 2/4), not '{s}'");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Whether configuration `j` of the expanded list belongs to this shard (the baseline,
    /// `j = 0`, belongs to every shard).
    pub fn owns(&self, j: usize) -> bool {
        j == 0 || (j - 1) % self.count + 1 == self.index
    }

    /// This shard's configurations, in the sweep's order.
    pub fn select(&self, configs: &[Config]) -> Vec<Config> {
        configs
            .iter()
            .enumerate()
            .filter(|(j, _)| self.owns(*j))
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// The shard's rows file: `--out` with `.shard-I-of-N` before the extension.
    pub fn out_path(&self, out: &Path) -> PathBuf {
        let stem = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sweep".into());
        let name = match out.extension() {
            Some(e) => format!(
                "{stem}.shard-{}-of-{}.{}",
                self.index,
                self.count,
                e.to_string_lossy()
            ),
            None => format!("{stem}.shard-{}-of-{}", self.index, self.count),
        };
        out.with_file_name(name)
    }
}

/// The manifest of a shard's rows file (`x.jsonl` → `x.manifest.json`).
pub fn manifest_path(rows: &Path) -> PathBuf {
    rows.with_extension("manifest.json")
}

/// One configuration as the manifest lists it: what its row must look like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub family: String,
    pub bits: u32,
    pub method: String,
    pub plan: String,
    /// The calibration its row must record (only for methods that gather statistics).
    pub calibration: Option<CalibrationRecord>,
}

/// What makes shards parts of one sweep, written by each shard next to its rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub shard: Shard,
    /// What every row's number depends on, the plan aside.
    pub key: RunKey,
    /// Every configuration of the sweep (not only this shard's), baseline first.
    pub configs: Vec<Entry>,
}

impl Manifest {
    /// The manifest of `spec` (whose `configs` is the full, unsharded list).
    pub fn of(spec: &SweepSpec, shard: Shard) -> Result<Self> {
        let mut calib: Option<CalibrationRecord> = None;
        let mut configs = Vec::with_capacity(spec.configs.len());
        for c in &spec.configs {
            let plan = c.plan(spec.layers);
            let parsed: crate::nn::Plan = plan
                .parse()
                .with_context(|| format!("sweep plan '{plan}'"))?;
            let calibration = if crate::nn::plan_needs_calibration(&parsed) {
                if calib.is_none() {
                    let c = spec.calibration.text_spec()?;
                    calib = Some(CalibrationRecord::of(&c.text, c.samples, c.seqlen, c.seed)?);
                }
                calib.clone()
            } else {
                None
            };
            configs.push(Entry {
                family: c.family.clone(),
                bits: c.bits,
                method: c.method.clone(),
                plan,
                calibration,
            });
        }
        Ok(Manifest {
            shard,
            key: super::sweep_key::of(spec)?,
            configs,
        })
    }

    /// The key fields that must agree between shards (not where files lie, nor the device;
    /// the model as named on the command line must agree).
    fn merge_key(k: &RunKey) -> RunKey {
        RunKey {
            model_files: String::new(),
            text: String::new(),
            device: String::new(),
            ..k.clone()
        }
    }

    /// The first field in which two shards' sweeps differ (the shard index aside).
    fn differs_from(&self, other: &Manifest) -> Option<String> {
        let mut diffs = Self::merge_key(&self.key).differences(&Self::merge_key(&other.key));
        if self.key.model != other.key.model {
            diffs.push(format!("model: {} → {}", self.key.model, other.key.model));
        }
        if !diffs.is_empty() {
            Some(diffs.join("; "))
        } else if self.shard.count != other.shard.count {
            Some("shard count N".into())
        } else if self.configs.len() == other.configs.len()
            && self.configs.iter().zip(&other.configs).all(|(a, b)| {
                ((&a.plan, &a.family, a.bits) == (&b.plan, &b.family, b.bits)
                    && a.calibration != b.calibration)
                    || a == b
            })
            && self.configs != other.configs
        {
            // Same configurations, calibrated on other data (file, samples, seed...).
            Some("calibration".into())
        } else if self.configs != other.configs {
            Some("configuration list".into())
        } else {
            None
        }
    }

    /// Whether `row` is this sweep's measurement of `entry`.
    fn matches(&self, entry: &Entry, row: &Row) -> bool {
        row.key.as_ref().is_some_and(|k| {
            k.model == self.key.model
                && Self::merge_key(k)
                    .differences(&Self::merge_key(&self.key))
                    .is_empty()
        }) && row.plan == entry.plan
            && row.calibration == entry.calibration
    }
}

/// Runs shard `shard` of `spec` (whose `configs` and `out` are those of the whole sweep):
/// writes the manifest, then runs (or resumes) the shard's configurations into its own
/// file. Returns the shard's rows and the file they are in.
pub fn run(spec: &SweepSpec, shard: Shard) -> Result<(Vec<Row>, PathBuf)> {
    let manifest = Manifest::of(spec, shard)?;
    let out = shard.out_path(&spec.out);
    let mpath = manifest_path(&out);
    // A shard resumed with another sweep's arguments is refused (by its rows' keys) before
    // its manifest is replaced.
    if out.exists() {
        let prev: Option<Manifest> = std::fs::read_to_string(&mpath)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if let Some(prev) = prev {
            if let Some(what) = prev.differs_from(&manifest) {
                bail!(
                    "{} was written by another sweep ({what}): pass --fresh to start this shard over, or choose another --out",
                    mpath.display()
                );
            }
        }
    }
    crate::quant::io::write_atomically(
        &mpath,
        (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes(),
    )?;
    let sub = SweepSpec {
        model: spec.model.clone(),
        device: spec.device.clone(),
        load_as: spec.load_as,
        configs: shard.select(&spec.configs),
        layers: spec.layers,
        text: spec.text.clone(),
        protocol: spec.protocol,
        max_chunks: spec.max_chunks,
        out: out.clone(),
        kl: spec.kl,
        calibration: spec.calibration.clone(),
        progress: spec.progress,
    };
    Ok((sweep::run(&sub)?, out))
}

/// Joins shard files (each with its manifest beside it) into the rows of the whole sweep,
/// in the order an unsharded run lists them. Refuses shards of different sweeps,
/// duplicate or missing shards, a configuration without its row, and rows present twice.
pub fn merge(files: &[PathBuf]) -> Result<(Manifest, Vec<Row>)> {
    if files.is_empty() {
        bail!("sweep merge needs the shard files (runs/sweep.shard-*-of-N.jsonl)");
    }
    let mut shards: Vec<(Manifest, &PathBuf, Vec<Row>)> = Vec::new();
    for f in files {
        let mpath = manifest_path(f);
        let text = std::fs::read_to_string(&mpath).with_context(|| {
            format!(
                "reading {} (the manifest `sweep --shard` writes next to {})",
                mpath.display(),
                f.display()
            )
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a sweep shard manifest", mpath.display()))?;
        if !f.exists() {
            bail!("{} does not exist", f.display());
        }
        let rows = sweep::read_rows(f)?;
        shards.push((m, f, rows));
    }
    let first = &shards[0];
    for (m, f, _) in &shards[1..] {
        if let Some(what) = first.0.differs_from(m) {
            bail!(
                "{} and {} are shards of different sweeps: their {what} differs",
                first.1.display(),
                f.display()
            );
        }
    }
    let n = first.0.shard.count;
    let mut by_index: Vec<Option<usize>> = vec![None; n];
    for (k, (m, f, _)) in shards.iter().enumerate() {
        let slot = &mut by_index[m.shard.index - 1];
        if let Some(prev) = *slot {
            bail!(
                "shard {} given twice: {} and {}",
                m.shard,
                shards[prev].1.display(),
                f.display()
            );
        }
        *slot = Some(k);
    }
    let missing: Vec<String> = by_index
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| format!("{}/{n}", i + 1))
        .collect();
    if !missing.is_empty() {
        bail!("missing shard(s) {}", missing.join(", "));
    }
    let manifest = first.0.clone();
    let mut merged = Vec::with_capacity(manifest.configs.len());
    for (j, entry) in manifest.configs.iter().enumerate() {
        // Where the row was found: (shard position, row).
        let mut found: Option<(usize, &Row)> = None;
        for (k, (m, f, rows)) in shards.iter().enumerate() {
            let hits: Vec<&Row> = rows.iter().filter(|r| manifest.matches(entry, r)).collect();
            if hits.len() > 1 {
                bail!(
                    "the row of {} appears {} times in {}",
                    entry.plan,
                    hits.len(),
                    f.display()
                );
            }
            let Some(&row) = hits.first() else { continue };
            if j == 0 {
                // Every shard measures the baseline; shard 1's is the merged one.
                if m.shard.index == 1 {
                    found = Some((k, row));
                }
                continue;
            }
            if let Some((prev, _)) = found {
                bail!(
                    "the row of {} appears twice: in {} and {}",
                    entry.plan,
                    shards[prev].1.display(),
                    f.display()
                );
            }
            found = Some((k, row));
        }
        let owner = if j == 0 { 1 } else { (j - 1) % n + 1 };
        match found {
            Some((_, row)) => merged.push(row.clone()),
            None => bail!(
                "shard {owner}/{n} ({}) has no row for {} (did it finish? re-run it to resume)",
                shards[by_index[owner - 1].unwrap_or(0)].1.display(),
                entry.plan
            ),
        }
    }
    Ok((manifest, merged))
}

/// Writes merged rows to `out`, replacing it whole (a merge is recomputed from its
/// shards), atomically.
pub fn write_rows(out: &Path, rows: &[Row]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text += &serde_json::to_string(r)?;
        text.push('\n');
    }
    crate::quant::io::write_atomically(out, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_or_say_why_not() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        assert_eq!(
            "1/1".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 1 }
        );
        for bad in ["0/4", "5/4", "a/b", "1/0", "2", "", "1/2/3", "-1/4"] {
            let e = bad.parse::<Shard>().unwrap_err().to_string();
            assert!(e.contains("I/N") && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn slices_are_round_robin_with_the_baseline_in_every_shard() {
        let configs: Vec<Config> = (0..8)
            .map(|j| Config {
                family: format!("f{j}"),
                bits: 4,
                method: format!("m{j}"),
            })
            .collect();
        let names = |s: &str| -> Vec<String> {
            s.parse::<Shard>()
                .unwrap()
                .select(&configs)
                .into_iter()
                .map(|c| c.method)
                .collect()
        };
        assert_eq!(names("1/3"), ["m0", "m1", "m4", "m7"]);
        assert_eq!(names("2/3"), ["m0", "m2", "m5"]);
        assert_eq!(names("3/3"), ["m0", "m3", "m6"]);
        assert_eq!(names("1/1").len(), 8);
        // More shards than configurations: the extra shards only measure the baseline.
        assert_eq!(names("9/9"), ["m0"]);
        let s: Shard = "2/4".parse().unwrap();
        assert_eq!(
            s.out_path(Path::new("runs/sweep.jsonl")),
            Path::new("runs/sweep.shard-2-of-4.jsonl")
        );
        assert_eq!(
            manifest_path(&s.out_path(Path::new("runs/sweep.jsonl"))),
            Path::new("runs/sweep.shard-2-of-4.manifest.json")
        );
        assert_eq!(s.out_path(Path::new("out")), Path::new("out.shard-2-of-4"));
    }
}
