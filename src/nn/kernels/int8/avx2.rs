//! The AVX2 micro-kernel, exact: `vpmaddubsw` would saturate u8 × i8 pair sums to i16
//! (255 · 127 · 2 > 32767), so both operands are widened to i16 instead and multiplied by
//! `vpmaddwd` (pair sums of at most 2 · 255 · 128, far inside i32). Each 16-byte piece of a
//! packed group (4 channels × 4 k) widens to one register; the activation's 4 bytes are
//! widened and broadcast to match, so each i32 lane holds half of one channel's four
//! products; the halves are added once at the end.

use super::gemm::{Acc, Tile};
use super::pack::PANEL;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must have AVX2, and `t.check(nr, np)` must hold.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn block(t: &Tile, nr: usize, np: usize, acc: &mut Acc) {
    t.check(nr, np);
    if nr == 1 {
        // One row (GEMV): several panels per broadcast activation.
        let mut p = 0;
        while p < np {
            // SAFETY (all three): row 0 and panels p.. lie inside the checked tile.
            match np - p {
                1 => unsafe { micro::<1, 1>(t, 0, p, acc) },
                2 => unsafe { micro::<1, 2>(t, 0, p, acc) },
                _ => unsafe { micro::<1, 3>(t, 0, p, acc) },
            }
            p += 3;
        }
    } else {
        for p in 0..np {
            let mut r = 0;
            while r < nr {
                // SAFETY: rows r.. and panel p lie inside the checked tile.
                if nr - r >= 2 {
                    unsafe { micro::<2, 1>(t, r, p, acc) };
                } else {
                    unsafe { micro::<1, 1>(t, r, p, acc) };
                }
                r += 2;
            }
        }
    }
}

/// Rows `r0..r0 + R` × panels `p0..p0 + P`.
///
/// # Safety
/// AVX2, and those rows and panels inside a tile that passed `Tile::check`.
// Register arrays indexed by row, panel and piece read clearer than zipped iterators.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2")]
unsafe fn micro<const R: usize, const P: usize>(t: &Tile, r0: usize, p0: usize, acc: &mut Acc) {
    // SAFETY: r0 + R <= nr and p0 + P <= np, whose bounds Tile::check asserted.
    let (a, w) = unsafe {
        (
            t.a.as_ptr().add(r0 * t.stride),
            t.w.as_ptr().add(p0 * t.panel_stride),
        )
    };
    let mut s = [[[_mm256_setzero_si256(); 4]; P]; R];
    for g in 0..t.groups {
        let mut av = [_mm256_setzero_si256(); R];
        for (r, v) in av.iter_mut().enumerate() {
            // SAFETY: row r's group g (4 bytes) is inside the tile.
            let x = unsafe { (a.add(r * t.stride + g * 4) as *const i32).read_unaligned() };
            *v = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(x)));
        }
        for p in 0..P {
            for q in 0..4 {
                // SAFETY: panel p's group g spans 64 bytes inside the tile; piece q is 16 of them.
                let piece = unsafe {
                    _mm_loadu_si128(w.add(p * t.panel_stride + g * 64 + q * 16) as *const __m128i)
                };
                let wq = _mm256_cvtepi8_epi16(piece);
                for r in 0..R {
                    s[r][p][q] = _mm256_add_epi32(s[r][p][q], _mm256_madd_epi16(av[r], wq));
                }
            }
        }
    }
    let mut lanes = [0i32; 8];
    for r in 0..R {
        for p in 0..P {
            for q in 0..4 {
                // SAFETY: `lanes` holds 8 i32.
                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s[r][p][q]) };
                for c in 0..4 {
                    acc[r0 + r][(p0 + p) * PANEL + 4 * q + c] =
                        lanes[2 * c].wrapping_add(lanes[2 * c + 1]);
                }
            }
        }
    }
}
