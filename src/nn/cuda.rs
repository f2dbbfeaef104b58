//! Fused kernels for the GPU forward pass and perplexity scoring, as candle custom ops.
//!
//! candle composes attention from generic ops: a broadcast mask add over the whole
//! `[batch, heads, t, t]` score tensor, a softmax, and key/value heads repeated for
//! grouped-query attention; perplexity takes a full log-softmax over `[rows, vocab]`
//! logits to read one value per row. On a GPU each of these is a pass over hundreds of
//! megabytes. The ops here do the same arithmetic in one pass each:
//!
//! - [`causal_softmax`]: scale, causal mask and softmax of attention scores in one
//!   kernel, rows of query heads that share a key head stacked (no repeated keys);
//! - [`nll_rows`]: `logsumexp(row) − row[target]` per row, in f32, without the
//!   log-probability tensor;
//! - [`rope_heads`]: rotary embedding and the head transpose in one pass;
//! - [`fake_quant_u8_dynamic`]: dynamic per-tensor u8 activation quantization with its
//!   range reduced on the device (the composed version read min and max back to the host
//!   once per layer).
//!
//! The CUDA code is `kernels/cuda/fused.cu`, compiled to PTX by `build.rs` under the
//! `cuda` feature. Every op also has a plain CPU implementation (the reference the CUDA
//! kernels are tested against, in `tests/cuda.rs`; the CPU forward pass keeps its own
//! fused path and does not use these). `QUANTLAB_FUSED=0` turns the fused GPU path off
//! (the composed candle ops run instead), for A/B measurements.

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

/// Whether the forward pass uses the fused kernels on `device`: a CUDA device in a
/// build with the `cuda` feature, unless `QUANTLAB_FUSED=0`.
pub fn enabled(device: &candle_core::Device) -> bool {
    cfg!(feature = "cuda")
        && device.is_cuda()
        && std::env::var("QUANTLAB_FUSED").map_or(true, |v| v != "0")
}

/// Softmax over the last dimension of `scores` `[.., rows, total]` after multiplying by
/// `scale`, with a causal mask: within the last two dimensions, row `r` is the query at
/// position `r % t + (total − t)` and sees the columns up to it (so `rows` may stack
/// several query heads of `t` positions each). Masked columns get probability 0. Output
/// in the scores' dtype, computed in f32.
pub fn causal_softmax(scores: &Tensor, t: usize, scale: f32) -> Result<Tensor> {
    let dims = scores.dims();
    if dims.len() < 2 {
        bail!("causal softmax of a tensor of shape {dims:?}");
    }
    let (rows, total) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if t == 0 || t > total || rows % t != 0 {
        bail!("causal softmax of {rows} × {total} scores for {t} query positions");
    }
    let op = CausalSoftmax {
        t,
        offset: total - t,
        scale,
    };
    Ok(scores.contiguous()?.apply_op1_no_bwd(&op)?)
}

/// `logsumexp(logits[n]) − logits[n][targets[n]]` for each row `n` of `logits`
/// `[rows, vocab]` (f32, bf16 or f16), in f32 (`[rows]`). A target outside the
/// vocabulary gives NaN.
pub fn nll_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        bail!(
            "{rows} rows of logits need {rows} u32 targets, got {:?} {:?}",
            targets.dims(),
            targets.dtype()
        );
    }
    Ok(logits
        .contiguous()?
        .apply_op2_no_bwd(&targets.contiguous()?, &NllRows)?)
}

/// Dynamic per-tensor u8 activation quantization, emulated (quantized and dequantized,
/// same dtype out): the range is the whole tensor's min and max, scale and zero point as
/// the CPU kernel's `activation_qparams_u8`, codes `round_half_even(x / scale) + zp`
/// clamped to 0..=255. On the GPU the range never leaves the device (two kernels, no
/// host round trip). A NaN or infinite input gives NaN everywhere.
pub fn fake_quant_u8_dynamic(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1_no_bwd(&FakeQuantU8Dyn)?)
}

struct FakeQuantU8Dyn;

/// The CPU version (the reference for the CUDA kernels): the CPU int8 kernel's rule.
fn fake_quant_cpu<T: Copy>(x: &[T], to: impl Fn(T) -> f32, from: impl Fn(f32) -> T) -> Vec<T> {
    let v: Vec<f32> = x.iter().map(|&a| to(a)).collect();
    if v.iter().any(|a| !a.is_finite()) {
        return v.iter().map(|_| from(f32::NAN)).collect();
    }
    let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (scale, zp) = crate::nn::kernels::activation_qparams_u8(lo, hi);
    let (inv, zp) = (1.0 / scale, zp as f32);
    v.iter()
        .map(|&a| from((((a * inv).round_ties_even() + zp).clamp(0.0, 255.0) - zp) * scale))
        .collect()
}

impl CustomOp1 for FakeQuantU8Dyn {
    fn name(&self) -> &'static str {
        "fake-quant-u8-dynamic"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (o1, o2) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fake quant needs a contiguous tensor".into())
        })?;
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(fake_quant_cpu(&x[o1..o2], |a| a, |a| a)),
            CpuStorage::BF16(x) => {
                CpuStorage::BF16(fake_quant_cpu(&x[o1..o2], bf16::to_f32, bf16::from_f32))
            }
            CpuStorage::F16(x) => {
                CpuStorage::F16(fake_quant_cpu(&x[o1..o2], f16::to_f32, f16::from_f32))
            }
            s => candle_core::bail!("fake quant of {:?} activations", s.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let slice = gpu::fake_quant_u8_dynamic(storage, layout)?;
        let device = storage.device.clone();
        Ok((
            candle_core::CudaStorage { slice, device },
            layout.shape().clone(),
        ))
    }
}

/// Rotary position embedding fused with the head transpose: `x` `[b, t, heads · hd]` (a
/// projection's output) to `[b, heads, t, hd]`, rotated at positions `offset..offset + t`
/// by `cos`/`sin` `[positions, hd / 2]` (same dtype as `x`); pairs `(2i, 2i + 1)` when
/// `interleaved`, else `(i, i + hd/2)`. Computed in f32. Replaces a transpose copy and
/// candle's rope kernel (two passes) with one.
pub fn rope_heads(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    offset: usize,
    interleaved: bool,
) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let (positions, half) = cos.dims2()?;
    if heads == 0 || width != heads * 2 * half || sin.dims() != cos.dims() {
        bail!(
            "rope of {:?} in {heads} heads with tables {:?} / {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    if offset + t > positions {
        bail!("rope at positions up to {} of {positions}", offset + t);
    }
    if cos.dtype() != x.dtype() || sin.dtype() != x.dtype() {
        bail!("rope tables must be in the activations' dtype");
    }
    let op = RopeHeads {
        b,
        t,
        heads,
        hd: 2 * half,
        offset,
        interleaved,
    };
    Ok(x.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?)
}

struct RopeHeads {
    b: usize,
    t: usize,
    heads: usize,
    hd: usize,
    offset: usize,
    interleaved: bool,
}

impl RopeHeads {
    /// The CPU version (the reference for the CUDA kernel).
    fn cpu<T: Copy>(
        &self,
        x: &[T],
        cos: &[T],
        sin: &[T],
        to: impl Fn(T) -> f32,
        from: impl Fn(f32) -> T,
    ) -> Vec<T> {
        let (b, t, heads, hd) = (self.b, self.t, self.heads, self.hd);
        let half = hd / 2;
        let mut y = vec![from(0.0); b * t * heads * hd];
        for bi in 0..b {
            for pos in 0..t {
                for h in 0..heads {
                    let src = ((bi * t + pos) * heads + h) * hd;
                    let dst = ((bi * heads + h) * t + pos) * hd;
                    for p in 0..half {
                        let (a0, a1) = if self.interleaved {
                            (2 * p, 2 * p + 1)
                        } else {
                            (p, p + half)
                        };
                        let k = (self.offset + pos) * half + p;
                        let (c, s) = (to(cos[k]), to(sin[k]));
                        let (x0, x1) = (to(x[src + a0]), to(x[src + a1]));
                        y[dst + a0] = from(x0 * c - x1 * s);
                        y[dst + a1] = from(x0 * s + x1 * c);
                    }
                }
            }
        }
        y
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.b, self.heads, self.t, self.hd))
    }
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let part = |l: &Layout| {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("rope needs contiguous tensors".into()))
        };
        let ((a1, b1), (a2, b2), (a3, b3)) = (part(l1)?, part(l2)?, part(l3)?);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(self.cpu(&x[a1..b1], &c[a2..b2], &s[a3..b3], |a| a, |a| a))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                CpuStorage::BF16(self.cpu(
                    &x[a1..b1],
                    &c[a2..b2],
                    &s[a3..b3],
                    bf16::to_f32,
                    bf16::from_f32,
                ))
            }
            (CpuStorage::F16(x), CpuStorage::F16(c), CpuStorage::F16(s)) => {
                CpuStorage::F16(self.cpu(
                    &x[a1..b1],
                    &c[a2..b2],
                    &s[a3..b3],
                    f16::to_f32,
                    f16::from_f32,
                ))
            }
            _ => candle_core::bail!("rope of {:?} activations", s1.dtype()),
        };
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let slice = gpu::rope_heads(self, (s1, l1), (s2, l2), (s3, l3))?;
        let device = s1.device.clone();
        Ok((candle_core::CudaStorage { slice, device }, self.out_shape()))
    }
}

struct CausalSoftmax {
    t: usize,
    offset: usize,
    scale: f32,
}

/// The rows × columns of the last two dimensions of a contiguous layout.
fn last_two(layout: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let dims = layout.dims();
    if layout.contiguous_offsets().is_none() || dims.len() < 2 {
        candle_core::bail!("fused op needs a contiguous tensor of rank ≥ 2, got {dims:?}");
    }
    let cols = dims[dims.len() - 1];
    let el = layout.shape().elem_count();
    Ok((el / cols.max(1), cols, layout.start_offset()))
}

/// The CPU version: plain loops in f32 (the reference for the CUDA kernel).
fn softmax_rows<T: Copy>(
    x: &[T],
    cols: usize,
    op: &CausalSoftmax,
    to: impl Fn(T) -> f32,
    from: impl Fn(f32) -> T,
) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for (r, row) in x.chunks(cols).enumerate() {
        let n = (r % op.t + op.offset + 1).min(cols);
        let v: Vec<f32> = row[..n].iter().map(|&a| to(a) * op.scale).collect();
        let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let s: f32 = v.iter().map(|&a| (a - m).exp()).sum();
        out.extend(v.iter().map(|&a| from((a - m).exp() / s)));
        out.extend((n..cols).map(|_| from(0.0)));
    }
    out
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols, start) = last_two(layout)?;
        let n = rows * cols;
        let out = match storage {
            CpuStorage::F32(x) => {
                CpuStorage::F32(softmax_rows(&x[start..start + n], cols, self, |a| a, |a| a))
            }
            CpuStorage::BF16(x) => CpuStorage::BF16(softmax_rows(
                &x[start..start + n],
                cols,
                self,
                bf16::to_f32,
                bf16::from_f32,
            )),
            CpuStorage::F16(x) => CpuStorage::F16(softmax_rows(
                &x[start..start + n],
                cols,
                self,
                f16::to_f32,
                f16::from_f32,
            )),
            s => candle_core::bail!("causal softmax of {:?} scores", s.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let slice = gpu::causal_softmax(self, storage, layout)?;
        let device = storage.device.clone();
        Ok((
            candle_core::CudaStorage { slice, device },
            layout.shape().clone(),
        ))
    }
}

struct NllRows;

/// The CPU version: per row, max, Σ exp in f64 (the reference for the CUDA kernel).
fn nll_cpu<T: Copy>(x: &[T], cols: usize, targets: &[u32], to: impl Fn(T) -> f32) -> Vec<f32> {
    x.chunks(cols)
        .zip(targets)
        .map(|(row, &k)| {
            let m = row
                .iter()
                .fold(f64::NEG_INFINITY, |a, &b| a.max(to(b) as f64));
            let s: f64 = row.iter().map(|&a| (to(a) as f64 - m).exp()).sum();
            match row.get(k as usize) {
                Some(&v) => (m + s.ln() - to(v) as f64) as f32,
                None => f32::NAN,
            }
        })
        .collect()
}

impl CustomOp2 for NllRows {
    fn name(&self) -> &'static str {
        "nll-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols, start) = last_two(l1)?;
        let n = rows * cols;
        let CpuStorage::U32(targets) = s2 else {
            candle_core::bail!("nll targets must be u32");
        };
        let targets = &targets[l2.start_offset()..l2.start_offset() + rows];
        let out = match s1 {
            CpuStorage::F32(x) => nll_cpu(&x[start..start + n], cols, targets, |a| a),
            CpuStorage::BF16(x) => nll_cpu(&x[start..start + n], cols, targets, bf16::to_f32),
            CpuStorage::F16(x) => nll_cpu(&x[start..start + n], cols, targets, f16::to_f32),
            s => candle_core::bail!("nll of {:?} logits", s.dtype()),
        };
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (rows, slice) = gpu::nll_rows(s1, l1, s2, l2)?;
        let device = s1.device.clone();
        Ok((
            candle_core::CudaStorage { slice, device },
            Shape::from(rows),
        ))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod gpu {
    //! Launches of the kernels in `kernels/cuda/fused.cu`.
    use super::{last_two, CausalSoftmax, RopeHeads};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result};

    /// The PTX of `kernels/cuda/fused.cu` and the module name it is loaded under (shared
    /// with `nn::cuda_lt`, whose kernels live in the same file).
    pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    pub(crate) const MODULE: &str = "quantlab_fused";

    fn i32_of(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} too large")))
    }

    fn softmax_t<T: DeviceRepr>(
        op: &CausalSoftmax,
        x: &CudaSlice<T>,
        dev: &CudaDevice,
        layout: &Layout,
        name: &str,
    ) -> Result<CudaSlice<T>> {
        let (rows, cols, start) = last_two(layout)?;
        let x = x.slice(start..start + rows * cols);
        // Rows of at most 256 16-byte vectors, 16-byte aligned: the register-resident
        // kernel (one read of the scores); otherwise the two-pass one.
        let e = 16 / std::mem::size_of::<T>();
        let vec = (cols % e == 0 && start % e == 0)
            .then(|| [1usize, 2, 4, 8].into_iter().find(|nv| 32 * nv * e >= cols))
            .flatten();
        let kernel = match vec {
            Some(nv) => format!("causal_softmax_v{nv}_{name}"),
            None => format!("causal_softmax_{name}"),
        };
        let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel (each row's columns, masked ones
        // as 0) before the tensor is read.
        let y = unsafe { dev.alloc::<T>(rows * cols)? };
        const ROWS_PER_BLOCK: usize = 4;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (32, ROWS_PER_BLOCK as u32, 1),
            shared_mem_bytes: 0,
        };
        let (r, t, c, o) = (
            i32_of(rows, "rows")?,
            i32_of(op.t, "positions")?,
            i32_of(cols, "columns")?,
            i32_of(op.offset, "offset")?,
        );
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&y);
        b.arg(&r);
        b.arg(&t);
        b.arg(&c);
        b.arg(&o);
        b.arg(&op.scale);
        // SAFETY: the argument list matches the kernel's signature (two pointers to
        // `rows × cols` elements of T, four i32, one f32); the kernel bounds its reads
        // and writes by rows and cols.
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn causal_softmax(
        op: &CausalSoftmax,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<S> {
        let dev = &storage.device;
        Ok(match &storage.slice {
            S::F32(x) => S::F32(softmax_t(op, x, dev, layout, "f32")?),
            S::BF16(x) => S::BF16(softmax_t(op, x, dev, layout, "bf16")?),
            S::F16(x) => S::F16(softmax_t(op, x, dev, layout, "f16")?),
            _ => candle_core::bail!("causal softmax of {:?} scores", storage.dtype()),
        })
    }

    fn nll_t<T: DeviceRepr>(
        x: &CudaSlice<T>,
        l1: &Layout,
        targets: &CudaSlice<u32>,
        l2: &Layout,
        dev: &CudaDevice,
        name: &str,
    ) -> Result<(usize, CudaSlice<f32>)> {
        let (rows, cols, start) = last_two(l1)?;
        let x = x.slice(start..start + rows * cols);
        let targets = targets.slice(l2.start_offset()..l2.start_offset() + rows);
        let func = dev.get_or_load_custom_func(&format!("nll_rows_{name}"), MODULE, PTX)?;
        // SAFETY: the kernel writes one value per row.
        let y = unsafe { dev.alloc::<f32>(rows)? };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let c = i32_of(cols, "vocabulary")?;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&targets);
        b.arg(&y);
        b.arg(&c);
        // SAFETY: the argument list matches the kernel's signature (logits `rows × cols`
        // of T, `rows` u32 targets, `rows` f32 outputs, one i32); reads of a target's
        // logit are bounds-checked in the kernel.
        unsafe { b.launch(cfg) }.w()?;
        Ok((rows, y))
    }

    type Arg<'a> = (&'a CudaStorage, &'a Layout);

    fn rope_t<T: DeviceRepr>(
        op: &RopeHeads,
        x: (&CudaSlice<T>, &Layout),
        cos: (&CudaSlice<T>, &Layout),
        sin: (&CudaSlice<T>, &Layout),
        dev: &CudaDevice,
        name: &str,
    ) -> Result<CudaSlice<T>> {
        fn part<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
            let (a, b) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("rope needs contiguous tensors".into()))?;
            Ok(s.slice(a..b))
        }
        let (xs, cs, ss) = (part(x.0, x.1)?, part(cos.0, cos.1)?, part(sin.0, sin.1)?);
        let half = op.hd / 2;
        let n = op.b * op.t * op.heads * op.hd;
        if xs.len() < n || cs.len() < (op.offset + op.t) * half || ss.len() < cs.len() {
            candle_core::bail!("rope: tensors smaller than their shapes say");
        }
        let func = dev.get_or_load_custom_func(&format!("rope_heads_{name}"), MODULE, PTX)?;
        // SAFETY: the kernel writes both elements of every pair, i.e. all n elements.
        let y = unsafe { dev.alloc::<T>(n.max(1))? };
        let pairs = n / 2;
        let cfg = LaunchConfig {
            grid_dim: (pairs.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [op.b, op.t, op.heads, op.hd, op.offset]
            .map(|v| i32_of(v, "rope dimension"))
            .into_iter()
            .collect::<Result<Vec<i32>>>()?;
        let il = op.interleaved as i32;
        let mut b = func.builder();
        b.arg(&xs);
        b.arg(&cs);
        b.arg(&ss);
        b.arg(&y);
        for a in &args {
            b.arg(a);
        }
        b.arg(&il);
        // SAFETY: arguments match `rope_heads_T(const T*, const T*, const T*, T*, int b,
        // int t, int heads, int hd, int offset, int interleaved)`; sizes were checked above
        // and the kernel returns for indices past b·t·heads·hd/2.
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn rope_heads(op: &RopeHeads, x: Arg, cos: Arg, sin: Arg) -> Result<S> {
        let dev = &x.0.device;
        Ok(match (&x.0.slice, &cos.0.slice, &sin.0.slice) {
            (S::F32(a), S::F32(c), S::F32(s)) => {
                S::F32(rope_t(op, (a, x.1), (c, cos.1), (s, sin.1), dev, "f32")?)
            }
            (S::BF16(a), S::BF16(c), S::BF16(s)) => {
                S::BF16(rope_t(op, (a, x.1), (c, cos.1), (s, sin.1), dev, "bf16")?)
            }
            (S::F16(a), S::F16(c), S::F16(s)) => {
                S::F16(rope_t(op, (a, x.1), (c, cos.1), (s, sin.1), dev, "f16")?)
            }
            _ => candle_core::bail!("rope of {:?} activations", x.0.dtype()),
        })
    }

    fn fake_quant_t<T: DeviceRepr>(
        x: &CudaSlice<T>,
        dev: &CudaDevice,
        layout: &Layout,
        name: &str,
    ) -> Result<CudaSlice<T>> {
        let (o1, o2) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fake quant needs a contiguous tensor".into())
        })?;
        let n = o2 - o1;
        let x = x.slice(o1..o2);
        const THREADS: usize = 256;
        let parts = n.div_ceil(THREADS * 8).clamp(1, 1024);
        let minmax = dev.get_or_load_custom_func(&format!("minmax_partial_{name}"), MODULE, PTX)?;
        let quant =
            dev.get_or_load_custom_func(&format!("fake_quant_u8_dyn_{name}"), MODULE, PTX)?;
        // SAFETY: pass 1 writes both values of every block's pair before pass 2 (same
        // stream) reads them; pass 2 writes every element of y.
        let part = unsafe { dev.alloc::<f32>(2 * parts)? };
        let y = unsafe { dev.alloc::<T>(n.max(1))? };
        let n64 = n as i64;
        let p32 = parts as i32;
        let mut b = minmax.builder();
        b.arg(&x);
        b.arg(&n64);
        b.arg(&part);
        let cfg = LaunchConfig {
            grid_dim: (parts as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `minmax_partial_T(const T*, long long, float*)`; the
        // kernel reads x below n and writes part[0..2 * gridDim).
        unsafe { b.launch(cfg) }.w()?;
        let mut b = quant.builder();
        b.arg(&x);
        b.arg(&y);
        b.arg(&n64);
        b.arg(&part);
        b.arg(&p32);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(THREADS).clamp(1, 8192) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `fake_quant_u8_dyn_T(const T*, T*, long long, const
        // float*, int)`; the kernel reads x and writes y below n, reads part[0..2 * parts).
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn fake_quant_u8_dynamic(storage: &CudaStorage, layout: &Layout) -> Result<S> {
        let dev = &storage.device;
        Ok(match &storage.slice {
            S::F32(x) => S::F32(fake_quant_t(x, dev, layout, "f32")?),
            S::BF16(x) => S::BF16(fake_quant_t(x, dev, layout, "bf16")?),
            S::F16(x) => S::F16(fake_quant_t(x, dev, layout, "f16")?),
            _ => candle_core::bail!("fake quant of {:?} activations", storage.dtype()),
        })
    }

    pub(super) fn nll_rows(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(usize, S)> {
        let dev = &s1.device;
        let S::U32(targets) = &s2.slice else {
            candle_core::bail!("nll targets must be u32");
        };
        let (rows, y) = match &s1.slice {
            S::F32(x) => nll_t(x, l1, targets, l2, dev, "f32")?,
            S::BF16(x) => nll_t(x, l1, targets, l2, dev, "bf16")?,
            S::F16(x) => nll_t(x, l1, targets, l2, dev, "f16")?,
            _ => candle_core::bail!("nll of {:?} logits", s1.dtype()),
        };
        Ok((rows, S::F32(y)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The op's CPU version equals the composed path (scale, −∞ mask, softmax) that the
    /// forward pass runs without fused kernels, with query heads stacked as the GPU
    /// forward pass stacks them.
    #[test]
    fn causal_softmax_matches_mask_then_softmax() -> Result<()> {
        let dev = Device::Cpu;
        for &(heads, t, offset) in &[(3usize, 5usize, 0usize), (2, 1, 6), (1, 7, 3)] {
            let total = t + offset;
            let s = Tensor::randn(0f32, 3., (2, heads * t, total), &dev)?;
            let got = causal_softmax(&s, t, 0.25)?;
            let mut mask = vec![0f32; t * total];
            for i in 0..t {
                for j in i + offset + 1..total {
                    mask[i * total + j] = f32::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(mask, (t, total), &dev)?;
            let want = (s.reshape((2, heads, t, total))? * 0.25)?.broadcast_add(&mask)?;
            let want = candle_nn::ops::softmax_last_dim(&want)?.reshape((2, heads * t, total))?;
            let d = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-6, "heads {heads} t {t} offset {offset}: {d}");
        }
        assert!(causal_softmax(&Tensor::zeros((4, 5), DType::F32, &dev)?, 3, 1.0).is_err());
        Ok(())
    }

    /// The op's CPU version equals candle's rope (both layouts) on the transposed heads.
    #[test]
    fn rope_heads_matches_transpose_then_rope() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, heads, hd, offset) = (2, 5, 3, 8, 4);
        let x = Tensor::randn(0f32, 1., (b, t, heads * hd), &dev)?;
        let cos = Tensor::randn(0f32, 1., (16, hd / 2), &dev)?;
        let sin = Tensor::randn(0f32, 1., (16, hd / 2), &dev)?;
        for interleaved in [false, true] {
            let got = rope_heads(&x, &cos, &sin, heads, offset, interleaved)?;
            let xt = x
                .reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let (c, s) = (cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?);
            let want = if interleaved {
                candle_nn::rotary_emb::rope_i(&xt, &c, &s)?
            } else {
                candle_nn::rotary_emb::rope(&xt, &c, &s)?
            };
            let d = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "interleaved {interleaved}: {d}");
        }
        assert!(rope_heads(&x, &cos, &sin, heads, 12, false).is_err());
        assert!(rope_heads(&x, &cos, &sin, 2, 0, false).is_err());
        Ok(())
    }

    /// The op's CPU version equals the CPU int8 kernel's quantize/dequantize.
    #[test]
    fn fake_quant_matches_the_int8_kernel_rule() -> Result<()> {
        let x = Tensor::randn(0.5f32, 2., (3, 41), &Device::Cpu)?;
        let got = fake_quant_u8_dynamic(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (scale, zp) = crate::nn::kernels::activation_qparams_u8(lo, hi);
        let codes = crate::nn::kernels::quantize_u8(&v, scale, zp);
        for (g, c) in got.iter().zip(codes) {
            assert_eq!(*g, (c as i32 - zp) as f32 * scale);
        }
        let bad = Tensor::from_vec(vec![1f32, f32::NAN, 2.0], 3, &Device::Cpu)?;
        assert!(fake_quant_u8_dynamic(&bad)?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_nan()));
        Ok(())
    }

    /// The op's CPU version equals −log_softmax at the target.
    #[test]
    fn nll_rows_matches_log_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 4., (6, 37), &dev)?;
        let targets = Tensor::from_vec(vec![0u32, 36, 5, 17, 2, 9], 6, &dev)?;
        let got = nll_rows(&x, &targets)?.to_vec1::<f32>()?;
        let lp = candle_nn::ops::log_softmax(&x, 1)?;
        let want = lp.gather(&targets.unsqueeze(1)?, 1)?.flatten_all()?;
        for (g, w) in got.iter().zip(want.to_vec1::<f32>()?) {
            assert!((g + w).abs() < 1e-5, "{g} vs {}", -w);
        }
        let bad = Tensor::from_vec(vec![0u32, 37, 0, 0, 0, 0], 6, &dev)?;
        assert!(nll_rows(&x, &bad)?.to_vec1::<f32>()?[1].is_nan());
        Ok(())
    }
}
