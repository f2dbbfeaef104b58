//! The portable micro-kernel: plain Rust over the packed layout (any CPU).

use super::gemm::{Acc, Tile};
use super::pack::{KGROUP, PANEL};

/// `acc[r][p · 16 + c] = Σ_k a[r, k] · W[panel p, channel c, k]` for `r < nr`, `p < np`.
pub(super) fn block(t: &Tile, nr: usize, np: usize, acc: &mut Acc) {
    let depth = t.groups * KGROUP;
    for (r, row_acc) in acc.iter_mut().enumerate().take(nr) {
        let a = &t.a[r * t.stride..r * t.stride + depth];
        for p in 0..np {
            let w = &t.w[p * t.panel_stride..p * t.panel_stride + depth * PANEL];
            let mut s = [0i32; PANEL];
            for (ag, wg) in a.chunks_exact(KGROUP).zip(w.chunks_exact(KGROUP * PANEL)) {
                for (c, sc) in s.iter_mut().enumerate() {
                    let mut d = 0i32;
                    for q in 0..KGROUP {
                        d += ag[q] as i32 * wg[c * KGROUP + q] as i32;
                    }
                    *sc = sc.wrapping_add(d);
                }
            }
            row_acc[p * PANEL..(p + 1) * PANEL].copy_from_slice(&s);
        }
    }
}
