//! GGUF files (llama.cpp's format): metadata, tensors kept in their GGML types, and the
//! llama architecture's hyper-parameters. Parsing is candle's; this module turns its
//! errors into ones that name the file and the missing key.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor as GgmlTensor;
use candle_core::Device;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// An opened GGUF file: header parsed, tensor data read on demand.
pub struct Gguf {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        super::sniff::ensure_not_dangling(path)?;
        let file = File::open(path).with_context(|| {
            format!(
                "cannot open GGUF file {} (for SmolLM2 run scripts/fetch-smollm2.sh)",
                path.display()
            )
        })?;
        super::gguf_check::check_file(path)
            .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a readable GGUF file ({e}); re-download it",
                path.display()
            )
        })?;
        Ok(Gguf {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .with_context(|| format!("GGUF {} has no metadata key '{key}'", self.path.display()))
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    /// An integer of any GGUF width.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => bail!(
                "GGUF {}: '{key}' should be a non-negative integer, found {other:?}",
                self.path.display()
            ),
        };
        Ok(n as usize)
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            _ => Ok(self.usize(key)? as f64),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.content.metadata.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => bail!(
                "GGUF {}: '{key}' should be a bool, found {other:?}",
                self.path.display()
            ),
        }
    }

    pub fn string(&self, key: &str) -> Result<String> {
        match self.value(key)? {
            Value::String(s) => Ok(s.clone()),
            other => bail!(
                "GGUF {}: '{key}' should be a string, found {other:?}",
                self.path.display()
            ),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        let arr = match self.value(key)? {
            Value::Array(a) => a,
            other => bail!(
                "GGUF {}: '{key}' should be an array, found {:?}",
                self.path.display(),
                other.value_type()
            ),
        };
        arr.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => bail!(
                    "GGUF {}: '{key}' should hold strings, found {:?}",
                    self.path.display(),
                    other.value_type()
                ),
            })
            .collect()
    }

    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let arr = match self.value(key)? {
            Value::Array(a) => a,
            _ => bail!("GGUF {}: '{key}' should be an array", self.path.display()),
        };
        arr.iter()
            .map(|v| match v {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                Value::U8(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                other => bail!(
                    "GGUF {}: '{key}' should hold integers, found {:?}",
                    self.path.display(),
                    other.value_type()
                ),
            })
            .collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor in its stored GGML type.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<GgmlTensor> {
        if !self.has_tensor(name) {
            bail!(
                "GGUF {} has no tensor '{name}' (is it a llama-architecture file?)",
                self.path.display()
            );
        }
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| {
                anyhow::anyhow!(
                    "reading tensor '{name}' from {}: {e} (the file looks truncated or corrupt; re-download it)",
                    self.path.display()
                )
            })
    }

    /// Sum of the stored tensor payloads, in bytes.
    pub fn tensor_bytes(&self) -> usize {
        self.content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size())
            .sum()
    }
}

/// GGUF tensors under their GGUF names (`blk.0.attn_q.weight`); renaming from other
/// conventions is the model's business.
impl super::TensorSource for Gguf {
    fn origin(&self) -> String {
        self.path.display().to_string()
    }

    fn has(&self, name: &str) -> bool {
        self.has_tensor(name)
    }

    fn tensor(&mut self, name: &str, device: &Device) -> Result<candle_core::Tensor> {
        let q = Gguf::tensor(self, name, device)?;
        super::checked_f32(name, &self.origin(), q.dequantize(device)?)
    }

    fn ggml(&mut self, name: &str, device: &Device) -> Result<Option<GgmlTensor>> {
        Gguf::tensor(self, name, device).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_corrupt_files_are_clear_errors() {
        let e = Gguf::open(Path::new("/nonexistent/m.gguf"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/m.gguf"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00garbage").unwrap();
        let e = Gguf::open(&p).err().unwrap().to_string();
        assert!(e.contains("bad.gguf") && e.contains("GGUF"), "{e}");
    }

    #[test]
    fn reads_metadata_and_tensors_written_by_candle() {
        use candle_core::quantized::{gguf_file, GgmlDType};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let w = candle_core::Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let q = GgmlTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let arch = Value::String("llama".into());
        let n = Value::U32(7);
        let toks = Value::Array(vec![Value::String("a".into()), Value::String("b".into())]);
        let mut f = File::create(&p).unwrap();
        gguf_file::write(
            &mut f,
            &[
                ("general.architecture", &arch),
                ("llama.block_count", &n),
                ("tokenizer.ggml.tokens", &toks),
            ],
            &[("w", &q)],
        )
        .unwrap();
        drop(f);
        let mut g = Gguf::open(&p).unwrap();
        assert_eq!(g.string("general.architecture").unwrap(), "llama");
        assert_eq!(g.usize("llama.block_count").unwrap(), 7);
        assert_eq!(g.strings("tokenizer.ggml.tokens").unwrap(), ["a", "b"]);
        assert!(g.bool_or("absent", true).unwrap());
        let e = g.usize("absent").unwrap_err().to_string();
        assert!(e.contains("absent"), "{e}");
        let t = g.tensor("w", &Device::Cpu).unwrap();
        assert_eq!(t.shape().dims(), [2, 32]);
        let back = t
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Q8_0: 32-element blocks scaled by max|x|/127, so error ≤ half a step.
        assert!((back[1][31] - 63.0).abs() < 63.0 / 127.0);
        assert!(g.tensor("nope", &Device::Cpu).is_err());
    }
}
