//! MarianMT (transformers' `MarianMTModel`): a post-LayerNorm encoder–decoder transformer
//! with sinusoidal positions, every projection a [`QLinear`] named as in the checkpoint
//! (`model.encoder.layers.0.self_attn.q_proj`, `model.decoder.layers.2.encoder_attn.v_proj`,
//! `model.decoder.layers.1.fc1`, `lm_head`), so any plan applies to it.
//!
//! Decoding runs one token per row per step: the decoder self-attention keys/values grow in a
//! cache, the cross-attention keys/values are computed once from the encoder output, and
//! rows (sentences × beams) can be reordered or dropped between steps.

use crate::load::TensorSource;
use crate::nn::{HasLinears, QLinear};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::LayerNorm;
use serde_json::Value;
use std::path::Path;

/// The activation between `fc1` and `fc2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Swish,
    Relu,
    Gelu,
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "swish" | "silu" => Self::Swish,
            "relu" => Self::Relu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            other => bail!(
                "activation_function '{other}' is not supported (swish, relu, gelu, gelu_new)"
            ),
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Swish => match swish_on_cpu(x)? {
                Some(y) => y,
                None => candle_nn::ops::silu(x)?,
            },
            Self::Relu => x.relu()?,
            Self::Gelu => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
        })
    }
}

/// SiLU of a contiguous f32 CPU tensor with `kernels::silu_rows` (candle's values bit for
/// bit, split over rayon's pool: candle's `silu` waits on its own thread pool from 64K
/// values on, which cost a sixth of a decode); `None` for other tensors.
fn swish_on_cpu(x: &Tensor) -> Result<Option<Tensor>> {
    if x.dtype() != DType::F32 {
        return Ok(None);
    }
    let n = x.elem_count();
    let pick = candle_core::CpuStorage::as_slice::<f32>;
    let y = crate::nn::rows::with_cpu_slice(x, n, pick, |v| {
        let mut y = v.to_vec();
        crate::nn::kernels::silu_rows::silu_in_place(&mut y);
        y
    });
    Ok(match y {
        Some(y) => Some(Tensor::from_vec(y, x.shape(), x.device())?),
        None => None,
    })
}

/// The fields of a Marian `config.json` that the forward pass and generation need.
#[derive(Debug, Clone)]
pub struct MarianConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_heads: usize,
    pub decoder_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub vocab_size: usize,
    pub decoder_vocab_size: usize,
    pub max_position_embeddings: usize,
    pub scale_embedding: bool,
    pub activation: Activation,
    pub share_encoder_decoder_embeddings: bool,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
    pub decoder_start_token_id: u32,
    pub forced_eos_token_id: Option<u32>,
}

impl MarianConfig {
    /// Reads a Hugging Face Marian config. The keys that shape the model or name special
    /// tokens are required (transformers' defaults describe one particular checkpoint, so a
    /// config lacking them is refused rather than silently given another model's sizes);
    /// flags keep transformers' defaults. Sizes are bounded (see [`limits`]) and every
    /// special token id must lie inside the vocabulary.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        if let Some(t) = v.get("model_type").and_then(|t| t.as_str()) {
            if t != "marian" {
                bail!("model_type is '{t}', not 'marian'");
            }
        }
        let opt = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .map(Some)
                    .with_context(|| format!("'{k}' must be a non-negative integer, got {x}")),
            }
        };
        let int = |k: &str| -> Result<usize> {
            opt(k)?.with_context(|| {
                format!("'{k}' is missing: a Marian config.json must give it (no default is safe)")
            })
        };
        // A size that must be positive and at most `max`.
        let size = |k: &str, max: usize| -> Result<usize> {
            let n = int(k)?;
            if n == 0 || n > max {
                bail!("'{k}' is {n}: a working model needs 1 to {max}");
            }
            Ok(n)
        };
        let boolean =
            |k: &str, default: bool| v.get(k).and_then(|x| x.as_bool()).unwrap_or(default);
        if boolean("normalize_before", false) {
            bail!(
                "normalize_before=true (pre-LayerNorm) is not Marian's layout and is not supported"
            );
        }
        if !boolean("static_position_embeddings", true) {
            bail!(
                "learned position embeddings are not supported (static_position_embeddings=false)"
            );
        }
        let vocab_size = size("vocab_size", limits::MAX_VOCAB)?;
        let decoder_vocab_size = match opt("decoder_vocab_size")? {
            None => vocab_size,
            Some(_) => size("decoder_vocab_size", limits::MAX_VOCAB)?,
        };
        // Ids the decoder reads or writes must be decoder tokens; pad also pads sources.
        let token = |k: &str, vocab: usize, vocab_key: &str| -> Result<u32> {
            let id = int(k)?;
            if id >= vocab {
                bail!("'{k}' is {id}, outside the vocabulary ({vocab_key} {vocab})");
            }
            Ok(id as u32)
        };
        let cfg = Self {
            d_model: size("d_model", limits::MAX_WIDTH)?,
            encoder_layers: size("encoder_layers", limits::MAX_LAYERS)?,
            decoder_layers: size("decoder_layers", limits::MAX_LAYERS)?,
            encoder_heads: size("encoder_attention_heads", limits::MAX_WIDTH)?,
            decoder_heads: size("decoder_attention_heads", limits::MAX_WIDTH)?,
            encoder_ffn_dim: size("encoder_ffn_dim", limits::MAX_FFN)?,
            decoder_ffn_dim: size("decoder_ffn_dim", limits::MAX_FFN)?,
            vocab_size,
            decoder_vocab_size,
            max_position_embeddings: size("max_position_embeddings", limits::MAX_POSITIONS)?,
            scale_embedding: boolean("scale_embedding", false),
            activation: Activation::parse(
                v.get("activation_function")
                    .and_then(|x| x.as_str())
                    .unwrap_or("gelu"),
            )?,
            share_encoder_decoder_embeddings: boolean("share_encoder_decoder_embeddings", true),
            pad_token_id: token(
                "pad_token_id",
                vocab_size.min(decoder_vocab_size),
                "smaller of vocab_size and decoder_vocab_size",
            )?,
            eos_token_id: token("eos_token_id", decoder_vocab_size, "decoder_vocab_size")?,
            decoder_start_token_id: token(
                "decoder_start_token_id",
                decoder_vocab_size,
                "decoder_vocab_size",
            )?,
            forced_eos_token_id: match v.get("forced_eos_token_id") {
                Some(Value::Null) => None,
                // transformers' MarianConfig default.
                None => Some(0),
                Some(_) => Some(token(
                    "forced_eos_token_id",
                    decoder_vocab_size,
                    "decoder_vocab_size",
                )?),
            },
        };
        for (name, dim, heads) in [
            ("encoder", cfg.d_model, cfg.encoder_heads),
            ("decoder", cfg.d_model, cfg.decoder_heads),
        ] {
            if heads == 0 || dim % heads != 0 {
                bail!("d_model {dim} is not divisible by {name}_attention_heads {heads}");
            }
        }
        if !cfg.d_model.is_multiple_of(2) {
            bail!(
                "d_model {} must be even for sinusoidal positions",
                cfg.d_model
            );
        }
        if cfg.max_position_embeddings * cfg.d_model > limits::MAX_POSITION_TABLE {
            bail!(
                "max_position_embeddings {} × d_model {} is more than the {} position-table values accepted",
                cfg.max_position_embeddings,
                cfg.d_model,
                limits::MAX_POSITION_TABLE
            );
        }
        Ok(cfg)
    }
}

/// Bounds on sizes read from a Marian config.json, far above any released Marian model
/// (opus-mt-tc-big: d_model 1024, 6 layers, ffn 4096, 53k tokens, 1024 positions), so that a
/// corrupt config is refused before it asks for absurd memory.
pub mod limits {
    pub const MAX_WIDTH: usize = 1 << 16;
    pub const MAX_LAYERS: usize = 1024;
    pub const MAX_FFN: usize = 1 << 20;
    pub const MAX_VOCAB: usize = 1 << 24;
    pub const MAX_POSITIONS: usize = 1 << 20;
    /// Values in the sinusoidal position table (max_position_embeddings × d_model): 1 GiB.
    pub const MAX_POSITION_TABLE: usize = 1 << 28;
}

struct Attention {
    q: QLinear,
    k: QLinear,
    v: QLinear,
    o: QLinear,
    heads: usize,
}

impl Attention {
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (n, t, d) = x.dims3()?;
        Ok(x.reshape((n, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Keys and values of `x` split into heads: `[n, heads, t, head_dim]` each.
    fn keys_values(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split_heads(&self.k.forward(x)?)?,
            self.split_heads(&self.v.forward(x)?)?,
        ))
    }

    /// Attention of queries from `x` over `k`/`v`; `mask` is additive, broadcast to
    /// `[n, heads, t_q, t_k]`.
    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (n, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let q = self.split_heads(&self.q.forward(x)?)?;
        let mut att = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(v)?.transpose(1, 2)?.reshape((n, t, d))?;
        self.o.forward(&y)
    }
}

struct FeedForward {
    fc1: QLinear,
    fc2: QLinear,
}

struct EncoderLayer {
    self_attn: Attention,
    self_attn_norm: LayerNorm,
    ffn: FeedForward,
    final_norm: LayerNorm,
}

struct DecoderLayer {
    self_attn: Attention,
    self_attn_norm: LayerNorm,
    cross_attn: Attention,
    cross_attn_norm: LayerNorm,
    ffn: FeedForward,
    final_norm: LayerNorm,
}

/// An encoded batch: what the decoder attends to, one row per decoder row.
pub struct DecoderState {
    /// Per decoder layer: cross-attention keys and values `[rows, heads, src_len, head_dim]`.
    cross: Vec<(Tensor, Tensor)>,
    /// Per decoder layer: self-attention keys and values so far.
    past: Vec<Option<(Tensor, Tensor)>>,
    /// Additive source padding mask `[rows, 1, 1, src_len]`.
    src_mask: Tensor,
    /// The encoded sentence (row of the encoder batch) each row reads.
    source: Vec<usize>,
    /// Rows of `past` each row continues, when [`DecoderState::select_rows`] reordered them
    /// since the last step: applied while the next step appends its keys/values (one copy
    /// of the cache per step instead of a gather and then a concatenation).
    pending: Option<Vec<usize>>,
    /// Tokens fed so far (the decoder position of the next one).
    pub len: usize,
}

impl DecoderState {
    pub fn rows(&self) -> Result<usize> {
        Ok(self.src_mask.dim(0)?)
    }

    /// Keeps (and reorders, or repeats) rows: row `i` of the result is old row `rows[i]`.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let n = self.source.len();
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            bail!("select_rows: row {bad} of {n}");
        }
        if rows.iter().copied().eq(0..n) {
            return Ok(());
        }
        let pick = |t: &Tensor| gather_rows(t, rows);
        // The cross-attention keys/values and the mask of a row depend only on its source
        // sentence: when every new row reads the same sentence as the old row in its place
        // (a beam search reordering beams inside each sentence, the usual step), they are
        // already the right values and copying them would change nothing.
        let source: Vec<usize> = rows.iter().map(|&r| self.source[r]).collect();
        if source != self.source {
            self.src_mask = pick(&self.src_mask)?;
            for (k, v) in &mut self.cross {
                *k = pick(k)?;
                *v = pick(v)?;
            }
            self.source = source;
        }
        // The self-attention cache is gathered when the next step appends to it.
        let pending = match self.pending.take() {
            Some(before) => rows.iter().map(|&r| before[r]).collect(),
            None => rows.to_vec(),
        };
        self.pending = Some(pending);
        Ok(())
    }
}

pub struct Marian {
    pub cfg: MarianConfig,
    encoder_embed: Tensor,
    decoder_embed: Tensor,
    positions: Tensor,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    lm_head: QLinear,
    /// Encoder and decoder read one embedding table.
    shared_embeddings: bool,
    /// `lm_head` was built from the decoder embedding table (no `lm_head.weight` stored).
    tied_lm_head: bool,
    device: Device,
}

/// Sinusoidal position table `[n, dim]`: sin in the first half, cos in the second, computed
/// in f64 as transformers does (numpy) before rounding to f32.
pub fn sinusoidal_positions(n: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let mut out = vec![0f32; n * dim];
    for pos in 0..n {
        for j in 0..half {
            let angle = pos as f64 / 10000f64.powf(2.0 * j as f64 / dim as f64);
            out[pos * dim + j] = angle.sin() as f32;
            out[pos * dim + half + j] = angle.cos() as f32;
        }
    }
    Ok(Tensor::from_vec(out, (n, dim), device)?)
}

impl Marian {
    /// Builds the model from `config.json`'s fields and a source of named tensors.
    pub fn build(cfg: MarianConfig, src: &mut dyn TensorSource, device: &Device) -> Result<Self> {
        let d = cfg.d_model;
        let shared = if src.has("model.shared.weight") {
            Some(src.tensor("model.shared.weight", device)?)
        } else {
            None
        };
        // A table comes from `model.shared` when the config shares them or the checkpoint
        // stores no table of its own.
        let from_shared = |src: &dyn TensorSource, name: &str| {
            shared.is_some() && (cfg.share_encoder_decoder_embeddings || !src.has(name))
        };
        let table = |src: &mut dyn TensorSource, name: &str, rows: usize| -> Result<Tensor> {
            let t = match &shared {
                Some(s) if from_shared(src, name) => s.clone(),
                _ => src.tensor(name, device)?,
            };
            if t.dims() != [rows, d] {
                bail!(
                    "embedding {name} has shape {:?}, config says [{rows}, {d}]",
                    t.dims()
                );
            }
            Ok(t)
        };
        let encoder_embed = table(src, "model.encoder.embed_tokens.weight", cfg.vocab_size)?;
        let decoder_embed = table(
            src,
            "model.decoder.embed_tokens.weight",
            cfg.decoder_vocab_size,
        )?;
        let linear = |src: &mut dyn TensorSource, name: &str| -> Result<QLinear> {
            let l = QLinear::load(name, src, false, device)?;
            if l.bias.is_none() {
                bail!("tensor '{name}.bias' is missing from {}", src.origin());
            }
            Ok(l)
        };
        let norm = |src: &mut dyn TensorSource, name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                src.tensor(&format!("{name}.weight"), device)?,
                src.tensor(&format!("{name}.bias"), device)?,
                1e-5,
            ))
        };
        let attention = |src: &mut dyn TensorSource, p: &str, heads: usize| -> Result<Attention> {
            Ok(Attention {
                q: linear(src, &format!("{p}.q_proj"))?,
                k: linear(src, &format!("{p}.k_proj"))?,
                v: linear(src, &format!("{p}.v_proj"))?,
                o: linear(src, &format!("{p}.out_proj"))?,
                heads,
            })
        };
        let ffn = |src: &mut dyn TensorSource, p: &str| -> Result<FeedForward> {
            Ok(FeedForward {
                fc1: linear(src, &format!("{p}.fc1"))?,
                fc2: linear(src, &format!("{p}.fc2"))?,
            })
        };
        let mut encoder = Vec::with_capacity(cfg.encoder_layers);
        for i in 0..cfg.encoder_layers {
            let p = format!("model.encoder.layers.{i}");
            encoder.push(EncoderLayer {
                self_attn: attention(src, &format!("{p}.self_attn"), cfg.encoder_heads)?,
                self_attn_norm: norm(src, &format!("{p}.self_attn_layer_norm"))?,
                ffn: ffn(src, &p)?,
                final_norm: norm(src, &format!("{p}.final_layer_norm"))?,
            });
        }
        let mut decoder = Vec::with_capacity(cfg.decoder_layers);
        for i in 0..cfg.decoder_layers {
            let p = format!("model.decoder.layers.{i}");
            decoder.push(DecoderLayer {
                self_attn: attention(src, &format!("{p}.self_attn"), cfg.decoder_heads)?,
                self_attn_norm: norm(src, &format!("{p}.self_attn_layer_norm"))?,
                cross_attn: attention(src, &format!("{p}.encoder_attn"), cfg.decoder_heads)?,
                cross_attn_norm: norm(src, &format!("{p}.encoder_attn_layer_norm"))?,
                ffn: ffn(src, &p)?,
                final_norm: norm(src, &format!("{p}.final_layer_norm"))?,
            });
        }
        // The output projection is its own layer (tied to the decoder embeddings unless the
        // checkpoint stores `lm_head.weight`), so a plan can quantize it alone.
        // A quantized checkpoint records the head as a layer of its own (with its bias)
        // unless it was still the tied f32 table.
        let stored_head = crate::nn::checkpoint::has_stored_layer(src, "lm_head")?;
        let tied_lm_head = !src.has("lm_head.weight") && !stored_head;
        let shared_embeddings = from_shared(src, "model.encoder.embed_tokens.weight")
            && from_shared(src, "model.decoder.embed_tokens.weight");
        let bias = if src.has("final_logits_bias") {
            src.tensor("final_logits_bias", device)?.flatten_all()?
        } else {
            Tensor::zeros(cfg.decoder_vocab_size, DType::F32, device)?
        };
        let lm_head = if stored_head {
            QLinear::load("lm_head", src, false, device)?
        } else if !tied_lm_head {
            QLinear::new("lm_head", src.tensor("lm_head.weight", device)?, Some(bias))?
        } else {
            QLinear::new("lm_head", decoder_embed.clone(), Some(bias))?
        };
        let positions = sinusoidal_positions(cfg.max_position_embeddings, d, device)?;
        Ok(Self {
            cfg,
            encoder_embed,
            decoder_embed,
            positions,
            encoder,
            decoder,
            lm_head,
            shared_embeddings,
            tied_lm_head,
            device: device.clone(),
        })
    }

    /// Bytes of everything but the linear layers: embedding tables (once when shared),
    /// layer norms and, when the output projection is still the tied f32 table, nothing
    /// more for it. Sinusoidal positions are computed, not stored.
    pub fn dense_bytes(&self) -> usize {
        let t = |x: &Tensor| x.elem_count() * 4;
        let mut n = t(&self.encoder_embed);
        if !self.shared_embeddings {
            n += t(&self.decoder_embed);
        }
        let norms = |l: &LayerNorm| t(l.weight()) + l.bias().map_or(0, t);
        for l in &self.encoder {
            n += norms(&l.self_attn_norm) + norms(&l.final_norm);
        }
        for l in &self.decoder {
            n += norms(&l.self_attn_norm) + norms(&l.cross_attn_norm) + norms(&l.final_norm);
        }
        n
    }

    /// The tensors that are not linear layers, under checkpoint names: embedding tables
    /// (`model.shared.weight` once when shared), layer norms and `final_logits_bias` (the
    /// output projection's bias). With the linear layers they rebuild the model.
    pub fn dense_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        if self.shared_embeddings {
            out.push(("model.shared.weight".into(), self.encoder_embed.clone()));
        } else {
            out.push((
                "model.encoder.embed_tokens.weight".into(),
                self.encoder_embed.clone(),
            ));
            out.push((
                "model.decoder.embed_tokens.weight".into(),
                self.decoder_embed.clone(),
            ));
        }
        let mut norm = |name: String, l: &LayerNorm| {
            out.push((format!("{name}.weight"), l.weight().clone()));
            if let Some(b) = l.bias() {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        for (i, l) in self.encoder.iter().enumerate() {
            let p = format!("model.encoder.layers.{i}");
            norm(format!("{p}.self_attn_layer_norm"), &l.self_attn_norm);
            norm(format!("{p}.final_layer_norm"), &l.final_norm);
        }
        for (i, l) in self.decoder.iter().enumerate() {
            let p = format!("model.decoder.layers.{i}");
            norm(format!("{p}.self_attn_layer_norm"), &l.self_attn_norm);
            norm(format!("{p}.encoder_attn_layer_norm"), &l.cross_attn_norm);
            norm(format!("{p}.final_layer_norm"), &l.final_norm);
        }
        if let Some(b) = &self.lm_head.bias {
            out.push(("final_logits_bias".into(), b.unsqueeze(0)?));
        }
        Ok(out)
    }

    /// Whether the output projection still shares the decoder embedding table's storage
    /// (then its weight costs no bytes of its own).
    pub fn lm_head_is_tied(&self) -> bool {
        self.tied_lm_head && self.lm_head.weight.id() == crate::nn::format::dense::ID
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn embed_scale(&self) -> f64 {
        if self.cfg.scale_embedding {
            (self.cfg.d_model as f64).sqrt()
        } else {
            1.0
        }
    }

    fn embed(&self, table: &Tensor, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (n, t) = ids.dims2()?;
        if offset + t > self.cfg.max_position_embeddings {
            bail!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        let x = table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((n, t, self.cfg.d_model))?;
        let pos = self.positions.narrow(0, offset, t)?;
        Ok(((x * self.embed_scale())?.broadcast_add(&pos))?)
    }

    /// Source ids `[n, s]` with a 1/0 attention mask `[n, s]` → encoder output `[n, s, d]`
    /// and the additive mask `[n, 1, 1, s]` that hides padding.
    pub fn encode(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, s) = ids.dims2()?;
        let keep = attention_mask.to_dtype(DType::F32)?;
        // 0 where attended, the lowest f32 where padded (as transformers' eager masks).
        let mask = ((keep.ones_like()? - &keep)? * f32::MIN as f64)?.reshape((n, 1, 1, s))?;
        let mut x = self.embed(&self.encoder_embed, ids, 0)?;
        for l in &self.encoder {
            let (k, v) = l.self_attn.keys_values(&x)?;
            let h = l.self_attn.attend(&x, &k, &v, Some(&mask))?;
            x = l.self_attn_norm.forward(&(x + h)?)?;
            let h = l
                .ffn
                .fc2
                .forward(&self.cfg.activation.apply(&l.ffn.fc1.forward(&x)?)?)?;
            x = l.final_norm.forward(&(x + h)?)?;
        }
        Ok((x, mask))
    }

    /// The decoder's view of an encoded batch, before any target token.
    pub fn start_decoding(&self, encoded: &Tensor, src_mask: &Tensor) -> Result<DecoderState> {
        let cross = self
            .decoder
            .iter()
            .map(|l| l.cross_attn.keys_values(encoded))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderState {
            cross,
            past: vec![None; self.decoder.len()],
            src_mask: src_mask.clone(),
            source: (0..src_mask.dim(0)?).collect(),
            pending: None,
            len: 0,
        })
    }

    /// Feeds target ids `[rows, t]` after the state's tokens; returns logits `[rows, t, vocab]`
    /// (with `final_logits_bias`).
    pub fn decode(&self, state: &mut DecoderState, ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = state.len;
        let mut x = self.embed(&self.decoder_embed, ids, offset)?;
        let causal = if t > 1 {
            let total = offset + t;
            let m: Vec<f32> = (0..t)
                .flat_map(|i| (0..total).map(move |j| if j > i + offset { f32::MIN } else { 0.0 }))
                .collect();
            Some(Tensor::from_vec(m, (t, total), &self.device)?)
        } else {
            None
        };
        for (i, l) in self.decoder.iter().enumerate() {
            let (k, v) = l.self_attn.keys_values(&x)?;
            let (k, v) = match state.past[i].take() {
                Some((pk, pv)) => (
                    gather_append(&pk, state.pending.as_deref(), &k)?,
                    gather_append(&pv, state.pending.as_deref(), &v)?,
                ),
                None => (k, v),
            };
            let h = l.self_attn.attend(&x, &k, &v, causal.as_ref())?;
            state.past[i] = Some((k, v));
            x = l.self_attn_norm.forward(&(x + h)?)?;
            let (ck, cv) = &state.cross[i];
            let h = l.cross_attn.attend(&x, ck, cv, Some(&state.src_mask))?;
            x = l.cross_attn_norm.forward(&(x + h)?)?;
            let h = l
                .ffn
                .fc2
                .forward(&self.cfg.activation.apply(&l.ffn.fc1.forward(&x)?)?)?;
            x = l.final_norm.forward(&(x + h)?)?;
        }
        state.len += t;
        state.pending = None;
        self.lm_head.forward(&x)
    }
}

/// Rows `rows` of `t` (along dimension 0): `index_select`, copied in one pass on the CPU
/// (candle's fills a zeroed buffer first). Rows were checked against `t` by the caller.
fn gather_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    if dims.is_empty() {
        bail!("cannot pick rows of a scalar");
    }
    let per: usize = dims[1..].iter().product();
    let pick = candle_core::CpuStorage::as_slice::<f32>;
    let fused = crate::nn::rows::with_cpu_slice(t, dims[0] * per, pick, |x| {
        let mut out = Vec::with_capacity(rows.len() * per);
        for &r in rows {
            out.extend_from_slice(&x[r * per..][..per]);
        }
        out
    });
    let mut shape = dims;
    shape[0] = rows.len();
    Ok(match fused {
        Some(out) => Tensor::from_vec(out, shape, t.device())?,
        None => {
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            t.contiguous()?
                .index_select(&Tensor::from_vec(idx, rows.len(), t.device())?, 0)?
        }
    })
}

/// `past` (`[rows', heads, t, hd]`) with its rows picked by `rows` (all, in order, when
/// `None`), then `new` (`[rows, heads, t', hd]`) appended along the sequence: the result
/// of `index_select` followed by `cat`, built in one copy on the CPU (values copied, never
/// computed: the same bits).
fn gather_append(past: &Tensor, rows: Option<&[usize]>, new: &Tensor) -> Result<Tensor> {
    let (pr, h, tp, hd) = past.dims4()?;
    let (n, h2, tn, hd2) = new.dims4()?;
    if (h, hd) != (h2, hd2) || rows.map_or(pr != n, |r| r.len() != n || r.iter().any(|&i| i >= pr))
    {
        bail!(
            "decoder cache {:?} does not fit new keys/values {:?}",
            past.dims(),
            new.dims()
        );
    }
    let pick = candle_core::CpuStorage::as_slice::<f32>;
    let fused = crate::nn::rows::with_cpu_slice(past, pr * h * tp * hd, pick, |p| {
        crate::nn::rows::with_cpu_slice(new, n * h * tn * hd, pick, |q| {
            let (bp, bq, t) = (tp * hd, tn * hd, (tp + tn) * hd);
            let mut out = Vec::with_capacity(n * h * t);
            for r in 0..n {
                let src = rows.map_or(r, |rows| rows[r]);
                for j in 0..h {
                    out.extend_from_slice(&p[(src * h + j) * bp..][..bp]);
                    out.extend_from_slice(&q[(r * h + j) * bq..][..bq]);
                }
            }
            out
        })
    })
    .flatten();
    Ok(match fused {
        Some(out) => Tensor::from_vec(out, (n, h, tp + tn, hd), past.device())?,
        None => {
            let past = match rows {
                Some(rows) => gather_rows(past, rows)?,
                None => past.clone(),
            };
            Tensor::cat(&[&past, new], 2)?
        }
    })
}

impl HasLinears for Marian {
    fn linears(&self) -> Vec<&QLinear> {
        let mut out = Vec::new();
        for l in &self.encoder {
            let a = &l.self_attn;
            out.extend([&a.q, &a.k, &a.v, &a.o, &l.ffn.fc1, &l.ffn.fc2]);
        }
        for l in &self.decoder {
            let (a, c) = (&l.self_attn, &l.cross_attn);
            out.extend([
                &a.q, &a.k, &a.v, &a.o, &c.q, &c.k, &c.v, &c.o, &l.ffn.fc1, &l.ffn.fc2,
            ]);
        }
        out.push(&self.lm_head);
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut QLinear> {
        let mut out = Vec::new();
        for l in &mut self.encoder {
            let a = &mut l.self_attn;
            out.extend([
                &mut a.q,
                &mut a.k,
                &mut a.v,
                &mut a.o,
                &mut l.ffn.fc1,
                &mut l.ffn.fc2,
            ]);
        }
        for l in &mut self.decoder {
            let (a, c) = (&mut l.self_attn, &mut l.cross_attn);
            out.extend([
                &mut a.q,
                &mut a.k,
                &mut a.v,
                &mut a.o,
                &mut c.q,
                &mut c.k,
                &mut c.v,
                &mut c.o,
                &mut l.ffn.fc1,
                &mut l.ffn.fc2,
            ]);
        }
        out.push(&mut self.lm_head);
        out
    }
}

/// Loads a Hugging Face Marian directory: config.json, then model.safetensors (or the shards of
/// its index) or pytorch_model.bin.
pub fn load_dir(dir: &Path, device: &Device) -> Result<Marian> {
    let cfg_path = dir.join("config.json");
    let v = crate::load::read_json(&cfg_path)?;
    let cfg =
        MarianConfig::from_hf_json(&v).with_context(|| format!("in {}", cfg_path.display()))?;
    let mut src = crate::load::open_checkpoint(dir)?;
    Marian::build(cfg, src.as_mut(), device).with_context(|| format!("loading {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(dims: &[usize], seed: u64) -> Tensor {
        crate::quant::random::randn(dims, seed).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn cache_copies_equal_index_select_and_cat() {
        let past = randn(&[5, 3, 7, 4], 1);
        let new = randn(&[4, 3, 1, 4], 2);
        let rows = [4usize, 0, 0, 2];
        let idx = Tensor::new(&[4u32, 0, 0, 2], &Device::Cpu).unwrap();
        let want = Tensor::cat(&[&past.index_select(&idx, 0).unwrap(), &new], 2).unwrap();
        let got = gather_append(&past, Some(&rows), &new).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert_eq!(bits(&got), bits(&want));
        // The copying fallback (a non-contiguous cache) gives the same values.
        let strided = past.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!strided.is_contiguous());
        assert_eq!(
            bits(&gather_append(&strided, Some(&rows), &new).unwrap()),
            bits(&want)
        );
        // No reordering: a plain concatenation.
        let same = randn(&[5, 3, 2, 4], 3);
        let want = Tensor::cat(&[&past, &same], 2).unwrap();
        assert_eq!(
            bits(&gather_append(&past, None, &same).unwrap()),
            bits(&want)
        );
        // Rows alone.
        let want = past.index_select(&idx, 0).unwrap();
        assert_eq!(bits(&gather_rows(&past, &rows).unwrap()), bits(&want));
        assert_eq!(bits(&gather_rows(&strided, &rows).unwrap()), bits(&want));
        // Shapes that do not fit are errors.
        assert!(gather_append(&past, Some(&[9, 0, 0, 0]), &new).is_err());
        assert!(gather_append(&past, None, &new).is_err());
        assert!(gather_append(&past, Some(&rows), &randn(&[4, 2, 1, 4], 4)).is_err());
    }

    #[test]
    fn select_rows_rejects_rows_out_of_range() {
        let mask = Tensor::zeros((2, 1, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let mut s = DecoderState {
            cross: vec![],
            past: vec![None],
            src_mask: mask,
            source: vec![0, 1],
            pending: None,
            len: 0,
        };
        assert!(s.select_rows(&[0, 2]).is_err());
        s.select_rows(&[1, 1, 0]).unwrap();
        assert_eq!(s.rows().unwrap(), 3);
        assert_eq!(s.source, [1, 1, 0]);
        // A reorder inside the same sources composes with the pending one.
        s.select_rows(&[1, 0, 2]).unwrap();
        assert_eq!(s.pending.as_deref(), Some(&[1, 1, 0][..]));
    }
}
