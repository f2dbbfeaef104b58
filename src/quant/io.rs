//! Saving quantized tensors to disk and reading them back: safetensors files holding
//! bit-packed codes and parameters, with the scheme in the metadata. Files are written
//! to a temporary name and renamed, so a crash never leaves a half-written file.

use super::params::QParams;
use super::scheme::Scheme;
use super::uniform::QTensor;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

const FORMAT_KEY: &str = "quantlab.format";
const UNIFORM_FORMAT: &str = "uniform-v1";

/// Writes bytes to `path` through a temporary file in the same folder, then renames.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    write_atomically_with(path, |w| Ok(w.write_all(bytes)?)).map(|_| ())
}

/// The one way quantlab writes an output file. Streams into a buffered temporary file
/// next to `path` (`.NAME.tmpPID`), syncs it and renames it into place, so a reader never
/// sees half a file. On every error path the temporary file is removed, and so are the
/// folders this call created for it; errors name `path` (what the user typed), not the
/// temporary name: "writing runs/x.svg: No space left on device". A `path` that is a
/// directory is refused before anything is written; one that is a device or a pipe
/// (`/dev/stdout`, `/dev/full`) is written in place, since nothing can be renamed onto it.
/// Returns the file's size.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<u64> {
    use std::io::Write;
    if path.as_os_str().is_empty() {
        bail!("empty output file name");
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            bail!(
                "cannot write {}: it is a directory (give a file name inside it)",
                path.display()
            );
        }
        if !meta.is_file() {
            return write_in_place(path, write);
        }
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("cannot write {}: it names no file", path.display()))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let created =
        create_folders(dir).with_context(|| format!("cannot write {}", path.display()))?;
    remove_orphaned_temporaries(dir, name);
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> Result<u64> {
        let file = std::fs::File::create(&tmp).map_err(anyhow::Error::from)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        w.flush()?;
        let file = w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("{}", e.error()))?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        std::fs::rename(&tmp, path)?;
        Ok(bytes)
    })()
    .with_context(|| format!("writing {}", path.display()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        // Deepest first: each is empty once the temporary file is gone.
        for d in created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
    result
}

/// Removes `.NAME.tmpPID` files left beside `NAME` by a quantlab process that was killed
/// mid-write (no error path ran to clean up). Only files of exactly that pattern whose
/// process is gone are removed; where liveness cannot be checked (no `/proc`), nothing is.
fn remove_orphaned_temporaries(dir: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Refuses, before any work, an output path that [`write_atomically_with`] would refuse
/// at the end: a directory, or one below a file. (Disk space cannot be checked ahead.)
pub fn check_target(path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() {
        bail!("empty output file name");
    }
    if path.is_dir() {
        bail!(
            "cannot write {}: it is a directory (give a file name inside it)",
            path.display()
        );
    }
    let mut cur = path.parent();
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => bail!(
                "cannot write {}: {} exists and is not a folder",
                path.display(),
                d.display()
            ),
            Err(_) => cur = d.parent(),
        }
    }
    Ok(())
}

/// Writes straight into a device or pipe (no rename possible).
fn write_in_place(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<u64> {
    use std::io::Write;
    (|| -> Result<u64> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        w.flush()?;
        Ok(0)
    })()
    .with_context(|| format!("writing {}", path.display()))
}

/// Creates `dir` and its missing ancestors; returns the folders created, outermost first.
/// A path component that exists but is not a folder is named in the error.
fn create_folders(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => bail!("{} exists and is not a folder", d.display()),
            Err(_) => missing.push(d.to_path_buf()),
        }
        cur = d.parent();
    }
    missing.reverse();
    let mut created = Vec::new();
    for d in missing {
        if let Err(e) = std::fs::create_dir(&d) {
            if !d.is_dir() {
                for c in created.iter().rev() {
                    let _ = std::fs::remove_dir(c);
                }
                return Err(e).with_context(|| format!("creating folder {}", d.display()));
            }
        } else {
            created.push(d);
        }
    }
    Ok(created)
}

fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn le_bytes_i32(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Saves an f32 tensor as a one-tensor safetensors file (the baseline for size comparisons).
pub fn save_f32(t: &Tensor, name: &str, path: &Path) -> Result<u64> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bytes = le_bytes_f32(&v);
    let view = TensorView::new(Dtype::F32, t.dims().to_vec(), &bytes)?;
    let out = safetensors::serialize([(name, view)], None)?;
    write_atomically(path, &out)?;
    Ok(out.len() as u64)
}

/// Saves a quantized tensor with its codes packed to `bits` bits each. Returns bytes written.
pub fn save_qtensor(q: &QTensor, path: &Path) -> Result<u64> {
    let packed = q.packed_codes()?;
    let scale = le_bytes_f32(&q.params.scale);
    let zp = le_bytes_i32(&q.params.zero_point);
    let n = q.params.len();
    let tensors = [
        (
            "codes",
            TensorView::new(Dtype::U8, vec![packed.len()], &packed)?,
        ),
        ("scale", TensorView::new(Dtype::F32, vec![n], &scale)?),
        ("zero_point", TensorView::new(Dtype::I32, vec![n], &zp)?),
    ];
    let mut meta = HashMap::new();
    meta.insert(FORMAT_KEY.to_string(), UNIFORM_FORMAT.to_string());
    meta.insert("scheme".to_string(), q.scheme.to_string());
    meta.insert("shape".to_string(), serde_json::to_string(q.dims())?);
    let out = safetensors::serialize(tensors, Some(meta))?;
    write_atomically(path, &out)?;
    Ok(out.len() as u64)
}

/// Reads a tensor written by [`save_qtensor`].
pub fn load_qtensor(path: &Path, device: &Device) -> Result<QTensor> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading quantized tensor {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| {
        format!(
            "{} is not a valid safetensors file (truncated or corrupt?)",
            path.display()
        )
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get(FORMAT_KEY).map(String::as_str) != Some(UNIFORM_FORMAT) {
        bail!("{} was not written by quantlab's save_qtensor (missing '{FORMAT_KEY}: {UNIFORM_FORMAT}' metadata)", path.display());
    }
    let scheme: Scheme = meta
        .get("scheme")
        .context("missing 'scheme' metadata")?
        .parse()?;
    let shape: Vec<usize> =
        serde_json::from_str(meta.get("shape").context("missing 'shape' metadata")?)
            .context("invalid 'shape' metadata")?;
    let codes = st.tensor("codes").context("missing 'codes' tensor")?;
    let scale: Vec<f32> = st
        .tensor("scale")
        .context("missing 'scale' tensor")?
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let zero_point: Vec<i32> = st
        .tensor("zero_point")
        .context("missing 'zero_point' tensor")?
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    QTensor::from_packed(
        scheme,
        &shape,
        codes.data(),
        QParams { scale, zero_point },
        device,
    )
    .with_context(|| format!("reading quantized tensor {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::uniform::quantize;

    #[test]
    fn round_trip_signed_3bit_groups() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(data, (4, 16), &Device::Cpu).unwrap();
        let s: Scheme = "i3:sym:g8".parse().unwrap();
        let q = quantize(&x, &s).unwrap();
        let path = dir.path().join("w.safetensors");
        let n = save_qtensor(&q, &path).unwrap();
        assert_eq!(n, std::fs::metadata(&path).unwrap().len());
        let back = load_qtensor(&path, &Device::Cpu).unwrap();
        assert_eq!(back.scheme, q.scheme);
        assert_eq!(back.params, q.params);
        assert_eq!(back.codes_i32().unwrap(), q.codes_i32().unwrap());
    }

    /// Files in `dir`, hidden ones included, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_killed_writer_s_temporary_file_is_removed_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.svg");
        // PIDs above the kernel's maximum (2^22) never belong to a live process.
        let orphan = dir.path().join(".x.svg.tmp4999999");
        let other = dir.path().join(".y.svg.tmp4999999");
        std::fs::write(&orphan, b"half").unwrap();
        std::fs::write(&other, b"half").unwrap();
        write_atomically(&out, b"<svg/>").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"<svg/>");
        assert!(!orphan.exists(), "the orphan of a dead process stays");
        assert!(other.exists(), "another file's temporary was removed");
    }

    #[test]
    fn failed_writes_name_the_path_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("a_dir")).unwrap();
        std::fs::write(d.join("a_file"), "x").unwrap();
        let before = listing(d);
        let e = format!(
            "{:#}",
            write_atomically(&d.join("a_dir"), b"data").unwrap_err()
        );
        assert!(e.contains("a_dir") && e.contains("directory"), "{e}");
        let e = format!(
            "{:#}",
            write_atomically(&d.join("a_file/sub/out.txt"), b"data").unwrap_err()
        );
        assert!(e.contains("a_file") && e.contains("not a folder"), "{e}");
        // A failure inside the writer removes the temporary file and the new folders.
        let e = write_atomically_with(&d.join("new/deeper/out.txt"), |_| {
            anyhow::bail!("No space left on device")
        })
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("new/deeper/out.txt") && e.contains("No space"),
            "{e}"
        );
        assert_eq!(listing(d), before);
        assert_eq!(listing(&d.join("a_dir")), Vec::<String>::new());
        // Success creates missing folders and replaces files whole.
        write_atomically(&d.join("made/out.txt"), b"one").unwrap();
        write_atomically(&d.join("made/out.txt"), b"two").unwrap();
        assert_eq!(std::fs::read(d.join("made/out.txt")).unwrap(), b"two");
        assert_eq!(listing(&d.join("made")), ["out.txt"]);
        if Path::new("/dev/full").exists() {
            let e = format!(
                "{:#}",
                write_atomically(Path::new("/dev/full"), &[0u8; 1 << 16]).unwrap_err()
            );
            assert!(e.contains("/dev/full") && e.contains("space"), "{e}");
        }
    }

    #[test]
    fn corrupt_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let e = load_qtensor(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
        let missing = load_qtensor(&dir.path().join("nope"), &Device::Cpu).unwrap_err();
        assert!(format!("{missing:#}").contains("nope"));
    }
}
