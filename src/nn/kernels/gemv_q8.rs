//! Decode-step GEMV for 4-bit weight-only layouts ([`LowBit`] nibbles: int-N codes with a
//! scale and zero point per group, NF4/FP4 code books) against activations quantized to
//! 8 bits per 32 values, as llama.cpp multiplies its Q4 types with `q8_0` activation blocks.
//!
//! This is an opt-in approximation (`--activations q8`, [`DecodeActivations::Q8`]); on
//! AVX-512 VNNI and AVX2 the panel kernels (`ggml_blocks::panels`) take its place, and this
//! GEMV serves the portable path:
//! the f32-activation GEMV (`LowBit::gemv`) multiplies exactly the dequantized weights with
//! the activations as they are, and is what perplexity, KL and every prefill use. Here one
//! activation row is first quantized per chunk `c` of 32 columns: `d_c = max|x| / 127`,
//! `q = round(x / d_c)` (llama.cpp's `quantize_row_q8_0`), so `|x − d_c·q| ≤ d_c / 2`. Then
//! per chunk an exact integer dot product of the 4-bit codes with `q` (VNNI `vpdpbusd` on
//! AVX-512, `maddubs` on AVX2), scaled once: for int-N weights `(n − z')·s`,
//!
//! `y = Σ_c s_g(c)·d_c·(Σ_j n_j·q_j) − Σ_g s_g·z'_g·A_g`,  `A_g = Σ_{c∈g} d_c·Σ_j q_j`,
//!
//! where the zero-point term needs only the activation's per-chunk sums. A code book
//! (NF4/FP4) is first rounded to signed 8-bit values `t8 = round(127·t / max|t|)` (a
//! relative change of at most 1/254 of `max|t|` per weight, the same size as the activation
//! rounding), multiplied as integers, and the row scaled by `max|t| / 127`. On AVX-512 the
//! code-book values are offset to unsigned (`t8 + 128`, which `vpdpbusd` needs) and the
//! offset is removed as a zero point `z' = 128`.
//!
//! Layout: the quantized row ([`Q8Row`]) is stored per block of 4 chunks as 64 bytes of the
//! chunks' columns 0–15 then 64 bytes of their columns 16–31, the order in which one
//! 64-byte load of 4 chunks of nibbles gives its low (`& 15`) and high (`>> 4`) nibbles, so
//! no shuffle is needed in the loop: lane `4k..4k+3` of the i32 sum is chunk `k`'s.

use super::lowbit::{Codes, LowBit, CHUNK};
use super::Isa;

/// Chunks per block (one 512-bit register holds 4 chunks of nibbles).
const BC: usize = 4;
/// Bytes of a quantized block: 4 chunks × 32 values.
const BLOCK_BYTES: usize = BC * CHUNK;

/// The process-wide activation switch (`kernels::prefill`), under its old decode-only name.
pub use super::prefill::ActivationMode as DecodeActivations;

/// Sets the process-wide mode (alias of `prefill::set_activations`).
pub fn set_decode_activations(a: DecodeActivations) {
    super::prefill::set_activations(a);
}

/// The process-wide mode (alias of `prefill::activations`).
pub fn decode_activations() -> DecodeActivations {
    super::prefill::activations()
}

/// Whether [`gemv`] runs this layout (nibble ints and whole-chunk code books; rows whose
/// chunks straddle two NF4 blocks and byte codes keep the f32 path).
pub fn supports(lb: &LowBit) -> bool {
    matches!(lb.kind, Codes::Nibble | Codes::Table)
}

/// One activation row quantized per 32 values, in the block layout of the module docs.
#[derive(Debug, Clone)]
pub struct Q8Row {
    /// `[blocks, 2, 64]`: per block the chunks' columns 0–15, then their columns 16–31.
    q: Vec<i8>,
    /// Scale per chunk (zero past the row), padded to whole blocks.
    d: Vec<f32>,
    /// `Σ q` per chunk.
    qsum: Vec<i32>,
    nch: usize,
}

impl Q8Row {
    /// Quantizes `x`: per chunk `d = max|x| / 127`, `q = round(x · (1/d))` (0 where `d = 0`).
    pub fn quantize(x: &[f32]) -> Q8Row {
        let nch = x.len().div_ceil(CHUNK);
        let nblk = nch.div_ceil(BC);
        let mut q = vec![0i8; nblk * BLOCK_BYTES];
        let mut d = vec![0f32; nblk * BC];
        let mut qsum = vec![0i32; nblk * BC];
        for (c, xs) in x.chunks(CHUNK).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let dc = amax / 127.0;
            let id = if dc > 0.0 { 1.0 / dc } else { 0.0 };
            let (b, k) = (c / BC, c % BC);
            let mut s = 0i32;
            for (j, &v) in xs.iter().enumerate() {
                // |v·id| ≤ 127 up to rounding; `as` saturates (and maps NaN to 0).
                let qv = (v * id).round() as i8;
                q[b * BLOCK_BYTES + (j / 16) * 64 + k * 16 + j % 16] = qv;
                s += qv as i32;
            }
            d[c] = dc;
            qsum[c] = s;
        }
        Q8Row { q, d, qsum, nch }
    }

    /// Chunk `c`'s value `j` (test and portable-path accessor).
    fn at(&self, c: usize, j: usize) -> i8 {
        self.q[(c / BC) * BLOCK_BYTES + (j / 16) * 64 + (c % BC) * 16 + j % 16]
    }
}

/// Per-call tables shared by all rows: per block the chunk scales spread over the lanes
/// (each chunk's `d` on its 4 lanes) and which group each lane's chunk belongs to.
struct Prep {
    /// `[blocks, 16]`: lane `4k + i` holds `d` of the block's chunk `k`.
    dvec: Vec<f32>,
    /// `[blocks, 16]`: lane `4k + i` holds `group(chunk k) − group(first chunk)`.
    idx: Vec<i32>,
    /// Per block: first group and how many groups its chunks touch (1–4).
    groups: Vec<(usize, usize)>,
    /// Per chunk: its group.
    gof: Vec<usize>,
    /// `A_g = Σ_{c∈g} d_c · Σq_c` per group.
    a: Vec<f32>,
    /// Signed 8-bit code book and the factor that undoes its scaling (1 for int codes).
    t8: [i8; 16],
    mult: f32,
}

impl Prep {
    fn new(lb: &LowBit, a: &Q8Row) -> Prep {
        let nblk = a.nch.div_ceil(BC);
        let mut dvec = vec![0f32; nblk * 16];
        let mut idx = vec![0i32; nblk * 16];
        let mut groups = Vec::with_capacity(nblk);
        let gof: Vec<usize> = (0..lb.nch).map(|c| c / lb.cpg).collect();
        for b in 0..nblk {
            let g0 = gof[b * BC];
            let last = ((b + 1) * BC).min(lb.nch) - 1;
            groups.push((g0, gof[last] - g0 + 1));
            for k in 0..BC {
                let c = b * BC + k;
                for i in 0..4 {
                    dvec[b * 16 + 4 * k + i] = a.d[c];
                    idx[b * 16 + 4 * k + i] = if c < lb.nch { (gof[c] - g0) as i32 } else { 0 };
                }
            }
        }
        let mut ag = vec![0f32; lb.gpr];
        for c in 0..lb.nch {
            ag[gof[c]] += a.d[c] * a.qsum[c] as f32;
        }
        let (t8, mult) = if lb.kind == Codes::Table {
            code_book_i8(&lb.table)
        } else {
            ([0; 16], 1.0)
        };
        Prep {
            dvec,
            idx,
            groups,
            gof,
            a: ag,
            t8,
            mult,
        }
    }
}

/// A code book as signed 8-bit values `round(127·t / max|t|)` and the factor `max|t| / 127`.
pub fn code_book_i8(table: &[f32; 16]) -> ([i8; 16], f32) {
    let tmax = table.iter().fold(0f32, |a, v| a.max(v.abs()));
    if !(tmax > 0.0 && tmax.is_finite()) {
        return ([0; 16], 0.0);
    }
    let t8 = std::array::from_fn(|n| (table[n] / tmax * 127.0).round() as i8);
    (t8, tmax / 127.0)
}

/// `y = x · Ŵᵀ` for one activation row with `x` quantized to [`Q8Row`] on path `isa`
/// (capped at the detected one); rows split over threads when the matrix is large.
/// Panics unless [`supports`]`(lb)` and the sizes agree (callers check).
pub fn gemv(lb: &LowBit, isa: Isa, x: &[f32], y: &mut [f32]) {
    assert!(supports(lb), "gemv_q8: {:?} codes", lb.kind);
    assert!(x.len() == lb.cols && y.len() == lb.rows, "gemv_q8: sizes");
    let isa = isa.min(Isa::detected());
    let a = Q8Row::quantize(x);
    let prep = Prep::new(lb, &a);
    super::for_row_blocks(y, lb.rows * lb.cols, 2, |o0, ys| {
        rows(lb, isa, &a, &prep, o0, ys);
    });
}

/// Rows `o0 .. o0 + ys.len()`.
fn rows(lb: &LowBit, isa: Isa, a: &Q8Row, p: &Prep, o0: usize, ys: &mut [f32]) {
    assert!(o0 + ys.len() <= lb.rows && a.nch == lb.nch);
    assert!(lb.codes.len() >= lb.rows * lb.nch * 16 && lb.scale.len() >= lb.rows * lb.gpr);
    assert!(lb.kind == Codes::Table || lb.zero.len() >= lb.rows * lb.gpr);
    let mut o = 0;
    while o < ys.len() {
        let r = (ys.len() - o).min(4);
        let out = &mut ys[o..o + r];
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                // SAFETY: `gemv` caps `isa` at the detected path, so the CPU has AVX-512
                // F/BW/VL/VNNI; sizes asserted above.
                unsafe { x86::rows_avx512(lb, a, p, o0 + o, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: the binary requires AVX2+FMA (x86-64-v3); sizes asserted above.
                unsafe { x86::rows_avx2(lb, a, p, o0 + o, out) }
            }
            _ => rows_portable(lb, a, p, o0 + o, out),
        }
        o += r;
    }
}

/// `Σ_g s_g · z'_g · A_g` for row `o` (`z' = zoff` for code books), in eight lanes.
fn zero_term(lb: &LowBit, p: &Prep, o: usize, zoff: f32) -> f32 {
    let s = &lb.scale[o * lb.gpr..(o + 1) * lb.gpr];
    let mut acc = [0f32; 8];
    if lb.kind == Codes::Table {
        if zoff == 0.0 {
            return 0.0;
        }
        for (i, (&sv, &av)) in s.iter().zip(&p.a).enumerate() {
            acc[i % 8] += sv * av;
        }
        return acc.iter().sum::<f32>() * zoff;
    }
    let z = &lb.zero[o * lb.gpr..(o + 1) * lb.gpr];
    for (i, ((&sv, &zv), &av)) in s.iter().zip(z).zip(&p.a).enumerate() {
        acc[i % 8] += sv * zv * av;
    }
    acc.iter().sum()
}

/// Portable path: per chunk an i32 dot product, scaled by `s·d`.
fn rows_portable(lb: &LowBit, a: &Q8Row, p: &Prep, o0: usize, ys: &mut [f32]) {
    let table = lb.kind == Codes::Table;
    for (r, y) in ys.iter_mut().enumerate() {
        let o = o0 + r;
        let mut acc = 0f32;
        for c in 0..lb.nch {
            let base = (o * lb.nch + c) * 16;
            let bytes = &lb.codes[base..base + 16];
            let mut dot = 0i32;
            for (j, &b) in bytes.iter().enumerate() {
                let (lo, hi) = ((b & 15) as usize, (b >> 4) as usize);
                let (wl, wh) = if table {
                    (p.t8[lo] as i32, p.t8[hi] as i32)
                } else {
                    (lo as i32, hi as i32)
                };
                dot += wl * a.at(c, j) as i32 + wh * a.at(c, j + 16) as i32;
            }
            acc += dot as f32 * (lb.scale[o * lb.gpr + p.gof[c]] * a.d[c]);
        }
        *y = p.mult * (acc - zero_term(lb, p, o, 0.0));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX-512 VNNI rows `o0 .. o0 + ys.len()` (at most 4).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL/VNNI; sizes as asserted by `rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows_avx512(lb: &LowBit, a: &Q8Row, p: &Prep, o0: usize, ys: &mut [f32]) {
        let table = lb.kind == Codes::Table;
        match (ys.len(), table) {
            (4, false) => r512::<4, false>(lb, a, p, o0, ys),
            (4, true) => r512::<4, true>(lb, a, p, o0, ys),
            (_, t) => {
                for (r, y) in ys.iter_mut().enumerate() {
                    let y = std::slice::from_mut(y);
                    if t {
                        r512::<1, true>(lb, a, p, o0 + r, y)
                    } else {
                        r512::<1, false>(lb, a, p, o0 + r, y)
                    }
                }
            }
        }
    }

    /// `R` rows; `T`: code book (looked up with `vpshufb` as `t8 + 128`).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn r512<const R: usize, const T: bool>(
        lb: &LowBit,
        a: &Q8Row,
        p: &Prep,
        o0: usize,
        ys: &mut [f32],
    ) {
        assert!(o0 + R <= lb.rows && ys.len() == R);
        let row_bytes = lb.nch * 16;
        let nblk = lb.nch.div_ceil(BC);
        assert!(a.q.len() >= nblk * BLOCK_BYTES && p.dvec.len() >= nblk * 16);
        let m4 = _mm512_set1_epi8(0x0f);
        let mut tb = [0u8; 16];
        for (u, &t) in tb.iter_mut().zip(&p.t8) {
            *u = (t as i32 + 128) as u8;
        }
        // SAFETY (whole body): block b reads at most 64 code bytes of rows o0..o0+R from
        // `b·64` (masked to the row's chunks, so never past the row), groups
        // `g0 .. g0 + ng` of those rows' scales (masked, g0 + ng ≤ gpr), and 128 bytes of
        // `a.q` / 16 lanes of `dvec`/`idx` at block b (lengths asserted).
        let lut = _mm512_broadcast_i32x4(_mm_loadu_si128(tb.as_ptr() as *const __m128i));
        let codes = lb.codes.as_ptr().add(o0 * row_bytes);
        let scale = lb.scale.as_ptr().add(o0 * lb.gpr);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nblk {
            let nc = (lb.nch - b * BC).min(BC);
            let kmask: u64 = if nc == BC {
                !0
            } else {
                (1u64 << (16 * nc)) - 1
            };
            let xlo = _mm512_loadu_si512(a.q.as_ptr().add(b * BLOCK_BYTES) as *const __m512i);
            let xhi = _mm512_loadu_si512(a.q.as_ptr().add(b * BLOCK_BYTES + 64) as *const __m512i);
            let dv = _mm512_loadu_ps(p.dvec.as_ptr().add(b * 16));
            let idx = _mm512_loadu_si512(p.idx.as_ptr().add(b * 16) as *const __m512i);
            let (g0, ng) = *p.groups.get_unchecked(b);
            let gmask: u16 = (1u16 << ng) - 1;
            for r in 0..R {
                let w =
                    _mm512_maskz_loadu_epi8(kmask, codes.add(r * row_bytes + b * 64) as *const i8);
                let mut lo = _mm512_and_si512(w, m4);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), m4);
                if T {
                    lo = _mm512_shuffle_epi8(lut, lo);
                    hi = _mm512_shuffle_epi8(lut, hi);
                }
                let dot = _mm512_dpbusd_epi32(
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo),
                    hi,
                    xhi,
                );
                let s = _mm512_maskz_loadu_ps(gmask, scale.add(r * lb.gpr + g0));
                let sd = _mm512_mul_ps(_mm512_permutexvar_ps(idx, s), dv);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sd, acc[r]);
            }
        }
        let zoff = if T { 128.0 } else { 0.0 };
        for r in 0..R {
            ys[r] = p.mult * (_mm512_reduce_add_ps(acc[r]) - zero_term(lb, p, o0 + r, zoff));
        }
    }

    /// AVX2 rows `o0 .. o0 + ys.len()`: two chunks per 256-bit step, `maddubs` (codes
    /// ≤ 15 as u8 times `q`: pair sums ≤ 2·15·127, no saturation; code books by the sign
    /// trick `|t8| · sign(q, t8)`: pair sums ≤ 2·127·127 < 2^15).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; sizes as asserted by `rows`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_avx2(lb: &LowBit, a: &Q8Row, p: &Prep, o0: usize, ys: &mut [f32]) {
        let table = lb.kind == Codes::Table;
        let row_bytes = lb.nch * 16;
        let nblk = lb.nch.div_ceil(BC);
        assert!(o0 + ys.len() <= lb.rows);
        assert!(a.q.len() >= nblk * BLOCK_BYTES && p.dvec.len() >= nblk * 16);
        let m4 = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        // SAFETY (whole body): pair (c, c+1) reads 16 code bytes per chunk that exists
        // (c + 1 < nch for the 32-byte load), 32 bytes of `a.q` at offsets inside block
        // `c / 4`, 8 lanes of `dvec` inside it; `p.t8` is 16 bytes.
        let lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.t8.as_ptr() as *const __m128i));
        for (r, y) in ys.iter_mut().enumerate() {
            let o = o0 + r;
            let row = lb.codes.as_ptr().add(o * row_bytes);
            let sc = &lb.scale[o * lb.gpr..(o + 1) * lb.gpr];
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < lb.nch {
                let w = if c + 1 < lb.nch {
                    _mm256_loadu_si256(row.add(c * 16) as *const __m256i)
                } else {
                    _mm256_zextsi128_si256(_mm_loadu_si128(row.add(c * 16) as *const __m128i))
                };
                let lo = _mm256_and_si256(w, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4);
                let at = (c / BC) * BLOCK_BYTES + (c % BC) * 16;
                let xlo = _mm256_loadu_si256(a.q.as_ptr().add(at) as *const __m256i);
                let xhi = _mm256_loadu_si256(a.q.as_ptr().add(at + 64) as *const __m256i);
                let dot = if table {
                    let tl = _mm256_shuffle_epi8(lut, lo);
                    let th = _mm256_shuffle_epi8(lut, hi);
                    let pl = _mm256_maddubs_epi16(_mm256_abs_epi8(tl), _mm256_sign_epi8(xlo, tl));
                    let ph = _mm256_maddubs_epi16(_mm256_abs_epi8(th), _mm256_sign_epi8(xhi, th));
                    _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, ones))
                } else {
                    let s = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, xlo),
                        _mm256_maddubs_epi16(hi, xhi),
                    );
                    _mm256_madd_epi16(s, ones)
                };
                let s0 = *sc.get_unchecked(p.gof[c]);
                let s1 = if c + 1 < lb.nch {
                    *sc.get_unchecked(p.gof[c + 1])
                } else {
                    0.0
                };
                let sv = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
                let dv = _mm256_loadu_ps(p.dvec.as_ptr().add((c / BC) * 16 + (c % BC) * 4));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sv, dv), acc);
                c += 2;
            }
            let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
            *y = p.mult * (_mm_cvtss_f32(h) - zero_term(lb, p, o, 0.0));
        }
    }
}

#[cfg(test)]
mod tests;
