//! CPU kernels for three GGML block types — Q8_0, Q4_0 and Q4_1 — with activations
//! quantized on the fly to 32-element int8 blocks exactly as llama.cpp's reference
//! `quantize_row_q8_0_ref` / `quantize_row_q8_1_ref` (and candle) do.
//!
//! The arithmetic, per output `y[r][c]` over the blocks `b` of the reduction:
//!
//! ```text
//! y = Σ_b dw[c][b]·dx[r][b]·I[r][c][b]  (+ Σ_b mw[c][b]·sx[r][b] for Q4_1)
//! I = Σ_{j<32} v_j·x_j                  (exact, i32)
//! ```
//! with `v` the weight's signed code (Q8_0: `q`; Q4_0: `q − 8`; Q4_1: the nibble `q`),
//! `x` the activation's int8 code, and for Q4_1 `sx = f16(dx·Σx)` as llama.cpp's `q8_1`.
//! That is the arithmetic of ggml's `vec_dot_q8_0_q8_0` / `q4_0_q8_0` / `q4_1_q8_1`; only
//! the order of the f32 additions differs between paths.
//!
//! Layout ([`PackedBlocks`], built once per weight): codes contiguous per output row as
//! unsigned bytes — Q8_0 as `q + 128` (so VNNI's `vpdpbusd`, u8 × s8, takes them as is;
//! the `+128·Σx` it adds is cancelled exactly by the accumulator's start value), Q4 as
//! nibbles regrouped so that one 64-byte load, masked and shifted, yields 2 × 64 codes in
//! element order (see [`nibble_groups`]) — and f32 scales (and Q4_1 minima) per block.
//! Activations ([`ActBlocks`]) hold int8 codes, f32 scales, Q4_1's `sx`, and the per-4
//! element start values `−offset·Σx` that make the unsigned codes signed.
//!
//! Paths (`Isa`): portable (scalar), AVX2 (`vpmaddubsw` + `vpmaddwd`, one block per ymm),
//! AVX-512 VNNI (`vpdpbusd`, two blocks per zmm). The integer block sums `I` are exact in
//! every path; tiles of several activation rows × several weight rows share each load.
//!
//! Models hold a weight as [`Packed`]: on AVX-512 VNNI only the 16-channel panel layout of
//! [`panels`] (decode and prefill: its one `vpdpbusd` per 16 channels × 4 codes does a
//! quarter of the row kernel's float work, 2-3x less CPU time per decode token), elsewhere
//! the row layout above.

use super::{Isa, SendPtr};
use anyhow::{bail, Result};

mod aligned;
pub mod panels;
use half::f16;
pub use panels::PanelBlocks;
use rayon::prelude::*;

/// Elements per GGML block (all three types).
pub const QK: usize = 32;

/// The block types these kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl BlockKind {
    /// Bytes of one GGML block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockKind::Q8_0 => 34,
            BlockKind::Q4_0 => 18,
            BlockKind::Q4_1 => 20,
        }
    }

    /// What the stored unsigned code exceeds the signed value `v` by (the start value of
    /// each integer accumulator is `−offset·Σx`).
    pub fn offset(self) -> i32 {
        match self {
            BlockKind::Q8_0 => 128,
            BlockKind::Q4_0 => 8,
            BlockKind::Q4_1 => 0,
        }
    }

    fn nibbles(self) -> bool {
        self != BlockKind::Q8_0
    }
}

/// Sizes of the nibble groups a row of `k` elements is cut into, in order: as many 128s as
/// fit, then a 64 and a 32 for the rest. A group of `g` elements at `e` takes `g/2` bytes
/// from byte `e/2`: byte `j` holds element `e+j` (low nibble) and `e+j+g/2` (high nibble).
/// So a 128-group is one 64-byte load whose low nibbles are elements 0..64 and high
/// nibbles 64..128; a 32-group is GGML's own order.
pub fn nibble_groups(k: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = k / 128 * 128;
    let mut groups: Vec<(usize, usize)> = (0..full).step_by(128).map(|e| (e, 128)).collect();
    let mut e = full;
    if k - e >= 64 {
        groups.push((e, 64));
        e += 64;
    }
    if k - e >= 32 {
        groups.push((e, 32));
    }
    groups.into_iter()
}

/// A GGML weight `[n, k]` repacked for these kernels (see the module doc).
#[derive(Clone)]
pub struct PackedBlocks {
    pub kind: BlockKind,
    pub n: usize,
    pub k: usize,
    /// Row-major codes: `k` bytes per row (Q8_0) or `k/2` (Q4), each row starting on a
    /// 64-byte boundary (rows padded to [`Self::stride`]): whole-line loads when streaming.
    codes: Vec<Line>,
    /// Scale per block, `n × k/32`.
    d: Vec<f32>,
    /// Q4_1's minimum per block (empty otherwise).
    m: Vec<f32>,
}

impl std::fmt::Debug for PackedBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBlocks({:?}, {}×{})", self.kind, self.n, self.k)
    }
}

/// One cache line, so the code buffer is 64-byte aligned (and stays so when cloned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl PackedBlocks {
    /// Repacks GGML blocks (`n` rows of `k/32` blocks, as `QTensor::data` gives them).
    pub fn from_ggml(kind: BlockKind, bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        if k == 0 || !k.is_multiple_of(QK) {
            bail!("{kind:?}: {k} input features are not a positive multiple of {QK}");
        }
        let kb = k / QK;
        let bb = kind.block_bytes();
        if bytes.len() != n * kb * bb {
            bail!(
                "{kind:?} [{n}, {k}]: expected {} bytes of blocks, got {}",
                n * kb * bb,
                bytes.len()
            );
        }
        let row_bytes = if kind.nibbles() { k / 2 } else { k };
        let stride = row_bytes.next_multiple_of(64);
        let mut lines = vec![Line([0; 64]); n * stride / 64];
        // SAFETY: Line is 64 plain bytes with no padding; the view covers the Vec exactly.
        let codes: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, n * stride) };
        let mut d = vec![0f32; n * kb];
        let mut m = if kind == BlockKind::Q4_1 {
            vec![0f32; n * kb]
        } else {
            Vec::new()
        };
        let mut row = vec![0u8; k];
        for c in 0..n {
            for b in 0..kb {
                let blk = &bytes[(c * kb + b) * bb..][..bb];
                d[c * kb + b] = f16_at(blk, 0);
                let dst = &mut row[b * QK..][..QK];
                match kind {
                    BlockKind::Q8_0 => {
                        for (o, &q) in dst.iter_mut().zip(&blk[2..34]) {
                            *o = q ^ 0x80; // q + 128 as u8
                        }
                    }
                    BlockKind::Q4_0 | BlockKind::Q4_1 => {
                        let qs = if kind == BlockKind::Q4_0 {
                            &blk[2..18]
                        } else {
                            m[c * kb + b] = f16_at(blk, 2);
                            &blk[4..20]
                        };
                        for (j, &q) in qs.iter().enumerate() {
                            dst[j] = q & 0x0F;
                            dst[j + 16] = q >> 4;
                        }
                    }
                }
            }
            let out = &mut codes[c * stride..][..row_bytes];
            if kind.nibbles() {
                for (e, g) in nibble_groups(k) {
                    for j in 0..g / 2 {
                        out[e / 2 + j] = row[e + j] | (row[e + j + g / 2] << 4);
                    }
                }
            } else {
                out.copy_from_slice(&row);
            }
        }
        Ok(PackedBlocks {
            kind,
            n,
            k,
            codes: lines,
            d,
            m,
        })
    }

    fn row_bytes(&self) -> usize {
        if self.kind.nibbles() {
            self.k / 2
        } else {
            self.k
        }
    }

    /// Distance in bytes between rows of codes.
    fn stride(&self) -> usize {
        self.row_bytes().next_multiple_of(64)
    }

    /// All code bytes, `n × stride`.
    fn code_bytes(&self) -> &[u8] {
        // SAFETY: Line is 64 plain bytes with no padding; the view covers the Vec exactly.
        unsafe {
            std::slice::from_raw_parts(self.codes.as_ptr() as *const u8, self.codes.len() * 64)
        }
    }

    /// Row `c`'s unsigned codes in element order (what the portable path reads).
    fn unpack_row(&self, c: usize, out: &mut [u8]) {
        let rb = self.row_bytes();
        let src = &self.code_bytes()[c * self.stride()..][..rb];
        if self.kind.nibbles() {
            for (e, g) in nibble_groups(self.k) {
                for j in 0..g / 2 {
                    let v = src[e / 2 + j];
                    out[e + j] = v & 0x0F;
                    out[e + j + g / 2] = v >> 4;
                }
            }
        } else {
            out[..self.k].copy_from_slice(src);
        }
    }

    /// Bytes this packed copy holds.
    pub fn bytes(&self) -> usize {
        self.codes.len() * 64 + 4 * (self.d.len() + self.m.len())
    }
}

/// Activations `[m, k]` quantized to int8 blocks for one forward call.
pub struct ActBlocks {
    pub m: usize,
    pub k: usize,
    q: Vec<i8>,
    /// Scale per block (the f16-stored value, as f32), `m × k/32`.
    d: Vec<f32>,
    /// `f16(d·Σq)` per block (llama.cpp's `q8_1` `s`; used by Q4_1).
    s: Vec<f32>,
    /// `−offset·(q[4i]+…+q[4i+3])` per 4 elements (empty when the offset is 0).
    start: Vec<i32>,
}

/// llama.cpp's reference rounding of one block (`quantize_row_q8_{0,1}_ref`): `d = amax/127`,
/// `q = round(x/d)` half away from zero, computed as `x·(1/d)`; `d` is stored as f16.
/// Returns the stored `d` and the f32 `d` used for `s`.
fn quantize_block_scalar(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * id).round() as i8;
    }
    (f16::from_f32(d).to_f32(), d)
}

impl ActBlocks {
    /// Quantizes `x` (`m × k`, row-major) for weights of `kind` on path `isa`.
    pub fn quantize(isa: Isa, kind: BlockKind, x: &[f32], m: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(QK) && x.len() == m * k, "activation shape");
        let kb = k / QK;
        let mut a = ActBlocks {
            m,
            k,
            q: vec![0i8; m * k],
            d: vec![0f32; m * kb],
            s: vec![0f32; m * kb],
            start: Vec::new(),
        };
        let mut dd = vec![0f32; m * kb];
        let threads = rayon::current_num_threads();
        let rows_per = if m * k >= 1 << 16 && threads > 1 {
            m.div_ceil(2 * threads)
        } else {
            m.max(1)
        };
        a.q.par_chunks_mut(rows_per * k)
            .zip(a.d.par_chunks_mut(rows_per * kb))
            .zip(dd.par_chunks_mut(rows_per * kb))
            .zip(x.par_chunks(rows_per * k))
            .for_each(|(((q, d), dd), x)| {
                for ((q, x), (d, dd)) in q
                    .chunks_exact_mut(QK)
                    .zip(x.chunks_exact(QK))
                    .zip(d.iter_mut().zip(dd.iter_mut()))
                {
                    (*d, *dd) = quantize_block(isa, x, q);
                }
            });
        for ((s, q), dd) in a.s.iter_mut().zip(a.q.chunks_exact(QK)).zip(&dd) {
            let sum: i32 = q.iter().map(|&v| v as i32).sum();
            *s = f16::from_f32(sum as f32 * dd).to_f32();
        }
        let off = kind.offset();
        if off != 0 {
            a.start =
                a.q.chunks_exact(4)
                    .map(|q| -off * q.iter().map(|&v| v as i32).sum::<i32>())
                    .collect();
        }
        a
    }
}

fn quantize_block(isa: Isa, x: &[f32], q: &mut [i8]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: AVX2 is present on this path; both slices are 32 long (chunks_exact).
        return unsafe { x86::quantize_block_avx2(x, q) };
    }
    let _ = isa;
    quantize_block_scalar(x, q)
}

/// `out[r·n + c] = Σ ...` for every activation row `r` and weight row `c` on path `isa`.
pub fn matmul_with(isa: Isa, w: &PackedBlocks, a: &ActBlocks, out: &mut [f32]) {
    assert_eq!(a.k, w.k, "reduction width");
    assert_eq!(out.len(), a.m * w.n, "output size");
    assert_eq!(a.q.len(), a.m * a.k);
    if w.kind.offset() != 0 {
        assert_eq!(
            a.start.len(),
            a.m * a.k / 4,
            "activations quantized for this kind"
        );
    }
    let (m, n) = (a.m, w.n);
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let work = m * n * w.k;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |c0: usize, c1: usize| {
        let p = out_ptr;
        // SAFETY: every task writes only columns c0..c1 of each of the m rows of `out`
        // (m·n long, checked above); column ranges of tasks are disjoint.
        unsafe { run_columns(isa, w, a, c0, c1, p.get(), n) }
    };
    if threads < 2 || work < PAR_MIN_WORK {
        run(0, n);
        return;
    }
    // Column chunks: a few per thread for m = 1 (decode), narrower for big m so each
    // chunk's weights stay in cache while every activation row passes over them.
    let tasks = if m < 8 { 2 * threads } else { 8 * threads };
    let per = n.div_ceil(tasks).next_multiple_of(4).max(4);
    (0..n.div_ceil(per))
        .into_par_iter()
        .for_each(|t| run(t * per, ((t + 1) * per).min(n)));
}

/// Below this many multiply-adds one thread does the whole product.
const PAR_MIN_WORK: usize = 1 << 17;

/// # Safety
/// `out` must point to `a.m × ldo` f32 with `c1 <= w.n <= ldo`; no other thread may touch
/// columns `c0..c1` meanwhile.
unsafe fn run_columns(
    isa: Isa,
    w: &PackedBlocks,
    a: &ActBlocks,
    c0: usize,
    c1: usize,
    out: *mut f32,
    ldo: usize,
) {
    assert!(c0 <= c1 && c1 <= w.n && w.n <= ldo);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: caller's contract; the AVX-512 path is only selected where the CPU has it.
        Isa::Avx512 => unsafe { x86::columns_avx512(w, a, c0, c1, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, AVX2.
        Isa::Avx2 => unsafe { x86::columns_avx2(w, a, c0, c1, out, ldo) },
        // SAFETY: caller's contract.
        _ => unsafe { columns_portable(w, a, c0, c1, out, ldo) },
    }
}

/// Scalar path: exact i32 per block, f32 sum in block order.
///
/// # Safety
/// As [`run_columns`].
unsafe fn columns_portable(
    w: &PackedBlocks,
    a: &ActBlocks,
    c0: usize,
    c1: usize,
    out: *mut f32,
    ldo: usize,
) {
    let (k, kb) = (w.k, w.k / QK);
    let off = w.kind.offset();
    let mut codes = vec![0u8; k];
    for c in c0..c1 {
        w.unpack_row(c, &mut codes);
        for r in 0..a.m {
            let x = &a.q[r * k..][..k];
            let mut y = 0f32;
            for b in 0..kb {
                let mut i = 0i32;
                for j in b * QK..(b + 1) * QK {
                    i += (codes[j] as i32 - off) * x[j] as i32;
                }
                y += w.d[c * kb + b] * a.d[r * kb + b] * i as f32;
                if w.kind == BlockKind::Q4_1 {
                    y += w.m[c * kb + b] * a.s[r * kb + b];
                }
            }
            // SAFETY: r < a.m, c < c1 <= ldo (caller's contract).
            unsafe { *out.add(r * ldo + c) = y };
        }
    }
}

/// Q4_1's `Σ_b mw·sx` for one (row, column).
fn min_term(w: &PackedBlocks, a: &ActBlocks, r: usize, c: usize) -> f32 {
    let kb = w.k / QK;
    let (mw, sx) = (&w.m[c * kb..][..kb], &a.s[r * kb..][..kb]);
    mw.iter().zip(sx).map(|(m, s)| m * s).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD paths. Bounds: every raw read below stays inside one row of codes
    //! (`row_bytes`), one row of activation codes (`k`), one row of start values (`k/4`)
    //! or one row of scales (`k/32`), because the loops walk `nibble_groups(k)` / blocks
    //! of a row whose lengths were asserted in `matmul_with`.

    use super::*;
    use std::arch::x86_64::*;

    /// AVX2 version of [`quantize_block_scalar`], bit-identical: same `d`, same `1/d`,
    /// the same product `x·id` and round-half-away-from-zero done exactly as
    /// `t = trunc(v); t + sign(v)·(|v − t| ≥ 0.5)` (`v − t` is exact in f32).
    ///
    /// # Safety
    /// AVX2 + FMA; `x.len() == q.len() == 32`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8]) -> (f32, f32) {
        assert!(x.len() == QK && q.len() == QK);
        let p = x.as_ptr();
        // SAFETY: 4 × 8 floats inside x (asserted).
        let v: [__m256; 4] = unsafe { std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i))) };
        let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut mx = _mm256_setzero_ps();
        for vi in v {
            mx = _mm256_max_ps(mx, _mm256_and_ps(vi, absmask));
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), mx) };
        // NaN-free inputs give the same max in any order (max is exact).
        let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        let mut qi = [_mm256_setzero_si256(); 4];
        for (i, vi) in v.iter().enumerate() {
            let s = _mm256_mul_ps(*vi, idv);
            let t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = _mm256_and_ps(_mm256_sub_ps(s, t), absmask);
            let up = _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), one);
            let r = _mm256_add_ps(t, _mm256_or_ps(up, _mm256_and_ps(s, sign)));
            qi[i] = _mm256_cvttps_epi32(r);
        }
        // i32 → i8 (values in −127..127): two packs reorder lanes; permute restores order.
        let a = _mm256_packs_epi32(qi[0], qi[1]);
        let b = _mm256_packs_epi32(qi[2], qi[3]);
        let c = _mm256_packs_epi16(a, b);
        let c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 bytes into q (asserted).
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, c) };
        (f16::from_f32(d).to_f32(), d)
    }

    // ---------------------------------------------------------------- AVX-512 VNNI

    /// Tile shape of the AVX-512 path: activation rows × weight rows (16 zmm accumulators).
    const R5: usize = 4;
    const C5: usize = 4;

    /// # Safety
    /// As `run_columns`; the CPU has AVX-512 F/BW/VL + VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn columns_avx512(
        w: &PackedBlocks,
        a: &ActBlocks,
        c0: usize,
        c1: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        macro_rules! kinds {
            ($r:literal, $c:literal, $r0:expr, $cc:expr) => {
                // SAFETY: r0 + R <= m, cc + C <= c1 (loop bounds below); caller's contract.
                match w.kind {
                    BlockKind::Q8_0 => unsafe { tile512::<$r, $c, 0>(w, a, $r0, $cc, out, ldo) },
                    BlockKind::Q4_0 => unsafe { tile512::<$r, $c, 1>(w, a, $r0, $cc, out, ldo) },
                    BlockKind::Q4_1 => unsafe { tile512::<$r, $c, 2>(w, a, $r0, $cc, out, ldo) },
                }
            };
        }
        let m = a.m;
        let mut r0 = 0;
        while r0 + R5 <= m {
            let mut c = c0;
            while c + C5 <= c1 {
                kinds!(4, 4, r0, c);
                c += C5;
            }
            while c < c1 {
                kinds!(4, 1, r0, c);
                c += 1;
            }
            r0 += R5;
        }
        while r0 < m {
            let mut c = c0;
            while c + C5 <= c1 {
                kinds!(1, 4, r0, c);
                c += C5;
            }
            while c < c1 {
                kinds!(1, 1, r0, c);
                c += 1;
            }
            r0 += 1;
        }
    }

    /// How many C-row tiles ahead GEMV prefetches its weight rows.
    const PREFETCH_TILES: usize = 6;

    /// Broadcasts two consecutive f32 to the low and high 8 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn expand2(p: *const f32) -> __m512 {
        // SAFETY: caller: p points at 2 readable f32.
        let two = unsafe { _mm_castpd_ps(_mm_load_sd(p as *const f64)) };
        let idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(two))
    }

    /// One R × C tile of outputs. `KIND`: 0 = Q8_0, 1 = Q4_0, 2 = Q4_1.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL + VNNI; `r0 + R <= a.m`, `c0 + C <= w.n`, `out` holds rows of `ldo`
    /// with `c0 + C <= ldo`.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile512<const R: usize, const C: usize, const KIND: u8>(
        w: &PackedBlocks,
        a: &ActBlocks,
        r0: usize,
        c0: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let k = w.k;
        let kb = k / QK;
        assert!(r0 + R <= a.m && c0 + C <= w.n && c0 + C <= ldo);
        let rb = w.stride();
        let codes = w.code_bytes();
        let has_start = KIND != 2;
        let wc: [*const u8; C] = std::array::from_fn(|c| codes[(c0 + c) * rb..].as_ptr());
        let wd: [*const f32; C] = std::array::from_fn(|c| w.d[(c0 + c) * kb..].as_ptr());
        let xq: [*const i8; R] = std::array::from_fn(|r| a.q[(r0 + r) * k..].as_ptr());
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d[(r0 + r) * kb..].as_ptr());
        let xs: [*const i32; R] = std::array::from_fn(|r| {
            if has_start {
                a.start[(r0 + r) * k / 4..].as_ptr()
            } else {
                std::ptr::null()
            }
        });
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mask = _mm512_set1_epi8(0x0F);

        // One 64-element step (2 blocks) at element e with the C weight vectors `wv`.
        macro_rules! step64 {
            ($e:expr, $wv:expr) => {{
                let e: usize = $e;
                let b = e / QK;
                // SAFETY: b + 1 < kb (e + 64 <= k) for every row's scale.
                let dw: [__m512; C] = std::array::from_fn(|c| unsafe { expand2(wd[c].add(b)) });
                for r in 0..R {
                    // SAFETY: e + 64 <= k inside row r0 + r.
                    let x = unsafe { _mm512_loadu_si512(xq[r].add(e) as *const _) };
                    let dx = unsafe { expand2(xd[r].add(b)) };
                    let init = if has_start {
                        // SAFETY: e/4 + 16 <= k/4.
                        unsafe { _mm512_loadu_si512(xs[r].add(e / 4) as *const _) }
                    } else {
                        _mm512_setzero_si512()
                    };
                    for c in 0..C {
                        let p = _mm512_dpbusd_epi32(init, $wv[c], x);
                        let s = _mm512_mul_ps(dw[c], dx);
                        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc[r][c]);
                    }
                }
            }};
        }

        let mut tail = [[_mm256_setzero_ps(); C]; R];
        for (e, g) in groups(KIND, k) {
            match g {
                128 => {
                    let mut lo = [_mm512_setzero_si512(); C];
                    let mut hi = [_mm512_setzero_si512(); C];
                    if R == 1 {
                        // GEMV streams the weight from memory once: ask for the rows two
                        // tiles on (the hardware prefetcher alone left the loads stalling).
                        // wrapping_add: a prefetch past the end is harmless, not a read.
                        let ahead = PREFETCH_TILES * C * rb;
                        let (at, len) = if KIND == 0 { (e, 128) } else { (e / 2, 64) };
                        for c in 0..C {
                            for off in (0..len).step_by(64) {
                                let p = wc[c].wrapping_add(ahead + at + off);
                                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                            }
                        }
                    }
                    if KIND == 0 {
                        // Q8_0: one 64-byte step at a time (fewer live registers).
                        for half in [e, e + 64] {
                            // SAFETY: half + 64 <= e + 128 <= k = row bytes.
                            let v: [__m512i; C] = std::array::from_fn(|c| unsafe {
                                _mm512_loadu_si512(wc[c].add(half) as *const _)
                            });
                            step64!(half, v);
                        }
                        continue;
                    }
                    for c in 0..C {
                        {
                            // SAFETY: e/2 + 64 <= k/2 = row bytes.
                            let v = unsafe { _mm512_loadu_si512(wc[c].add(e / 2) as *const _) };
                            lo[c] = _mm512_and_si512(v, mask);
                            hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                        }
                    }
                    step64!(e, lo);
                    step64!(e + 64, hi);
                }
                64 => {
                    let mut v = [_mm512_setzero_si512(); C];
                    for c in 0..C {
                        v[c] = if KIND == 0 {
                            // SAFETY: e + 64 <= k.
                            unsafe { _mm512_loadu_si512(wc[c].add(e) as *const _) }
                        } else {
                            // SAFETY: e/2 + 32 <= k/2.
                            let h = unsafe { _mm256_loadu_si256(wc[c].add(e / 2) as *const _) };
                            let m = _mm256_set1_epi8(0x0F);
                            let l = _mm256_and_si256(h, m);
                            let u = _mm256_and_si256(_mm256_srli_epi16(h, 4), m);
                            _mm512_inserti64x4(_mm512_castsi256_si512(l), u, 1)
                        };
                    }
                    step64!(e, v);
                }
                _ => {
                    // A last single block: 256-bit VNNI.
                    let b = e / QK;
                    let mut v = [_mm256_setzero_si256(); C];
                    for c in 0..C {
                        v[c] = if KIND == 0 {
                            // SAFETY: e + 32 <= k.
                            unsafe { _mm256_loadu_si256(wc[c].add(e) as *const _) }
                        } else {
                            // SAFETY: e/2 + 16 <= k/2.
                            let h = unsafe { _mm_loadu_si128(wc[c].add(e / 2) as *const _) };
                            let m = _mm_set1_epi8(0x0F);
                            let l = _mm_and_si128(h, m);
                            let u = _mm_and_si128(_mm_srli_epi16(h, 4), m);
                            _mm256_set_m128i(u, l)
                        };
                    }
                    for r in 0..R {
                        // SAFETY: e + 32 <= k; b < kb; e/4 + 8 <= k/4.
                        let x = unsafe { _mm256_loadu_si256(xq[r].add(e) as *const _) };
                        let dx = unsafe { *xd[r].add(b) };
                        let init = if has_start {
                            unsafe { _mm256_loadu_si256(xs[r].add(e / 4) as *const _) }
                        } else {
                            _mm256_setzero_si256()
                        };
                        for c in 0..C {
                            let p = _mm256_dpbusd_epi32(init, v[c], x);
                            // SAFETY: b < kb.
                            let s = _mm256_set1_ps(unsafe { *wd[c].add(b) } * dx);
                            tail[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, tail[r][c]);
                        }
                    }
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let lo = _mm512_castps512_ps256(acc[r][c]);
                let hi = _mm512_extractf32x8_ps::<1>(acc[r][c]);
                let v = _mm256_add_ps(_mm256_add_ps(lo, hi), tail[r][c]);
                let mut y = hsum256(v);
                if KIND == 2 {
                    y += min_term(w, a, r0 + r, c0 + c);
                }
                // SAFETY: r0 + r < m, c0 + c < ldo (asserted); caller's contract.
                unsafe { *out.add((r0 + r) * ldo + c0 + c) = y };
            }
        }
    }

    /// The groups a row is walked in: nibble groups for Q4 (a layout), the same cut for Q8_0
    /// (only a loop shape there).
    fn groups(_kind: u8, k: usize) -> impl Iterator<Item = (usize, usize)> {
        nibble_groups(k)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    // ---------------------------------------------------------------- AVX2

    /// Tile shape of the AVX2 path (8 ymm accumulators of 16).
    const R2: usize = 2;
    const C2: usize = 4;

    /// # Safety
    /// As `run_columns`; the CPU has AVX2 + FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns_avx2(
        w: &PackedBlocks,
        a: &ActBlocks,
        c0: usize,
        c1: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        macro_rules! kinds {
            ($r:literal, $c:literal, $r0:expr, $cc:expr) => {
                // SAFETY: r0 + R <= m, cc + C <= c1 (loop bounds below); caller's contract.
                match w.kind {
                    BlockKind::Q8_0 => unsafe { tile2::<$r, $c, 0>(w, a, $r0, $cc, out, ldo) },
                    BlockKind::Q4_0 => unsafe { tile2::<$r, $c, 1>(w, a, $r0, $cc, out, ldo) },
                    BlockKind::Q4_1 => unsafe { tile2::<$r, $c, 2>(w, a, $r0, $cc, out, ldo) },
                }
            };
        }
        let m = a.m;
        let mut r0 = 0;
        while r0 + R2 <= m {
            let mut c = c0;
            while c + C2 <= c1 {
                kinds!(2, 4, r0, c);
                c += C2;
            }
            while c < c1 {
                kinds!(2, 1, r0, c);
                c += 1;
            }
            r0 += R2;
        }
        while r0 < m {
            let mut c = c0;
            while c + C2 <= c1 {
                kinds!(1, 4, r0, c);
                c += C2;
            }
            while c < c1 {
                kinds!(1, 1, r0, c);
                c += 1;
            }
            r0 += 1;
        }
    }

    /// One R × C tile on AVX2, one block (32 codes, one ymm) at a time.
    ///
    /// `vpmaddubsw` multiplies u8 × s8 and adds adjacent pairs into i16 with saturation;
    /// it never saturates here: Q4 codes are 0..15 and activations −127..127 (|x/d| ≤ 127
    /// by the choice of d), so a pair is at most 2·15·127 = 3810; for Q8_0 the sign trick
    /// multiplies |w| ≤ 128 by ±x with |x| ≤ 127, a pair at most 2·128·127 = 32512 < 32767.
    ///
    /// # Safety
    /// AVX2 + FMA; `r0 + R <= a.m`, `c0 + C <= w.n`, `c0 + C <= ldo`.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile2<const R: usize, const C: usize, const KIND: u8>(
        w: &PackedBlocks,
        a: &ActBlocks,
        r0: usize,
        c0: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let k = w.k;
        let kb = k / QK;
        assert!(r0 + R <= a.m && c0 + C <= w.n && c0 + C <= ldo);
        let rb = w.stride();
        let codes = w.code_bytes();
        let wc: [*const u8; C] = std::array::from_fn(|c| codes[(c0 + c) * rb..].as_ptr());
        let wd: [*const f32; C] = std::array::from_fn(|c| w.d[(c0 + c) * kb..].as_ptr());
        let xq: [*const i8; R] = std::array::from_fn(|r| a.q[(r0 + r) * k..].as_ptr());
        let xd: [*const f32; R] = std::array::from_fn(|r| a.d[(r0 + r) * kb..].as_ptr());
        let xs: [*const i32; R] = std::array::from_fn(|r| {
            if KIND == 1 {
                a.start[(r0 + r) * k / 4..].as_ptr()
            } else {
                std::ptr::null()
            }
        });
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);

        // One block at element e with the C weight vectors `wv` (Q4: codes; Q8_0: q + 128).
        macro_rules! step32 {
            ($e:expr, $wv:expr) => {{
                let e: usize = $e;
                let b = e / QK;
                let mut wa = [_mm256_setzero_si256(); C];
                let mut ws = [_mm256_setzero_si256(); C];
                if KIND == 0 {
                    for c in 0..C {
                        ws[c] = _mm256_xor_si256($wv[c], flip); // signed q
                        wa[c] = _mm256_abs_epi8(ws[c]);
                    }
                }
                for r in 0..R {
                    // SAFETY: e + 32 <= k in row r0 + r; b < kb; e/4 + 8 <= k/4.
                    let x = unsafe { _mm256_loadu_si256(xq[r].add(e) as *const _) };
                    let dx = unsafe { *xd[r].add(b) };
                    for c in 0..C {
                        let p16 = if KIND == 0 {
                            _mm256_maddubs_epi16(wa[c], _mm256_sign_epi8(x, ws[c]))
                        } else {
                            _mm256_maddubs_epi16($wv[c], x)
                        };
                        let mut p = _mm256_madd_epi16(p16, ones);
                        if KIND == 1 {
                            let st = unsafe { _mm256_loadu_si256(xs[r].add(e / 4) as *const _) };
                            p = _mm256_add_epi32(p, st);
                        }
                        // SAFETY: b < kb.
                        let s = _mm256_set1_ps(unsafe { *wd[c].add(b) } * dx);
                        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][c]);
                    }
                }
            }};
        }

        let mask = _mm256_set1_epi8(0x0F);
        for (e, g) in groups(KIND, k) {
            if KIND == 0 {
                for s in (e..e + g).step_by(QK) {
                    // SAFETY: s + 32 <= k = row bytes.
                    let v: [__m256i; C] = std::array::from_fn(|c| unsafe {
                        _mm256_loadu_si256(wc[c].add(s) as *const _)
                    });
                    step32!(s, v);
                }
                continue;
            }
            match g {
                128 | 64 => {
                    // 32 bytes at a time: low nibbles are one block, high the block g/2 on.
                    for j in (0..g / 2).step_by(32) {
                        let mut lo = [_mm256_setzero_si256(); C];
                        let mut hi = [_mm256_setzero_si256(); C];
                        for c in 0..C {
                            // SAFETY: e/2 + j + 32 <= e/2 + g/2 <= k/2.
                            let v = unsafe { _mm256_loadu_si256(wc[c].add(e / 2 + j) as *const _) };
                            lo[c] = _mm256_and_si256(v, mask);
                            hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                        }
                        step32!(e + j, lo);
                        step32!(e + j + g / 2, hi);
                    }
                }
                _ => {
                    let mut v = [_mm256_setzero_si256(); C];
                    for c in 0..C {
                        // SAFETY: e/2 + 16 <= k/2.
                        let h = unsafe { _mm_loadu_si128(wc[c].add(e / 2) as *const _) };
                        let m = _mm_set1_epi8(0x0F);
                        v[c] = _mm256_set_m128i(
                            _mm_and_si128(_mm_srli_epi16(h, 4), m),
                            _mm_and_si128(h, m),
                        );
                    }
                    step32!(e, v);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let mut y = hsum256(acc[r][c]);
                if KIND == 2 {
                    y += min_term(w, a, r0 + r, c0 + c);
                }
                // SAFETY: r0 + r < m, c0 + c < ldo (asserted); caller's contract.
                unsafe { *out.add((r0 + r) * ldo + c0 + c) = y };
            }
        }
    }
}

/// A GGML weight in the one layout the selected kernel path runs, built once at load: the
/// panel layout on AVX-512 VNNI (decode and prefill alike: one `vpdpbusd` serves 16 output
/// rows, see [`panels`]), the row layout elsewhere. Only one copy is kept.
#[derive(Debug, Clone)]
pub enum Packed {
    Rows(PackedBlocks),
    Panels(PanelBlocks),
}

impl Packed {
    /// Repacks GGML blocks for `isa` (`Isa::selected()` in models).
    pub fn from_ggml(isa: Isa, kind: BlockKind, bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let rows = PackedBlocks::from_ggml(kind, bytes, n, k)?;
        Ok(if panels::panel_layout(isa) {
            Packed::Panels(PanelBlocks::from_rows(&rows))
        } else {
            Packed::Rows(rows)
        })
    }

    /// Output features.
    pub fn n(&self) -> usize {
        match self {
            Packed::Rows(w) => w.n,
            Packed::Panels(w) => w.n,
        }
    }

    /// Input features.
    pub fn k(&self) -> usize {
        match self {
            Packed::Rows(w) => w.k,
            Packed::Panels(w) => w.k,
        }
    }

    pub fn kind(&self) -> BlockKind {
        match self {
            Packed::Rows(w) => w.kind,
            Packed::Panels(w) => w.kind,
        }
    }

    /// Bytes this copy holds.
    pub fn bytes(&self) -> usize {
        match self {
            Packed::Rows(w) => w.bytes(),
            Packed::Panels(w) => w.bytes(),
        }
    }
}

/// `x` (`m × k` f32) times the packed weight's transpose: `m × n` f32, on `Isa::selected()`
/// (falling back to the best path the CPU has if the layout was built for another).
pub fn matmul(w: &Packed, x: &[f32], m: usize) -> Vec<f32> {
    let isa = Isa::selected();
    let mut out = vec![0f32; m * w.n()];
    match w {
        Packed::Panels(p) => {
            let isa = if panels::panel_layout(isa) {
                isa
            } else {
                Isa::Portable
            };
            // The panel kernels take their start values per block (`panels::block_starts`),
            // not the row kernels' per-4 ones: quantize as for Q4_1 (offset 0), which skips
            // those (the codes, scales and sums are the same for every kind).
            let a = ActBlocks::quantize(isa, BlockKind::Q4_1, x, m, p.k);
            panels::matmul_with(isa, p, &a, &mut out);
        }
        Packed::Rows(r) => {
            let a = ActBlocks::quantize(isa, r.kind, x, m, r.k);
            matmul_with(isa, r, &a, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! Every path against a scalar reference written from GGML's block format directly
    //! (it shares no code with the kernels: its own block decoding, its own activation
    //! quantization, f64 sums).
    use super::*;

    /// A small seeded generator (also the panel tests' inputs).
    pub(super) struct Lcg(pub(super) u64);
    impl Lcg {
        pub(super) fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        pub(super) fn unif(&mut self) -> f32 {
            self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
        }
    }

    const KINDS: [BlockKind; 3] = [BlockKind::Q8_0, BlockKind::Q4_0, BlockKind::Q4_1];

    /// Random GGML blocks; `unit` makes every scale 1 and every minimum 0 (exact sums).
    /// Codes hit the extremes (−128/−127/127, nibbles 0/15) often.
    fn random_blocks(kind: BlockKind, n: usize, k: usize, unit: bool, g: &mut Lcg) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n * k / QK {
            let d = if unit {
                1.0
            } else {
                0.001 + 0.05 * g.unif().abs()
            };
            out.extend(f16::from_f32(d).to_le_bytes());
            if kind == BlockKind::Q4_1 {
                let m = if unit { 0.0 } else { 0.1 * g.unif() };
                out.extend(f16::from_f32(m).to_le_bytes());
            }
            let nb = if kind == BlockKind::Q8_0 { 32 } else { 16 };
            for _ in 0..nb {
                let v = g.next();
                let byte = match (kind, v % 8) {
                    (BlockKind::Q8_0, 0) => 127u8,
                    (BlockKind::Q8_0, 1) => (-127i8) as u8,
                    (BlockKind::Q8_0, 2) => (-128i8) as u8,
                    (_, 0) => 0xFF,
                    (_, 1) => 0x00,
                    (_, 2) => 0x0F,
                    _ => (v >> 8) as u8,
                };
                out.push(byte);
            }
        }
        out
    }

    /// Block `b` of row `c`: scale, minimum, signed values `v` (see the module doc).
    fn ref_block(
        kind: BlockKind,
        bytes: &[u8],
        kb: usize,
        c: usize,
        b: usize,
    ) -> (f64, f64, Vec<i64>) {
        let bb = kind.block_bytes();
        let blk = &bytes[(c * kb + b) * bb..][..bb];
        let d = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f64();
        match kind {
            BlockKind::Q8_0 => (d, 0.0, blk[2..].iter().map(|&q| q as i8 as i64).collect()),
            _ => {
                let (m, qs) = if kind == BlockKind::Q4_1 {
                    (
                        f16::from_bits(u16::from_le_bytes([blk[2], blk[3]])).to_f64(),
                        &blk[4..],
                    )
                } else {
                    (0.0, &blk[2..])
                };
                let off = if kind == BlockKind::Q4_0 { 8 } else { 0 };
                let mut v = vec![0i64; 32];
                for j in 0..16 {
                    v[j] = (qs[j] & 15) as i64 - off;
                    v[j + 16] = (qs[j] >> 4) as i64 - off;
                }
                (d, m, v)
            }
        }
    }

    /// llama.cpp's quantize_row_q8_1_ref written out: (stored d, s, codes) per block.
    fn ref_act(x: &[f32]) -> (f64, f64, Vec<i64>) {
        let mut amax = 0f32;
        for v in x {
            amax = amax.max(v.abs());
        }
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let q: Vec<i64> = x
            .iter()
            .map(|&v| {
                let t = v * id;
                let r = t.abs().floor()
                    + if t.abs() - t.abs().floor() >= 0.5 {
                        1.0
                    } else {
                        0.0
                    };
                (r.copysign(t)) as i64
            })
            .collect();
        let sum: i64 = q.iter().sum();
        let s = f16::from_f32(sum as f32 * d).to_f64();
        (f16::from_f32(d).to_f64(), s, q)
    }

    /// (y in f64, Σ|terms| for the tolerance, exact Σ_b I when every scale is 1).
    fn reference(
        kind: BlockKind,
        bytes: &[u8],
        x: &[f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<(f64, f64, i64)> {
        let kb = k / QK;
        let mut out = Vec::new();
        for r in 0..m {
            let acts: Vec<_> = (0..kb)
                .map(|b| ref_act(&x[r * k + b * QK..][..QK]))
                .collect();
            for c in 0..n {
                let (mut y, mut mag, mut isum) = (0f64, 0f64, 0i64);
                for (b, (dx, sx, qx)) in acts.iter().enumerate() {
                    let (dw, mw, v) = ref_block(kind, bytes, kb, c, b);
                    let i: i64 = v.iter().zip(qx).map(|(a, b)| a * b).sum();
                    isum += i;
                    let t = dw * dx * i as f64;
                    let u = if kind == BlockKind::Q4_1 {
                        mw * sx
                    } else {
                        0.0
                    };
                    y += t + u;
                    mag += t.abs() + u.abs();
                }
                out.push((y, mag, isum));
            }
        }
        out
    }

    /// Ragged shapes: m = 1..5 (decode) and past the panel kernel's 8-row switch and 4-row
    /// tile; n off the 4-row tile, the 16-channel panel and the 3-panel tile; k with every
    /// nibble-group tail; work below and above the threading threshold.
    const SHAPES: [(usize, usize, usize); 14] = [
        (1, 1, 32),
        (1, 5, 64),
        (3, 7, 96),
        (1, 17, 608),
        (3, 6, 160),
        (17, 9, 224),
        (100, 17, 608),
        (5, 4, 128),
        (17, 33, 576),
        (1, 300, 576),
        (2, 49, 160),
        (4, 1, 32),
        (5, 83, 96),
        (1, 1201, 576),
    ];

    /// `x · Wᵀ` by every kernel this CPU has, each called directly: the row kernels on
    /// every path, the panel kernel on its paths (portable and AVX-512), and `matmul`'s
    /// dispatch on the selected path's layout. Labels name the path and layout.
    fn every_kernel(
        kind: BlockKind,
        bytes: &[u8],
        x: &[f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<(String, Vec<f32>)> {
        let rows = PackedBlocks::from_ggml(kind, bytes, n, k).unwrap();
        let pan = PanelBlocks::from_rows(&rows);
        let mut out = Vec::new();
        for isa in Isa::available() {
            let a = ActBlocks::quantize(isa, kind, x, m, k);
            let mut y = vec![0f32; m * n];
            matmul_with(isa, &rows, &a, &mut y);
            out.push((format!("{isa:?}/rows"), y));
            if isa == Isa::Portable || panels::panel_layout(isa) {
                let mut y = vec![0f32; m * n];
                panels::matmul_with(isa, &pan, &a, &mut y);
                out.push((format!("{isa:?}/panels"), y));
            }
        }
        let sel = Packed::from_ggml(Isa::selected(), kind, bytes, n, k).unwrap();
        out.push(("selected/matmul".into(), matmul(&sel, x, m)));
        out
    }

    #[test]
    fn every_path_matches_the_f64_reference() {
        let mut g = Lcg(7);
        for kind in KINDS {
            for (m, n, k) in SHAPES {
                let bytes = random_blocks(kind, n, k, false, &mut g);
                let x: Vec<f32> = (0..m * k).map(|_| g.unif() * 3.0).collect();
                let want = reference(kind, &bytes, &x, m, n, k);
                for (isa, y) in every_kernel(kind, &bytes, &x, m, n, k) {
                    for (i, (&got, &(y0, mag, _))) in y.iter().zip(&want).enumerate() {
                        // f32: each product d·d·I and each sum rounds by ≤ 2^-24 relative;
                        // k/32 + 8 roundings on terms of total size `mag`.
                        let tol = (k / QK + 8) as f64 * 2f64.powi(-23) * mag + 1e-30;
                        assert!(
                            (got as f64 - y0).abs() <= tol,
                            "{kind:?} {isa} m{m} n{n} k{k} @{i}: {got} vs {y0} (tol {tol})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn integer_sums_are_exact_on_every_path() {
        let mut g = Lcg(11);
        for kind in KINDS {
            for (m, n, k) in SHAPES {
                let bytes = random_blocks(kind, n, k, true, &mut g);
                // Integer activations with a ±127 in every block: d = 1, q = x exactly.
                let x: Vec<f32> = (0..m * k)
                    .map(|i| match (i % QK, g.next() % 4) {
                        (0, 0) => 127.0,
                        (0, _) => -127.0,
                        (_, 0) => 127.0,
                        (_, 1) => -127.0,
                        _ => (g.next() % 255) as f32 - 127.0,
                    })
                    .collect();
                let want = reference(kind, &bytes, &x, m, n, k);
                for (isa, y) in every_kernel(kind, &bytes, &x, m, n, k) {
                    for (i, (&got, &(_, _, isum))) in y.iter().zip(&want).enumerate() {
                        // |Σ I| <= k·128·127 < 2^24: every partial sum is exact in f32.
                        assert_eq!(got as i64, isum, "{kind:?} {isa} m{m} n{n} k{k} @{i}");
                        assert_eq!(got.fract(), 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantization_is_bit_identical_on_every_path() {
        let mut g = Lcg(3);
        let mut x: Vec<f32> = (0..32 * 40).map(|_| g.unif() * 10.0).collect();
        // Ties: amax 127 → d = 1, id = 1, halves round away from zero.
        for (j, v) in x[..32].iter_mut().enumerate() {
            *v = if j == 0 {
                127.0
            } else {
                (j as f32 - 16.0) + 0.5
            };
        }
        for v in &mut x[32..64] {
            *v = 0.0; // all-zero block: d = 0
        }
        x[64] = 1e-30;
        for isa in Isa::available() {
            let a = ActBlocks::quantize(isa, BlockKind::Q4_1, &x, 40, 32);
            for (b, blk) in x.chunks_exact(32).enumerate() {
                let (d, s, q) = ref_act(blk);
                assert_eq!(a.d[b] as f64, d, "{isa:?} block {b}");
                assert_eq!(a.s[b] as f64, s, "{isa:?} block {b}");
                let got: Vec<i64> = a.q[b * 32..][..32].iter().map(|&v| v as i64).collect();
                assert_eq!(got, q, "{isa:?} block {b}");
            }
        }
    }

    #[test]
    fn matches_candle_qmatmul() {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        use candle_core::{Device, Module, Tensor};
        let mut g = Lcg(5);
        for (kind, t) in [
            (BlockKind::Q8_0, GgmlDType::Q8_0),
            (BlockKind::Q4_0, GgmlDType::Q4_0),
            (BlockKind::Q4_1, GgmlDType::Q4_1),
        ] {
            for (m, n, k) in [(1, 24, 576), (7, 40, 128), (20, 12, 1536)] {
                let wf: Vec<f32> = (0..n * k).map(|_| g.unif()).collect();
                let xf: Vec<f32> = (0..m * k).map(|_| g.unif()).collect();
                let wt = Tensor::from_vec(wf, (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&wt, t).unwrap();
                let bytes = q.data().unwrap().into_owned();
                let want = QMatMul::from_qtensor(q)
                    .unwrap()
                    .forward(&Tensor::from_vec(xf.clone(), (m, k), &Device::Cpu).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let reff = reference(kind, &bytes, &xf, m, n, k);
                for (isa, y) in every_kernel(kind, &bytes, &xf, m, n, k) {
                    for ((&got, &c), &(_, mag, _)) in y.iter().zip(&want).zip(&reff) {
                        // Summation order; for Q4_1 also its s, which candle rounds as
                        // f16(f16(Σq)·f16(d)) and llama.cpp (and we) as f16(Σq·d): up to
                        // 2^-10 relative on each m·s term (f16 has 11 significant bits).
                        let s_tol = if kind == BlockKind::Q4_1 {
                            2f64.powi(-10)
                        } else {
                            0.0
                        };
                        let tol = (1e-5 + s_tol) * mag + 1e-6;
                        assert!(
                            ((got - c) as f64).abs() <= tol,
                            "{kind:?} {isa} m{m} n{n} k{k}: {got} vs candle {c}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_blocks_are_errors() {
        assert!(PackedBlocks::from_ggml(BlockKind::Q8_0, &[0; 34], 1, 48).is_err());
        assert!(PackedBlocks::from_ggml(BlockKind::Q4_0, &[0; 17], 1, 32).is_err());
        assert!(PackedBlocks::from_ggml(BlockKind::Q4_1, &[0; 20], 1, 32).is_ok());
    }
}
