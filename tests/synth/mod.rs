//! Small synthetic model files built byte by byte for the bad-input tests and the reader
//! fuzzer: a working tiny llama GGUF (with a byte-level BPE vocabulary), a safetensors
//! file, a SentencePiece model, an IDX array and a MarianMT folder. Built here rather than
//! read from disk so the tests run where no model is present (CI).
#![allow(dead_code)]

use std::path::Path;

/// A GGUF metadata value (the subset the tests need).
#[derive(Clone, Debug)]
pub enum Meta {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

impl Meta {
    fn type_id(&self) -> u32 {
        match self {
            Meta::U32(_) => 4,
            Meta::I32(_) => 5,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Strs(_) | Meta::I32s(_) => 9,
            Meta::U64(_) => 10,
        }
    }
}

/// A tensor to write: GGUF dims (fastest first), GGML type id, payload.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    /// Written instead of the real offset (to corrupt it).
    pub offset_override: Option<u64>,
}

/// A GGUF file to write.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: Vec<(String, Meta)>,
    pub tensors: Vec<GgufTensor>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Gguf {
    pub fn set(&mut self, key: &str, v: Meta) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = v,
            None => self.metadata.push((key.to_string(), v)),
        }
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut GgufTensor {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }

    /// The file's bytes (32-byte alignment).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            match v {
                Meta::U32(x) => out.extend(x.to_le_bytes()),
                Meta::I32(x) => out.extend(x.to_le_bytes()),
                Meta::U64(x) => out.extend(x.to_le_bytes()),
                Meta::F32(x) => out.extend(x.to_le_bytes()),
                Meta::Bool(b) => out.push(*b as u8),
                Meta::Str(s) => put_str(&mut out, s),
                Meta::Strs(a) => {
                    out.extend(8u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for s in a {
                        put_str(&mut out, s);
                    }
                }
                Meta::I32s(a) => {
                    out.extend(5u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        out.extend(x.to_le_bytes());
                    }
                }
            }
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(t.offset_override.unwrap_or(offset).to_le_bytes());
            offsets.push(offset);
            offset += (t.data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        let start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend(&t.data);
        }
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}

/// Deterministic small f32 values as little-endian bytes.
pub fn f32_bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = (s % 2001) as f32 / 1000.0 - 1.0;
            (x * 0.5).to_le_bytes()
        })
        .collect()
}

/// Byte-level BPE tokens of the tiny llama (GPT-2 maps a space to 'Ġ').
pub const TOKENS: [&str; 8] = ["<s>", "</s>", "a", "b", "c", "Ġ", "ab", "Ġa"];
pub const MERGES: [&str; 2] = ["a b", "Ġ a"];
pub const HIDDEN: u64 = 8;
pub const FFN: u64 = 16;
pub const CONTEXT: u32 = 16;

/// A working llama GGUF: 1 block, hidden 8, 2 heads of 4, ffn 16, 8 tokens, context 16,
/// tied output, all F32.
pub fn tiny_llama() -> Gguf {
    let vocab = TOKENS.len() as u64;
    let s = |x: &str| Meta::Str(x.to_string());
    let metadata = vec![
        ("general.architecture".to_string(), s("llama")),
        ("llama.block_count".into(), Meta::U32(1)),
        ("llama.context_length".into(), Meta::U32(CONTEXT)),
        ("llama.embedding_length".into(), Meta::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Meta::U32(FFN as u32)),
        ("llama.attention.head_count".into(), Meta::U32(2)),
        ("llama.attention.head_count_kv".into(), Meta::U32(2)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Meta::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Meta::F32(10000.0)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("default")),
        (
            "tokenizer.ggml.tokens".into(),
            Meta::Strs(TOKENS.iter().map(|t| t.to_string()).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Meta::I32s(vec![3, 3, 1, 1, 1, 1, 1, 1]),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Meta::Strs(MERGES.iter().map(|t| t.to_string()).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Meta::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true)),
    ];
    let mut tensors = Vec::new();
    let mut seed = 1;
    let mut add = |name: &str, dims: Vec<u64>, norm: bool| {
        let n: u64 = dims.iter().product();
        let data = if norm {
            1f32.to_le_bytes().repeat(n as usize)
        } else {
            seed += 1;
            f32_bytes(n as usize, seed)
        };
        tensors.push(GgufTensor {
            name: name.to_string(),
            dims,
            ty: 0,
            data,
            offset_override: None,
        });
    };
    add("token_embd.weight", vec![HIDDEN, vocab], false);
    add("blk.0.attn_norm.weight", vec![HIDDEN], true);
    for n in ["attn_q", "attn_k", "attn_v", "attn_output"] {
        add(&format!("blk.0.{n}.weight"), vec![HIDDEN, HIDDEN], false);
    }
    add("blk.0.ffn_norm.weight", vec![HIDDEN], true);
    add("blk.0.ffn_gate.weight", vec![HIDDEN, FFN], false);
    add("blk.0.ffn_up.weight", vec![HIDDEN, FFN], false);
    add("blk.0.ffn_down.weight", vec![FFN, HIDDEN], false);
    add("output_norm.weight", vec![HIDDEN], true);
    Gguf {
        version: 3,
        metadata,
        tensors,
    }
}

/// A safetensors file: `(name, dtype, shape, payload)` in order, plus optional metadata.
pub fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + data.len()],
            }),
        );
        offset += data.len();
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, _, _, d) in tensors {
        out.extend(d);
    }
    out
}

/// A protobuf field (short payloads only: one-byte lengths).
fn field(num: u32, wire: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![((num << 3) | wire as u32) as u8];
    if wire == 2 {
        assert!(payload.len() < 128);
        out.push(payload.len() as u8);
    }
    out.extend_from_slice(payload);
    out
}

fn piece(text: &str, score: f32, kind: u8) -> Vec<u8> {
    let mut p = field(1, 2, text.as_bytes());
    p.extend(field(2, 5, &score.to_le_bytes()));
    p.extend(field(3, 0, &[kind]));
    field(1, 2, &p)
}

/// Pieces of the synthetic SentencePiece model and the Marian vocab.json built on it.
pub const SPM_PIECES: [(&str, f32); 5] = [
    ("▁", -2.0),
    ("▁a", -1.0),
    ("b", -1.5),
    ("▁b", -1.2),
    ("c", -3.0),
];

/// A unigram SentencePiece model: `<unk>`, `</s>` and [`SPM_PIECES`].
pub fn spm() -> Vec<u8> {
    let mut m = piece("<unk>", 0.0, 2);
    m.extend(piece("</s>", 0.0, 3));
    for (t, s) in SPM_PIECES {
        m.extend(piece(t, s, 1));
    }
    m
}

/// An IDX file of unsigned bytes with the given dims.
pub fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    out
}

/// A complete MarianMT folder in `dir`: tests/fixtures/marian-tiny's config and weights
/// (vocabulary 40, pad/decoder start 39, 32 positions) with a synthetic tokenizer.
pub fn marian_dir(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/marian-tiny");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "generation_config.json", "pytorch_model.bin"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("source.spm"), spm()).unwrap();
    std::fs::write(dir.join("target.spm"), spm()).unwrap();
    let mut vocab = serde_json::Map::new();
    vocab.insert("</s>".into(), 0.into());
    vocab.insert("<unk>".into(), 1.into());
    for (i, (t, _)) in SPM_PIECES.iter().enumerate() {
        vocab.insert(t.to_string(), (i + 2).into());
    }
    vocab.insert("<pad>".into(), 39.into());
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::Value::Object(vocab).to_string(),
    )
    .unwrap();
}

/// Edits a JSON file in place.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}
