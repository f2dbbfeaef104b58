//! The AVX2 path of the panel GEMM (no VNNI): the same layout, the same exact integer block
//! sums and the same float operations per block as the AVX-512 path, so both give the same
//! bits. Integer products use `vpmaddubsw` (u8 × i8 pairs summed to i16) then `vpmaddwd`
//! by ones (i16 pairs to i32), llama.cpp's AVX2 way. A 256-bit half of a 64-byte group
//! holds 8 channels × 4 codes, so each i32 lane is one channel's 4-product sum, as in the
//! VNNI kernel. `vpmaddubsw` saturates its i16 pair sums, so:
//! - nibble codes (0..15) multiply the activation codes (|x| ≤ 127) directly: a pair is at
//!   most 2·15·127 = 3810, and a block's 8 pairs per lane (≤ 30,480) are summed in i16
//!   before one `vpmaddwd`;
//! - byte codes (Q8_0-like, and code-book values looked up with `vpshufb`) are made signed
//!   (`u ⊕ 0x80 = u − 128`) and multiplied with llama.cpp's sign trick `|w| · sign(x, w)`
//!   (|w| ≤ 128, pairs ≤ 2·128·127 = 32,512), one `vpmaddwd` each. The `−128` moved out of
//!   the codes is moved into each block's start value by the caller ([`byte_start_shift`]):
//!   `Σ (u − z)·x = Σ (u − 128)·x + (128 − z)·Σx`.
//!
//! Tiles: decode (one row) takes both halves of a panel at once; several rows take one
//! half (8 channels) × up to 4 rows, which fits AVX2's 16 registers.

use super::{ActBlocks, BlockKind, PanelBlocks, MC, PANEL, QK};
use std::arch::x86_64::*;

/// Whether the AVX2 kernel runs `w`'s codes as signed bytes (module doc): its block start
/// values must then include `+128·Σx`.
pub(super) fn byte_start_shift(w: &PanelBlocks) -> bool {
    w.kind == BlockKind::Q8_0 || w.lut.is_some()
}

/// Activation rows per tile (several-row tiles; decode takes one).
const R: usize = 4;

/// # Safety
/// As `run_panels`; the CPU has AVX2 + FMA; `starts` were computed for this path
/// ([`byte_start_shift`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panels_avx2(
    w: &PanelBlocks,
    a: &ActBlocks,
    starts: &[i32],
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    macro_rules! tile {
        ($r:literal, $h:literal, $r0:expr, $p:expr, $h0:expr) => {
            // SAFETY: r0 + R <= m, p < p1 <= panels, h0 + H <= 2 (loop bounds below);
            // caller's contract for `out`.
            match (w.kind, w.lut.is_some(), !w.zeros.is_empty()) {
                (BlockKind::Q8_0, _, false) => unsafe {
                    tile::<$r, $h, 0, false>(w, a, starts, $r0, $p, $h0, out)
                },
                (BlockKind::Q8_0, _, true) => unsafe {
                    tile::<$r, $h, 0, true>(w, a, starts, $r0, $p, $h0, out)
                },
                (BlockKind::Q4_0, true, _) => unsafe {
                    tile::<$r, $h, 3, false>(w, a, starts, $r0, $p, $h0, out)
                },
                (BlockKind::Q4_0, false, false) => unsafe {
                    tile::<$r, $h, 1, false>(w, a, starts, $r0, $p, $h0, out)
                },
                (BlockKind::Q4_0, false, true) => unsafe {
                    tile::<$r, $h, 1, true>(w, a, starts, $r0, $p, $h0, out)
                },
                (BlockKind::Q4_1, _, _) => unsafe {
                    tile::<$r, $h, 2, false>(w, a, starts, $r0, $p, $h0, out)
                },
            }
        };
    }
    let m = a.m;
    if m == 1 {
        // Decode: one panel at a time, both halves, the weight read in ascending order.
        for p in p0..p1 {
            tile!(1, 2, 0, p, 0);
        }
        return;
    }
    for m0 in (0..m).step_by(MC) {
        let m1 = (m0 + MC).min(m);
        for p in p0..p1 {
            for h in 0..2 {
                let mut r0 = m0;
                while r0 < m1 {
                    let nr = R.min(m1 - r0);
                    match nr {
                        4 => tile!(4, 1, r0, p, h),
                        3 => tile!(3, 1, r0, p, h),
                        2 => tile!(2, 1, r0, p, h),
                        _ => tile!(1, 1, r0, p, h),
                    }
                    r0 += nr;
                }
            }
        }
    }
}

/// One tile: rows `r0..r0 + RR` × channels `16·p + 8·h0 .. + 8·H`. `KIND`: 0 = bytes
/// (Q8_0), 1 = nibbles (Q4_0), 2 = nibbles with minima (Q4_1), 3 = nibbles looked up in
/// the code book. `ZP`: per-block zero points (`starts` then holds `−Σq`).
///
/// # Safety
/// AVX2 + FMA; `r0 + RR <= a.m`, `p < w.panels()`, `h0 + H <= 2`; `out` holds `a.m × w.n`
/// f32 whose columns of panel `p` no other thread touches.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const RR: usize, const H: usize, const KIND: u8, const ZP: bool>(
    w: &PanelBlocks,
    a: &ActBlocks,
    starts: &[i32],
    r0: usize,
    p: usize,
    h0: usize,
    out: *mut f32,
) {
    let (k, kb, n) = (w.k, w.k / QK, w.n);
    let bb = PanelBlocks::block_bytes(w.kind);
    assert!(r0 + RR <= a.m && p < w.panels() && h0 + H <= 2);
    assert!(w.codes.len() >= (p + 1) * kb * bb && w.d.len() >= (p + 1) * kb * PANEL);
    assert!(KIND != 2 || w.m.len() >= (p + 1) * kb * PANEL);
    assert!(!ZP || w.zeros.len() >= (p + 1) * kb * PANEL);
    assert!(KIND != 3 || w.lut.is_some());
    assert!(a.q.len() >= (r0 + RR) * k && starts.len() >= (r0 + RR) * kb);
    assert!(a.d.len() >= (r0 + RR) * kb && a.s.len() >= (r0 + RR) * kb);
    // The code book as signed values (`t8 = lut − 128`), for `vpshufb`.
    let table = w.lut.unwrap_or([0; 16]).map(|v| v ^ 0x80);
    // SAFETY: `table` is 16 bytes.
    let lut = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(table.as_ptr() as *const _) });
    let wc = w.codes[p * kb * bb..].as_ptr();
    let wd = w.d[p * kb * PANEL..].as_ptr();
    let wm = if KIND == 2 {
        w.m[p * kb * PANEL..].as_ptr()
    } else {
        std::ptr::null()
    };
    let zc = if ZP {
        w.zeros[p * kb * PANEL..].as_ptr()
    } else {
        std::ptr::null()
    };
    let xq: [*const u8; RR] = std::array::from_fn(|r| a.q[(r0 + r) * k..].as_ptr() as *const u8);
    let xd: [*const f32; RR] = std::array::from_fn(|r| a.d[(r0 + r) * kb..].as_ptr());
    let xs: [*const f32; RR] = std::array::from_fn(|r| a.s[(r0 + r) * kb..].as_ptr());
    let st: [*const i32; RR] = std::array::from_fn(|r| starts[(r0 + r) * kb..].as_ptr());
    let mask = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let shift = _mm256_set1_epi32(if KIND == 0 { 128 } else { 0 });
    let mut acc = [[_mm256_setzero_ps(); H]; RR];
    // Four activation codes of row r at element e as one broadcast i32.
    // SAFETY (at each use): e + 4 <= (b + 1)·32 <= k inside row r0 + r (asserted).
    let x4 = |r: usize, e: usize| unsafe {
        _mm256_set1_epi32((xq[r].add(e) as *const i32).read_unaligned())
    };
    // Code bytes of group-offset `off` in block b, half h0 + h (32 bytes).
    // SAFETY (at each use): off + 64 <= bb inside block b < kb of panel p (asserted).
    let load = |b: usize, off: usize, h: usize| unsafe {
        _mm256_loadu_si256(wc.add(b * bb + off + (h0 + h) * 32) as *const _)
    };
    // Σ |w|·sign(x, w) over 4-code groups, to i32 lanes (w signed bytes).
    let signed_dot = |wv: __m256i, x: __m256i| {
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv));
        _mm256_madd_epi16(p16, ones)
    };
    for b in 0..kb {
        // Block start values: −offset·Σx (+128·Σx for bytes, folded in by the caller), or
        // per channel (z − 128 for bytes)·(−Σx).
        let mut s = [[_mm256_setzero_si256(); H]; RR];
        for r in 0..RR {
            // SAFETY: b < kb inside row r0 + r of `starts` (asserted).
            let v = _mm256_set1_epi32(unsafe { *st[r].add(b) });
            for h in 0..H {
                s[r][h] = if ZP {
                    // SAFETY: 8 zero points of this block's half h0 + h (asserted length).
                    let z = _mm256_cvtepu8_epi32(unsafe {
                        _mm_loadl_epi64(zc.add(b * PANEL + (h0 + h) * 8) as *const _)
                    });
                    _mm256_mullo_epi32(_mm256_sub_epi32(z, shift), v)
                } else {
                    v
                };
            }
        }
        if KIND == 0 {
            for j in 0..8 {
                let wv: [__m256i; H] =
                    std::array::from_fn(|h| _mm256_xor_si256(load(b, j * 64, h), flip));
                for r in 0..RR {
                    let x = x4(r, b * QK + 4 * j);
                    for h in 0..H {
                        s[r][h] = _mm256_add_epi32(s[r][h], signed_dot(wv[h], x));
                    }
                }
            }
        } else if KIND == 3 {
            for j in 0..4 {
                let raw: [__m256i; H] = std::array::from_fn(|h| load(b, j * 64, h));
                let lo: [__m256i; H] = std::array::from_fn(|h| {
                    _mm256_shuffle_epi8(lut, _mm256_and_si256(raw[h], mask))
                });
                let hi: [__m256i; H] = std::array::from_fn(|h| {
                    _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16::<4>(raw[h]), mask))
                });
                for r in 0..RR {
                    let (xl, xh) = (x4(r, b * QK + 4 * j), x4(r, b * QK + 16 + 4 * j));
                    for h in 0..H {
                        let d = _mm256_add_epi32(signed_dot(lo[h], xl), signed_dot(hi[h], xh));
                        s[r][h] = _mm256_add_epi32(s[r][h], d);
                    }
                }
            }
        } else {
            // Nibbles: i16 pair sums of the whole block (≤ 30,480), then one vpmaddwd.
            let mut p16 = [[_mm256_setzero_si256(); H]; RR];
            for j in 0..4 {
                let raw: [__m256i; H] = std::array::from_fn(|h| load(b, j * 64, h));
                let lo: [__m256i; H] = std::array::from_fn(|h| _mm256_and_si256(raw[h], mask));
                let hi: [__m256i; H] =
                    std::array::from_fn(|h| _mm256_and_si256(_mm256_srli_epi16::<4>(raw[h]), mask));
                for r in 0..RR {
                    let (xl, xh) = (x4(r, b * QK + 4 * j), x4(r, b * QK + 16 + 4 * j));
                    for h in 0..H {
                        let d = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo[h], xl),
                            _mm256_maddubs_epi16(hi[h], xh),
                        );
                        p16[r][h] = _mm256_add_epi16(p16[r][h], d);
                    }
                }
            }
            for r in 0..RR {
                for h in 0..H {
                    s[r][h] = _mm256_add_epi32(s[r][h], _mm256_madd_epi16(p16[r][h], ones));
                }
            }
        }
        // SAFETY: b·16 + 16 <= kb·16 inside panel p's scales (asserted).
        let dw: [__m256; H] =
            std::array::from_fn(|h| unsafe { _mm256_loadu_ps(wd.add(b * PANEL + (h0 + h) * 8)) });
        for r in 0..RR {
            // SAFETY: b < kb inside row r0 + r (asserted).
            let dx = _mm256_set1_ps(unsafe { *xd[r].add(b) });
            for h in 0..H {
                let scale = _mm256_mul_ps(dw[h], dx);
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][h]), scale, acc[r][h]);
            }
        }
        if KIND == 2 {
            // SAFETY: as for the scales.
            let mw: [__m256; H] = std::array::from_fn(|h| unsafe {
                _mm256_loadu_ps(wm.add(b * PANEL + (h0 + h) * 8))
            });
            for r in 0..RR {
                // SAFETY: b < kb inside row r0 + r (asserted).
                let sx = _mm256_set1_ps(unsafe { *xs[r].add(b) });
                for h in 0..H {
                    acc[r][h] = _mm256_fmadd_ps(mw[h], sx, acc[r][h]);
                }
            }
        }
    }
    for r in 0..RR {
        for h in 0..H {
            let c0 = p * PANEL + (h0 + h) * 8;
            if c0 >= n {
                continue;
            }
            let cnt = 8.min(n - c0);
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][h]) };
            for (c, &v) in lanes.iter().enumerate().take(cnt) {
                // SAFETY: row r0 + r < m, column c0 + c < n; the caller's contract gives
                // this task the columns of panel p.
                unsafe { *out.add((r0 + r) * n + c0 + c) = v };
            }
        }
    }
}
