//! Named tensors from checkpoint files, whatever the file format: one trait for
//! safetensors (single or sharded, memory-mapped), PyTorch `pytorch_model.bin` and GGUF, so
//! models are built the same way from each. Float tensors come out as f32 and are refused
//! when they hold NaN or infinite values; quantized payloads come out as raw bytes.

use anyhow::{bail, Context, Result};
use candle_core::quantized::QTensor as GgmlTensor;
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// A tensor as it is serialized: element type, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// A raw tensor with the name it is stored under.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: RawTensor,
}

impl RawTensor {
    pub fn new(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        RawTensor {
            dtype,
            shape,
            bytes,
        }
    }

    pub fn f32s(v: &[f32]) -> Self {
        Self::new(
            Dtype::F32,
            vec![v.len()],
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    pub fn u8s(v: Vec<u8>) -> Self {
        Self::new(Dtype::U8, vec![v.len()], v)
    }

    pub fn with_shape(mut self, shape: Vec<usize>) -> Self {
        self.shape = shape;
        self
    }

    /// Elements the shape holds.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn expect(&self, what: &str, dtype: Dtype, numel: usize) -> Result<()> {
        if self.dtype != dtype {
            bail!("{what} is stored as {:?}, expected {dtype:?}", self.dtype);
        }
        if self.numel() != numel || self.bytes.len() != numel * dtype.bitsize() / 8 {
            bail!(
                "{what} has {} elements ({} bytes), expected {numel}",
                self.numel(),
                self.bytes.len()
            );
        }
        Ok(())
    }

    /// The values as f32, checked to be `numel` F32 elements.
    pub fn to_f32(&self, what: &str, numel: usize) -> Result<Vec<f32>> {
        self.expect(what, Dtype::F32, numel)?;
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// The bytes, checked to be `numel` elements of `dtype` (one byte each).
    pub fn to_bytes(&self, what: &str, dtype: Dtype, numel: usize) -> Result<Vec<u8>> {
        self.expect(what, dtype, numel)?;
        Ok(self.bytes.clone())
    }
}

/// Where a model's tensors come from.
pub trait TensorSource {
    /// The file or folder, for error messages.
    fn origin(&self) -> String;
    fn has(&self, name: &str) -> bool;
    /// A float tensor as f32 on `device`, refused if it holds NaN or infinite values.
    fn tensor(&mut self, name: &str, device: &Device) -> Result<Tensor>;
    /// A tensor's stored bytes (quantized payloads: codes, scales, zero points).
    fn raw(&mut self, name: &str) -> Result<RawTensor> {
        bail!("{} cannot give tensor '{name}' as raw bytes", self.origin())
    }
    /// A GGML block-quantized tensor kept in its type; `None` for sources that hold none.
    fn ggml(&mut self, _name: &str, _device: &Device) -> Result<Option<GgmlTensor>> {
        Ok(None)
    }
    /// String metadata stored with the tensors (safetensors' `__metadata__`).
    fn metadata(&self) -> Option<&HashMap<String, String>> {
        None
    }
    /// A metadata value that holds a JSON object, parsed once when the file was opened;
    /// `None` when absent or not valid JSON.
    fn metadata_json(&self, _key: &str) -> Option<&serde_json::Value> {
        None
    }
}

/// Converts to f32 and refuses NaN or infinite values, naming the tensor and the file.
/// Only float tensors are weights: an integer tensor where a float one belongs is refused,
/// never cast by value (an F32 payload mislabelled I32 would otherwise load as garbage).
pub fn checked_f32(name: &str, origin: &str, t: Tensor) -> Result<Tensor> {
    if !t.dtype().is_float() {
        bail!(
            "tensor '{name}' in {origin} is stored as {:?}, not a float type: weights must be F32, F16, BF16 or F64 (the file is mislabelled or not a checkpoint of this model)",
            t.dtype()
        );
    }
    let t = t.to_dtype(DType::F32)?;
    if !crate::quant::uniform::all_finite(&t)? {
        bail!(
            "tensor '{name}' in {origin} holds NaN or infinite values: the checkpoint is corrupt"
        );
    }
    Ok(t)
}

/// Refuses NaN or infinite values read from a file, naming what they are.
pub fn ensure_finite_values(v: &[f32], what: &str) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!("{what} holds a NaN or infinite value at element {i}: the checkpoint is corrupt");
    }
    Ok(())
}

/// One tensor of a safetensors file, as f32 (`quantize --input FILE --tensor NAME`). A file
/// of another kind is named as such, with what to pass instead; a missing tensor lists the
/// ones the file has.
pub fn read_input_tensor(path: &Path, name: &str) -> Result<Tensor> {
    use super::sniff::{kind_of_file, FileKind};
    super::sniff::ensure_not_dangling(path)?;
    match kind_of_file(path) {
        Some(FileKind::Gguf) => bail!(
            "{} is a GGUF file; --input reads one tensor from a safetensors file. To quantize a GGUF model whole, pass it as --model {} with --plan and --out",
            path.display(),
            path.display()
        ),
        Some(FileKind::Safetensors) | None => {}
        Some(other) => bail!(
            "{} is {}, not a safetensors file; --input needs a .safetensors file",
            path.display(),
            other.describe()
        ),
    }
    let mut src = SafetensorsSource::open(&[path.to_path_buf()])?;
    if !src.has(name) {
        let mut names: Vec<&String> = src.names.iter().collect();
        names.sort();
        let shown: Vec<&str> = names.iter().take(20).map(|s| s.as_str()).collect();
        bail!(
            "no tensor '{name}' in {}; it has: {}{}",
            path.display(),
            shown.join(", "),
            if names.len() > 20 { ", ..." } else { "" }
        );
    }
    src.tensor(name, &Device::Cpu)
}

/// Safetensors files (one, or the shards of an index), memory-mapped.
pub struct SafetensorsSource {
    files: Vec<PathBuf>,
    st: candle_core::safetensors::MmapedSafetensors,
    names: HashSet<String>,
    metadata: Option<HashMap<String, String>>,
    json: HashMap<String, serde_json::Value>,
}

impl SafetensorsSource {
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        // SAFETY: the files are memory-mapped read-only and not modified while loaded.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(|e| {
                anyhow::anyhow!("opening {}: {e} (re-download or re-write it)", show(files))
            })?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        let metadata = match files {
            [one] => read_safetensors_metadata(one)?,
            _ => None,
        };
        let json = metadata
            .iter()
            .flatten()
            .filter(|(_, v)| v.starts_with('{'))
            .filter_map(|(k, v)| Some((k.clone(), serde_json::from_str(v).ok()?)))
            .collect();
        Ok(Self {
            files: files.to_vec(),
            st,
            names,
            metadata,
            json,
        })
    }
}

fn show(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `__metadata__` map of a safetensors file's header.
pub fn read_safetensors_metadata(path: &Path) -> Result<Option<HashMap<String, String>>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{} is too short for a safetensors header", path.display()))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata()?.len();
    if n > size.saturating_sub(8) || n > 100 << 20 {
        bail!(
            "{}: safetensors header of {n} bytes does not fit the file ({size} bytes)",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: the safetensors header is not JSON", path.display()))?;
    Ok(v.get("__metadata__").and_then(|m| m.as_object()).map(|m| {
        m.iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect()
    }))
}

impl TensorSource for SafetensorsSource {
    fn origin(&self) -> String {
        show(&self.files)
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn tensor(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        if !self.has(name) {
            bail!("tensor '{name}' is missing from {}", self.origin());
        }
        let t = self
            .st
            .load(name, device)
            .map_err(|e| anyhow::anyhow!("loading tensor '{name}' from {}: {e}", self.origin()))?;
        checked_f32(name, &self.origin(), t)
    }

    fn raw(&mut self, name: &str) -> Result<RawTensor> {
        if !self.has(name) {
            bail!("tensor '{name}' is missing from {}", self.origin());
        }
        let v = self
            .st
            .get(name)
            .map_err(|e| anyhow::anyhow!("reading tensor '{name}' from {}: {e}", self.origin()))?;
        Ok(RawTensor::new(
            v.dtype(),
            v.shape().to_vec(),
            v.data().to_vec(),
        ))
    }

    fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    fn metadata_json(&self, key: &str) -> Option<&serde_json::Value> {
        self.json.get(key)
    }
}

/// A PyTorch `pytorch_model.bin` (read whole, through candle's pickle reader).
pub struct PickleSource {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl PickleSource {
    pub fn open(path: &Path) -> Result<Self> {
        super::sniff::ensure_not_dangling(path)?;
        Self::check_sizes(path)?;
        let tensors = pickle_guard(path, || candle_core::pickle::read_all(path))
            .map_err(|e| {
                anyhow::anyhow!(
                    "reading {}: {e} (re-download the checkpoint)",
                    path.display()
                )
            })?
            .into_iter()
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }
}

/// Runs candle's pickle reader, turning a panic on a corrupt file (its opcode parser does
/// unchecked arithmetic on values from the file) into an error naming the file.
fn pickle_guard<T>(
    path: &Path,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(candle_core::Error::Msg(format!(
            "the pickle reader failed on {}",
            path.display()
        )))
    })
}

impl PickleSource {
    /// Refuses a checkpoint whose pickle describes a tensor larger than the file before
    /// candle allocates it: PyTorch stores tensor data uncompressed in the zip, so every
    /// tensor's bytes (from its storage offset on) lie within the file.
    fn check_sizes(path: &Path) -> Result<()> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let infos = pickle_guard(path, || {
            candle_core::pickle::read_pth_tensor_info(path, false, None)
        })
        .map_err(|e| {
            anyhow::anyhow!(
                "reading {}: {e} (not a PyTorch checkpoint, or a corrupt one: re-download it)",
                path.display()
            )
        })?;
        for t in infos {
            let need = t
                .layout
                .dims()
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|e| e.checked_add(t.layout.start_offset()))
                .and_then(|e| e.checked_mul(t.dtype.size_in_bytes()));
            if need.is_none_or(|n| n as u64 > len) {
                bail!(
                    "{}: tensor '{}' ({:?}, shape {:?}) needs more bytes than the file's {len}: the checkpoint is corrupt",
                    path.display(),
                    t.name,
                    t.dtype,
                    t.layout.dims()
                );
            }
        }
        Ok(())
    }
}

impl TensorSource for PickleSource {
    fn origin(&self) -> String {
        self.path.display().to_string()
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn tensor(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("tensor '{name}' is missing from {}", self.origin()))?
            .to_device(device)?;
        checked_f32(name, &self.origin(), t)
    }
}

/// Writes tensors and string metadata as one safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: HashMap<String, String>,
) -> Result<u64> {
    let mut seen = HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            bail!(
                "tensor '{}' would be written twice to {}",
                t.name,
                path.display()
            );
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            let r = &t.tensor;
            Ok((
                t.name.clone(),
                safetensors::tensor::TensorView::new(r.dtype, r.shape.clone(), &r.bytes)
                    .with_context(|| format!("tensor '{}'", t.name))?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))?;
    crate::quant::io::write_atomically(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// The f32 bytes of a tensor, for writing.
pub fn raw_f32(t: &Tensor) -> Result<RawTensor> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(RawTensor::f32s(&v).with_shape(t.dims().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_with_metadata_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let tensors = vec![
            NamedTensor {
                name: "a".into(),
                tensor: RawTensor::f32s(&[1.0, -2.5, 3.0, 4.0]).with_shape(vec![2, 2]),
            },
            NamedTensor {
                name: "codes".into(),
                tensor: RawTensor::u8s(vec![7, 8, 9]),
            },
            NamedTensor {
                name: "bad".into(),
                tensor: RawTensor::f32s(&[1.0, f32::NAN]),
            },
        ];
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&path, &tensors, meta).unwrap();
        let mut src = SafetensorsSource::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(src.metadata().unwrap()["k"], "v");
        let a = src.tensor("a", &Device::Cpu).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), [[1.0, -2.5], [3.0, 4.0]]);
        assert_eq!(src.raw("codes").unwrap(), tensors[1].tensor);
        let e = src.tensor("bad", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("'bad'") && e.contains("NaN"), "{e}");
        let e = src.tensor("nope", &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("'nope'") && e.contains("missing"), "{e}");
        let r = src.raw("codes").unwrap();
        assert!(r.to_f32("codes", 3).is_err());
        assert!(r.to_bytes("codes", Dtype::U8, 4).is_err());
        assert_eq!(r.to_bytes("codes", Dtype::U8, 3).unwrap(), [7, 8, 9]);
        let dup = vec![tensors[1].clone(), tensors[1].clone()];
        assert!(write_safetensors(&dir.path().join("d"), &dup, HashMap::new()).is_err());
        assert!(!dir.path().join("d").exists());
    }
}
