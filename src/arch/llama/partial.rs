//! The decoder block split in two halves (attention, feed-forward) on host buffers, shared by
//! the CPU forward pass and by callers that resume a forward pass from a stored hidden
//! state (the layer-sensitivity pass perturbs one layer and recomputes only what follows it).
//! One window at a time, f32 on the CPU; the arithmetic is exactly that of
//! [`Llama::forward`] on the CPU.

use super::{fused, Block, Llama, RopeLayout};
use crate::nn::kernels::llm_f32::{self, KvHeads, RopePairs};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// A tensor's values on the host, row-major.
pub(super) fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Runs `f` on a tensor's values on the host: borrowed when the tensor is a contiguous f32
/// CPU buffer (the linear layers' outputs are), copied otherwise. Read-only uses of a
/// layer's output borrow it, so a 512-token prefill does not copy 6 MB per block on one
/// thread while the other waits.
pub(super) fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let mut f = Some(f);
    if t.dtype() == DType::F32 {
        let n = t.elem_count();
        let r =
            crate::nn::rows::with_cpu_slice(t, n, candle_core::CpuStorage::as_slice::<f32>, |v| {
                f.take().map(|f| f(v))
            });
        if let Some(Some(r)) = r {
            return Ok(r);
        }
    }
    let v = host(t)?;
    let f = f
        .take()
        .ok_or_else(|| anyhow::anyhow!("with_host: the closure already ran"))?;
    Ok(f(&v))
}

/// The attention shapes and constants of a block, from the config (shared by the resumed
/// forward pass here and the staged calibration pass).
pub(super) struct AttnDims {
    pub hs: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub eps: f32,
    pub scale: f32,
    pub pairs: RopePairs,
}

/// Where a resumed forward pass starts: the input of one half of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stage {
    pub block: usize,
    /// 0: attention (q, k, v, o read from here); 1: feed-forward (gate, up, down).
    pub half: usize,
}

impl Stage {
    /// Position in the sequence of halves: `2 * block + half`.
    pub fn index(&self) -> usize {
        2 * self.block + self.half
    }
}

impl Llama {
    pub(super) fn attn_dims(&self) -> AttnDims {
        let c = &self.cfg;
        AttnDims {
            hs: c.hidden_size,
            nh: c.num_attention_heads,
            nkv: c.num_key_value_heads,
            hd: c.head_dim,
            eps: c.rms_norm_eps as f32,
            scale: (1.0 / (c.head_dim as f64).sqrt()) as f32,
            pairs: match self.rope_layout {
                RopeLayout::Interleaved => RopePairs::Adjacent,
                RopeLayout::HalfSplit => RopePairs::Halves,
            },
        }
    }

    /// `x += attention(norm(x))` for block `b` on `t` rows of `x` placed after `kv`'s
    /// `offset` cached positions (appended to `kv`).
    pub(super) fn attention_half(
        &self,
        b: &Block,
        x: &mut [f32],
        t: usize,
        kv: &mut KvHeads,
        offset: usize,
    ) -> Result<()> {
        let AttnDims {
            hs,
            nh,
            nkv,
            hd,
            eps,
            scale,
            pairs,
        } = self.attn_dims();
        let dev = &self.device;
        // The norm's weights are read in place (no per-step copy of a host vector).
        let h = with_host(&b.attn_norm, |w| llm_f32::rms_norm(x, w, eps))?;
        let h = Tensor::from_vec(h, (t, hs), dev)?;
        let [mut q, mut k, v]: [Vec<f32>; 3] =
            fused::project(&b.qkv_fused, self.fuse, &[&b.q, &b.k, &b.v], &h, t)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("q/k/v projection gave the wrong part count"))?;
        llm_f32::rope_qk(
            &mut q,
            nh,
            &mut k,
            nkv,
            hd,
            offset,
            &self.cos_host,
            &self.sin_host,
            pairs,
        );
        kv.append(&k, &v, nkv, hd);
        let y = llm_f32::causal_attention(&q, t, nh, hd, kv, offset, scale);
        let y = b.o.forward(&Tensor::from_vec(y, (t, nh * hd), dev)?)?;
        with_host(&y, |y| llm_f32::add_in_place(x, y))?;
        Ok(())
    }

    /// `x += down(silu(gate(norm(x))) · up(norm(x)))` for block `b`.
    pub(super) fn mlp_half(&self, b: &Block, x: &mut [f32], t: usize) -> Result<()> {
        let c = &self.cfg;
        let dev = &self.device;
        let eps = c.rms_norm_eps as f32;
        let h = with_host(&b.ffn_norm, |w| llm_f32::rms_norm(x, w, eps))?;
        let h = Tensor::from_vec(h, (t, c.hidden_size), dev)?;
        let [mut g, u]: [Vec<f32>; 2] =
            fused::project(&b.gate_up_fused, self.fuse, &[&b.gate, &b.up], &h, t)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("gate/up projection gave the wrong part count"))?;
        llm_f32::silu_mul(&mut g, &u);
        let d = b
            .down
            .forward(&Tensor::from_vec(g, (t, c.intermediate_size), dev)?)?;
        with_host(&d, |d| llm_f32::add_in_place(x, d))?;
        Ok(())
    }

    /// Whether the host-buffer path can run (CPU, f32 embeddings).
    fn check_host_path(&self) -> Result<()> {
        if !self.device.is_cpu() || self.embed.dtype() != DType::F32 {
            bail!("resumable forward passes run on the CPU in f32: load the model with --device cpu --dtype f32");
        }
        Ok(())
    }

    /// Number of decoder blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The stage whose input layer `name` reads, if it is a block's linear layer.
    pub fn stage_of(&self, name: &str) -> Option<Stage> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            if [&b.q, &b.k, &b.v, &b.o].iter().any(|l| l.name == name) {
                Some(Stage { block: i, half: 0 })
            } else if [&b.gate, &b.up, &b.down].iter().any(|l| l.name == name) {
                Some(Stage { block: i, half: 1 })
            } else {
                None
            }
        })
    }

    /// The embedded window `[t * hidden]` (the input of stage 0).
    pub fn embed_window(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_host_path()?;
        if ids.is_empty() || ids.len() > self.cfg.max_position_embeddings {
            bail!(
                "a window of {} tokens: use 1 to {} (the model's context)",
                ids.len(),
                self.cfg.max_position_embeddings
            );
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            bail!(
                "token id {id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        host(&self.embed.index_select(&ids, 0)?)
    }

    /// Runs one stage on a whole window (`x` is `[t * hidden]`, positions from 0): the
    /// attention half recomputes its keys and values, as the window has no cache.
    pub fn run_stage(&self, s: Stage, x: &mut [f32]) -> Result<()> {
        self.check_host_path()?;
        let hs = self.cfg.hidden_size;
        if x.is_empty() || !x.len().is_multiple_of(hs) {
            bail!("hidden states of {} values are not rows of {hs}", x.len());
        }
        let t = x.len() / hs;
        let b = self
            .blocks
            .get(s.block)
            .ok_or_else(|| anyhow::anyhow!("no block {} (of {})", s.block, self.blocks.len()))?;
        match s.half {
            0 => self.attention_half(b, x, t, &mut KvHeads::default(), 0),
            1 => self.mlp_half(b, x, t),
            h => bail!("a block has halves 0 and 1, not {h}"),
        }
    }

    /// Log-probabilities `[t, vocab]` of the final hidden states `x` (`[t * hidden]`).
    pub fn head_log_probs(&self, x: &[f32]) -> Result<Tensor> {
        self.check_host_path()?;
        let hs = self.cfg.hidden_size;
        if x.is_empty() || !x.len().is_multiple_of(hs) {
            bail!("hidden states of {} values are not rows of {hs}", x.len());
        }
        let t = x.len() / hs;
        let h = Tensor::from_vec(
            llm_f32::rms_norm(x, &host(&self.norm)?, self.cfg.rms_norm_eps as f32),
            (t, hs),
            &self.device,
        )?;
        Llama::log_softmax(&self.lm_head.forward(&h)?)
    }
}
