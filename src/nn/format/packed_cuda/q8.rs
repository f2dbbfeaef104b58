//! The packed decode GEMV against activations quantized to 8 bits per 32 columns
//! (`--activations q8` on a GPU; `kernels/cuda/gemv_q8.cuh`): llama.cpp's CUDA approach
//! (activations quantized once per call, `__dp4a` integer products), here on the codes
//! and (scale, zero) pairs of [`PackedWeight`], so no second copy of the weight is kept.
//!
//! Arithmetic (the CPU q8 route's, `kernels::ggml_blocks::panels`): each 32-column block
//! of an activation row becomes `d = max|x|/127`, `q = round(x·(1/d))` (half away from
//! zero), `d` kept as f16; per output row and block the exact integer sum
//! `I = Σ (u − z)·q` (code `u`, integer zero point `z`; code books rounded to signed bytes
//! `t8 = round(127·t/max|t|)`, `gemv_q8::code_book_i8`), and `y += f32(I)·(s_w·d)` in f32
//! (`s_w·max|t|/127` for code books). The block sums are exact, so the GPU and the CPU
//! differ only in the order of the f32 additions over blocks.
//!
//! Where it applies ([`eligible`]): 4-bit (nibble) and 8-bit (byte) codes with integer
//! zero points, NF4/FP4 code books, scale groups of whole blocks (a multiple of 32
//! columns, or one per row), at most [`MAX_ROWS`] activation rows. Other layouts (real
//! zero points, groups of 16, more rows) keep the exact kernels.
//!
//! Two routes ([`Route`]): the fused kernel (`gemv_q8f_*`), one launch per product, each
//! block quantizing the activation rows into shared memory in its prologue (bit for bit
//! as the quantization kernel) and walking row tiles so that about one wave of blocks
//! quantizes x once each; and two launches (`q8_quantize_*` into a scratch buffer, then
//! `gemv_q8_*`). By default weights up to [`FUSED_MAX_WEIGHTS`] take the fused kernel
//! (where the second launch cost most), larger ones the two launches (as fast or faster
//! there), as do rows too long for shared memory; `QUANTLAB_Q8_FUSED=1|0` forces one. Both take the same lanes per row, so their outputs are equal.
//! Small layers (fewer row tiles than multiprocessors) get blocks of fewer warps and more
//! lanes per row ([`shape_threads`]).
//!
//! Measured on the H200 before fusion (`bench-gemv`, bf16 activations, m = 1, one run,
//! two launches): at 14336×4096, 8192² and 28672×8192 it read 2.3–3.7 TB/s of packed
//! bytes, 1.35–1.76x cuBLAS bf16 for 8-bit codes and 1.44–1.99x for 4-bit; on SmolLM2's
//! layers (576–1536 rows) the two launches cost more than the bytes saved (0.55–1.1x
//! cuBLAS). The fused kernel there: 1.1–1.6x (README's GPU section).
//!
//! The CPU side of the op is [`reference`], the kernel's arithmetic in plain Rust (what
//! the tests check the kernel and the CPU q8 route against).

use super::{contiguous, Decode, GemvShape, Output, PackedWeight};
use crate::nn::kernels::gemv_q8::code_book_i8;
use crate::nn::kernels::prefill::{self, ActivationMode};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

/// Columns per activation block.
pub const BLOCK: usize = 32;

/// Most activation rows the q8 kernel takes (`Q8_MM` in gemv_q8.cuh).
pub const MAX_ROWS: usize = 2;

/// How a q8 product runs on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// [`Route::Fused`] with the automatic grid up to [`FUSED_MAX_WEIGHTS`] weights (stacks
    /// counted whole), [`Route::TwoLaunch`] above; `QUANTLAB_Q8_FUSED=1` or `=0` (A/B runs)
    /// takes one route at every size.
    #[default]
    Auto,
    /// One launch (`gemv_q8f_*`): each block quantizes the activation rows into shared
    /// memory in its prologue. At most `max_blocks` blocks (0: about one wave, from the
    /// kernel's occupancy; tests give small numbers so that each block walks many row
    /// tiles). Rows whose quantized copy does not fit in a block's shared memory
    /// (`m · ⌈k/32⌉ · 40` bytes above the device's opt-in limit, 227 KB on the H200:
    /// k > 90,000 at m = 2) take the two launches.
    Fused { max_blocks: u32 },
    /// Two launches: `q8_quantize_*` into a scratch buffer, then `gemv_q8_*`.
    TwoLaunch,
}

/// Largest weight (rows × columns) that [`Route::Auto`] gives the fused kernel. Measured
/// on the H200 (bench-gemv, bf16, one run each at m = 1 and 2): up to 4096² the fused
/// kernel wins everywhere (SmolLM2's layers 1.1–1.6x cuBLAS against 0.8–0.9x with two
/// launches; 4096² 1.23–1.50x against 1.10–1.14x); from 14336×4096 the two launches are as
/// fast or faster (NF4 1.46–1.93x against 1.09–1.51x, everything at m = 2): their grid of
/// one block per row tile balances better than the fused kernel's one wave of blocks that
/// each quantize x first.
pub const FUSED_MAX_WEIGHTS: usize = 1 << 24;

impl Route {
    /// The route of [`Route::Auto`] for a weight of `weights` rows × columns, given
    /// `QUANTLAB_Q8_FUSED` (`Some(true)`: fused, `Some(false)`: two launches, `None`: by size).
    pub fn auto(weights: usize, forced: Option<bool>) -> Route {
        match forced {
            Some(false) => Route::TwoLaunch,
            Some(true) => Route::Fused { max_blocks: 0 },
            None if weights <= FUSED_MAX_WEIGHTS => Route::Fused { max_blocks: 0 },
            None => Route::TwoLaunch,
        }
    }

    /// [`Route::Auto`] resolved for `weights` by `QUANTLAB_Q8_FUSED` (read once).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn resolve(self, weights: usize) -> Route {
        static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        match self {
            Route::Auto => {
                let forced = *FORCED.get_or_init(|| {
                    std::env::var("QUANTLAB_Q8_FUSED")
                        .ok()
                        .map(|v| v.trim() != "0")
                });
                Route::auto(weights, forced)
            }
            r => r,
        }
    }
}

/// Bytes of shared memory the fused kernel takes for `m` rows of `k` columns: the codes
/// (32 per block), an f32 scale and an i32 sum per block.
pub fn fused_shared_bytes(m: usize, k: usize) -> usize {
    m * k.div_ceil(BLOCK) * (BLOCK + 8)
}

/// Whether the q8 kernel runs `w`'s products (see the module doc).
pub fn eligible(w: &PackedWeight) -> bool {
    let s = &w.shape;
    let groups = s.gpr == 1 || s.group.is_multiple_of(BLOCK);
    let values = match s.decode {
        Decode::Int => w.int_zeros,
        Decode::Table => w.table.is_some_and(|t| code_book_i8(&t).1 != 0.0),
    };
    matches!(s.bits, 4 | 8) && s.k > 0 && groups && values
}

/// Whether a product of `m` rows of `x` through `w` takes the q8 kernel: asked for on the
/// weight ([`PackedWeight::with_activations`]), or by `--activations q8` on a GPU.
fn wanted(w: &PackedWeight, x: &Tensor, m: usize) -> bool {
    let on = match w.acts {
        Some(a) => a == ActivationMode::Q8,
        None => !x.device().is_cpu() && prefill::q8_activations(),
    };
    on && m <= MAX_ROWS && eligible(w)
}

/// The product through the q8 kernel where [`wanted`], else `None`.
pub(super) fn run(
    w: &PackedWeight,
    x: &Tensor,
    m: usize,
    output: Output,
) -> Result<Option<Tensor>> {
    if !wanted(w, x, m) {
        return Ok(None);
    }
    let (t8, tfac) = match w.table {
        Some(t) => code_book_i8(&t),
        None => ([0; 16], 1.0),
    };
    let op = Q8Op {
        shape: w.shape,
        m,
        output,
        t8,
        tfac,
        route: w.q8_route,
    };
    Ok(Some(
        x.reshape((m, w.shape.k))?
            .contiguous()?
            .apply_op3_no_bwd(&w.codes, &w.params, &op)?,
    ))
}

/// Activation rows quantized per block: codes `[m, kb·32]` (columns past `k` are 0;
/// `perm`: each run of 8 stored as its even columns, then its odd ones), `f32(f16(d))` and
/// `Σq` per block `[m, kb]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Rows {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sum: Vec<i32>,
}

/// The stored position of column `j` (0–31) of a block (`perm`: see [`Q8Rows`]).
fn position(j: usize, perm: bool) -> usize {
    if perm {
        (j & !7) | ((j & 1) << 2) | ((j & 7) >> 1)
    } else {
        j
    }
}

/// The quantization of `m` rows of `x` (`[m, k]`, f32) as the kernel does it.
pub fn quantize_reference(x: &[f32], m: usize, k: usize, perm: bool) -> Q8Rows {
    let kb = k.div_ceil(BLOCK);
    let mut out = Q8Rows {
        q: vec![0; m * kb * BLOCK],
        d: vec![0.0; m * kb],
        sum: vec![0; m * kb],
    };
    for i in 0..m {
        for b in 0..kb {
            let cols = b * BLOCK..((b + 1) * BLOCK).min(k);
            let xs = &x[i * k..(i + 1) * k][cols];
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut s = 0i32;
            for (j, &v) in xs.iter().enumerate() {
                // Saturating, NaN to 0, as the kernel.
                let q = (v * id).round() as i8;
                out.q[(i * kb + b) * BLOCK + position(j, perm)] = q;
                s += i32::from(q);
            }
            out.d[i * kb + b] = f16::from_f32(d).to_f32();
            out.sum[i * kb + b] = s;
        }
    }
    out
}

/// Whether the kernel stores a weight's activations in the even/odd order (plain nibbles).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn perm_for(shape: &GemvShape) -> bool {
    shape.bits == 4 && shape.decode == Decode::Int
}

/// `x` (`[m, k]`, at most [`MAX_ROWS`] rows) quantized on its device: the CUDA kernel on a
/// GPU, [`quantize_reference`] on the CPU (tests: the two must agree bit for bit).
pub fn quantize_rows(x: &Tensor, perm: bool) -> Result<Q8Rows> {
    let (m, k) = x.dims2()?;
    anyhow::ensure!(
        (1..=MAX_ROWS).contains(&m) && k > 0,
        "q8 rows: 1 to {MAX_ROWS} rows of at least one column, not [{m}, {k}]"
    );
    let op = QuantizeOp { m, k, perm };
    let bytes = x
        .contiguous()?
        .apply_op1_no_bwd(&op)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<u8>()?;
    Ok(op.unpack(&bytes))
}

/// The kernel's arithmetic on the CPU: `[m, n]` products of the packed weight with the
/// quantized rows, blocks added in column order.
pub fn reference(
    shape: &GemvShape,
    codes: &[u8],
    params: &[f32],
    table: Option<&[f32; 16]>,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let (n, k) = (shape.n, shape.k);
    let kb = k.div_ceil(BLOCK);
    let a = quantize_reference(x, m, k, false);
    let (t8, tfac) = match table {
        Some(t) => code_book_i8(t),
        None => ([0; 16], 1.0),
    };
    let mut y = vec![0f32; m * n];
    for r in 0..n {
        for i in 0..m {
            let mut acc = 0f32;
            for b in 0..kb {
                let g = if shape.gpr == 1 {
                    0
                } else {
                    b * BLOCK / shape.group
                };
                let p = 2 * (r * shape.gpr + g);
                let z = params[p + 1] as i32;
                let mut isum = 0i32;
                for j in 0..BLOCK.min(k - b * BLOCK) {
                    let c = b * BLOCK + j;
                    let u = shape.code(codes, r, c);
                    let v = match shape.decode {
                        Decode::Int => u as i32 - z,
                        Decode::Table => i32::from(t8[u as usize]),
                    };
                    isum += v * i32::from(a.q[(i * kb + b) * BLOCK + j]);
                }
                let sw = match shape.decode {
                    Decode::Int => params[p],
                    Decode::Table => params[p] * tfac,
                };
                acc = (isum as f32).mul_add(sw * a.d[i * kb + b], acc);
            }
            y[i * n + r] = acc;
        }
    }
    y
}

/// The q8 product as a candle op on (x, codes, params).
struct Q8Op {
    shape: GemvShape,
    m: usize,
    output: Output,
    /// The code book as signed bytes and its factor (Table decode; read by the launch).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    t8: [i8; 16],
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tfac: f32,
    /// Fused or two launches (GPU).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    route: Route,
}

impl Q8Op {
    fn outputs(&self) -> usize {
        match self.output {
            Output::Glu => self.shape.n / 2,
            _ => self.shape.n,
        }
    }

    fn lens(&self) -> (usize, usize, usize) {
        let s = &self.shape;
        let table = if s.decode == Decode::Table { 16 } else { 0 };
        (self.m * s.k, s.n * s.ld, 2 * s.n * s.gpr + table)
    }

    /// The reference, then the GLU in f32 or the split layout, as the kernel writes them.
    fn reference(&self, codes: &[u8], params: &[f32], x: &[f32]) -> Vec<f32> {
        let s = &self.shape;
        let table: Option<[f32; 16]> = (s.decode == Decode::Table)
            .then(|| params[s.tab_off..s.tab_off + 16].try_into().ok())
            .flatten();
        let y = reference(s, codes, params, table.as_ref(), x, self.m);
        let (n, m) = (s.n, self.m);
        match self.output {
            Output::Plain => y,
            Output::Glu => {
                let h = n / 2;
                let mut out = Vec::with_capacity(m * h);
                for row in y.chunks(n) {
                    for r in 0..h {
                        let (g, u) = (row[r], row[h + r]);
                        out.push(g / (1.0 + (-g).exp()) * u);
                    }
                }
                out
            }
            Output::Split(n1, n2) => {
                let mut out = Vec::with_capacity(m * n);
                for (a, b) in [(0, n1), (n1, n2), (n2, n)] {
                    for row in y.chunks(n) {
                        out.extend_from_slice(&row[a..b]);
                    }
                }
                out
            }
        }
    }
}

/// f32 values of a host slice of activations (f32, bf16 or f16).
fn host_f32(s: &CpuStorage, a: usize, b: usize) -> candle_core::Result<Vec<f32>> {
    Ok(match s {
        CpuStorage::F32(x) => x[a..b].to_vec(),
        CpuStorage::BF16(x) => x[a..b].iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F16(x) => x[a..b].iter().map(|v| v.to_f32()).collect(),
        s => candle_core::bail!("q8 GEMV of {:?} activations", s.dtype()),
    })
}

impl CustomOp3 for Q8Op {
    fn name(&self) -> &'static str {
        "packed-gemv-q8"
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
        let (nx, nc, np) = self.lens();
        let (a1, b1) = contiguous(l1, nx, "x")?;
        let (a2, b2) = contiguous(l2, nc, "codes")?;
        let (a3, b3) = contiguous(l3, np, "params")?;
        let (CpuStorage::U8(codes), CpuStorage::F32(params)) = (s2, s3) else {
            candle_core::bail!("q8 GEMV: codes must be u8 and parameters f32");
        };
        let y = self.reference(&codes[a2..b2], &params[a3..b3], &host_f32(s1, a1, b1)?);
        let out = match s1.dtype() {
            DType::BF16 => CpuStorage::BF16(y.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(y.into_iter().map(f16::from_f32).collect()),
            _ => CpuStorage::F32(y),
        };
        Ok((out, Shape::from(self.m * self.outputs())))
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
        let (nx, nc, np) = self.lens();
        let ranges = (
            contiguous(l1, nx, "x")?,
            contiguous(l2, nc, "codes")?,
            contiguous(l3, np, "params")?,
        );
        let slice = gpu::gemv(self, s1, s2, s3, ranges)?;
        let device = s1.device.clone();
        Ok((
            candle_core::CudaStorage { slice, device },
            Shape::from(self.m * self.outputs()),
        ))
    }
}

/// The quantization alone (tests): a u8 buffer of the codes, then the `d` and the sums as
/// little-endian 4-byte values.
struct QuantizeOp {
    m: usize,
    k: usize,
    perm: bool,
}

impl QuantizeOp {
    fn kb(&self) -> usize {
        self.k.div_ceil(BLOCK)
    }

    fn bytes(&self) -> usize {
        self.m * self.kb() * (BLOCK + 8)
    }

    fn unpack(&self, bytes: &[u8]) -> Q8Rows {
        let nq = self.m * self.kb() * BLOCK;
        let nb = self.m * self.kb();
        let word = |i: usize| {
            let at = nq + 4 * i;
            [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
        };
        Q8Rows {
            q: bytes[..nq].iter().map(|&v| v as i8).collect(),
            d: (0..nb).map(|i| f32::from_le_bytes(word(i))).collect(),
            sum: (nb..2 * nb).map(|i| i32::from_le_bytes(word(i))).collect(),
        }
    }
}

impl CustomOp1 for QuantizeOp {
    fn name(&self) -> &'static str {
        "q8-quantize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = contiguous(l, self.m * self.k, "x")?;
        let r = quantize_reference(&host_f32(s, a, b)?, self.m, self.k, self.perm);
        let mut out: Vec<u8> = r.q.iter().map(|&v| v as u8).collect();
        out.extend(r.d.iter().flat_map(|v| v.to_le_bytes()));
        out.extend(r.sum.iter().flat_map(|v| v.to_le_bytes()));
        Ok((CpuStorage::U8(out), Shape::from(self.bytes())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let range = contiguous(l, self.m * self.k, "x")?;
        let slice = gpu::quantize_only(s, range, self.m, self.k, self.perm)?;
        let device = s.device.clone();
        Ok((
            candle_core::CudaStorage {
                slice: candle_core::cuda_backend::CudaStorageSlice::U8(slice),
                device,
            },
            Shape::from(self.bytes()),
        ))
    }
}

/// Lanes per row (4, 8, 16 or 32) for `kb` blocks, `u` blocks per lane per iteration:
/// the fewest idle slots (ties: more lanes), as `v2_lanes`.
pub fn lanes(kb: usize, u: usize) -> usize {
    let mut best = (32, 0.0);
    for lanes in [32, 16, 8, 4] {
        let span = u * lanes;
        let busy = kb as f64 / (kb.div_ceil(span) * span) as f64;
        if busy > best.1 + 1e-9 {
            best = (lanes, busy);
        }
    }
    best.0
}

/// Warps per block of the two-launch kernel (`Q8_WARPS`), the fused kernel's most.
pub const WARPS: usize = 4;

/// Lanes per row and warps per block (fused kernel) for `outputs` outputs of `kb` blocks,
/// `u` blocks per lane per step, `per_thread` outputs per row group: [`lanes`] (fewest
/// idle lanes) and [`WARPS`], then, while the row tiles would not cover the `sms`
/// multiprocessors, fewer warps per block and then more lanes per row (small layers:
/// more, smaller blocks). Both routes take the same lanes, so they add the same blocks in
/// the same order (bit-identical outputs).
pub fn shape_threads(
    kb: usize,
    u: usize,
    outputs: usize,
    per_thread: usize,
    sms: usize,
) -> (usize, usize) {
    let (mut lanes, mut warps) = (lanes(kb, u), WARPS);
    let tiles = |w: usize, l: usize| outputs.div_ceil(w * (32 / l) * per_thread);
    while tiles(warps, lanes) < sms && warps > 1 {
        warps /= 2;
    }
    while tiles(warps, lanes) < sms && lanes < 32 {
        lanes *= 2;
    }
    (lanes, warps)
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The launches of `kernels/cuda/gemv_q8.cuh`.
    use super::{perm_for, Decode, Output, Q8Op, Route, BLOCK};
    use crate::nn::cuda::gpu::{MODULE, PTX};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUdevice_attribute, CUfunction_attribute,
    };
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Result};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    type Range = (usize, usize);
    /// Blocks per multiprocessor by (kernel name, threads per block, shared bytes).
    type OccupancyCache = HashMap<(String, usize, usize), usize>;

    use super::WARPS;
    /// Rows per thread (`Q8_R` in gemv_q8.cuh).
    const ROWS: usize = 2;

    fn i32_of(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} too large")))
    }

    fn dtype_name(x: &S) -> Result<&'static str> {
        Ok(match x {
            S::F32(_) => "f32",
            S::BF16(_) => "bf16",
            S::F16(_) => "f16",
            _ => candle_core::bail!("q8 GEMV: activations must be f32, bf16 or f16"),
        })
    }

    /// Quantizes `m` rows of `k` values at `x` into `buf` (codes, then `d`, then sums:
    /// `m · kb · 40` bytes).
    fn quantize_into<T: DeviceRepr>(
        dev: &CudaDevice,
        x: &CudaView<T>,
        name: &str,
        buf: &CudaSlice<u8>,
        (m, k, perm): (usize, usize, bool),
    ) -> Result<()> {
        let kb = k.div_ceil(BLOCK);
        let (nq, nb) = (m * kb * BLOCK, m * kb);
        if buf.len() < nq + 8 * nb {
            candle_core::bail!("q8 quantization: scratch too small");
        }
        let func = dev.get_or_load_custom_func(&format!("q8_quantize_{name}"), MODULE, PTX)?;
        let (q, d, s) = (
            buf.slice(0..nq),
            buf.slice(nq..nq + 4 * nb),
            buf.slice(nq + 4 * nb..nq + 8 * nb),
        );
        let cfg = LaunchConfig {
            grid_dim: (kb.div_ceil(WARPS) as u32, m as u32, 1),
            block_dim: (32, WARPS as u32, 1),
            shared_mem_bytes: 0,
        };
        let (k32, kb32, perm32) = (
            i32_of(k, "columns")?,
            i32_of(kb, "blocks")?,
            i32::from(perm),
        );
        let mut b = func.builder();
        b.arg(x);
        b.arg(&q);
        b.arg(&d);
        b.arg(&s);
        b.arg(&k32);
        b.arg(&kb32);
        b.arg(&perm32);
        // SAFETY: x holds m·k values of T (checked by the callers), q m·kb·32 bytes, d and
        // s m·kb 4-byte values (offsets multiples of 32 and 4 from an aligned allocation);
        // the kernel writes one code per (row, block, lane) and one d and sum per block.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    fn scratch(dev: &CudaDevice, m: usize, k: usize) -> Result<CudaSlice<u8>> {
        let kb = k.div_ceil(BLOCK);
        // SAFETY: every byte is written by the quantization kernel before it is read.
        unsafe { dev.alloc::<u8>(m * kb * (BLOCK + 8)) }
    }

    pub(super) fn quantize_only(
        x: &CudaStorage,
        (a, b): Range,
        m: usize,
        k: usize,
        perm: bool,
    ) -> Result<CudaSlice<u8>> {
        let dev = &x.device;
        let buf = scratch(dev, m, k)?;
        let shape = (m, k, perm);
        match &x.slice {
            S::F32(v) => quantize_into(dev, &v.slice(a..b), "f32", &buf, shape)?,
            S::BF16(v) => quantize_into(dev, &v.slice(a..b), "bf16", &buf, shape)?,
            S::F16(v) => quantize_into(dev, &v.slice(a..b), "f16", &buf, shape)?,
            _ => candle_core::bail!("q8 quantization of {:?} activations", x.dtype()),
        }
        Ok(buf)
    }

    /// (multiprocessors, opt-in shared memory bytes per block) of the device, read once
    /// (the machines here have one kind of GPU).
    fn device_limits(dev: &CudaDevice) -> Result<(usize, usize)> {
        static LIMITS: OnceLock<(usize, usize)> = OnceLock::new();
        if let Some(l) = LIMITS.get() {
            return Ok(*l);
        }
        let ctx = dev.cuda_stream().context().clone();
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()?;
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .w()?;
        Ok(*LIMITS.get_or_init(|| (sms.max(1) as usize, optin.max(0) as usize)))
    }

    /// Blocks of `fname` resident per multiprocessor with `shared` bytes each: the
    /// occupancy calculator's answer, cached per (kernel, block size, shared bytes), unless
    /// `QUANTLAB_Q8_BLOCKS_PER_SM` sets it (tuning).
    fn blocks_per_sm(
        func: &CudaFunction,
        fname: &str,
        threads: usize,
        shared: usize,
    ) -> Result<usize> {
        static FORCED: OnceLock<Option<usize>> = OnceLock::new();
        static CACHE: OnceLock<Mutex<OccupancyCache>> = OnceLock::new();
        let forced = *FORCED.get_or_init(|| {
            std::env::var("QUANTLAB_Q8_BLOCKS_PER_SM")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| v > 0)
        });
        if let Some(f) = forced {
            return Ok(f);
        }
        let cache = CACHE.get_or_init(Default::default);
        let key = (fname.to_string(), threads, shared);
        if let Some(&b) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(b);
        }
        let b = func
            .occupancy_max_active_blocks_per_multiprocessor(threads as u32, shared, None)
            .w()?
            .max(1) as usize;
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, b);
        Ok(b)
    }

    /// What both routes share: the kernel's name part, blocks per group, lanes, outputs;
    /// the fused kernel's warps per block.
    struct Plan {
        kind: &'static str,
        kb: usize,
        bpg: usize,
        lanes: usize,
        warps: usize,
        outputs: usize,
        per_thread: usize,
        n1: usize,
        n2: usize,
        glu: bool,
    }

    impl Plan {
        /// Outputs per block (per tile of the fused kernel) with `warps` warps.
        fn per_tile(&self, warps: usize) -> usize {
            warps * (32 / self.lanes) * self.per_thread
        }
    }

    fn plan(op: &Q8Op, rc: Range, rp: Range, sms: usize) -> Result<Plan> {
        let s = &op.shape;
        let (m, k) = (op.m, s.k);
        if m == 0 || m > super::MAX_ROWS {
            candle_core::bail!("q8 GEMV takes 1 to {} rows, not {m}", super::MAX_ROWS);
        }
        let kind = match (s.bits, s.decode) {
            (4, Decode::Int) => "q4_int",
            (8, Decode::Int) => "q8_int",
            (4, Decode::Table) => "q4_tab",
            _ => candle_core::bail!("q8 GEMV: no kernel for {} bits {:?}", s.bits, s.decode),
        };
        if !rc.0.is_multiple_of(16) || !s.ld.is_multiple_of(16) {
            candle_core::bail!("q8 GEMV: codes not 16-byte aligned");
        }
        if !rp.0.is_multiple_of(2) {
            candle_core::bail!("q8 GEMV: parameters not 8-byte aligned");
        }
        let kb = k.div_ceil(BLOCK);
        // Every block's codes lie in the row (4-bit: 16 bytes each; 8-bit: the kernel
        // reads a block's second 16 bytes only inside the row).
        let per_block = if s.bits == 4 { 16 } else { 32 };
        if (kb - 1) * per_block >= s.ld {
            candle_core::bail!("q8 GEMV: rows of {} bytes for {kb} blocks", s.ld);
        }
        let bpg = if s.gpr == 1 {
            0
        } else if s.group.is_multiple_of(BLOCK) {
            s.group / BLOCK
        } else {
            candle_core::bail!("q8 GEMV: groups of {} columns", s.group);
        };
        let glu = op.output == Output::Glu;
        let outputs = op.outputs();
        let (n1, n2) = match op.output {
            Output::Split(a, b) => (a, b),
            _ => (outputs, outputs),
        };
        let per_thread = if glu { ROWS / 2 } else { ROWS };
        let u = if s.bits == 4 { 4 } else { 2 };
        let (lanes, warps) = super::shape_threads(kb, u, outputs, per_thread, sms);
        Ok(Plan {
            kind,
            kb,
            bpg,
            lanes,
            warps,
            outputs,
            per_thread,
            n1,
            n2,
            glu,
        })
    }

    /// The code book as 4 little-endian words of signed bytes.
    fn table_words(op: &Q8Op) -> [u32; 4] {
        std::array::from_fn(|j| u32::from_le_bytes(std::array::from_fn(|b| op.t8[4 * j + b] as u8)))
    }

    /// The fused route: one launch, or `None` where the quantized rows do not fit in a
    /// block's shared memory (the caller takes the two launches).
    #[allow(clippy::too_many_arguments)]
    fn launch_fused<T: DeviceRepr>(
        op: &Q8Op,
        p: &Plan,
        x: &CudaSlice<T>,
        codes: &CudaSlice<u8>,
        params: &CudaSlice<f32>,
        (rx, rc, rp): (Range, Range, Range),
        dev: &CudaDevice,
        name: &str,
        max_blocks: u32,
    ) -> Result<Option<CudaSlice<T>>> {
        let s = &op.shape;
        let (m, k) = (op.m, s.k);
        let shared = super::fused_shared_bytes(m, k);
        let (sms, optin) = device_limits(dev)?;
        if shared > optin {
            return Ok(None);
        }
        let fname = format!(
            "gemv_q8f_{}_{name}{}",
            p.kind,
            if p.glu { "_glu" } else { "" }
        );
        let func = dev.get_or_load_custom_func(&fname, MODULE, PTX)?;
        if shared > 48 * 1024 {
            // Above 48 KB a kernel's dynamic shared memory must be opted into.
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared as i32,
            )
            .w()?;
        }
        // About one wave of blocks, each walking an equal number of row tiles (the last
        // block possibly fewer): the activations are quantized once per block.
        let tiles = p.outputs.div_ceil(p.per_tile(p.warps));
        let threads = 32 * p.warps;
        let mut resident = sms * blocks_per_sm(&func, &fname, threads, shared)?;
        if max_blocks > 0 {
            resident = resident.min(max_blocks as usize);
        }
        let per_block = tiles.div_ceil(resident.max(1));
        let grid = tiles.div_ceil(per_block.max(1)).max(1);
        let size = std::mem::size_of::<T>();
        // 8-value vector loads of x need every row start 16-byte aligned.
        let xvec = i32::from((k * size).is_multiple_of(16) && (rx.0 * size).is_multiple_of(16));
        // SAFETY: the kernel writes all m × outputs values (one per (row, output) pair).
        let y = unsafe { dev.alloc::<T>(m * p.outputs)? };
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (32, p.warps as u32, 1),
            shared_mem_bytes: shared as u32,
        };
        let ints = [
            i32_of(m, "rows")?,
            i32_of(p.outputs, "outputs")?,
            i32_of(k, "columns")?,
            i32_of(s.ld, "row bytes")?,
            i32_of(p.bpg, "blocks per group")?,
            i32_of(s.gpr, "groups per row")?,
        ];
        let tail = [
            i32_of(p.n1, "split")?,
            i32_of(p.n2, "split")?,
            i32_of(p.lanes, "lanes")?,
            xvec,
        ];
        let t = table_words(op);
        let (xs, cs, ps) = (
            x.slice(rx.0..rx.1),
            codes.slice(rc.0..rc.1),
            params.slice(rp.0..rp.1),
        );
        let mut b = func.builder();
        b.arg(&xs);
        b.arg(&cs);
        b.arg(&ps);
        b.arg(&y);
        for a in &ints {
            b.arg(a);
        }
        for w in &t {
            b.arg(w);
        }
        b.arg(&op.tfac);
        for a in &tail {
            b.arg(a);
        }
        // SAFETY: the arguments match the kernel's signature (x m·k of T, codes n·ld
        // bytes, params 2·n·gpr f32, y m·outputs of T; six i32, four u32, one f32, four
        // i32); the slices' lengths were checked against those counts by the caller, each
        // block's codes lie inside its row (checked in `plan`), the dynamic shared memory
        // is the m·kb·40 bytes the kernel lays out (opted into above 48 KB, within the
        // device's limit), and the kernel bounds every read by k, kb, n, ld and m.
        unsafe { b.launch(cfg) }.w()?;
        Ok(Some(y))
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        op: &Q8Op,
        x: &CudaSlice<T>,
        codes: &CudaSlice<u8>,
        params: &CudaSlice<f32>,
        (rx, rc, rp): (Range, Range, Range),
        dev: &CudaDevice,
        name: &str,
    ) -> Result<CudaSlice<T>> {
        let p = plan(op, rc, rp, device_limits(dev)?.0)?;
        if let Route::Fused { max_blocks } = op.route.resolve(op.shape.n * op.shape.k) {
            let ranges = (rx, rc, rp);
            if let Some(y) = launch_fused(op, &p, x, codes, params, ranges, dev, name, max_blocks)?
            {
                return Ok(y);
            }
        }
        let s = &op.shape;
        let (m, k, kb) = (op.m, s.k, p.kb);
        let buf = scratch(dev, m, k)?;
        quantize_into(dev, &x.slice(rx.0..rx.1), name, &buf, (m, k, perm_for(s)))?;
        let (nq, nb) = (m * kb * BLOCK, m * kb);
        let (q, d, sums) = (
            buf.slice(0..nq),
            buf.slice(nq..nq + 4 * nb),
            buf.slice(nq + 4 * nb..nq + 8 * nb),
        );
        let fname = format!(
            "gemv_q8_{}_{name}{}",
            p.kind,
            if p.glu { "_glu" } else { "" }
        );
        let func = dev.get_or_load_custom_func(&fname, MODULE, PTX)?;
        // SAFETY: the kernel writes all m × outputs values (one per (row, output) pair).
        let y = unsafe { dev.alloc::<T>(m * p.outputs)? };
        let cfg = LaunchConfig {
            grid_dim: (p.outputs.div_ceil(p.per_tile(WARPS)) as u32, 1, 1),
            block_dim: (32, WARPS as u32, 1),
            shared_mem_bytes: 0,
        };
        let t = table_words(op);
        let ints = [
            i32_of(m, "rows")?,
            i32_of(p.outputs, "outputs")?,
            i32_of(kb, "blocks")?,
            i32_of(s.ld, "row bytes")?,
            i32_of(p.bpg, "blocks per group")?,
            i32_of(s.gpr, "groups per row")?,
        ];
        let tail = [
            i32_of(p.n1, "split")?,
            i32_of(p.n2, "split")?,
            i32_of(p.lanes, "lanes")?,
        ];
        let (cs, ps) = (codes.slice(rc.0..rc.1), params.slice(rp.0..rp.1));
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&d);
        b.arg(&sums);
        b.arg(&cs);
        b.arg(&ps);
        b.arg(&y);
        for a in &ints {
            b.arg(a);
        }
        for w in &t {
            b.arg(w);
        }
        b.arg(&op.tfac);
        for a in &tail {
            b.arg(a);
        }
        // SAFETY: the arguments match the kernel's signature (quantized rows m·kb·32
        // bytes, m·kb f32 and i32; codes n·ld bytes; params 2·n·gpr f32; y m·outputs of
        // T; six i32, four u32, one f32, three i32), the slices' lengths were checked
        // against those counts by the caller, each block's codes lie inside its row
        // (checked in `plan`), and the kernel bounds every read by kb, n, ld and m.
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn gemv(
        op: &Q8Op,
        x: &CudaStorage,
        codes: &CudaStorage,
        params: &CudaStorage,
        ranges: (Range, Range, Range),
    ) -> Result<S> {
        let dev = &x.device;
        let (S::U8(c), S::F32(p)) = (&codes.slice, &params.slice) else {
            candle_core::bail!("q8 GEMV: codes must be u8 and parameters f32");
        };
        let name = dtype_name(&x.slice)?;
        Ok(match &x.slice {
            S::F32(v) => S::F32(launch(op, v, c, p, ranges, dev, name)?),
            S::BF16(v) => S::BF16(launch(op, v, c, p, ranges, dev, name)?),
            S::F16(v) => S::F16(launch(op, v, c, p, ranges, dev, name)?),
            _ => candle_core::bail!("q8 GEMV of {:?} activations", x.dtype()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_a_permutation_of_even_then_odd_columns() {
        let mut seen = [false; 32];
        for j in 0..32 {
            let p = position(j, true);
            assert!(!seen[p]);
            seen[p] = true;
            // Within each run of 8: columns 0, 2, 4, 6 at 0..4, then 1, 3, 5, 7.
            let (r, at) = (j % 8, p % 8);
            assert_eq!(at, if r % 2 == 0 { r / 2 } else { 4 + r / 2 });
            assert_eq!(p / 8, j / 8);
        }
    }

    #[test]
    fn auto_route_fuses_up_to_2_pow_24_weights_unless_forced() {
        let fused = Route::Fused { max_blocks: 0 };
        assert_eq!(Route::auto(576 * 576, None), fused);
        assert_eq!(Route::auto(4096 * 4096, None), fused);
        assert_eq!(Route::auto(14336 * 4096, None), Route::TwoLaunch);
        assert_eq!(Route::auto(14336 * 4096, Some(true)), fused);
        assert_eq!(Route::auto(576, Some(false)), Route::TwoLaunch);
    }

    #[test]
    fn small_layers_get_smaller_blocks_and_large_ones_keep_theirs() {
        // SmolLM2's 576x576 at 8 bits (18 blocks): 9 tiles of 4 warps; 1 warp of 16 lanes
        // per row makes 144 tiles for 132 SMs.
        assert_eq!(shape_threads(18, 2, 576, 2, 132), (16, 1));
        // gate|up GLU at 4 bits (1536 outputs, one per row group): 96 tiles of 4 warps,
        // 192 of 2.
        assert_eq!(shape_threads(18, 4, 1536, 1, 132), (8, 2));
        // 4096x4096 at 8 bits: 512 tiles as it was.
        assert_eq!(shape_threads(128, 2, 4096, 2, 132), (32, 4));
        // One output: nothing to split, lanes grow to a warp.
        assert_eq!(shape_threads(2, 2, 1, 2, 132), (32, 1));
    }

    #[test]
    fn lanes_cover_short_and_long_rows() {
        assert_eq!(lanes(128, 4), 32);
        // 576 4-bit columns: 8 lanes × 4 blocks and 4 × 4 both leave 14 of 32 slots idle;
        // the tie goes to more lanes (fewer rows per warp).
        assert_eq!(lanes(18, 4), 8);
        assert_eq!(lanes(18, 2), 4); // 8-bit: 4 lanes × 2 blocks, 18 of 24 slots busy
        for kb in 1..400 {
            assert!([4, 8, 16, 32].contains(&lanes(kb, 2)));
        }
    }

    #[test]
    fn quantization_rounds_half_away_and_zero_blocks_stay_zero() {
        // 127 / 2 = 63.5: rounds to 64 (away from zero), -63.5 to -64.
        let mut x = vec![0f32; 70];
        x[0] = 127.0;
        x[1] = 63.5;
        x[2] = -63.5;
        let r = quantize_reference(&x, 1, 70, false);
        assert_eq!(&r.q[..3], &[127, 64, -64]);
        assert_eq!(r.d[0], 1.0);
        assert_eq!(r.sum[0], 127);
        assert_eq!((r.d[1], r.sum[1], r.d[2]), (0.0, 0, 0.0));
        assert!(r.q[32..].iter().all(|&v| v == 0));
    }
}
