//! A Llama-family decoder (SmolLM, SmolLM2, Llama 2/3 configs: GQA, tied embeddings, rope
//! theta and scaling) whose every linear layer is a [`QLinear`], so one plan quantizes it.
//! Layers are named as in Hugging Face checkpoints (`model.layers.3.mlp.down_proj`,
//! `lm_head`) whichever file they came from.

use crate::load::gguf::Gguf;
use crate::load::{SafetensorsSource, TensorSource};
use crate::nn::format::packed_cuda::{self, PackedWeight};
use crate::nn::format::WeightFormat;
use crate::nn::kernels::llm_f32::{self, KvHeads};
use crate::nn::scaling::{GroupMut, Producer, ScaleGroup, ScaleSite};
use crate::nn::{HasLinears, QLinear};
use crate::profile;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

mod fused;
mod partial;
mod staged;

pub use fused::FUSE_ENV;

pub use partial::Stage;

/// Rope frequency scaling from config.json's `rope_parameters` (transformers 5) or
/// `rope_scaling` (earlier).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3's piecewise rescaling of the frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// How q/k features are paired by the rotary embedding: Hugging Face rotates the two
/// halves of each head; GGUF files store q/k permuted for adjacent (interleaved) pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeLayout {
    HalfSplit,
    Interleaved,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Checks the shapes fit together, so a bad config fails here and not inside a matmul.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        for (name, n, max) in [
            ("vocab_size", c.vocab_size, limits::MAX_VOCAB),
            ("hidden_size", c.hidden_size, limits::MAX_WIDTH),
            ("intermediate_size", c.intermediate_size, limits::MAX_FFN),
            ("num_hidden_layers", c.num_hidden_layers, limits::MAX_LAYERS),
            (
                "num_attention_heads",
                c.num_attention_heads,
                limits::MAX_WIDTH,
            ),
            (
                "num_key_value_heads",
                c.num_key_value_heads,
                limits::MAX_WIDTH,
            ),
            ("head_dim", c.head_dim, limits::MAX_WIDTH),
            (
                "max_position_embeddings",
                c.max_position_embeddings,
                limits::MAX_POSITIONS,
            ),
        ] {
            if n == 0 || n > max {
                bail!("llama config: {name} is {n}; a working model needs 1 to {max}");
            }
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0) {
            bail!(
                "llama config: rms_norm_eps {} must be a positive finite number",
                c.rms_norm_eps
            );
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
            bail!(
                "llama config: rope_theta {} must be a positive finite number",
                c.rope_theta
            );
        }
        if c.max_position_embeddings * c.head_dim > limits::MAX_ROPE_TABLE {
            bail!(
                "llama config: max_position_embeddings {} × head_dim {} is more than the {} rotary-table values accepted",
                c.max_position_embeddings,
                c.head_dim,
                limits::MAX_ROPE_TABLE
            );
        }
        if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
            bail!(
                "llama config: {} attention heads are not a multiple of {} key/value heads",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if !c.head_dim.is_multiple_of(2) {
            bail!(
                "llama config: head_dim {} must be even for rope",
                c.head_dim
            );
        }
        Ok(())
    }

    /// A Hugging Face config.json (the older `rope_theta` + `rope_scaling` layout, which
    /// [`Self::from_hf_json`] and transformers both read).
    pub fn to_hf_json(&self) -> Value {
        let scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({ "rope_type": "linear", "factor": factor })
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
        })
    }

    /// From a Hugging Face config.json.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let u = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .with_context(|| format!("config.json: missing integer '{k}'"))
        };
        let heads = u("num_attention_heads")?;
        let hidden = u("hidden_size")?;
        // transformers 5 writes rope settings as one "rope_parameters" object (rope_theta
        // included, rope_type "default" when unscaled); older configs have top-level
        // "rope_theta" and an optional "rope_scaling".
        let rope = match v.get("rope_parameters") {
            Some(p @ Value::Object(_)) => Some(p),
            _ => v.get("rope_scaling").filter(|s| !s.is_null()),
        };
        let rope_scaling = match rope {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let f = |k: &str| s.get(k).and_then(Value::as_f64);
                let factor = || f("factor").context("config.json: rope scaling needs 'factor'");
                match kind {
                    "default" => None,
                    "linear" => Some(RopeScaling::Linear { factor: factor()? }),
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: factor()?,
                        low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: s
                            .get("original_max_position_embeddings")
                            .and_then(Value::as_u64)
                            .unwrap_or(8192)
                            as usize,
                    }),
                    other => bail!(
                        "config.json: rope type '{other}' is not supported (default, linear, llama3)"
                    ),
                }
            }
        };
        let rope_theta = rope
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let cfg = LlamaConfig {
            vocab_size: u("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: u("intermediate_size")?,
            num_hidden_layers: u("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: u("num_key_value_heads").unwrap_or(heads),
            head_dim: match v.get("head_dim").filter(|h| !h.is_null()) {
                Some(_) => u("head_dim")?,
                None if heads > 0 && hidden.is_multiple_of(heads) => hidden / heads,
                None => bail!(
                    "config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads} (and no head_dim is given)"
                ),
            },
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: u("max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// From a GGUF file's `llama.*` metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.string("general.architecture")?;
        if arch != "llama" {
            bail!(
                "GGUF {}: architecture '{arch}' is not supported (only llama)",
                g.path.display()
            );
        }
        // A size that must be positive and bounded, named by its key and the file.
        let size = |key: &str, max: usize| -> Result<usize> {
            let n = g.usize(key)?;
            if n == 0 || n > max {
                bail!(
                    "GGUF {}: metadata '{key}' is {n}; a working model needs 1 to {max}",
                    g.path.display()
                );
            }
            Ok(n)
        };
        let heads = size("llama.attention.head_count", limits::MAX_WIDTH)?;
        let hidden = size("llama.embedding_length", limits::MAX_WIDTH)?;
        let vocab = if g.has("llama.vocab_size") {
            size("llama.vocab_size", limits::MAX_VOCAB)?
        } else {
            let n = g.strings("tokenizer.ggml.tokens")?.len();
            if n == 0 || n > limits::MAX_VOCAB {
                bail!(
                    "GGUF {}: 'tokenizer.ggml.tokens' holds {n} tokens; a working model needs 1 to {}",
                    g.path.display(),
                    limits::MAX_VOCAB
                );
            }
            n
        };
        let head_dim = if g.has("llama.rope.dimension_count") {
            size("llama.rope.dimension_count", limits::MAX_WIDTH)?
        } else {
            if !hidden.is_multiple_of(heads) {
                bail!(
                    "GGUF {}: 'llama.embedding_length' {hidden} is not divisible by 'llama.attention.head_count' {heads} (and no 'llama.rope.dimension_count' gives the head size)",
                    g.path.display()
                );
            }
            hidden / heads
        };
        let float = |key: &str| -> Result<f64> {
            let x = g.f64(key)?;
            if !(x.is_finite() && x > 0.0) {
                bail!(
                    "GGUF {}: metadata '{key}' is {x}; it must be a positive finite number",
                    g.path.display()
                );
            }
            Ok(x)
        };
        let cfg = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: size("llama.feed_forward_length", limits::MAX_FFN)?,
            num_hidden_layers: size("llama.block_count", limits::MAX_LAYERS)?,
            num_attention_heads: heads,
            num_key_value_heads: if g.has("llama.attention.head_count_kv") {
                size("llama.attention.head_count_kv", limits::MAX_WIDTH)?
            } else {
                heads
            },
            head_dim,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: if g.has("llama.rope.freq_base") {
                float("llama.rope.freq_base")?
            } else {
                10000.0
            },
            rope_scaling: None,
            max_position_embeddings: if g.has("llama.context_length") {
                size("llama.context_length", limits::MAX_POSITIONS)?
            } else {
                2048
            },
            tie_word_embeddings: !g.has_tensor("output.weight"),
        };
        cfg.validate()
            .with_context(|| format!("GGUF {}", g.path.display()))?;
        Ok(cfg)
    }

    /// Rotary inverse frequencies, with the configured scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64);
                match &self.rope_scaling {
                    None => f,
                    Some(RopeScaling::Linear { factor }) => f / factor,
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    }) => {
                        let old = *original_max_position_embeddings as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                        if wavelen < high_wl {
                            f
                        } else if wavelen > low_wl {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}

/// Bounds on sizes read from a config.json or GGUF metadata, far above any Llama-family
/// model quantlab runs (Llama 3 405B: hidden 16384, 126 layers, ffn 53248, 128k tokens and
/// positions), so that a corrupt header is refused before it asks for absurd memory.
pub mod limits {
    pub const MAX_WIDTH: usize = 1 << 16;
    pub const MAX_LAYERS: usize = 1024;
    pub const MAX_FFN: usize = 1 << 20;
    pub const MAX_VOCAB: usize = 1 << 24;
    pub const MAX_POSITIONS: usize = 1 << 20;
    /// Values in the rotary cos/sin tables (positions × head_dim): 2^28, 1 GiB per table.
    pub const MAX_ROPE_TABLE: usize = 1 << 28;
}

/// Key in a quantized checkpoint's config.json: the rope layout of its q/k weights
/// (`interleaved` when they came from a GGUF file, whose q/k rows are permuted).
pub const ROPE_LAYOUT_KEY: &str = "quantlab_rope_layout";

/// Forward passes of fewer rows than this (decode steps) run inside a thread-team session
/// (`kernels::team`).
const DECODE_TEAM_ROWS: usize = 8;

/// How weights are materialised when a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadAs {
    /// Keep GGUF weights in their GGML types (as llama.cpp runs them).
    Ggml,
    /// Dequantize everything to f32: the reference model for quantization studies.
    F32,
}

struct Block {
    attn_norm: Tensor,
    q: QLinear,
    k: QLinear,
    v: QLinear,
    o: QLinear,
    ffn_norm: Tensor,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
    /// q/k/v and gate/up stacked for the CPU forward pass (see `fused`).
    qkv_fused: fused::Fusion,
    gate_up_fused: fused::Fusion,
    /// q|k|v and gate|up stacked for one packed decode GEMV each (GPU, weight-only formats).
    qkv_packed: Stacked,
    glu_packed: Stacked,
}

impl Block {
    /// Drops the stacked weights (a layer is about to change).
    fn clear_fused(&mut self) {
        self.qkv_fused.clear();
        self.gate_up_fused.clear();
    }
}

/// Packed weights of layers that read the same input, stacked for one decode launch
/// (`nn::format::packed_cuda`): built on first use and rebuilt when a layer's weight is
/// replaced (a plan applied later), keyed by the weights it was built from.
#[derive(Default)]
struct Stacked(std::sync::Mutex<Option<StackedEntry>>);

type StackedEntry = (Vec<Arc<dyn WeightFormat>>, Option<Arc<PackedWeight>>);

impl Stacked {
    /// The stack of `layers`' packed weights, or `None` where one has none, has a bias,
    /// or their layouts differ.
    fn get(&self, layers: &[&QLinear]) -> Result<Option<Arc<PackedWeight>>> {
        let mut entry = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("stacked decode weights: a thread panicked"))?;
        if let Some((ws, p)) = &*entry {
            let same = ws.len() == layers.len()
                && ws
                    .iter()
                    .zip(layers)
                    .all(|(w, l)| Arc::ptr_eq(w, &l.weight));
            if same {
                return Ok(p.clone());
            }
        }
        let packed: Option<Vec<_>> = layers
            .iter()
            .map(|l| l.bias.is_none().then(|| l.weight.packed_gemv()).flatten())
            .collect();
        let p = match packed {
            Some(parts) => {
                let refs: Vec<&PackedWeight> = parts.iter().map(|p| p.as_ref()).collect();
                PackedWeight::stack(&refs)?.map(Arc::new)
            }
            None => None,
        };
        *entry = Some((layers.iter().map(|l| l.weight.clone()).collect(), p.clone()));
        Ok(p)
    }
}

/// Whether a product of `x` (`[.., k]`) may take the stacked packed GEMV: the fused GPU
/// path, the packed GEMV on, and decode-sized (at most `packed_cuda::DECODE_ROWS` rows).
fn packed_decode(x: &Tensor) -> Result<bool> {
    let k = x.dim(D::Minus1)?;
    Ok(crate::nn::cuda::enabled(x.device())
        && packed_cuda::enabled()
        && k > 0
        && x.elem_count() / k <= packed_cuda::DECODE_ROWS)
}

/// Cached keys and values per layer: on the CPU one growing `[seq, head_dim]` buffer per
/// key/value head (appended to in place), elsewhere tensors `[batch, kv_heads, seq,
/// head_dim]`.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    cpu: Vec<KvHeads>,
    len: usize,
}

impl KvCache {
    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub rope_layout: RopeLayout,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: QLinear,
    cos: Tensor,
    sin: Tensor,
    /// `cos` and `sin` as host tables `[positions, head_dim / 2]` for the CPU path.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    pub device: Device,
    /// Whether the CPU forward pass multiplies q/k/v, and gate/up, as one stacked weight.
    fuse: bool,
}

/// GGUF tensors read under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`).
struct GgufNames<'a>(&'a mut Gguf);

/// The GGUF name of a Hugging Face tensor name ending in `.weight`.
pub fn gguf_tensor_name(hf: &str) -> Result<String> {
    gguf_name(hf.strip_suffix(".weight").unwrap_or(hf))
}

impl TensorSource for GgufNames<'_> {
    fn origin(&self) -> String {
        self.0.origin()
    }

    fn has(&self, name: &str) -> bool {
        gguf_tensor_name(name).is_ok_and(|g| self.0.has(&g))
    }

    fn tensor(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        TensorSource::tensor(self.0, &gguf_tensor_name(name)?, device)
    }

    fn ggml(
        &mut self,
        name: &str,
        device: &Device,
    ) -> Result<Option<candle_core::quantized::QTensor>> {
        self.0.ggml(&gguf_tensor_name(name)?, device)
    }
}

/// The GGUF (llama.cpp) name of a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> Result<String> {
    let fixed = [
        ("model.embed_tokens", "token_embd"),
        ("model.norm", "output_norm"),
        ("lm_head", "output"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Ok(format!("{g}.weight"));
    }
    let rest = hf
        .strip_prefix("model.layers.")
        .with_context(|| format!("no GGUF name for tensor '{hf}'"))?;
    let (idx, part) = rest
        .split_once('.')
        .with_context(|| format!("no GGUF name for tensor '{hf}'"))?;
    let g = match part {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => bail!("no GGUF name for tensor '{hf}'"),
    };
    Ok(format!("blk.{idx}.{g}.weight"))
}

/// Tensors with their Hugging Face names, for building the model.
struct Reader<'a> {
    src: &'a mut dyn TensorSource,
    keep_ggml: bool,
    device: Device,
}

impl Reader<'_> {
    /// A vector or embedding table as f32.
    fn dense(&mut self, hf_name: &str) -> Result<Tensor> {
        self.src.tensor(&format!("{hf_name}.weight"), &self.device)
    }

    /// A linear layer `[out, in]`.
    fn linear(&mut self, hf_name: &str) -> Result<QLinear> {
        QLinear::load(hf_name, self.src, self.keep_ggml, &self.device)
    }
}

impl Llama {
    /// Loads a llama-architecture GGUF file.
    pub fn from_gguf(g: &mut Gguf, load_as: LoadAs, device: &Device) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let origin = g.path.display().to_string();
        let mut names = GgufNames(g);
        let mut src = Reader {
            src: &mut names,
            keep_ggml: load_as == LoadAs::Ggml,
            device: device.clone(),
        };
        Self::build(cfg, &mut src, RopeLayout::Interleaved, device)
            .with_context(|| format!("loading GGUF {origin}"))
    }

    /// Loads a Hugging Face directory: config.json and model.safetensors (or shards listed
    /// in model.safetensors.index.json), possibly a quantized checkpoint written by quantlab
    /// (whose config.json records the rope layout of the weights it was made from).
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let v = crate::load::read_json(&cfg_path)?;
        let cfg =
            LlamaConfig::from_hf_json(&v).with_context(|| format!("in {}", cfg_path.display()))?;
        let layout = match v.get(ROPE_LAYOUT_KEY).and_then(|l| l.as_str()) {
            None | Some("half-split") => RopeLayout::HalfSplit,
            Some("interleaved") => RopeLayout::Interleaved,
            Some(other) => bail!(
                "{}: unknown {ROPE_LAYOUT_KEY} '{other}' (interleaved or half-split)",
                cfg_path.display()
            ),
        };
        let mut st = SafetensorsSource::open(&crate::load::safetensors_files(dir)?)?;
        let mut src = Reader {
            src: &mut st,
            keep_ggml: false,
            device: device.clone(),
        };
        Self::build(cfg, &mut src, layout, device)
            .with_context(|| format!("loading {}", dir.display()))
    }

    fn build(
        cfg: LlamaConfig,
        src: &mut Reader,
        rope_layout: RopeLayout,
        device: &Device,
    ) -> Result<Self> {
        let embed = src.dense("model.embed_tokens")?;
        if embed.dims() != [cfg.vocab_size, cfg.hidden_size] {
            bail!(
                "embedding table has shape {:?}, config says [{}, {}]",
                embed.dims(),
                cfg.vocab_size,
                cfg.hidden_size
            );
        }
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let b = Block {
                attn_norm: src.dense(&p("input_layernorm"))?,
                q: src.linear(&p("self_attn.q_proj"))?,
                k: src.linear(&p("self_attn.k_proj"))?,
                v: src.linear(&p("self_attn.v_proj"))?,
                o: src.linear(&p("self_attn.o_proj"))?,
                ffn_norm: src.dense(&p("post_attention_layernorm"))?,
                gate: src.linear(&p("mlp.gate_proj"))?,
                up: src.linear(&p("mlp.up_proj"))?,
                down: src.linear(&p("mlp.down_proj"))?,
                qkv_fused: Default::default(),
                gate_up_fused: Default::default(),
                qkv_packed: Stacked::default(),
                glu_packed: Stacked::default(),
            };
            let (hd, nh, nkv) = (
                cfg.head_dim,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
            );
            let expect = [
                (&b.q, nh * hd, cfg.hidden_size),
                (&b.k, nkv * hd, cfg.hidden_size),
                (&b.v, nkv * hd, cfg.hidden_size),
                (&b.o, cfg.hidden_size, nh * hd),
                (&b.gate, cfg.intermediate_size, cfg.hidden_size),
                (&b.up, cfg.intermediate_size, cfg.hidden_size),
                (&b.down, cfg.hidden_size, cfg.intermediate_size),
            ];
            for (l, o, i) in expect {
                if (l.out_features, l.in_features) != (o, i) {
                    bail!(
                        "layer {} has shape [{}, {}], the config implies [{o}, {i}]",
                        l.name,
                        l.out_features,
                        l.in_features
                    );
                }
            }
            blocks.push(b);
        }
        let norm = src.dense("model.norm")?;
        let stored_head = crate::nn::checkpoint::has_stored_layer(src.src, "lm_head")?;
        let lm_head = if stored_head {
            src.linear("lm_head")?
        } else if cfg.tie_word_embeddings {
            // Tied: the output layer starts as the embedding table (its own copy, so a plan
            // can quantize it without touching the embeddings).
            match src.linear("model.embed_tokens") {
                Ok(mut l) => {
                    l.name = "lm_head".into();
                    l
                }
                Err(_) => QLinear::new("lm_head", embed.clone(), None)?,
            }
        } else {
            src.linear("lm_head")?
        };
        let inv: Vec<f32> = cfg.inv_freq().iter().map(|&f| f as f32).collect();
        let n = cfg.max_position_embeddings.max(1);
        let inv = Tensor::from_vec(inv, (1, cfg.head_dim / 2), device)?;
        let pos = Tensor::arange(0u32, n as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        Ok(Llama {
            cos_host: cos.flatten_all()?.to_vec1()?,
            sin_host: sin.flatten_all()?.to_vec1()?,
            cos,
            sin,
            cfg,
            rope_layout,
            embed,
            blocks,
            norm,
            lm_head,
            device: device.clone(),
            fuse: fused::fuse_by_default(),
        })
    }

    /// Whether the CPU forward pass runs q/k/v, and gate/up, as one product each over
    /// their stacked weights (on by default; `QUANTLAB_FUSE=off` turns it off at load).
    /// The numbers are the same either way.
    pub fn set_fused_projections(&mut self, on: bool) {
        self.fuse = on;
        for b in &mut self.blocks {
            b.clear_fused();
        }
    }

    /// The layer groups the CPU forward pass now runs as one stacked product each (names
    /// in order; empty when fusion is off): q/k/v and gate/up of each block whose parts
    /// share a format that stacks. Builds the stacked weights not yet built.
    pub fn fused_groups(&self) -> Vec<Vec<String>> {
        if !self.fuse {
            return Vec::new();
        }
        let mut out = Vec::new();
        for b in &self.blocks {
            let groups: [(&fused::Fusion, Vec<&QLinear>); 2] = [
                (&b.qkv_fused, vec![&b.q, &b.k, &b.v]),
                (&b.gate_up_fused, vec![&b.gate, &b.up]),
            ];
            for (f, layers) in groups {
                if f.get(&layers).is_some() {
                    out.push(layers.iter().map(|l| l.name.clone()).collect());
                }
            }
        }
        out
    }

    /// Whether [`Self::set_fused_projections`] is on.
    pub fn fused_projections(&self) -> bool {
        self.fuse
    }

    /// Runs activations in `dtype` (f32, bf16 or f16), as transformers runs a model loaded
    /// in that dtype: the embedding table, norms and uncompressed (f32) linear layers are
    /// held in it; compressed layers compute in it where their device lets them choose
    /// (dequantized copies on a GPU); attention scores and softmax stay in f32.
    pub fn set_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("activations can be f32, bf16 or f16, not {dtype:?}");
        }
        if dtype == self.dtype() {
            return Ok(());
        }
        self.embed = self.embed.to_dtype(dtype)?;
        self.norm = self.norm.to_dtype(dtype)?;
        for b in &mut self.blocks {
            b.attn_norm = b.attn_norm.to_dtype(dtype)?;
            b.ffn_norm = b.ffn_norm.to_dtype(dtype)?;
        }
        self.cos = self.cos.to_dtype(dtype)?;
        self.sin = self.sin.to_dtype(dtype)?;
        for l in self.linears_mut() {
            let dense = l.weight.id() == crate::nn::format::dense::ID
                || l.weight.id() == crate::nn::format::half::ID;
            if dense {
                let w = l.weight.dequantize()?;
                l.weight = if dtype == DType::F32 {
                    Arc::new(crate::nn::format::dense::Dense::new(w)?)
                } else {
                    Arc::new(crate::nn::format::half::Half::new(&w, dtype)?)
                };
            } else {
                l.set_compute_dtype(dtype)?;
            }
        }
        Ok(())
    }

    /// The activations' dtype.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Keep dequantized copies of compressed weights (faster evaluation, more memory).
    pub fn set_cache_dequantized(&mut self, on: bool) {
        for l in self.linears_mut() {
            l.set_cache_dequantized(on);
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.cfg.num_hidden_layers],
            cpu: vec![KvHeads::default(); self.cfg.num_hidden_layers],
            len: 0,
        }
    }

    fn rope(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let x = x.contiguous()?;
        Ok(match self.rope_layout {
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
        })
    }

    /// The causal mask `[t, offset + t]` (0 where a position may attend, −∞ after it) in
    /// the dtype of the attention scores, built once per forward pass (one upload, not one
    /// per layer); `None` for a single new position, which sees the whole cache.
    fn causal_mask(&self, t: usize, offset: usize) -> Result<Option<Tensor>> {
        if t <= 1 {
            return Ok(None);
        }
        let total = offset + t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > i + offset {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), &self.device)?;
        Ok(Some(mask.to_dtype(self.score_dtype())?))
    }

    /// Attention scores and softmax: in f32 on the CPU and for f32 activations; in the
    /// activations' half dtype on a GPU, as transformers' eager attention computes the
    /// scores (candle's softmax kernel accumulates in f32 for half inputs).
    fn score_dtype(&self) -> DType {
        if self.device.is_cpu() {
            DType::F32
        } else {
            self.dtype()
        }
    }

    fn attention(
        &self,
        b: &Block,
        x: &Tensor,
        offset: usize,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let y = self.attention_heads(b, x, offset, mask, cache)?;
        profile::section(&self.device, "o", || b.o.forward(&y))
    }

    /// Attention up to the output projection: the heads' outputs `[batch, t, heads ×
    /// head_dim]` (what `o` reads).
    fn attention_heads(
        &self,
        b: &Block,
        x: &Tensor,
        offset: usize,
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (bsz, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((bsz, t, n, hd))?.transpose(1, 2)?)
        };
        let dev = &self.device;
        let (q, k, v) = profile::section(dev, "qkv", || -> Result<_> {
            // Decode on the GPU: q, k and v from one packed GEMV where all three have one.
            if packed_decode(x)? {
                if let Some(w) = b.qkv_packed.get(&[&b.q, &b.k, &b.v])? {
                    if let [q, k, v] = &w.gemv_parts(x)?[..] {
                        return Ok((q.clone(), k.clone(), v.clone()));
                    }
                }
            }
            Ok((b.q.forward(x)?, b.k.forward(x)?, b.v.forward(x)?))
        })?;
        let fused = crate::nn::cuda::enabled(dev);
        let (q, k, v) = profile::section(dev, "rope", || -> Result<_> {
            if fused {
                // Rotation and head transpose in one kernel (the tables hold every position).
                let il = matches!(self.rope_layout, RopeLayout::Interleaved);
                let rope = |y: &Tensor, n: usize| {
                    crate::nn::cuda::rope_heads(y, &self.cos, &self.sin, n, offset, il)
                };
                return Ok((rope(&q, nh)?, rope(&k, nkv)?, heads(v, nkv)?.contiguous()?));
            }
            Ok((
                self.rope(&heads(q, nh)?, offset)?,
                self.rope(&heads(k, nkv)?, offset)?,
                heads(v, nkv)?.contiguous()?,
            ))
        })?;
        let (k, v) = match cache.take() {
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let total = k.dim(2)?;
        let rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        if fused {
            // Fused: the query heads that share a key head stacked as rows (no repeated
            // keys and values), scale + causal mask + softmax in one kernel.
            let q = q.reshape((bsz, nkv, rep * t, hd))?;
            let att = profile::section(dev, "scores", || -> Result<Tensor> {
                Ok(q.matmul(&k.t()?)?.to_dtype(self.score_dtype())?)
            })?;
            let att = profile::section(dev, "softmax", || -> Result<Tensor> {
                Ok(crate::nn::cuda::causal_softmax(&att, t, scale as f32)?.to_dtype(v.dtype())?)
            })?;
            let y = profile::section(dev, "att x v", || -> Result<Tensor> {
                Ok(att
                    .matmul(&v)?
                    .reshape((bsz, nh, t, hd))?
                    .transpose(1, 2)?
                    .reshape((bsz, t, nh * hd))?)
            })?;
            return Ok(y);
        }
        let expand = |z: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(z);
            }
            Ok(z.unsqueeze(2)?
                .expand((bsz, nkv, rep, total, hd))?
                .reshape((bsz, nh, total, hd))?)
        };
        let (k, v) = profile::section(dev, "kv expand", || -> Result<_> {
            Ok((expand(k)?, expand(v)?))
        })?;
        let mut att = profile::section(dev, "scores", || -> Result<Tensor> {
            Ok((q.matmul(&k.t()?)? * scale)?.to_dtype(self.score_dtype())?)
        })?;
        if let Some(mask) = mask {
            if mask.dims() != [t, total] {
                bail!("attention mask {:?} for {t} × {total} scores", mask.dims());
            }
            att = profile::section(dev, "mask", || att.broadcast_add(mask))?;
        }
        let att = profile::section(dev, "softmax", || -> Result<Tensor> {
            Ok(candle_nn::ops::softmax_last_dim(&att)?.to_dtype(v.dtype())?)
        })?;
        let y = profile::section(dev, "att x v", || -> Result<Tensor> {
            Ok(att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((bsz, t, nh * hd))?)
        })?;
        Ok(y)
    }

    /// Logits `[batch, seq, vocab]` for `ids` `[batch, seq]` placed after the cache's
    /// tokens. With `last_only`, only the last position's logits (`[batch, 1, vocab]`).
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache, last_only: bool) -> Result<Tensor> {
        let t = ids.dim(1)?;
        self.forward_tail(ids, cache, if last_only { 1 } else { t })
    }

    /// Logits of the last `rows` positions only (`[batch, rows, vocab]`): the output layer
    /// is the largest matmul, and perplexity scores only a window's tail.
    pub fn forward_tail(&self, ids: &Tensor, cache: &mut KvCache, rows: usize) -> Result<Tensor> {
        let (bsz, t, flat) = self.check_tail(ids, cache, rows)?;
        self.forward_tail_rest(bsz, t, flat, cache, rows)
    }

    /// Whether a batch of `bsz` sequences runs the CPU host-buffer pass.
    fn host_path(&self, bsz: usize) -> bool {
        self.device.is_cpu() && bsz == 1 && self.embed.dtype() == DType::F32
    }

    /// `log p(targets[r])` at each of the last `rows` positions of `ids` (`[1, t]`), with
    /// the output layer's product and log-softmax fused (`llm_f32::head_target_log_probs`:
    /// no `[rows, vocab]` logits are written). `None` where that path does not run (not
    /// the CPU host pass, or an output layer that is not a plain f32 weight without bias
    /// and without a statistics collector): the caller then takes [`Self::forward_tail`].
    /// Equal to `log_softmax(forward_tail(..))` at the targets up to summation order.
    pub fn tail_target_log_probs(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        rows: usize,
        targets: &[u32],
    ) -> Result<Option<Vec<f32>>> {
        let head = &self.lm_head;
        let dense = head
            .weight
            .as_any()
            .downcast_ref::<crate::nn::format::dense::Dense>();
        let Some(packed) = dense.filter(|_| head.bias.is_none() && head.forwards_through_format())
        else {
            return Ok(None);
        };
        let (bsz, _, flat) = self.check_tail(ids, cache, rows)?;
        if !self.host_path(bsz) || targets.len() != rows {
            return Ok(None);
        }
        let Some(packed) = packed.packed_cpu() else {
            return Ok(None);
        };
        let x = self.embed.index_select(&flat, 0)?;
        let run = |cache: &mut KvCache| -> Result<Vec<f32>> {
            let h = self.hidden_cpu(x, cache, rows)?;
            Ok(llm_f32::head_target_log_probs(
                crate::nn::kernels::Isa::selected(),
                &h,
                rows,
                packed,
                targets,
            ))
        };
        // On a rayon worker, as `forward_cpu` (the products split from inside the pool).
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| run(cache)).map(Some);
        }
        run(cache).map(Some)
    }

    /// The checks of a forward pass over the last `rows` of `ids`: `(batch, length,
    /// flattened ids)`; resets a cache made for another model.
    fn check_tail(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        rows: usize,
    ) -> Result<(usize, usize, Tensor)> {
        let (bsz, t) = ids.dims2()?;
        if rows == 0 || rows > t {
            bail!("logits of the last {rows} of {t} positions asked for");
        }
        let offset = cache.len();
        if offset + t > self.cfg.max_position_embeddings {
            bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        if cache.layers.len() != self.blocks.len() {
            *cache = self.new_cache();
        }
        let flat = ids.flatten_all()?;
        let max_id = flat.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            bail!(
                "token id {max_id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        Ok((bsz, t, flat))
    }

    fn forward_tail_rest(
        &self,
        bsz: usize,
        t: usize,
        flat: Tensor,
        cache: &mut KvCache,
        rows: usize,
    ) -> Result<Tensor> {
        let offset = cache.len();
        if self.host_path(bsz) {
            let x = self.embed.index_select(&flat, 0)?;
            return self.forward_cpu(x, cache, rows);
        }
        let mut x = self
            .embed
            .index_select(&flat, 0)?
            .reshape((bsz, t, self.cfg.hidden_size))?;
        let eps = self.cfg.rms_norm_eps as f32;
        cache.len = offset + t;
        let dev = &self.device;
        // The fused attention (GPU) masks inside its softmax kernel.
        let mask = if crate::nn::cuda::enabled(dev) {
            None
        } else {
            self.causal_mask(t, offset)?
        };
        for (b, c) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let h = profile::section(dev, "norm", || {
                candle_nn::ops::rms_norm(&x, &b.attn_norm, eps)
            })?;
            let a = profile::section(dev, "attention", || {
                self.attention(b, &h, offset, mask.as_ref(), c)
            })?;
            x = (x + a)?;
            let h = profile::section(dev, "norm", || {
                candle_nn::ops::rms_norm(&x, &b.ffn_norm, eps)
            })?;
            let act = profile::section(dev, "mlp up", || -> Result<Tensor> {
                // Decode on the GPU: gate, up, SiLU and product in one packed GEMV.
                if packed_decode(&h)? {
                    if let Some(w) = b.glu_packed.get(&[&b.gate, &b.up])? {
                        return w.gemv_glu(&h);
                    }
                }
                Ok((candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?)
            })?;
            let d = profile::section(dev, "mlp down", || b.down.forward(&act))?;
            x = (x + d)?;
        }
        if rows < t {
            x = x.narrow(1, t - rows, rows)?;
        }
        let x = candle_nn::ops::rms_norm(&x.contiguous()?, &self.norm, eps)?;
        profile::section(dev, "lm_head", || self.lm_head.forward(&x))
    }

    /// The forward pass on the CPU for one sequence: activations as host buffers between
    /// the linear layers, attention over the cache's per-head buffers (no mask tensor, no
    /// repeated key/value heads, no concatenation), the elementwise steps fused on slices.
    /// The same arithmetic as the tensor path, up to summation order and `exp` (see
    /// `llm_f32`). `x` is the embedded sequence `[t, hidden]`.
    ///
    /// The pass runs on a rayon worker thread: the kernels split each matrix product over
    /// the pool, and a split started from a thread outside the pool is injected, its caller
    /// put to sleep and woken again (two futex round trips per product, 211 products per
    /// decoded token), while one started on a worker is a `join` whose other half the idle
    /// worker steals while still spinning.
    fn forward_cpu(&self, x: Tensor, cache: &mut KvCache, rows: usize) -> Result<Tensor> {
        // A decode step (a few rows): ~120 small products, split over a spinning thread
        // team (`kernels::team`) instead of one rayon fork/join each. Same task partitions:
        // same numbers.
        if x.dim(0)? < DECODE_TEAM_ROWS && !crate::nn::kernels::team::leading() {
            return crate::nn::kernels::team::session(|| self.forward_cpu_pooled(x, cache, rows));
        }
        self.forward_cpu_pooled(x, cache, rows)
    }

    /// [`Self::forward_cpu`] on a rayon worker (the products split from inside the pool).
    fn forward_cpu_pooled(&self, x: Tensor, cache: &mut KvCache, rows: usize) -> Result<Tensor> {
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_cpu_pooled(x, cache, rows));
        }
        let h = self.hidden_cpu(x, cache, rows)?;
        let h = Tensor::from_vec(h, (rows, self.cfg.hidden_size), &self.device)?;
        Ok(self
            .lm_head
            .forward(&h)?
            .reshape((1, rows, self.cfg.vocab_size))?)
    }

    /// The blocks of [`Self::forward_cpu`] and the final norm: the normed hidden states of
    /// the last `rows` positions, `[rows * hidden]` (the output layer's input).
    fn hidden_cpu(&self, x: Tensor, cache: &mut KvCache, rows: usize) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (t, hs) = x.dims2()?;
        let offset = cache.len();
        let eps = c.rms_norm_eps as f32;
        let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let mut x = host(&x)?;
        for (b, kv) in self.blocks.iter().zip(cache.cpu.iter_mut()) {
            self.attention_half(b, &mut x, t, kv, offset)?;
            self.mlp_half(b, &mut x, t)?;
        }
        cache.len = offset + t;
        let x = &x[(t - rows) * hs..];
        partial::with_host(&self.norm, |w| llm_f32::rms_norm(x, w, eps))
    }

    /// Parameters of the linear layers plus embeddings and norms.
    pub fn num_params(&self) -> usize {
        let norms = self.blocks.len() * 2 * self.cfg.hidden_size + self.cfg.hidden_size;
        let embed = self.embed.elem_count();
        let head = if self.cfg.tie_word_embeddings {
            0
        } else {
            self.lm_head.num_params()
        };
        let linears: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                    .iter()
                    .map(|l| l.num_params())
                    .sum::<usize>()
            })
            .sum();
        norms + embed + head + linears
    }

    /// Bytes held by the embedding table and norms (in the activations' dtype).
    pub fn dense_bytes(&self) -> usize {
        (self.embed.elem_count() + (self.blocks.len() * 2 + 1) * self.cfg.hidden_size)
            * self.dtype().size_in_bytes()
    }

    /// The tensors that are not linear layers, under their Hugging Face names with
    /// `.weight` (embedding table, norms): what a checkpoint stores beside the layers.
    pub fn dense_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, b) in self.blocks.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                b.attn_norm.clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                b.ffn_norm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        out
    }

    /// Log-probabilities of the last dimension, in f32 (fused on the CPU).
    pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        let logits = logits.to_dtype(DType::F32)?;
        if logits.device().is_cpu() {
            let cols = logits.dim(D::Minus1)?;
            let logits = logits.contiguous()?;
            let n = logits.elem_count();
            let out = crate::nn::rows::with_cpu_slice(
                &logits,
                n,
                candle_core::CpuStorage::as_slice::<f32>,
                |v| llm_f32::log_softmax(v, cols),
            );
            if let Some(out) = out {
                return Ok(Tensor::from_vec(out, logits.dims(), logits.device())?);
            }
        }
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }
}

impl HasLinears for Llama {
    /// Pre-norm blocks: `input_layernorm` feeds q/k/v, `post_attention_layernorm` feeds
    /// gate/up (the final norm feeds `lm_head`).
    fn norm_groups(&self) -> Vec<crate::nn::NormGroup> {
        let mut out = Vec::new();
        for b in &self.blocks {
            let p = b.q.name.trim_end_matches("self_attn.q_proj");
            out.push(crate::nn::NormGroup {
                norm: format!("{p}input_layernorm"),
                linears: vec![b.q.name.clone(), b.k.name.clone(), b.v.name.clone()],
            });
            out.push(crate::nn::NormGroup {
                norm: format!("{p}post_attention_layernorm"),
                linears: vec![b.gate.name.clone(), b.up.name.clone()],
            });
        }
        out.push(crate::nn::NormGroup {
            norm: "model.norm".into(),
            linears: vec![self.lm_head.name.clone()],
        });
        out
    }

    /// The norm groups in block order, each block's followed by the groups fed by a linear
    /// layer: up_proj → down_proj (through SiLU(gate)·up, linear in up's output), and
    /// v_proj → o_proj only without GQA (as AutoAWQ: with fewer key/value heads one v
    /// channel feeds several o channels, which one scale per channel cannot follow).
    fn scale_groups(&self) -> Vec<ScaleGroup> {
        let norm = |g: crate::nn::NormGroup| ScaleGroup {
            input: ScaleSite::Norm(g.norm),
            linears: g.linears,
        };
        let mut norms = self.norm_groups().into_iter();
        let mut out = Vec::new();
        let gqa = self.cfg.num_key_value_heads != self.cfg.num_attention_heads;
        for b in &self.blocks {
            out.extend(norms.next().map(norm));
            if !gqa {
                out.push(ScaleGroup {
                    input: ScaleSite::Linear(b.v.name.clone()),
                    linears: vec![b.o.name.clone()],
                });
            }
            out.extend(norms.next().map(norm));
            out.push(ScaleGroup {
                input: ScaleSite::Linear(b.up.name.clone()),
                linears: vec![b.down.name.clone()],
            });
        }
        out.extend(norms.map(norm));
        out
    }

    fn scale_group_mut(&mut self, g: &ScaleGroup) -> Result<GroupMut<'_>> {
        let gqa = self.cfg.num_key_value_heads != self.cfg.num_attention_heads;
        let found = match &g.input {
            ScaleSite::Norm(n) if n == "model.norm" => Some(GroupMut {
                producer: Producer::Norm(&mut self.norm),
                linears: vec![&mut self.lm_head],
            }),
            site => self.blocks.iter_mut().find_map(|b| {
                let p = b.q.name.trim_end_matches("self_attn.q_proj").to_string();
                b.clear_fused();
                let Block {
                    attn_norm,
                    q,
                    k,
                    v,
                    o,
                    ffn_norm,
                    gate,
                    up,
                    down,
                    ..
                } = b;
                match site {
                    ScaleSite::Norm(n) if *n == format!("{p}input_layernorm") => Some(GroupMut {
                        producer: Producer::Norm(attn_norm),
                        linears: vec![q, k, v],
                    }),
                    ScaleSite::Norm(n) if *n == format!("{p}post_attention_layernorm") => {
                        Some(GroupMut {
                            producer: Producer::Norm(ffn_norm),
                            linears: vec![gate, up],
                        })
                    }
                    ScaleSite::Linear(n) if *n == up.name => Some(GroupMut {
                        producer: Producer::Linear(up),
                        linears: vec![down],
                    }),
                    ScaleSite::Linear(n) if *n == v.name && !gqa => Some(GroupMut {
                        producer: Producer::Linear(v),
                        linears: vec![o],
                    }),
                    _ => None,
                }
            }),
        };
        let found = found.with_context(|| format!("no scale group {}", g.describe()))?;
        let names: Vec<&str> = found.linears.iter().map(|l| l.name.as_str()).collect();
        if names != g.linears {
            bail!(
                "scale group {} does not match the model's layers {names:?}",
                g.describe()
            );
        }
        Ok(found)
    }

    fn linears(&self) -> Vec<&QLinear> {
        let mut v: Vec<&QLinear> = self
            .blocks
            .iter()
            .flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down])
            .collect();
        v.push(&self.lm_head);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut QLinear> {
        let mut v: Vec<&mut QLinear> = self
            .blocks
            .iter_mut()
            .flat_map(|b| {
                b.clear_fused();
                [
                    &mut b.q,
                    &mut b.k,
                    &mut b.v,
                    &mut b.o,
                    &mut b.gate,
                    &mut b.up,
                    &mut b.down,
                ]
            })
            .collect();
        v.push(&mut self.lm_head);
        v
    }
}
