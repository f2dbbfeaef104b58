//! A bounded walk over a GGUF header before candle parses it, so that a corrupt or hostile
//! file is refused with a message that names the field, and no size read from the file is
//! allocated before it is checked against the bytes that are left.
//!
//! Checked: the magic and version (2 and 3; version 1 and big-endian files are named as
//! such), every count and length against the remaining bytes, value types, nesting depth,
//! `general.alignment` (a power of two), duplicate keys and tensor names, each tensor's rank,
//! dimensions (none 0, element count in checked arithmetic), GGML type, that its first dimension
//! is a whole number of blocks, that its offset is aligned, and that its data lies inside
//! the file and overlaps no other tensor's.

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use std::collections::HashSet;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// GGUF's default alignment of tensor data.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a GGML tensor has (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays accepted (llama.cpp writes none deeper than 1).
const MAX_DEPTH: usize = 8;
/// Longest metadata key or tensor name, in bytes (llama.cpp names are < 64 bytes).
const MAX_NAME: u64 = 1 << 16;

/// The GGML types candle reads, by their GGUF type id.
pub fn ggml_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A header that passed the checks: what the loader needs beyond candle's parse.
#[derive(Debug, Clone)]
pub struct HeaderSummary {
    pub version: u32,
    pub tensor_count: u64,
    pub metadata_count: u64,
    /// Where tensor data starts.
    pub data_offset: u64,
    /// Sum of the tensors' data, in bytes.
    pub tensor_bytes: u64,
}

/// Reads with a position and the file's length, so every length is checked before use.
struct Walker<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Walker<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        if self.left() < N as u64 {
            bail!(
                "the file ends at byte {} inside {what} (truncated)",
                self.len
            );
        }
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.left() {
            bail!(
                "{what} of {n} bytes runs past the end of the file ({} bytes left at byte {})",
                self.left(),
                self.pos
            );
        }
        if n <= 1 << 16 {
            // Short skips (most strings) go through the reader's buffer: a seek would
            // drop it and cost two system calls per string.
            let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())?;
            if copied != n {
                bail!("the file ends inside {what}");
            }
        } else {
            self.r.seek(SeekFrom::Current(i64::try_from(n)?))?;
        }
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed string, kept (keys and names: bounded by [`MAX_NAME`]).
    fn name(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > MAX_NAME || n > self.left() {
            bail!(
                "{what} claims {n} bytes ({} left in the file, at most {MAX_NAME} accepted): the header is corrupt",
                self.left()
            );
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b)?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Skips one value of GGUF type `ty`; returns it when it is an unsigned integer that fits
    /// in u64 (what `general.alignment` needs).
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Option<u64>> {
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let n = self.u64(key)?;
                self.skip(n, &format!("string value of '{key}'"))?;
                return Ok(None);
            }
            9 => {
                if depth >= MAX_DEPTH {
                    bail!("metadata '{key}' nests arrays deeper than {MAX_DEPTH}");
                }
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                // Each element takes at least one byte (strings and arrays: 8 or 12).
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => bail!("metadata '{key}' is an array of unknown value type {t}"),
                };
                if n.checked_mul(min).is_none_or(|b| b > self.left()) {
                    bail!(
                        "metadata '{key}' claims {n} array elements, more than the {} bytes left in the file hold",
                        self.left()
                    );
                }
                if matches!(elem, 8 | 9) {
                    for _ in 0..n {
                        self.value(elem, key, depth + 1)?;
                    }
                } else {
                    self.skip(n * min, &format!("array '{key}'"))?;
                }
                return Ok(None);
            }
            t => bail!("metadata '{key}' has unknown value type {t}"),
        };
        let raw = match size {
            1 => self.bytes::<1>(key)?[0] as u64,
            2 => u16::from_le_bytes(self.bytes(key)?) as u64,
            4 => u32::from_le_bytes(self.bytes(key)?) as u64,
            _ => self.u64(key)?,
        };
        // Unsigned types candle also reads the alignment from: u8, u16, u32 (the spec's).
        Ok(matches!(ty, 0 | 2 | 4).then_some(raw))
    }
}

/// Walks the header of the GGUF file at `path` and checks it (see the module doc).
pub fn check_file(path: &Path) -> Result<HeaderSummary> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    check(BufReader::new(f), len)
}

/// [`check_file`] over any reader of `len` bytes, positioned at the start.
pub fn check<R: Read + Seek>(r: R, len: u64) -> Result<HeaderSummary> {
    let mut w = Walker { r, pos: 0, len };
    let magic = w.bytes::<4>("the magic number")?;
    match &magic {
        b"GGUF" => {}
        b"FUGG" => bail!("this is a big-endian GGUF file; only little-endian files are supported"),
        _ => bail!(
            "it does not start with the GGUF magic number (found {}, it is {})",
            hex(&magic),
            super::sniff::kind_of_bytes(&magic).describe()
        ),
    }
    let version = w.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => bail!(
            "GGUF version 1 is not supported (2 and 3 are); convert it with a current llama.cpp"
        ),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => bail!(
            "this GGUF file is big-endian (version {}); only little-endian files are supported",
            v.swap_bytes()
        ),
        v => bail!("GGUF version {v} is not supported (2 and 3 are)"),
    }
    let tensor_count = w.u64("the tensor count")?;
    let metadata_count = w.u64("the metadata count")?;
    // A metadata entry takes at least 13 bytes, a tensor description at least 24.
    let need = metadata_count
        .checked_mul(13)
        .and_then(|m| tensor_count.checked_mul(24).and_then(|t| t.checked_add(m)));
    if need.is_none_or(|n| n > w.left()) {
        bail!(
            "the header declares {tensor_count} tensors and {metadata_count} metadata entries, more than the {} bytes of the file can hold: the header is corrupt",
            w.len
        );
    }
    let mut keys = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..metadata_count {
        let key = w.name(&format!("metadata key #{i}"))?;
        let ty = w.u32(&key)?;
        let v = w.value(ty, &key, 0)?;
        if key == "general.alignment" {
            alignment = match v {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => bail!(
                    "metadata 'general.alignment' must be an unsigned power of two up to 2^20, found {v:?} (type {ty})"
                ),
            };
        }
        if !keys.insert(key.clone()) {
            bail!("metadata key '{key}' appears twice");
        }
    }
    struct Info {
        name: String,
        offset: u64,
        bytes: u64,
    }
    let mut infos = Vec::with_capacity(tensor_count.min(1 << 20) as usize);
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let name = w.name(&format!("the name of tensor #{i}"))?;
        let rank = w.u32(&name)?;
        if rank == 0 || rank > MAX_DIMS {
            bail!("tensor '{name}' has {rank} dimensions (1 to {MAX_DIMS} are allowed)");
        }
        let mut dims = Vec::with_capacity(rank as usize);
        for _ in 0..rank {
            dims.push(w.u64(&name)?);
        }
        let ty = w.u32(&name)?;
        let offset = w.u64(&name)?;
        let dtype = ggml_type(ty).ok_or_else(|| {
            anyhow::anyhow!("tensor '{name}' has GGML type {ty}, which this build cannot read")
        })?;
        // An empty tensor describes no weights (and candle cannot read one safely).
        if dims.contains(&0) {
            bail!("tensor '{name}' has dimensions {dims:?}: a dimension of 0 holds no weights");
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 40);
        let Some(elems) = elems else {
            bail!("tensor '{name}' has dimensions {dims:?}: more than 2^40 elements");
        };
        let (block, size) = (dtype.block_size() as u64, dtype.type_size() as u64);
        if dims[0] % block != 0 {
            bail!(
                "tensor '{name}' ({dtype:?}) has rows of {} elements, not a multiple of its {block}-element blocks",
                dims[0]
            );
        }
        let bytes = elems / block * size;
        if offset % alignment != 0 {
            bail!(
                "tensor '{name}' has data offset {offset}, not a multiple of the alignment {alignment}: the file is corrupt"
            );
        }
        if !names.insert(name.clone()) {
            bail!("tensor '{name}' appears twice");
        }
        infos.push(Info {
            name,
            offset,
            bytes,
        });
    }
    let data_offset = w.pos.div_ceil(alignment) * alignment;
    let data_len = len.saturating_sub(data_offset);
    let mut total = 0u64;
    for t in &infos {
        let end = t.offset.checked_add(t.bytes);
        if end.is_none_or(|e| e > data_len) {
            bail!(
                "tensor '{}' needs {} bytes at data offset {} (file byte {}), past the end of the file ({len} bytes): the file is truncated or its offset is corrupt",
                t.name,
                t.bytes,
                t.offset,
                data_offset.saturating_add(t.offset)
            );
        }
        total += t.bytes;
    }
    infos.sort_by_key(|t| t.offset);
    for pair in infos.windows(2) {
        if pair[0].offset + pair[0].bytes > pair[1].offset {
            bail!(
                "tensors '{}' and '{}' overlap in the file (offsets {} and {}): the file is corrupt",
                pair[0].name,
                pair[1].name,
                pair[0].offset,
                pair[1].offset
            );
        }
    }
    Ok(HeaderSummary {
        version,
        tensor_count,
        metadata_count,
        data_offset,
        tensor_bytes: total,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
