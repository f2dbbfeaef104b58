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

/// Streams into a buffered temporary file next to `path`, syncs it and renames it into
/// place; the temporary file is removed when writing fails. Returns the file's size.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<u64> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let result = (|| -> Result<u64> {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        write(&mut w).with_context(|| format!("writing {}", tmp.display()))?;
        w.flush()
            .with_context(|| format!("writing {}", tmp.display()))?;
        let file = w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("writing {}: {}", tmp.display(), e.error()))?;
        file.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        let bytes = file.metadata()?.len();
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving {} into place", path.display()))?;
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
