//! Packed low-bit weights on the GPU for decode: a fused dequantize-GEMV that reads the
//! codes and scales where they are stored (`kernels/cuda/gemv.cuh`) instead of a cached
//! bf16 copy, so a decoded token reads 4 or 8 bits per weight instead of 16.
//!
//! [`PackedLayout`] repacks a host format into the kernel's layout: weight-only int-N
//! ([`Grouped`]: 1–8 bits, signed or unsigned, symmetric or affine, any group size, f32
//! or f16 scales, integer or real zero points) and NF4/FP4 ([`FourBitWeight`], when its
//! blocks do not cross rows). Codes of up to 4 bits are stored as nibbles (3- and 2-bit
//! codes take 4 bits: the layout stays one kernel), 5–8 bits as bytes; each row is padded
//! to 16 bytes so the kernel reads it with 128-bit loads. Signed codes are offset by
//! 2^(bits−1) together with their zero points, which leaves every `q − z` unchanged, so
//! the decoded weights are exactly the host format's.
//!
//! [`PackedWeight::gemv`] runs it as a candle op: on CUDA the kernel, on the CPU a
//! reference with the kernel's own index arithmetic and summation grouping (what the
//! tests check the layout with on machines without a GPU). `on_device::Dequantized` uses
//! it for up to [`MAX_ROWS`] activation rows; `QUANTLAB_PACKED_GEMV=0` turns it off.

use super::fourbit::FourBitWeight;
use super::grouped::Grouped;
use super::WeightFormat;
use crate::quant::codebook::Absmax;
use crate::quant::Granularity;
use anyhow::{bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};

/// Most activation rows the GEMV takes.
pub const MAX_ROWS: usize = 8;

/// Most activation rows the forward pass sends to the GEMV (more use the dequantized copy
/// and cuBLAS). On the H200 (`bench-gemv`, bf16) the kernel beat cuBLAS on SmolLM2's
/// shapes by 1.3–1.5× at m = 1 and 2, but fell to 0.9× on 576×1536 at m = 4 and to
/// 0.7–1.1× at m = 8 (every row re-reads the activations per 8 columns).
pub const DECODE_ROWS: usize = 2;

/// Largest weight (output rows × input columns, stacks counted whole) given a packed copy:
/// none since the v2 kernel. The v1 kernel was bound by instruction issue and lost to
/// cuBLAS above ~2^24 elements (0.77–0.94× at 14336×4096 and 8192², 0.43–0.55× on the
/// 49152×576 output layer), so large weights took the dequantized copy and cuBLAS (limit
/// 2^22). On the H200 (`bench-gemv`, bf16, m = 1 and 2) v2 beat cuBLAS at every large
/// shape measured (1.07–1.29× at 4096²…28672×8192, 1.15× at 49152×576), and the 4.2B
/// synthetic model decoded 1.16–1.23× faster than bf16 with every weight packed against
/// 0.95–1.00× with the 2^22 limit (same binary, one run). `QUANTLAB_PACKED_MAX_WEIGHTS`
/// sets a limit for A/B runs.
pub const MAX_WEIGHTS: usize = usize::MAX;

/// [`MAX_WEIGHTS`], or `QUANTLAB_PACKED_MAX_WEIGHTS` (elements; A/B runs of the limit).
/// Read once.
pub fn max_weights() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("QUANTLAB_PACKED_MAX_WEIGHTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_WEIGHTS)
    })
}

/// Whether the packed GEMV is used where it exists (`QUANTLAB_PACKED_GEMV=0`: no, for A/B
/// runs against the dequantized bf16 + cuBLAS path).
/// Read once: it is asked on every decode-sized product.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QUANTLAB_PACKED_GEMV").map_or(true, |v| v != "0"))
}

/// How a code becomes a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// `(q − zero) · scale`.
    Int,
    /// `table[q] · scale` (a 16-entry code book).
    Table,
}

/// The kernel's view of a packed matrix (everything but the data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvShape {
    /// Output rows and input columns.
    pub n: usize,
    pub k: usize,
    /// 4 (nibbles) or 8 (bytes) bits per stored code.
    pub bits: u32,
    pub decode: Decode,
    /// Bytes per row (a multiple of 16).
    pub ld: usize,
    /// Columns per (scale, zero) pair, and pairs per row.
    pub group: usize,
    pub gpr: usize,
    /// Offset of the 16-entry table in the parameters (Table only).
    pub tab_off: usize,
}

/// A matrix in the kernel's layout, on the host.
#[derive(Debug, Clone)]
pub struct PackedLayout {
    pub shape: GemvShape,
    /// `n × ld` bytes.
    pub codes: Vec<u8>,
    /// `(scale, zero)` per (row, group), row-major, then the table if any.
    pub params: Vec<f32>,
}

impl PackedLayout {
    /// The layout of a host format, or `None` where it has none (other formats, NF4/FP4
    /// blocks that cross rows, per-channel quantization along the input axis).
    pub fn from_format(f: &dyn WeightFormat) -> Option<Self> {
        let any = f.as_any();
        if let Some(g) = any.downcast_ref::<Grouped>() {
            return Self::from_grouped(g);
        }
        if let Some(w) = any.downcast_ref::<FourBitWeight>() {
            return Self::from_fourbit(w);
        }
        None
    }

    /// Packs `code(r, c)` (already unsigned, < 2^bits) row by row.
    fn pack(n: usize, k: usize, bits: u32, code: impl Fn(usize, usize) -> u8) -> (usize, Vec<u8>) {
        let row_bytes = if bits == 4 { k.div_ceil(2) } else { k };
        let ld = row_bytes.next_multiple_of(16).max(16);
        let mut out = vec![0u8; n * ld];
        for (r, row) in out.chunks_mut(ld).enumerate() {
            for c in 0..k {
                let q = code(r, c);
                if bits == 4 {
                    row[c / 2] |= (q & 0x0f) << (4 * (c % 2));
                } else {
                    row[c] = q;
                }
            }
        }
        (ld, out)
    }

    fn from_grouped(g: &Grouped) -> Option<Self> {
        let dims = g.q.codes.dims();
        let &[n, k] = dims else { return None };
        let scheme = &g.q.scheme;
        let bits = u32::from(scheme.bits);
        if !(1..=8).contains(&bits) || n == 0 || k == 0 {
            return None;
        }
        let store = if bits <= 4 { 4 } else { 8 };
        let codes = g.q.codes.flatten_all().ok()?.to_vec1::<u8>().ok()?;
        let (scale, zero) = (&g.q.params.scale, &g.q.params.zero_point);
        // (group, pairs per row, index of row r's pair for group j in the host's params).
        let (group, gpr): (usize, usize) = match scheme.granularity {
            // One pair per row in the kernel; c / group is 0 for every column.
            Granularity::PerTensor | Granularity::PerChannel { axis: 0 } => {
                (k.next_multiple_of(8), 1)
            }
            Granularity::PerGroup { size } if size > 0 => (size, k.div_ceil(size)),
            _ => return None,
        };
        let host_index = |r: usize, j: usize| match scheme.granularity {
            Granularity::PerTensor => 0,
            Granularity::PerChannel { .. } => r,
            _ => r * gpr + j,
        };
        let offset: i32 = if scheme.signed { 1 << (bits - 1) } else { 0 };
        let float_zero = g.float_zero();
        let need = match scheme.granularity {
            Granularity::PerTensor => 1,
            Granularity::PerChannel { .. } => n,
            _ => n * gpr,
        };
        if scale.len() < need || float_zero.map_or(zero.len(), <[f32]>::len) < need {
            return None;
        }
        let (ld, packed) = Self::pack(n, k, store, |r, c| {
            let raw = codes[r * k + c];
            let q = if scheme.signed {
                raw as i8 as i32
            } else {
                raw as i32
            };
            (q + offset) as u8
        });
        let mut params = Vec::with_capacity(2 * n * gpr);
        for r in 0..n {
            for j in 0..gpr {
                let h = host_index(r, j);
                let z = match float_zero {
                    Some(fz) => fz[h],
                    None => (zero[h] + offset) as f32,
                };
                params.extend([scale[h], z]);
            }
        }
        Some(PackedLayout {
            shape: GemvShape {
                n,
                k,
                bits: store,
                decode: Decode::Int,
                ld,
                group,
                gpr,
                tab_off: 0,
            },
            codes: packed,
            params,
        })
    }

    fn from_fourbit(w: &FourBitWeight) -> Option<Self> {
        let (n, k, bs) = (w.out_features, w.in_features, w.q.blocksize);
        if n == 0 || k == 0 || bs == 0 || k % bs != 0 || w.q.packed.len() < (n * k).div_ceil(2) {
            return None;
        }
        let decoded;
        let absmax: &[f32] = match &w.q.absmax {
            Absmax::Plain(v) => v,
            double => {
                decoded = double.values();
                &decoded
            }
        };
        let gpr = k / bs;
        if absmax.len() < n * gpr {
            return None;
        }
        let packed = &w.q.packed;
        // bitsandbytes' order: element e in byte e / 2, the high nibble first.
        let (ld, codes) = Self::pack(n, k, 4, |r, c| {
            let e = r * k + c;
            (packed[e / 2] >> (4 * (1 - (e & 1)))) & 0x0f
        });
        let mut params = Vec::with_capacity(2 * n * gpr + 16);
        for a in &absmax[..n * gpr] {
            params.extend([*a, 0.0]);
        }
        let tab_off = params.len();
        params.extend_from_slice(w.q.kind.code());
        Some(PackedLayout {
            shape: GemvShape {
                n,
                k,
                bits: 4,
                decode: Decode::Table,
                ld,
                group: bs,
                gpr,
                tab_off,
            },
            codes,
            params,
        })
    }
}

impl PackedLayout {
    /// A random matrix in this layout (benchmarks: the kernel's time does not depend on
    /// the values): `bits` 4 or 8, a code book when `table`, `group` columns per scale (0:
    /// one per row). Codes and scales from a fixed-seed xorshift.
    pub fn synthetic(n: usize, k: usize, bits: u32, table: bool, group: usize, seed: u64) -> Self {
        let bits = if bits <= 4 { 4 } else { 8 };
        let row_bytes = if bits == 4 { k.div_ceil(2) } else { k };
        let ld = row_bytes.next_multiple_of(16).max(16);
        let (group, gpr) = if group == 0 {
            (k.next_multiple_of(8), 1)
        } else {
            (group, k.div_ceil(group))
        };
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut codes = vec![0u8; n * ld];
        for chunk in codes.chunks_mut(8) {
            let v = next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        let mut params = Vec::with_capacity(2 * n * gpr + 16);
        for _ in 0..n * gpr {
            let s = 1e-3 * (1.0 + (next() % 1000) as f32 / 1000.0);
            params.extend([s, if table { 0.0 } else { 8.0 }]);
        }
        let tab_off = params.len();
        if table {
            params.extend_from_slice(crate::quant::FourBitType::Nf4.code());
        }
        PackedLayout {
            shape: GemvShape {
                n,
                k,
                bits,
                decode: if table { Decode::Table } else { Decode::Int },
                ld,
                group,
                gpr,
                tab_off,
            },
            codes,
            params,
        }
    }
}

impl GemvShape {
    /// The code at (r, c) from the packed bytes, as the kernel reads it.
    fn code(&self, codes: &[u8], r: usize, c: usize) -> u32 {
        let row = &codes[r * self.ld..(r + 1) * self.ld];
        if self.bits == 4 {
            u32::from(row[c / 2] >> (4 * (c % 2))) & 0x0f
        } else {
            u32::from(row[c])
        }
    }

    /// The weight at (r, c) as the kernel decodes it.
    pub fn weight(&self, codes: &[u8], params: &[f32], r: usize, c: usize) -> f32 {
        let q = self.code(codes, r, c);
        let p = 2 * (r * self.gpr + c / self.group);
        match self.decode {
            Decode::Int => (q as f32 - params[p + 1]) * params[p],
            Decode::Table => params[self.tab_off + q as usize] * params[p],
        }
    }

    /// The CPU reference of the kernel: `x [m, k]` (as f32) times the packed matrix, each
    /// run of 8 columns of one group summed as `scale · (Σ q·x − zero · Σ x)` (Table:
    /// `scale · Σ table[q]·x`), runs that cross a group or the row's end element by
    /// element, as `kernels/cuda/gemv.cuh` does (its lanes' partial sums are added in
    /// another order).
    pub fn gemv_reference(&self, codes: &[u8], params: &[f32], x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * self.n];
        for r in 0..self.n {
            for i in 0..m {
                let xr = &x[i * self.k..(i + 1) * self.k];
                let mut acc = 0f32;
                let mut col = 0;
                while col < self.k {
                    if self.group.is_multiple_of(8) && col + 8 <= self.k {
                        let p = 2 * (r * self.gpr + col / self.group);
                        let (mut dot, mut sx) = (0f32, 0f32);
                        for (j, &xv) in xr[col..col + 8].iter().enumerate() {
                            let q = self.code(codes, r, col + j);
                            let v = match self.decode {
                                Decode::Int => q as f32,
                                Decode::Table => params[self.tab_off + q as usize],
                            };
                            dot = v.mul_add(xv, dot);
                            sx += xv;
                        }
                        let inner = match self.decode {
                            Decode::Int => dot - params[p + 1] * sx,
                            Decode::Table => dot,
                        };
                        acc = params[p].mul_add(inner, acc);
                    } else {
                        for (c, &xv) in xr.iter().enumerate().take((col + 8).min(self.k)).skip(col)
                        {
                            acc = self.weight(codes, params, r, c).mul_add(xv, acc);
                        }
                    }
                    col += 8;
                }
                y[i * self.n + r] = acc;
            }
        }
        y
    }
}

pub mod q8;

/// A packed matrix on a device.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    pub shape: GemvShape,
    /// `n · ld` bytes (U8).
    codes: Tensor,
    /// The parameters (F32).
    params: Tensor,
    /// The code book (Table decode), kept on the host to check stacking.
    table: Option<[f32; 16]>,
    /// Rows per stacked layer ([`Self::stack`]); one entry for a single layer.
    parts: Vec<usize>,
    /// The CUDA kernel its products run on ([`Kernel::Auto`] unless chosen).
    kernel: Kernel,
    /// Every zero point an integer in 0..=255 (Int decode): the q8 kernel applies.
    int_zeros: bool,
    /// The activations its products use ([`q8`]); `None`: `--activations` on a GPU.
    acts: Option<crate::nn::kernels::prefill::ActivationMode>,
    /// How the q8 kernel runs ([`q8::Route`]; automatic unless chosen).
    q8_route: q8::Route,
}

/// What one launch computes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Output {
    /// `[m, n]`.
    Plain,
    /// Up to three stacked layers' products, each `[m, n_s]` stored one after the other
    /// (the rows split at `n1` and `n2`), so each is a contiguous tensor.
    Split(usize, usize),
    /// `silu(first half) ⊙ second half` of the rows: `[m, n / 2]`.
    Glu,
}

impl PackedWeight {
    pub fn upload(layout: &PackedLayout, device: &Device) -> Result<Self> {
        let s = &layout.shape;
        let table = match s.decode {
            Decode::Int => None,
            Decode::Table => {
                let t = layout.params.get(s.tab_off..s.tab_off + 16);
                Some(
                    t.and_then(|t| t.try_into().ok())
                        .context("packed layout without its table")?,
                )
            }
        };
        Ok(PackedWeight {
            shape: layout.shape,
            codes: Tensor::from_slice(&layout.codes, layout.codes.len(), device)?,
            params: Tensor::from_slice(&layout.params, layout.params.len(), device)?,
            table,
            parts: vec![s.n],
            kernel: Kernel::Auto,
            int_zeros: s.decode == Decode::Int
                && layout.params.get(..2 * s.n * s.gpr).is_some_and(|ps| {
                    ps.chunks(2)
                        .all(|p| p[1].fract() == 0.0 && (0.0..=255.0).contains(&p[1]))
                }),
            acts: None,
            q8_route: q8::Route::Auto,
        })
    }

    /// The same weight with its products on `kernel` (benchmarks and tests of each kernel;
    /// the device copy is shared).
    pub fn with_kernel(&self, kernel: Kernel) -> Self {
        PackedWeight {
            kernel,
            ..self.clone()
        }
    }

    /// The same weight with its products' activations chosen: `Some(Q8)` runs the q8
    /// kernel where [`q8::eligible`] (on the CPU: its reference), `Some(F32)` the exact
    /// kernels, `None` follows `--activations` on a GPU (benchmarks and tests).
    pub fn with_activations(
        &self,
        acts: Option<crate::nn::kernels::prefill::ActivationMode>,
    ) -> Self {
        PackedWeight {
            acts,
            ..self.clone()
        }
    }

    /// The same weight with its q8 products on `route` (the fused kernel or the two
    /// launches: benchmarks and tests of each).
    pub fn with_q8_route(&self, q8_route: q8::Route) -> Self {
        PackedWeight {
            q8_route,
            ..self.clone()
        }
    }

    /// Bytes on the device.
    pub fn device_bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.params.elem_count()
    }

    /// The rows of several layers that read the same input (q, k, v; gate, up) as one
    /// matrix, concatenated on the device: one launch for their products. `None` where
    /// their columns or layouts differ.
    pub fn stack(layers: &[&PackedWeight]) -> Result<Option<PackedWeight>> {
        Self::stack_within(layers, max_weights())
    }

    /// [`Self::stack`] with at most `limit` weights in the stack (`None` above it).
    pub fn stack_within(layers: &[&PackedWeight], limit: usize) -> Result<Option<PackedWeight>> {
        let Some(first) = layers.first() else {
            return Ok(None);
        };
        let sa = &first.shape;
        let same = |w: &&PackedWeight| {
            let sb = &w.shape;
            sa.k == sb.k
                && sa.bits == sb.bits
                && sa.decode == sb.decode
                && sa.ld == sb.ld
                && sa.group == sb.group
                && sa.gpr == sb.gpr
                && first.table == w.table
        };
        if !layers.iter().all(same) {
            return Ok(None);
        }
        if layers
            .iter()
            .map(|w| w.shape.n)
            .sum::<usize>()
            .saturating_mul(sa.k)
            > limit
        {
            return Ok(None);
        }
        let mut params = Vec::with_capacity(layers.len() + 1);
        for w in layers {
            params.push(w.params.narrow(0, 0, 2 * w.shape.n * w.shape.gpr)?);
        }
        let n: usize = layers.iter().map(|w| w.shape.n).sum();
        if let Some(t) = &first.table {
            params.push(Tensor::from_slice(t, 16, first.params.device())?);
        }
        let codes: Vec<&Tensor> = layers.iter().map(|w| &w.codes).collect();
        Ok(Some(PackedWeight {
            shape: GemvShape {
                n,
                tab_off: if first.table.is_some() {
                    2 * n * sa.gpr
                } else {
                    0
                },
                ..*sa
            },
            codes: Tensor::cat(&codes, 0)?,
            params: Tensor::cat(&params, 0)?,
            table: first.table,
            parts: layers.iter().map(|w| w.shape.n).collect(),
            kernel: Kernel::Auto,
            int_zeros: layers.iter().all(|w| w.int_zeros),
            acts: first.acts,
            q8_route: first.q8_route,
        }))
    }

    /// `x [.., k]` (f32, bf16 or f16, at most [`MAX_ROWS`] rows) times the weight's
    /// transpose: `[.., n]` in `x`'s dtype, accumulated in f32.
    pub fn gemv(&self, x: &Tensor) -> Result<Tensor> {
        let m = self.check(x)?;
        let y = self.run(x, m, Output::Plain)?;
        Ok(y.reshape(self.out_dims(x, self.shape.n))?)
    }

    /// For a stack of 2 or 3 layers ([`Self::stack`]): each layer's product, `[.., n_s]`,
    /// from one launch (each a contiguous tensor).
    pub fn gemv_parts(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (n1, n2) = match self.parts[..] {
            [a, b] => (a, a + b),
            [a, b, _] => (a, a + b),
            _ => bail!(
                "a split GEMV needs 2 or 3 stacked layers, not {}",
                self.parts.len()
            ),
        };
        let m = self.check(x)?;
        let y = self.run(x, m, Output::Split(n1, n2))?;
        let mut out = Vec::with_capacity(self.parts.len());
        let mut at = 0;
        for &n in &self.parts {
            out.push(y.narrow(0, at, m * n)?.reshape(self.out_dims(x, n))?);
            at += m * n;
        }
        Ok(out)
    }

    /// For a stack of gate rows over as many up rows ([`Self::stack`]):
    /// `silu(x·gateᵀ) ⊙ (x·upᵀ)`, `[.., n / 2]`, in one launch (the Llama MLP's first
    /// half), the product and the activation in f32 before one rounding to `x`'s dtype.
    pub fn gemv_glu(&self, x: &Tensor) -> Result<Tensor> {
        if self.parts.len() != 2 || self.parts[0] != self.parts[1] {
            bail!(
                "a GLU GEMV needs gate and up stacked, not rows {:?}",
                self.parts
            );
        }
        let m = self.check(x)?;
        let y = self.run(x, m, Output::Glu)?;
        Ok(y.reshape(self.out_dims(x, self.shape.n / 2))?)
    }

    fn out_dims(&self, x: &Tensor, n: usize) -> Vec<usize> {
        let dims = x.dims();
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(n);
        out
    }

    /// The activation rows of `x`, checked.
    fn check(&self, x: &Tensor) -> Result<usize> {
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            bail!("packed GEMV of a scalar");
        };
        if k != self.shape.k {
            bail!(
                "packed GEMV: {k} input columns for a {}-column weight",
                self.shape.k
            );
        }
        let m: usize = lead.iter().product();
        if m == 0 || m > MAX_ROWS {
            bail!("packed GEMV takes 1 to {MAX_ROWS} rows, not {m}");
        }
        if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            bail!("packed GEMV of {:?} activations", x.dtype());
        }
        Ok(m)
    }

    /// The op's flat output (`m · outputs` values).
    fn run(&self, x: &Tensor, m: usize, output: Output) -> Result<Tensor> {
        if let Some(y) = q8::run(self, x, m, output)? {
            return Ok(y);
        }
        let op = GemvOp {
            shape: self.shape,
            m,
            output,
            kernel: self.kernel,
        };
        Ok(x.reshape((m, self.shape.k))?
            .contiguous()?
            .apply_op3_no_bwd(&self.codes, &self.params, &op)?)
    }
}

struct GemvOp {
    shape: GemvShape,
    m: usize,
    output: Output,
    /// The CUDA kernel (the CPU reference serves both).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: Kernel,
}

/// Which CUDA kernel runs a product (the CPU reference is the same for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// For weights of at least [`V3_MIN_WEIGHTS`]: [`Kernel::V3`] for 4-bit codes at
    /// m = 1, [`Kernel::V2`] for 8-bit codes and m = 2; [`Kernel::V1`] for smaller
    /// weights and m > 2. `QUANTLAB_GEMV_KERNEL=v1|v2|v3` forces one (A/B runs). On the
    /// H200 (`bench-gemv`, bf16, one run, µs ratio to cuBLAS) v3 against v2 at m = 1,
    /// 4-bit g64: 1.99 / 1.47 at 4096², 1.38 / 1.25 at 14336×4096, 1.33 / 1.27 at 8192²,
    /// 1.62 / 1.23 at 28672×8192, 1.61 / 1.17 at 49152×576; but 8-bit per channel
    /// 0.85–1.15 / 1.10–1.21 from 14336×4096 up, and at m = 2 v3 lost at 8192² and above.
    Auto,
    /// `gemv_*` in `gemv.cuh`: one warp per row, any m up to [`MAX_ROWS`].
    V1,
    /// `gemv2_*`: several rows per thread sharing the activations, lanes per row sized
    /// to the row, at most [`V3_MAX_ROWS`] activation rows (larger m falls back to v1).
    /// Kept for A/B runs against v3.
    V2,
    /// `gemv3_*`: v2's thread layout with the activations converted once per block into
    /// shared memory and one instruction per code (denormal decode), at most
    /// [`V3_MAX_ROWS`] activation rows (larger m falls back to v1).
    V3,
}

/// Most activation rows the v2 and v3 kernels take (`GEMV2_MM`; v3 has m = 1 and m = 2
/// instances).
pub const V3_MAX_ROWS: usize = 2;

/// Smallest weight (rows × columns, stacks counted whole) that [`Kernel::Auto`] gives the
/// v2 or v3 kernel (the bound measured for v2, whose thread layout v3 keeps). On the H200
/// (`bench-gemv`, bf16, m = 1 and 2) v1 was faster than v2 on SmolLM2's layer shapes (up
/// to 1536×576: v1 1.3–1.8× cuBLAS, v2 0.6–1.3×: short rows leave lanes idle and few
/// blocks), v2 on every shape from 4096×4096 up and on 49152×576.
pub const V3_MIN_WEIGHTS: usize = 1 << 21;

/// Activation columns per shared-memory tile of the v3 kernel (`GEMV3_TILE`).
const V3_TILE: usize = 4096;

impl Kernel {
    /// The kernel that runs `m` rows through an `rows × k` matrix.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn resolve(self, m: usize, rows: usize, k: usize, bits: u32) -> Kernel {
        static FORCED: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        let forced = *FORCED.get_or_init(|| match std::env::var("QUANTLAB_GEMV_KERNEL") {
            Ok(v) if v == "v1" => Some(Kernel::V1),
            Ok(v) if v == "v2" => Some(Kernel::V2),
            Ok(v) if v == "v3" => Some(Kernel::V3),
            _ => None,
        });
        let want = match (self, forced) {
            (Kernel::Auto, Some(f)) => f,
            (Kernel::Auto, None) if rows * k >= V3_MIN_WEIGHTS && bits == 4 && m == 1 => Kernel::V3,
            (Kernel::Auto, None) if rows * k >= V3_MIN_WEIGHTS => Kernel::V2,
            (Kernel::Auto, None) => Kernel::V1,
            (k, _) => k,
        };
        match want {
            Kernel::V2 | Kernel::V3 if m <= V3_MAX_ROWS => want,
            _ => Kernel::V1,
        }
    }
}

/// Lanes per row for the v2 and v3 kernels: each lane loads `GEMV2_U` = `GEMV3_U` = 2 of
/// the row's `chunks` 16-byte chunks per iteration, so `lanes` lanes cover `2 · lanes`
/// chunks; the count of 4, 8, 16 or 32 that leaves the fewest slots idle (ties: more
/// lanes, fewer rows per warp). 576 4-bit columns (18 chunks) get 4 lanes (3 iterations,
/// 75% busy) instead of a warp (28%).
pub fn v2_lanes(chunks: usize) -> usize {
    let mut best = (32, 0.0);
    for lanes in [32, 16, 8, 4] {
        let span = 2 * lanes;
        let busy = chunks as f64 / (chunks.div_ceil(span) * span) as f64;
        if busy > best.1 + 1e-9 {
            best = (lanes, busy);
        }
    }
    best.0
}

/// The v3 kernel's chunks per shared-memory tile for `k` columns of `bits`-bit codes: a
/// whole row's chunks up to [`V3_TILE`] columns (the tile's row stride in shared memory).
pub fn v3_tile_chunks(k: usize, bits: u32) -> usize {
    let vpc = if bits == 4 { 32 } else { 16 };
    k.div_ceil(vpc).min(V3_TILE / vpc)
}

fn contiguous(l: &Layout, len: usize, what: &str) -> candle_core::Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a >= len => Ok((a, a + len)),
        _ => candle_core::bail!("packed GEMV: {what} is not a contiguous run of {len} values"),
    }
}

impl GemvOp {
    /// Outputs per activation row.
    fn outputs(&self) -> usize {
        match self.output {
            Output::Glu => self.shape.n / 2,
            _ => self.shape.n,
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    /// The row splits the kernel writes with (`n1 = n2 = outputs`: one `[m, outputs]`).
    fn splits(&self) -> (usize, usize) {
        match self.output {
            Output::Split(a, b) => (a, b),
            _ => (self.outputs(), self.outputs()),
        }
    }

    /// The CPU reference: the products, then the GLU in f32 or the split layout, as the
    /// kernel writes them.
    fn reference(&self, codes: &[u8], params: &[f32], x: &[f32]) -> Vec<f32> {
        let y = self.shape.gemv_reference(codes, params, x, self.m);
        let (n, m) = (self.shape.n, self.m);
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

    fn lens(&self) -> (usize, usize, usize) {
        let s = &self.shape;
        let params = 2 * s.n * s.gpr
            + match s.decode {
                Decode::Int => 0,
                Decode::Table => 16,
            };
        (self.m * s.k, s.n * s.ld, params)
    }

    fn out_shape(&self) -> Shape {
        Shape::from(self.m * self.outputs())
    }
}

impl CustomOp3 for GemvOp {
    fn name(&self) -> &'static str {
        "packed-gemv"
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
            candle_core::bail!("packed GEMV: codes must be u8 and parameters f32");
        };
        let (codes, params) = (&codes[a2..b2], &params[a3..b3]);
        let run = |x: Vec<f32>| self.reference(codes, params, &x);
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(run(x[a1..b1].to_vec())),
            CpuStorage::BF16(x) => CpuStorage::BF16(
                run(x[a1..b1].iter().map(|v| v.to_f32()).collect())
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect(),
            ),
            CpuStorage::F16(x) => CpuStorage::F16(
                run(x[a1..b1].iter().map(|v| v.to_f32()).collect())
                    .into_iter()
                    .map(f16::from_f32)
                    .collect(),
            ),
            s => candle_core::bail!("packed GEMV of {:?} activations", s.dtype()),
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
        let (nx, nc, np) = self.lens();
        let parts = (
            contiguous(l1, nx, "x")?,
            contiguous(l2, nc, "codes")?,
            contiguous(l3, np, "params")?,
        );
        let slice = gpu::gemv(self, s1, s2, s3, parts)?;
        let device = s1.device.clone();
        Ok((candle_core::CudaStorage { slice, device }, self.out_shape()))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The launch of `kernels/cuda/gemv.cuh`.
    use super::{v2_lanes, Decode, GemvOp, Kernel, Output};
    use crate::nn::cuda::gpu::{MODULE, PTX};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Result};

    type Range = (usize, usize);

    fn i32_of(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} too large")))
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        op: &GemvOp,
        x: &CudaSlice<T>,
        codes: &CudaSlice<u8>,
        params: &CudaSlice<f32>,
        (rx, rc, rp): (Range, Range, Range),
        dev: &CudaDevice,
        name: &str,
    ) -> Result<CudaSlice<T>> {
        let s = &op.shape;
        let kind = match (s.bits, s.decode) {
            (4, Decode::Int) => "q4_int",
            (8, Decode::Int) => "q8_int",
            (4, Decode::Table) => "q4_tab",
            _ => candle_core::bail!("packed GEMV: no kernel for {} bits {:?}", s.bits, s.decode),
        };
        let glu = if op.output == Output::Glu { "_glu" } else { "" };
        let rows = if op.output == Output::Glu {
            op.outputs() * 2
        } else {
            op.outputs()
        };
        let kernel = op.kernel.resolve(op.m, rows, s.k, s.bits);
        let fname = match kernel {
            Kernel::V3 => format!("gemv3_{kind}_{name}_m{}{glu}", op.m),
            Kernel::V2 => format!("gemv2_{kind}_{name}{glu}"),
            _ => format!("gemv_{kind}_{name}{glu}"),
        };
        let func = dev.get_or_load_custom_func(&fname, MODULE, PTX)?;
        let size = std::mem::size_of::<T>();
        // 8-value vector loads of x need every row start 16-byte aligned.
        let xvec = i32::from((s.k * size).is_multiple_of(16) && (rx.0 * size).is_multiple_of(16));
        let (xs, cs, ps) = (
            x.slice(rx.0..rx.1),
            codes.slice(rc.0..rc.1),
            params.slice(rp.0..rp.1),
        );
        // The kernel reads codes in 16-byte vectors: the codes must start 16-byte aligned
        // (they are their own allocation, offset 0, in practice).
        if !rc.0.is_multiple_of(16) || !s.ld.is_multiple_of(16) {
            candle_core::bail!("packed GEMV: codes not 16-byte aligned");
        }
        if !rp.0.is_multiple_of(2) {
            candle_core::bail!("packed GEMV: parameters not 8-byte aligned");
        }
        let outputs = op.outputs();
        let (n1, n2) = op.splits();
        // SAFETY: the kernel writes all m × outputs values (one per (row, output) pair).
        let y = unsafe { dev.alloc::<T>(op.m * outputs)? };
        const ROWS_PER_BLOCK: usize = 4; // GEMV_ROWS_PER_BLOCK in gemv.cuh
                                         // v2 and v3: GEMV2_WARPS = GEMV3_WARPS = 4 warps, each 32 / lanes row groups of
                                         // GEMV2_R = GEMV3_R = 4 rows (2 outputs for the GLU, whose rows are gate and up).
        const V23_WARPS: usize = 4;
        let tch = super::v3_tile_chunks(s.k, s.bits);
        let lanes = match kernel {
            Kernel::V3 => v2_lanes(tch),
            _ => v2_lanes(s.ld / 16),
        };
        let cfg = match kernel {
            Kernel::V2 | Kernel::V3 => {
                let per_thread = if op.output == Output::Glu { 2 } else { 4 };
                let per_block = V23_WARPS * (32 / lanes) * per_thread;
                // v3: the activation tile (m · tch · values per chunk f32) and Σx per
                // chunk (m · tch f32) in dynamic shared memory (<= 35 KB: no opt-in).
                let vpc = if s.bits == 4 { 32 } else { 16 };
                let shared = if kernel == Kernel::V3 {
                    4 * op.m * tch * (vpc + 1)
                } else {
                    0
                };
                LaunchConfig {
                    grid_dim: (outputs.div_ceil(per_block) as u32, 1, 1),
                    block_dim: (32, V23_WARPS as u32, 1),
                    shared_mem_bytes: shared as u32,
                }
            }
            _ => LaunchConfig {
                grid_dim: (outputs.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
                block_dim: (32, ROWS_PER_BLOCK as u32, 1),
                shared_mem_bytes: 0,
            },
        };
        let (n1, n2) = (i32_of(n1, "split")?, i32_of(n2, "split")?);
        // v1, v2: (m, n, k, ld, group, gpr, tab_off, xvec, n1, n2) [+ lanes for v2];
        // v3 (m fixed by the instance): (n, k, ld, group, gpr, tab_off, xvec, n1, n2,
        // lanes, tile chunks).
        let mut args = Vec::with_capacity(12);
        if kernel != Kernel::V3 {
            args.push(i32_of(op.m, "rows")?);
        }
        args.extend([
            // The GLU kernels take the outputs (half the rows: gate r and up r + n).
            i32_of(outputs, "outputs")?,
            i32_of(s.k, "inputs")?,
            i32_of(s.ld, "row bytes")?,
            i32_of(s.group, "group")?,
            i32_of(s.gpr, "groups per row")?,
            i32_of(s.tab_off, "table offset")?,
            xvec,
            n1,
            n2,
        ]);
        match kernel {
            Kernel::V2 => args.push(i32_of(lanes, "lanes")?),
            Kernel::V3 => args.extend([i32_of(lanes, "lanes")?, i32_of(tch, "tile chunks")?]),
            _ => {}
        }
        let mut b = func.builder();
        b.arg(&xs);
        b.arg(&cs);
        b.arg(&ps);
        b.arg(&y);
        for a in &args {
            b.arg(a);
        }
        // SAFETY: the arguments match the kernel's signature (x: m·k of T, codes: n·ld
        // bytes, params: 2·n·gpr (+16) f32, y: m·outputs of T, then the i32s listed above;
        // lanes a power of two dividing 32; for v3 the instance's m equals op.m and the
        // dynamic shared memory holds m · tch · (values per chunk + 1) f32), the slices'
        // lengths were checked against those counts by the caller, and the kernel bounds
        // every read by k, n, ld and m.
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }

    pub(super) fn gemv(
        op: &GemvOp,
        x: &CudaStorage,
        codes: &CudaStorage,
        params: &CudaStorage,
        ranges: (Range, Range, Range),
    ) -> Result<S> {
        let dev = &x.device;
        let (S::U8(c), S::F32(p)) = (&codes.slice, &params.slice) else {
            candle_core::bail!("packed GEMV: codes must be u8 and parameters f32");
        };
        Ok(match &x.slice {
            S::F32(v) => S::F32(launch(op, v, c, p, ranges, dev, "f32")?),
            S::BF16(v) => S::BF16(launch(op, v, c, p, ranges, dev, "bf16")?),
            S::F16(v) => S::F16(launch(op, v, c, p, ranges, dev, "f16")?),
            _ => candle_core::bail!("packed GEMV of {:?} activations", x.dtype()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::random::randn;
    use std::sync::Arc;

    fn host(method: &str, n: usize, k: usize, seed: u64) -> Arc<dyn WeightFormat> {
        let w = randn(&[n, k], seed).unwrap();
        let dense: Arc<dyn WeightFormat> = Arc::new(super::super::dense::Dense::new(w).unwrap());
        let alg = crate::nn::registry::parse_algorithm(method).unwrap();
        alg.apply(&crate::nn::algo::LayerInput {
            name: "fc",
            weight: &dense,
            calibration: None,
        })
        .unwrap()
    }

    /// The packed layout decodes to exactly the host format's weights, and the reference
    /// GEMV (the kernel's arithmetic) matches the host format's own product within f32
    /// summation error (bounded by 1e-5 of Σ|w·x|, generous for k ≤ 300 f32 terms).
    #[test]
    fn packed_layout_matches_the_host_format() {
        for method in [
            "w:i4:sym:g32",
            "w:u4:affine:g64",
            "w:i8:sym",
            "w:u8:affine:g16",
            "w:i3:sym:g64",
            "w:u2:affine:g32",
            "w:i4:sym:g12",
            "w:i4:sym:g64:f16-scales",
            "w:u4:affine",
            "nf4",
            "fp4:b32",
            "nf4:dq",
        ] {
            for (n, k) in [(7, 64), (13, 128), (5, 192), (3, 320)] {
                let h = host(method, n, k, (n * k) as u64);
                let Some(p) = PackedLayout::from_format(h.as_ref()) else {
                    panic!("{method} {n}x{k}: no packed layout");
                };
                let w = h.dequantize().unwrap().to_vec2::<f32>().unwrap();
                for (r, row) in w.iter().enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        let got = p.shape.weight(&p.codes, &p.params, r, c);
                        assert_eq!(got, v, "{method} {n}x{k} at ({r}, {c})");
                    }
                }
                for m in [1, 3, 8] {
                    let x = randn(&[m, k], 7 + m as u64).unwrap();
                    let want = h.forward(&x, None).unwrap().to_vec2::<f32>().unwrap();
                    let packed = PackedWeight::upload(&p, &Device::Cpu).unwrap();
                    let got = packed.gemv(&x).unwrap().to_vec2::<f32>().unwrap();
                    let xs = x.to_vec2::<f32>().unwrap();
                    for i in 0..m {
                        for r in 0..n {
                            let mag: f32 = (0..k).map(|c| (w[r][c] * xs[i][c]).abs()).sum();
                            let d = (want[i][r] - got[i][r]).abs();
                            assert!(
                                d <= 1e-5 * mag + 1e-6,
                                "{method} {n}x{k} m={m}: {d} of {mag}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ragged_shapes_and_half_activations() {
        // k not a multiple of 8 or 32, n not of the rows per block.
        for method in ["w:i4:sym:g32", "w:u8:affine", "w:i4:sym"] {
            let h = host(method, 11, 100, 3);
            let p = PackedLayout::from_format(h.as_ref()).unwrap();
            let packed = PackedWeight::upload(&p, &Device::Cpu).unwrap();
            let x = randn(&[5, 100], 4).unwrap();
            let want = h.forward(&x, None).unwrap();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let got = packed
                    .gemv(&x.to_dtype(dt).unwrap())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let d = crate::nn::format::max_abs_diff(&want, &got);
                let tol = if dt == DType::F32 { 1e-4 } else { 0.3 };
                assert!(d < tol, "{method} {dt:?}: {d}");
            }
        }
    }

    /// Stacked layers: the split products equal the separate ones exactly (same
    /// arithmetic per row), and gate|up's GLU is silu(gate·x) ⊙ (up·x) within f32 rounding.
    #[test]
    fn stacked_layers_match_separate_products() {
        let up = |h: &Arc<dyn WeightFormat>| {
            PackedWeight::upload(
                &PackedLayout::from_format(h.as_ref()).unwrap(),
                &Device::Cpu,
            )
            .unwrap()
        };
        for method in ["w:i4:sym:g32", "nf4", "w:u8:affine"] {
            let (g, u) = (up(&host(method, 9, 128, 1)), up(&host(method, 9, 128, 2)));
            let v = up(&host(method, 5, 128, 3));
            let x = randn(&[3, 128], 5).unwrap();
            let s = PackedWeight::stack(&[&g, &u]).unwrap().unwrap();
            let want = (candle_nn::ops::silu(&g.gemv(&x).unwrap()).unwrap() * u.gemv(&x).unwrap())
                .unwrap();
            let got = s.gemv_glu(&x).unwrap();
            assert_eq!(got.dims(), &[3, 9]);
            let d = crate::nn::format::max_abs_diff(&want, &got);
            assert!(d < 1e-4, "{method}: {d}");
            let s3 = PackedWeight::stack(&[&g, &u, &v]).unwrap().unwrap();
            assert!(s3.gemv_glu(&x).is_err());
            let parts = s3.gemv_parts(&x).unwrap();
            for (p, w) in parts.iter().zip([&g, &u, &v]) {
                let want = w.gemv(&x).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(p.to_vec2::<f32>().unwrap(), want, "{method}");
            }
        }
        // Different layouts do not stack.
        let a = up(&host("w:i4:sym:g32", 4, 64, 1));
        let b = up(&host("w:i8:sym", 4, 64, 1));
        assert!(PackedWeight::stack(&[&a, &b]).unwrap().is_none());
    }

    /// `codes8_fast` in gemv.cuh, transcribed: a nibble or byte or-ed into the mantissa of
    /// the power of two whose last mantissa bit sits at its position, minus that power,
    /// is the code, for every position the kernel uses.
    #[test]
    fn the_v2_magic_code_conversion_is_exact() {
        let f = |bits: u32| f32::from_bits(bits);
        let mut v: u32 = 0x1234_5678;
        for _ in 0..10_000 {
            v ^= v << 13;
            v ^= v >> 17;
            v ^= v << 5;
            let h = v >> 12;
            let q4 = [
                f((v & 0xF) | 0x4B00_0000) - 8_388_608.0,
                f((v & 0xF0) | 0x4900_0000) - 524_288.0,
                f((v & 0xF00) | 0x4700_0000) - 32_768.0,
                f((v & 0xF000) | 0x4500_0000) - 2048.0,
                f((v & 0xF_0000) | 0x4300_0000) - 128.0,
                f((h & 0xF00) | 0x4700_0000) - 32_768.0,
                f((h & 0xF000) | 0x4500_0000) - 2048.0,
                f((h & 0xF_0000) | 0x4300_0000) - 128.0,
            ];
            for (j, q) in q4.iter().enumerate() {
                assert_eq!(*q, ((v >> (4 * j)) & 0xF) as f32, "nibble {j} of {v:#x}");
            }
            let s = v >> 16;
            let q8 = [
                f((v & 0xFF) | 0x4B00_0000) - 8_388_608.0,
                f((v & 0xFF00) | 0x4700_0000) - 32_768.0,
                f((s & 0xFF) | 0x4B00_0000) - 8_388_608.0,
                f((s & 0xFF00) | 0x4700_0000) - 32_768.0,
            ];
            for (j, q) in q8.iter().enumerate() {
                assert_eq!(*q, ((v >> (8 * j)) & 0xFF) as f32, "byte {j} of {v:#x}");
            }
        }
    }

    /// v3's decode (`codes8_denorm` in gemv.cuh): a code masked in place at bit p is the
    /// denormal q·2^(p−149); times the activation stored as x·2^(85−p) (E = 64), one FMA
    /// gives exactly the f32 arithmetic on q and x scaled by 2^−64, for activations and
    /// partial sums of ordinary sizes (|x| < 2^43, products above 2^−62).
    #[test]
    fn the_v3_denormal_products_are_exact() {
        let f = |bits: u32| f32::from_bits(bits);
        let p2 = |e: i32| f32::from_bits(((127 + e) as u32) << 23);
        let (down, up) = (p2(-64), p2(64));
        let mut v: u32 = 0x9E37_79B9;
        let mut next = || {
            v ^= v << 13;
            v ^= v >> 17;
            v ^= v << 5;
            v
        };
        for t in 0..20_000 {
            let w = next();
            // Activations and running sums over 2^-20 .. 2^20, either sign.
            let mag = |r: u32, e0: i32| {
                let e = e0 + (r % 41) as i32 - 20;
                let sign = if r & 0x8000_0000 != 0 { -1.0 } else { 1.0 };
                sign * p2(e) * (1.0 + (r >> 8 & 0xFFFF) as f32 / 65536.0)
            };
            let x = mag(next(), 0);
            let acc = mag(next(), 0);
            let h = w >> 12;
            let q4 = [
                (f(w & 0xF), 0),
                (f(w & 0xF0), 4),
                (f(w & 0xF00), 8),
                (f(w & 0xF000), 12),
                (f(w & 0xF_0000), 16),
                (f(h & 0xF00), 8),
                (f(h & 0xF000), 12),
                (f(h & 0xF_0000), 16),
            ];
            for (j, &(dq, pos)) in q4.iter().enumerate() {
                let q = ((w >> (4 * j)) & 0xF) as f32;
                let got = dq.mul_add(x * p2(85 - pos), acc * down) * up;
                assert_eq!(
                    got,
                    q.mul_add(x, acc),
                    "nibble {j} of {w:#x}, x {x}, acc {acc} ({t})"
                );
            }
            let s = w >> 16;
            let q8 = [
                (f(w & 0xFF), 0),
                (f(w & 0xFF00), 8),
                (f(s & 0xFF), 0),
                (f(s & 0xFF00), 8),
            ];
            for (j, &(dq, pos)) in q8.iter().enumerate() {
                let q = ((w >> (8 * j)) & 0xFF) as f32;
                let got = dq.mul_add(x * p2(85 - pos), acc * down) * up;
                assert_eq!(
                    got,
                    q.mul_add(x, acc),
                    "byte {j} of {w:#x}, x {x}, acc {acc} ({t})"
                );
                // The element-wise path: back to x·2^-64 through the denormal 2^(p-149).
                assert_eq!(x * p2(85 - pos) * f(1 << pos), x * down);
            }
        }
    }

    #[test]
    fn v3_tiles_cover_the_row() {
        assert_eq!(v3_tile_chunks(576, 4), 18);
        assert_eq!(v3_tile_chunks(8192, 4), 128);
        assert_eq!(v3_tile_chunks(8192, 8), 256);
        assert_eq!(v3_tile_chunks(100, 8), 7);
    }

    #[test]
    fn v2_lanes_fit_the_row() {
        assert_eq!(v2_lanes(128), 32); // 4096 4-bit columns
        assert_eq!(v2_lanes(18), 4); // 576 4-bit columns: 3 iterations of 8 chunks
        assert_eq!(v2_lanes(1), 4); // one chunk: the fewest idle lanes
        for chunks in 1..300 {
            assert!([4, 8, 16, 32].contains(&v2_lanes(chunks)));
        }
        assert_eq!(Kernel::V2.resolve(3, 4096, 4096, 4), Kernel::V1);
        assert_eq!(Kernel::V3.resolve(3, 4096, 4096, 4), Kernel::V1);
        assert_eq!(Kernel::Auto.resolve(1, 16, 64, 4), Kernel::V1);
        if std::env::var("QUANTLAB_GEMV_KERNEL").is_err() {
            assert_eq!(Kernel::Auto.resolve(1, 4096, 4096, 4), Kernel::V3);
            assert_eq!(Kernel::Auto.resolve(2, 4096, 4096, 4), Kernel::V2);
            assert_eq!(Kernel::Auto.resolve(1, 4096, 4096, 8), Kernel::V2);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let h = host("w:i4:sym:g32", 4, 64, 1);
        let p = PackedWeight::upload(
            &PackedLayout::from_format(h.as_ref()).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        assert!(p.gemv(&randn(&[9, 64], 1).unwrap()).is_err());
        assert!(p.gemv(&randn(&[2, 63], 1).unwrap()).is_err());
        // NF4 blocks that cross rows have no layout.
        let h = host("nf4", 3, 96, 1);
        assert!(PackedLayout::from_format(h.as_ref()).is_none());
    }
}
