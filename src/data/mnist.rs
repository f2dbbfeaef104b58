//! MNIST from IDX files (optionally gzip-compressed), with clear errors for corrupt or
//! truncated files.

use super::DataDir;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::Path;

/// Images scaled to [0, 1] then normalised with the usual MNIST mean and std
/// (torchvision `Normalize((0.1307,), (0.3081,))`, as the lab does).
pub const MEAN: f32 = 0.1307;
pub const STD: f32 = 0.3081;

#[derive(Debug, Clone)]
pub struct MnistSplit {
    /// `[n, 784]` f32, normalised.
    pub images: Tensor,
    /// `[n]` u32 labels 0..9.
    pub labels: Tensor,
}

impl MnistSplit {
    pub fn len(&self) -> usize {
        self.labels.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: MnistSplit,
    pub test: MnistSplit,
}

/// Largest IDX file read, compressed or not: 256 MiB (MNIST's training images are 47 MB).
pub const MAX_IDX_BYTES: u64 = 256 << 20;

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let too_big = || {
        anyhow::anyhow!(
            "{} holds more than the {MAX_IDX_BYTES} bytes accepted for an IDX file",
            path.display()
        )
    };
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut raw = Vec::new();
    f.take(MAX_IDX_BYTES + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading {}", path.display()))?;
    if raw.len() as u64 > MAX_IDX_BYTES {
        return Err(too_big());
    }
    if raw.starts_with(&[0x1f, 0x8b]) {
        // Decompressed output is bounded too (a small gzip can expand without limit).
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .with_context(|| format!("{} is a corrupt or truncated gzip file", path.display()))?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(too_big());
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file: magic (0, 0, type 0x08 = u8, ndim), big-endian dims, then data.
pub fn parse_idx(bytes: &[u8], what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        bail!("{what} is not an IDX file (bad magic number)");
    }
    if bytes[2] != 0x08 {
        bail!(
            "{what} holds IDX type 0x{:02x}; only unsigned bytes (0x08) are supported",
            bytes[2]
        );
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        bail!("{what} is truncated inside its header");
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(bytes.len() - header) {
        bail!(
            "{what} declares shape {dims:?} ({} bytes of data) but holds {} bytes: the file is truncated or corrupt",
            n.map_or("more than 2^64".to_string(), |n| n.to_string()),
            bytes.len() - header
        );
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn load_split(dir: &Path, images: &str, labels: &str, device: &Device) -> Result<MnistSplit> {
    let find = |stem: &str| -> Result<std::path::PathBuf> {
        for name in [format!("{stem}.gz"), stem.to_string()] {
            let p = dir.join(&name);
            if p.exists() {
                return Ok(p);
            }
        }
        bail!(
            "missing MNIST file {}(.gz): put the IDX files in {} (see shared/data/README.md) or point --data-dir elsewhere",
            dir.join(stem).display(),
            dir.display()
        )
    };
    let ip = find(images)?;
    let lp = find(labels)?;
    let (idims, ibytes) = parse_idx(&read_maybe_gz(&ip)?, &ip.display().to_string())?;
    let (ldims, lbytes) = parse_idx(&read_maybe_gz(&lp)?, &lp.display().to_string())?;
    if idims.len() != 3 || idims[1] != 28 || idims[2] != 28 {
        bail!(
            "{} has shape {idims:?}; MNIST images are [n, 28, 28]",
            ip.display()
        );
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        bail!(
            "{} has {ldims:?} labels for {} images",
            lp.display(),
            idims[0]
        );
    }
    if idims[0] == 0 {
        bail!("{} holds no images", ip.display());
    }
    if let Some(bad) = lbytes.iter().find(|&&l| l > 9) {
        bail!("{} holds label {bad}; MNIST labels are 0..9", lp.display());
    }
    let n = idims[0];
    let pixels: Vec<f32> = ibytes
        .iter()
        .map(|&p| (p as f32 / 255.0 - MEAN) / STD)
        .collect();
    let labels: Vec<u32> = lbytes.iter().map(|&l| l as u32).collect();
    Ok(MnistSplit {
        images: Tensor::from_vec(pixels, (n, 784), device)?,
        labels: Tensor::from_vec(labels, n, device)?,
    })
}

/// Loads `mnist/` from the data folder.
pub fn load(data: &DataDir, device: &Device) -> Result<Mnist> {
    let dir = data.require("mnist", "MNIST IDX files are expected in <data-dir>/mnist")?;
    Ok(Mnist {
        train: load_split(
            &dir,
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            device,
        )?,
        test: load_split(
            &dir,
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
            device,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let mut ok = vec![0, 0, 8, 1, 0, 0, 0, 3];
        ok.extend([1, 2, 3]);
        assert_eq!(parse_idx(&ok, "t").unwrap(), (vec![3], vec![1, 2, 3]));
        let truncated = &ok[..ok.len() - 1];
        assert!(parse_idx(truncated, "t")
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(parse_idx(&[1, 2, 3, 4], "t").is_err());
        assert!(parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 0], "t").is_err());
    }

    #[test]
    fn loads_the_shared_files() {
        let data = DataDir::resolve(None).expect("needs ../shared/data");
        let m = load(&data, &Device::Cpu).unwrap();
        assert_eq!(m.test.len(), 10_000);
        assert_eq!(m.train.len(), 5_000);
        assert_eq!(m.test.images.dims(), &[10_000, 784]);
    }
}
