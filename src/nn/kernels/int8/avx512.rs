//! The AVX-512 VNNI micro-kernel: one `vpdpbusd` multiplies 4 u8 activations (broadcast)
//! by 16 channels × 4 i8 weights (one packed 64-byte group) and adds the four products of
//! each channel into its i32 lane, exactly (no intermediate saturation). A tile keeps
//! R rows × P panels of accumulators in registers (up to 4 × 4 = 16 of the 32 zmm).
//! One panel (the decode walk, see `gemm`) keeps four accumulators per row over successive
//! k groups instead, so four `vpdpbusd` chains are in flight as with four panels; their
//! i32 sums are added at the end (integer addition: the same sums in any order).

use super::gemm::{Acc, Tile};
use super::pack::PANEL;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must have AVX-512 F/BW/VL and VNNI, and `t.check(nr, np)` must hold.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn block(t: &Tile, nr: usize, np: usize, acc: &mut Acc) {
    t.check(nr, np);
    macro_rules! dispatch {
        ($($r:literal $p:literal),*) => {
            match (nr, np) {
                // SAFETY: bounds checked above for exactly this (nr, np); features per caller.
                $(($r, $p) => unsafe { micro::<$r, $p>(t, acc) },)*
                _ => unreachable!("tile shape checked"),
            }
        };
    }
    if np == 1 {
        // SAFETY: bounds checked above for nr rows and one panel; features per caller.
        return match nr {
            1 => unsafe { one_panel::<1>(t, acc) },
            2 => unsafe { one_panel::<2>(t, acc) },
            3 => unsafe { one_panel::<3>(t, acc) },
            _ => unsafe { one_panel::<4>(t, acc) },
        };
    }
    dispatch!(1 2, 1 3, 1 4, 2 2, 2 3, 2 4, 3 2, 3 3, 3 4, 4 2, 4 3, 4 4)
}

/// k groups per step of [`one_panel`] (independent accumulators per row).
const U: usize = 4;

/// R rows × one panel, U accumulator chains per row.
///
/// # Safety
/// As [`block`], with `nr = R`, `np = 1`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn one_panel<const R: usize>(t: &Tile, acc: &mut Acc) {
    let (a, w) = (t.a.as_ptr(), t.w.as_ptr());
    let mut s = [[_mm512_setzero_si512(); R]; U];
    // Four activation bytes of row r at group g as one broadcast i32.
    // SAFETY (at each use): g < groups, so (R − 1)·stride + 4·g + 4 <= a.len() (Tile::check).
    let x4 = |r: usize, g: usize| unsafe {
        _mm512_set1_epi32((a.add(r * t.stride + g * 4) as *const i32).read_unaligned())
    };
    let mut g = 0;
    while g + U <= t.groups {
        for u in 0..U {
            // SAFETY: group g + u < groups: its 64 bytes lie inside the panel (Tile::check).
            let wv = unsafe { _mm512_loadu_si512(w.add((g + u) * 64) as *const _) };
            for r in 0..R {
                s[u][r] = _mm512_dpbusd_epi32(s[u][r], x4(r, g + u), wv);
            }
        }
        g += U;
    }
    while g < t.groups {
        // SAFETY: as above.
        let wv = unsafe { _mm512_loadu_si512(w.add(g * 64) as *const _) };
        for r in 0..R {
            s[0][r] = _mm512_dpbusd_epi32(s[0][r], x4(r, g), wv);
        }
        g += 1;
    }
    for r in 0..R {
        let v = _mm512_add_epi32(
            _mm512_add_epi32(s[0][r], s[1][r]),
            _mm512_add_epi32(s[2][r], s[3][r]),
        );
        // SAFETY: acc rows hold NP · 16 >= 16 lanes.
        unsafe { _mm512_storeu_si512(acc[r].as_mut_ptr() as *mut _, v) };
    }
}

/// # Safety
/// As [`block`], with `nr = R`, `np = P`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn micro<const R: usize, const P: usize>(t: &Tile, acc: &mut Acc) {
    let (a, w) = (t.a.as_ptr(), t.w.as_ptr());
    let mut s = [[_mm512_setzero_si512(); P]; R];
    for g in 0..t.groups {
        let mut wv = [_mm512_setzero_si512(); P];
        for (p, v) in wv.iter_mut().enumerate() {
            // SAFETY: (P − 1) · panel_stride + groups · 64 <= w.len() (Tile::check).
            *v = unsafe { _mm512_loadu_si512(w.add(p * t.panel_stride + g * 64) as *const _) };
        }
        for (r, sr) in s.iter_mut().enumerate() {
            // SAFETY: (R − 1) · stride + groups · 4 <= a.len() (Tile::check).
            let x = unsafe { (a.add(r * t.stride + g * 4) as *const i32).read_unaligned() };
            let av = _mm512_set1_epi32(x);
            for p in 0..P {
                sr[p] = _mm512_dpbusd_epi32(sr[p], av, wv[p]);
            }
        }
    }
    for (r, sr) in s.iter().enumerate() {
        for (p, v) in sr.iter().enumerate() {
            // SAFETY: acc rows hold NP · 16 >= P · 16 lanes.
            unsafe { _mm512_storeu_si512(acc[r][p * PANEL..].as_mut_ptr() as *mut _, *v) };
        }
    }
}
