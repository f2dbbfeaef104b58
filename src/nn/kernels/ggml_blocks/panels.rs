//! The GEMM for GGML Q8_0/Q4_0/Q4_1 blocks in a panel layout: prefill (many rows) and
//! decode (one row, one panel at a time so the weight streams sequentially).
//!
//! The row kernels of the parent module do one `vpdpbusd` per 64 codes of one output channel
//! and then, per block and channel, a scale product, a conversion and an FMA: the float
//! work, not the integer dot product, bounds them. Here output channels are grouped in
//! panels of 16 (as the int8 kernel's [`PackedI8`](crate::nn::kernels::PackedI8)): one
//! 64-byte load holds 16 channels × 4 codes, one `vpdpbusd` with 4 broadcast activation
//! codes adds four products into each channel's i32 lane, and a block's 8 such steps end in
//! one conversion, one scale product and one FMA per 16 channels — a quarter of the row
//! kernels' float work per code, with the same exact integer block sums `I`.
//!
//! Layout ([`PanelBlocks`], built once per weight from [`PackedBlocks`]): per panel, per
//! block of 32, the codes as unsigned bytes (Q8_0: `q + 128`; Q4: the nibble `q`), then the
//! 16 channels' f32 scales (and Q4_1 minima) per block in a separate array.
//! - Q8_0: 8 groups of 64 bytes, `[j][c][t]` = element `4j + t` of channel `c`.
//! - Q4: 4 groups of 64 bytes, `[j][c][t]` low nibble = element `4j + t`, high nibble =
//!   element `16 + 4j + t`: one load, masked and shifted, feeds two `vpdpbusd`.
//!
//! The last panel is padded with zero-scale channels whose outputs are never stored.
//! The activation side is the parent's [`ActBlocks`] (llama.cpp's q8 blocks, unchanged);
//! the unsigned-code offset is cancelled per block by starting each i32 sum at `−offset·Σx`.
//!
//! Paths: AVX-512 VNNI, AVX2 (`vpmaddubsw`, module `avx2`; the same bits) and a portable
//! scalar version of the same layout (the portable path keeps the parent's row kernels:
//! see [`panel_layout`]).

use super::aligned::Aligned;
use super::{ActBlocks, BlockKind, PackedBlocks, QK};
use crate::nn::kernels::{Isa, SendPtr};

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Output channels per panel (one zmm of i32 lanes).
pub const PANEL: usize = 16;

/// Whether GGML weights are held in the panel layout on path `isa` (for every row count:
/// at m = 1 too the panel kernel does a quarter of the row kernel's float work per code,
/// and only one copy of the weight is kept). Also whether the weight-only q8-activation
/// route runs the panels (`LowBit::matmul_a8`).
///
/// AVX2 too: `examples/ggml_gemv_cpu_time` (one thread, CPU time, loaded machine) measured
/// the AVX2 panels against the AVX2 row kernels at 3.0× (Q8_0) and 3.1× (Q4_0) less time
/// per decoded token with the weights streamed from memory, and 2–3.5× at 128 rows.
pub fn panel_layout(isa: Isa) -> bool {
    isa >= Isa::Avx2
}

/// A GGML weight in the panel layout (module doc).
#[derive(Clone)]
pub struct PanelBlocks {
    pub kind: BlockKind,
    pub n: usize,
    pub k: usize,
    /// What each unsigned code exceeds its signed value by (GGML: the kind's offset).
    offset: i32,
    /// `panels × kb × block_bytes()` code bytes (64-byte aligned, as the scales and
    /// minima: the kernels' 64-byte loads never straddle cache lines).
    codes: Aligned<u8>,
    /// `panels × kb × 16` scales.
    d: Aligned<f32>,
    /// Q4_1: `panels × kb × 16` minima (empty otherwise).
    m: Aligned<f32>,
    /// Weight-only affine int-N: `panels × kb × 16` unsigned zero points `z'` per channel
    /// and block (empty otherwise: then every code's zero is the uniform `offset`). Each
    /// block's i32 sum starts at `−z'·Σq`, so `Σ (n − z')·q` stays exact in integers.
    zeros: Vec<u8>,
    /// Weight-only code books (NF4/FP4): nibble → unsigned byte `t8 + 128` looked up in
    /// the kernel (`vpshufb`) before the integer products; `None` for plain codes.
    lut: Option<[u8; 16]>,
}

impl std::fmt::Debug for PanelBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PanelBlocks({:?}, {}×{})", self.kind, self.n, self.k)
    }
}

impl PanelBlocks {
    /// Code bytes of one panel's block (16 channels × 32 codes).
    fn block_bytes(kind: BlockKind) -> usize {
        if kind.nibbles() {
            PANEL * QK / 2
        } else {
            PANEL * QK
        }
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// Repacks the row layout into panels.
    pub fn from_rows(w: &PackedBlocks) -> Self {
        let kb = w.k / QK;
        Self::build(
            w.kind,
            w.n,
            w.k,
            w.kind.offset(),
            |ch, row| w.unpack_row(ch, row),
            |ch, b| {
                let m = if w.kind == BlockKind::Q4_1 {
                    w.m[ch * kb + b]
                } else {
                    0.0
                };
                (w.d[ch * kb + b], m)
            },
        )
    }

    /// A weight given by unsigned codes with value `(code − offset)·scale` per block of
    /// 32: `row(ch, codes)` fills channel `ch`'s `k` codes in element order (each below 16
    /// for the nibble kinds), `scale(ch, b)` is block `b`'s scale. For weight-only int-N
    /// codes with one integer zero point (symmetric schemes); `k` a multiple of 32.
    pub fn from_codes(
        kind: BlockKind,
        n: usize,
        k: usize,
        offset: i32,
        row: impl Fn(usize, &mut [u8]),
        scale: impl Fn(usize, usize) -> f32,
    ) -> Self {
        assert!(
            kind != BlockKind::Q4_1,
            "no minima in a code-and-scale weight"
        );
        Self::build(kind, n, k, offset, row, |ch, b| (scale(ch, b), 0.0))
    }

    /// As [`Self::from_codes`] with a zero point per channel and block: value
    /// `(code − zero(ch, b))·scale(ch, b)` (weight-only affine int-N, `w:iN:asym`).
    pub fn from_codes_affine(
        kind: BlockKind,
        n: usize,
        k: usize,
        row: impl Fn(usize, &mut [u8]),
        scale: impl Fn(usize, usize) -> f32,
        zero: impl Fn(usize, usize) -> u8,
    ) -> Self {
        assert!(kind != BlockKind::Q4_1, "no minima in an affine weight");
        let mut w = Self::build(kind, n, k, 0, row, |ch, b| (scale(ch, b), 0.0));
        let kb = k / QK;
        w.zeros = vec![0u8; w.panels() * kb * PANEL];
        for ch in 0..n {
            for b in 0..kb {
                w.zeros[((ch / PANEL) * kb + b) * PANEL + ch % PANEL] = zero(ch, b);
            }
        }
        w
    }

    /// A code-book weight (NF4/FP4) as nibble panels: `row` gives 4-bit indices, the value
    /// of index `i` in block `b` is `(lut[i] − 128)·scale(ch, b)` (`lut` holds the code book
    /// rounded to signed 8-bit values plus 128).
    pub fn from_table_codes(
        n: usize,
        k: usize,
        lut: [u8; 16],
        row: impl Fn(usize, &mut [u8]),
        scale: impl Fn(usize, usize) -> f32,
    ) -> Self {
        let mut w = Self::build(BlockKind::Q4_0, n, k, 128, row, |ch, b| (scale(ch, b), 0.0));
        w.lut = Some(lut);
        w
    }

    /// The shared constructor: `params(ch, b)` = (scale, Q4_1 minimum).
    fn build(
        kind: BlockKind,
        n: usize,
        k: usize,
        offset: i32,
        row_of: impl Fn(usize, &mut [u8]),
        params: impl Fn(usize, usize) -> (f32, f32),
    ) -> Self {
        assert!(k.is_multiple_of(QK), "whole blocks");
        let kb = k / QK;
        let panels = n.div_ceil(PANEL);
        let bb = Self::block_bytes(kind);
        // Padding channels: zero codes with scale 0 (their outputs are never stored).
        let mut codes = Aligned::<u8>::zeroed(panels * kb * bb);
        let mut d = Aligned::<f32>::zeroed(panels * kb * PANEL);
        let mut m = if kind == BlockKind::Q4_1 {
            Aligned::<f32>::zeroed(panels * kb * PANEL)
        } else {
            Aligned::empty()
        };
        let mut row = vec![0u8; k];
        for ch in 0..n {
            let (p, c) = (ch / PANEL, ch % PANEL);
            row_of(ch, &mut row);
            for b in 0..kb {
                let at = (p * kb + b) * PANEL + c;
                (d[at], _) = params(ch, b);
                if kind == BlockKind::Q4_1 {
                    (_, m[at]) = params(ch, b);
                }
                let blk = &row[b * QK..][..QK];
                let dst = &mut codes[(p * kb + b) * bb..][..bb];
                if kind.nibbles() {
                    for j in 0..4 {
                        for t in 0..4 {
                            let (lo, hi) = (blk[4 * j + t], blk[16 + 4 * j + t]);
                            dst[j * 64 + c * 4 + t] = (lo & 0x0F) | (hi << 4);
                        }
                    }
                } else {
                    for j in 0..8 {
                        for t in 0..4 {
                            dst[j * 64 + c * 4 + t] = blk[4 * j + t];
                        }
                    }
                }
            }
        }
        PanelBlocks {
            kind,
            n,
            k,
            offset,
            codes,
            d,
            m,
            zeros: Vec::new(),
            lut: None,
        }
    }

    /// Bytes this copy holds.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.d.len() + self.m.len()) + self.zeros.len()
    }

    /// The i32 start of channel `ch`'s block `b` sum given the activation block's
    /// `start = −offset·Σq` (uniform offset) or `−Σq` (per-block zero points).
    fn start(&self, ch: usize, b: usize, start: i32) -> i32 {
        if self.zeros.is_empty() {
            start
        } else {
            let kb = self.k / QK;
            self.zeros[((ch / PANEL) * kb + b) * PANEL + ch % PANEL] as i32 * start
        }
    }

    /// Unsigned code of element `e` (of `k`) of channel `ch` (< panels·16).
    fn code(&self, ch: usize, e: usize) -> u8 {
        let kb = self.k / QK;
        let (p, c, b, i) = (ch / PANEL, ch % PANEL, e / QK, e % QK);
        let blk = &self.codes[(p * kb + b) * Self::block_bytes(self.kind)..];
        if self.kind.nibbles() {
            let (hi, i) = (i >= 16, i % 16);
            let byte = blk[(i / 4) * 64 + c * 4 + i % 4];
            let nib = if hi { byte >> 4 } else { byte & 0x0F };
            match &self.lut {
                Some(t) => t[nib as usize],
                None => nib,
            }
        } else {
            blk[(i / 4) * 64 + c * 4 + i % 4]
        }
    }
}

/// `−offset·Σ_{j<32} q[j]` per activation block (`m × kb`): each block sum's start value.
fn block_starts(off: i32, a: &ActBlocks) -> Vec<i32> {
    a.q.chunks_exact(QK)
        .map(|q| -off * q.iter().map(|&v| v as i32).sum::<i32>())
        .collect()
}

/// `out[r·n + c]` for every activation row and weight channel, on path `isa`: the same
/// products as the parent's `matmul_with`, summed per block in a different float order.
/// Panics if the operands do not fit or `isa` is not available.
pub fn matmul_with(isa: Isa, w: &PanelBlocks, a: &ActBlocks, out: &mut [f32]) {
    assert!(
        isa <= Isa::detected(),
        "kernel path {} not available",
        isa.name()
    );
    assert_eq!(a.k, w.k, "reduction width");
    assert_eq!(out.len(), a.m * w.n, "output size");
    assert!(a.q.len() == a.m * a.k && a.d.len() * QK == a.q.len() && a.s.len() == a.d.len());
    let (m, n) = (a.m, w.n);
    if m == 0 || n == 0 {
        return;
    }
    // Per-block zero points: the kernels multiply `−Σq` by each channel's `z'`. The AVX2
    // kernel runs byte codes as `u − 128`: their start moves by `+128·Σq`.
    #[cfg(target_arch = "x86_64")]
    let shift = isa == Isa::Avx2 && avx2::byte_start_shift(w);
    #[cfg(not(target_arch = "x86_64"))]
    let shift = false;
    let off = match (w.zeros.is_empty(), shift) {
        (false, _) => 1,
        (true, false) => w.offset,
        (true, true) => w.offset - 128,
    };
    let starts = block_starts(off, a);
    let panels = w.panels();
    let threads = rayon::current_num_threads();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |p0: usize, p1: usize| {
        let o = out_ptr;
        // SAFETY: each task writes only the columns of panels p0..p1 (< n) of the m rows
        // of `out` (m·n long, asserted); tasks' panel ranges are disjoint.
        unsafe { run_panels(isa, w, a, &starts, p0, p1, o.get()) }
    };
    if threads < 2 || m * n * w.k < 1 << 17 {
        run(0, panels);
        return;
    }
    // A few panel ranges per thread: each thread streams its own part of the weight.
    // Over the decode step's spinning team when there is one (`team`), rayon otherwise.
    let per = panels.div_ceil(4 * threads).max(1);
    super::super::team::for_each(panels.div_ceil(per), |t| {
        run(t * per, ((t + 1) * per).min(panels))
    });
}

/// `x [m, cols] · Wᵀ` → `[m, w.n]` with `x` quantized to llama.cpp's q8 blocks first
/// (rows zero-padded from `cols` to `w.k`): the opt-in integer activations of weight-only
/// formats (`--activations q8`, see `kernels::prefill`), for every row count.
pub fn matmul_f32(isa: Isa, w: &PanelBlocks, x: &[f32], m: usize, cols: usize) -> Vec<f32> {
    assert!(cols <= w.k && x.len() == m * cols, "activation size");
    // The q8 blocks are the same for every kind; Q4_1's (offset 0) skips the row kernels'
    // per-4 start values, which the panel kernels do not read.
    let kind = BlockKind::Q4_1;
    let a = if cols == w.k {
        ActBlocks::quantize(isa, kind, x, m, w.k)
    } else {
        let mut xp = vec![0f32; m * w.k];
        for (d, s) in xp.chunks_exact_mut(w.k).zip(x.chunks_exact(cols.max(1))) {
            d[..cols].copy_from_slice(s);
        }
        ActBlocks::quantize(isa, kind, &xp, m, w.k)
    };
    let mut out = vec![0f32; m * w.n];
    matmul_with(isa, w, &a, &mut out);
    out
}

/// Rows per cache block: their activation codes (≤ 128 × k bytes) stay in L2 while every
/// panel group of the range passes over them.
const MC: usize = 128;

/// # Safety
/// `out` points to `a.m × w.n` f32; no other thread touches the columns of panels
/// `p0..p1` meanwhile; `p1 <= w.panels()`.
unsafe fn run_panels(
    isa: Isa,
    w: &PanelBlocks,
    a: &ActBlocks,
    starts: &[i32],
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    assert!(p0 <= p1 && p1 <= w.panels());
    assert_eq!(starts.len(), a.d.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa <= detected (asserted by the caller), so the CPU has AVX-512 VNNI;
        // the rest is the caller's contract.
        Isa::Avx512 => unsafe { x86::panels_avx512(w, a, starts, p0, p1, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa <= detected, so the CPU has AVX2 + FMA; `matmul_with` computed the
        // starts for this path; the rest is the caller's contract.
        Isa::Avx2 => unsafe { avx2::panels_avx2(w, a, starts, p0, p1, out) },
        // SAFETY: caller's contract.
        _ => unsafe { panels_portable(w, a, starts, p0, p1, out) },
    }
}

/// Scalar version of the panel GEMM (same layout, same per-block integer sums, the same
/// float operations per block as the SIMD path).
///
/// # Safety
/// As [`run_panels`].
unsafe fn panels_portable(
    w: &PanelBlocks,
    a: &ActBlocks,
    starts: &[i32],
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    let (k, kb, n) = (w.k, w.k / QK, w.n);
    for r in 0..a.m {
        let x = &a.q[r * k..][..k];
        for ch in p0 * PANEL..(p1 * PANEL).min(n) {
            let (p, c) = (ch / PANEL, ch % PANEL);
            let mut y = 0f32;
            for b in 0..kb {
                let mut i = w.start(ch, b, starts[r * kb + b]);
                for (e, &xe) in x.iter().enumerate().skip(b * QK).take(QK) {
                    i += w.code(ch, e) as i32 * xe as i32;
                }
                let at = (p * kb + b) * PANEL + c;
                y = (i as f32).mul_add(w.d[at] * a.d[r * kb + b], y);
                if w.kind == BlockKind::Q4_1 {
                    y = w.m[at].mul_add(a.s[r * kb + b], y);
                }
            }
            // SAFETY: r < m, ch < n; caller's contract.
            unsafe { *out.add(r * n + ch) = y };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Activation rows per tile.
    const R: usize = 4;
    /// Panels per tile (R·P i32 + R·P f32 accumulators + P weight vectors ≤ 32 zmm).
    const P: usize = 3;

    /// # Safety
    /// As `run_panels`; the CPU has AVX-512 F/BW/VL + VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn panels_avx512(
        w: &PanelBlocks,
        a: &ActBlocks,
        starts: &[i32],
        p0: usize,
        p1: usize,
        out: *mut f32,
    ) {
        macro_rules! tile {
            ($r:literal, $p:literal, $r0:expr, $pp:expr) => {
                // SAFETY: r0 + R <= m and pp + P <= p1 (loop bounds below); caller's
                // contract for `out`.
                match (w.kind, w.lut.is_some(), !w.zeros.is_empty()) {
                    (BlockKind::Q8_0, _, false) => unsafe {
                        tile::<$r, $p, 0, false>(w, a, starts, $r0, $pp, out)
                    },
                    (BlockKind::Q8_0, _, true) => unsafe {
                        tile::<$r, $p, 0, true>(w, a, starts, $r0, $pp, out)
                    },
                    (BlockKind::Q4_0, true, _) => unsafe {
                        tile::<$r, $p, 3, false>(w, a, starts, $r0, $pp, out)
                    },
                    (BlockKind::Q4_0, false, false) => unsafe {
                        tile::<$r, $p, 1, false>(w, a, starts, $r0, $pp, out)
                    },
                    (BlockKind::Q4_0, false, true) => unsafe {
                        tile::<$r, $p, 1, true>(w, a, starts, $r0, $pp, out)
                    },
                    (BlockKind::Q4_1, _, _) => unsafe {
                        tile::<$r, $p, 2, false>(w, a, starts, $r0, $pp, out)
                    },
                }
            };
        }
        let m = a.m;
        for m0 in (0..m).step_by(MC) {
            let m1 = (m0 + MC).min(m);
            let mut p = p0;
            while p < p1 {
                // Decode (one row) walks one panel at a time: the weight is then read in
                // strictly ascending addresses (codes and scales, two streams), which
                // measured 1.1-1.4x less CPU time per token streamed from memory than three
                // panels at a time (examples/ggml_gemv_cpu_time, "streamed token").
                let np = if m == 1 { 1 } else { P.min(p1 - p) };
                let mut r0 = m0;
                while r0 < m1 {
                    let nr = R.min(m1 - r0);
                    match (nr, np) {
                        (4, 3) => tile!(4, 3, r0, p),
                        (4, 2) => tile!(4, 2, r0, p),
                        (4, _) => tile!(4, 1, r0, p),
                        (3, 3) => tile!(3, 3, r0, p),
                        (3, 2) => tile!(3, 2, r0, p),
                        (3, _) => tile!(3, 1, r0, p),
                        (2, 3) => tile!(2, 3, r0, p),
                        (2, 2) => tile!(2, 2, r0, p),
                        (2, _) => tile!(2, 1, r0, p),
                        (_, 3) => tile!(1, 3, r0, p),
                        (_, 2) => tile!(1, 2, r0, p),
                        _ => tile!(1, 1, r0, p),
                    }
                    r0 += nr;
                }
                p += np;
            }
        }
    }

    /// One tile: rows `r0..r0 + RR` × panels `pp..pp + PP`. `KIND`: 0 = Q8_0, 1 = Q4_0,
    /// 2 = Q4_1, 3 = nibbles looked up in the code-book table (`w.lut`). `ZP`: per-block
    /// zero points (`w.zeros`; `starts` then holds `−Σq`).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL + VNNI; `r0 + RR <= a.m`, `pp + PP <= w.panels()`; `out` holds
    /// `a.m × w.n` f32 whose columns of these panels no other thread touches.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const RR: usize, const PP: usize, const KIND: u8, const ZP: bool>(
        w: &PanelBlocks,
        a: &ActBlocks,
        starts: &[i32],
        r0: usize,
        pp: usize,
        out: *mut f32,
    ) {
        let (k, kb, n) = (w.k, w.k / QK, w.n);
        let bb = PanelBlocks::block_bytes(w.kind);
        assert!(r0 + RR <= a.m && pp + PP <= w.panels());
        assert!(w.codes.len() >= (pp + PP) * kb * bb && w.d.len() >= (pp + PP) * kb * PANEL);
        assert!(KIND != 2 || w.m.len() >= (pp + PP) * kb * PANEL);
        assert!(!ZP || w.zeros.len() >= (pp + PP) * kb * PANEL);
        assert!(KIND != 3 || w.lut.is_some());
        let zc: [*const u8; PP] = std::array::from_fn(|p| {
            if ZP {
                w.zeros[(pp + p) * kb * PANEL..].as_ptr()
            } else {
                std::ptr::null()
            }
        });
        let table = w.lut.unwrap_or([0; 16]);
        // SAFETY: `table` is 16 bytes.
        let lut = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(table.as_ptr() as *const _) });
        assert!(a.q.len() >= (r0 + RR) * k && starts.len() >= (r0 + RR) * kb);
        let wc: [*const u8; PP] = std::array::from_fn(|p| w.codes[(pp + p) * kb * bb..].as_ptr());
        let wd: [*const f32; PP] = std::array::from_fn(|p| w.d[(pp + p) * kb * PANEL..].as_ptr());
        let wm: [*const f32; PP] = std::array::from_fn(|p| {
            if KIND == 2 {
                w.m[(pp + p) * kb * PANEL..].as_ptr()
            } else {
                std::ptr::null()
            }
        });
        let xq: [*const u8; RR] =
            std::array::from_fn(|r| a.q[(r0 + r) * k..].as_ptr() as *const u8);
        let xd: [*const f32; RR] = std::array::from_fn(|r| a.d[(r0 + r) * kb..].as_ptr());
        let xs: [*const f32; RR] = std::array::from_fn(|r| a.s[(r0 + r) * kb..].as_ptr());
        let st: [*const i32; RR] = std::array::from_fn(|r| starts[(r0 + r) * kb..].as_ptr());
        let mask = _mm512_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); PP]; RR];
        for b in 0..kb {
            let mut s = [[_mm512_setzero_si512(); PP]; RR];
            if ZP {
                // SAFETY: b·16 + 16 <= kb·16 inside panel pp + p's zero points (asserted).
                let z: [__m512i; PP] = std::array::from_fn(|p| unsafe {
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(zc[p].add(b * PANEL) as *const _))
                });
                for r in 0..RR {
                    // SAFETY: b < kb inside row r0 + r of `starts` (asserted).
                    let v = _mm512_set1_epi32(unsafe { *st[r].add(b) });
                    for p in 0..PP {
                        s[r][p] = _mm512_mullo_epi32(z[p], v);
                    }
                }
            } else {
                for r in 0..RR {
                    // SAFETY: b < kb inside row r0 + r of `starts` (asserted).
                    let v = _mm512_set1_epi32(unsafe { *st[r].add(b) });
                    for p in 0..PP {
                        s[r][p] = v;
                    }
                }
            }
            // Four activation codes of row r at element e as one broadcast i32.
            // SAFETY (at each use): e + 4 <= (b + 1)·32 <= k inside row r0 + r.
            let x4 = |r: usize, e: usize| unsafe {
                _mm512_set1_epi32((xq[r].add(e) as *const i32).read_unaligned())
            };
            if KIND == 0 {
                for j in 0..8 {
                    // SAFETY: b·512 + j·64 + 64 <= kb·512 inside panel pp + p.
                    let wv: [__m512i; PP] = std::array::from_fn(|p| unsafe {
                        _mm512_loadu_si512(wc[p].add(b * 512 + j * 64) as *const _)
                    });
                    for r in 0..RR {
                        let x = x4(r, b * QK + 4 * j);
                        for p in 0..PP {
                            s[r][p] = _mm512_dpbusd_epi32(s[r][p], wv[p], x);
                        }
                    }
                }
            } else {
                for j in 0..4 {
                    // SAFETY: b·256 + j·64 + 64 <= kb·256 inside panel pp + p.
                    let raw: [__m512i; PP] = std::array::from_fn(|p| unsafe {
                        _mm512_loadu_si512(wc[p].add(b * 256 + j * 64) as *const _)
                    });
                    let lo: [__m512i; PP] = std::array::from_fn(|p| {
                        let i = _mm512_and_si512(raw[p], mask);
                        if KIND == 3 {
                            _mm512_shuffle_epi8(lut, i)
                        } else {
                            i
                        }
                    });
                    for r in 0..RR {
                        let x = x4(r, b * QK + 4 * j);
                        for p in 0..PP {
                            s[r][p] = _mm512_dpbusd_epi32(s[r][p], lo[p], x);
                        }
                    }
                    let hi: [__m512i; PP] = std::array::from_fn(|p| {
                        let i = _mm512_and_si512(_mm512_srli_epi16::<4>(raw[p]), mask);
                        if KIND == 3 {
                            _mm512_shuffle_epi8(lut, i)
                        } else {
                            i
                        }
                    });
                    for r in 0..RR {
                        let x = x4(r, b * QK + 16 + 4 * j);
                        for p in 0..PP {
                            s[r][p] = _mm512_dpbusd_epi32(s[r][p], hi[p], x);
                        }
                    }
                }
            }
            // SAFETY: b·16 + 16 <= kb·16 inside panel pp + p's scales.
            let dw: [__m512; PP] =
                std::array::from_fn(|p| unsafe { _mm512_loadu_ps(wd[p].add(b * PANEL)) });
            for r in 0..RR {
                // SAFETY: b < kb inside row r0 + r.
                let dx = _mm512_set1_ps(unsafe { *xd[r].add(b) });
                for p in 0..PP {
                    let scale = _mm512_mul_ps(dw[p], dx);
                    acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][p]), scale, acc[r][p]);
                }
            }
            if KIND == 2 {
                // SAFETY: as for the scales.
                let mw: [__m512; PP] =
                    std::array::from_fn(|p| unsafe { _mm512_loadu_ps(wm[p].add(b * PANEL)) });
                for r in 0..RR {
                    // SAFETY: b < kb inside row r0 + r.
                    let sx = _mm512_set1_ps(unsafe { *xs[r].add(b) });
                    for p in 0..PP {
                        acc[r][p] = _mm512_fmadd_ps(mw[p], sx, acc[r][p]);
                    }
                }
            }
        }
        for r in 0..RR {
            for p in 0..PP {
                let c0 = (pp + p) * PANEL;
                let cnt = PANEL.min(n - c0);
                let keep: __mmask16 = if cnt == PANEL { !0 } else { (1u16 << cnt) - 1 };
                // SAFETY: row r0 + r < m, columns c0..c0 + cnt < n (masked store); the
                // caller's contract gives this task these columns.
                unsafe {
                    _mm512_mask_storeu_ps(out.add((r0 + r) * n + c0), keep, acc[r][p]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The panel GEMM on every path against the parent's portable row kernel (itself
    //! tested against an f64 reference written from GGML's block format) and, with unit
    //! scales, exact integer sums.
    use super::super::tests::Lcg;
    use super::super::{matmul_with as rows_with, ActBlocks, BlockKind, PackedBlocks, QK};
    use super::*;
    use half::f16;

    /// Random blocks with extreme codes; `unit`: scale 1, minimum 0.
    fn blocks(kind: BlockKind, n: usize, k: usize, unit: bool, g: &mut Lcg) -> Vec<u8> {
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
                out.push(match (kind, v % 6) {
                    (BlockKind::Q8_0, 0) => 127,
                    (BlockKind::Q8_0, 1) => 0x80, // −128
                    (_, 0) => 0xFF,
                    (_, 1) => 0x00,
                    _ => (v >> 8) as u8,
                });
            }
        }
        out
    }

    /// Ragged shapes: n off the 16-channel panel and the 3-panel tile, m off the 4-row
    /// tile, below and above the 128-row cache block and the threading threshold.
    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 32),
        (8, 17, 96),
        (9, 50, 64),
        (13, 33, 160),
        (17, 16, 608),
        (130, 47, 576),
        (200, 97, 224),
        (64, 257, 1536),
    ];

    const KINDS: [BlockKind; 3] = [BlockKind::Q8_0, BlockKind::Q4_0, BlockKind::Q4_1];

    fn paths() -> Vec<Isa> {
        Isa::available()
    }

    /// The AVX2 and AVX-512 panel kernels do the same float operations on the same exact
    /// integer block sums: the same bits, for every kind and extension.
    #[test]
    fn avx2_and_avx512_panels_give_the_same_bits() {
        if !paths().contains(&Isa::Avx512) {
            return;
        }
        let mut g = Lcg(41);
        for kind in KINDS {
            for (m, n, k) in SHAPES {
                let bytes = blocks(kind, n, k, false, &mut g);
                let pan =
                    PanelBlocks::from_rows(&PackedBlocks::from_ggml(kind, &bytes, n, k).unwrap());
                let x: Vec<f32> = (0..m * k).map(|_| g.unif() * 3.0).collect();
                let a = ActBlocks::quantize(Isa::Portable, kind, &x, m, k);
                let (mut y2, mut y5) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_with(Isa::Avx2, &pan, &a, &mut y2);
                matmul_with(Isa::Avx512, &pan, &a, &mut y5);
                let same = y2.iter().zip(&y5).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "{kind:?} m{m} n{n} k{k}");
            }
        }
    }

    #[test]
    fn panels_match_the_row_kernel() {
        let mut g = Lcg(21);
        for kind in KINDS {
            for (m, n, k) in SHAPES {
                let bytes = blocks(kind, n, k, false, &mut g);
                let rows = PackedBlocks::from_ggml(kind, &bytes, n, k).unwrap();
                let pan = PanelBlocks::from_rows(&rows);
                let x: Vec<f32> = (0..m * k).map(|_| g.unif() * 3.0).collect();
                let a = ActBlocks::quantize(Isa::Portable, kind, &x, m, k);
                let mut want = vec![0f32; m * n];
                rows_with(Isa::Portable, &rows, &a, &mut want);
                // Σ|terms| per output for the tolerance, from the row kernel's pieces.
                let kb = k / QK;
                for isa in paths() {
                    let mut y = vec![0f32; m * n];
                    matmul_with(isa, &pan, &a, &mut y);
                    for r in 0..m {
                        for c in 0..n {
                            let mut codes = vec![0u8; k];
                            rows.unpack_row(c, &mut codes);
                            let mut mag = 0f64;
                            for b in 0..kb {
                                let mut i = 0i64;
                                let xs = &a.q[r * k + b * QK..][..QK];
                                for (&cv, &xv) in codes[b * QK..][..QK].iter().zip(xs) {
                                    i += (cv as i64 - kind.offset() as i64) * xv as i64;
                                }
                                mag +=
                                    (rows.d[c * kb + b] as f64 * a.d[r * kb + b] as f64 * i as f64)
                                        .abs();
                                if kind == BlockKind::Q4_1 {
                                    mag +=
                                        (rows.m[c * kb + b] as f64 * a.s[r * kb + b] as f64).abs();
                                }
                            }
                            // Both sides: ≤ 2 roundings per block term plus one per sum.
                            let tol = (3 * kb + 4) as f64 * 2f64.powi(-23) * mag + 1e-30;
                            let (got, w0) = (y[r * n + c], want[r * n + c]);
                            assert!(
                                ((got - w0) as f64).abs() <= tol,
                                "{kind:?} {isa:?} m{m} n{n} k{k} @({r},{c}): {got} vs {w0}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn panel_integer_sums_are_exact() {
        let mut g = Lcg(23);
        for kind in KINDS {
            // k ≤ 608: |partial sums| ≤ 608·128·127 < 2^24, exact in f32.
            for (m, n, k) in SHAPES.into_iter().filter(|s| s.2 <= 608) {
                let bytes = blocks(kind, n, k, true, &mut g);
                let rows = PackedBlocks::from_ggml(kind, &bytes, n, k).unwrap();
                let pan = PanelBlocks::from_rows(&rows);
                // ±127 in every block: d = 1, codes = x exactly.
                let x: Vec<f32> = (0..m * k)
                    .map(|i| match (i % QK, g.next() % 4) {
                        (0, 0) => 127.0,
                        (0, _) => -127.0,
                        (_, 0) => 127.0,
                        (_, 1) => -127.0,
                        _ => (g.next() % 255) as f32 - 127.0,
                    })
                    .collect();
                let a = ActBlocks::quantize(Isa::Portable, kind, &x, m, k);
                // Exact Σ v·x from GGML's block bytes directly.
                let bb = kind.block_bytes();
                let kb = k / QK;
                for isa in paths() {
                    let mut y = vec![0f32; m * n];
                    matmul_with(isa, &pan, &a, &mut y);
                    for r in 0..m {
                        for c in 0..n {
                            let mut want = 0i64;
                            for b in 0..kb {
                                let blk = &bytes[(c * kb + b) * bb..][..bb];
                                for j in 0..QK {
                                    let v = match kind {
                                        BlockKind::Q8_0 => blk[2 + j] as i8 as i64,
                                        _ => {
                                            let qs = &blk[bb - 16..];
                                            let q =
                                                if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
                                            q as i64 - if kind == BlockKind::Q4_0 { 8 } else { 0 }
                                        }
                                    };
                                    want += v * x[r * k + b * QK + j] as i64;
                                }
                            }
                            assert_eq!(
                                y[r * n + c] as i64,
                                want,
                                "{kind:?} {isa:?} m{m} n{n} k{k}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// llama.cpp's q8 block rounding written out: (stored d, codes).
    fn ref_q8(x: &[f32]) -> (f64, Vec<i64>) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let q = x
            .iter()
            .map(|&v| {
                let t = (v * id) as f64;
                (t.abs() + 0.5).floor().copysign(t) as i64
            })
            .collect();
        (f16::from_f32(d).to_f64(), q)
    }

    /// One weight-only case: `codes[c·k + e]` signed values (already minus the zero point),
    /// `scale[c·kb32 + b]` per 32-column block, and the kernel's panel copy.
    #[allow(clippy::too_many_arguments)]
    fn check_weight_only(
        what: &str,
        pan: &PanelBlocks,
        codes: &[i64],
        scale: &[f64],
        n: usize,
        k: usize,
        ms: &[usize],
        g: &mut Lcg,
    ) {
        let kp = k.next_multiple_of(QK);
        let kb = kp / QK;
        for &m in ms {
            let x: Vec<f32> = (0..m * k).map(|_| g.unif() * 2.0).collect();
            for isa in paths() {
                let y = matmul_f32(isa, pan, &x, m, k);
                for r in 0..m {
                    let mut xr = x[r * k..][..k].to_vec();
                    xr.resize(kp, 0.0);
                    for c in 0..n {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for b in 0..kb {
                            let (dx, qx) = ref_q8(&xr[b * QK..][..QK]);
                            let mut i = 0i64;
                            for (j, &q) in qx.iter().enumerate() {
                                let e = b * QK + j;
                                if e < k {
                                    i += codes[c * k + e] * q;
                                }
                            }
                            let t = scale[c * kb + b] * dx * i as f64;
                            want += t;
                            mag += t.abs();
                        }
                        // Per block: the scale product (1 rounding, plus 2 in the weight's
                        // own f32 scale), the conversion, the FMA; one per sum.
                        let tol = (4 * kb + 4) as f64 * 2f64.powi(-23) * mag + 1e-30;
                        let got = y[r * n + c] as f64;
                        assert!(
                            (got - want).abs() <= tol,
                            "{what} {isa:?} m{m} n{n} k{k} @({r},{c}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Row counts: decode (1), small, past the 4-row tile and the 128-row cache block.
    const MS: [usize; 6] = [1, 2, 5, 17, 33, 130];

    #[test]
    fn int_n_q8_activations_match_the_reference() {
        use crate::nn::kernels::lowbit::LowBit;
        let mut g = Lcg(29);
        // (bits, signed zero point?, group, n, k): 784 is not a whole 32- or 64-column
        // block (MNIST); n·k ≥ 2^17 with m = 1 takes the threaded split.
        for (bits, affine, group, n, k) in [
            (4u8, false, 64usize, 37usize, 784usize),
            (4, false, 32, 50, 96),
            (8, false, 0, 33, 160),
            (8, false, 64, 20, 200),
            (2, false, 32, 17, 64),
            (3, false, 128, 40, 576),
            (4, true, 64, 37, 784),
            (4, true, 32, 300, 448),
            (8, true, 64, 21, 200),
            (3, true, 32, 18, 96),
        ] {
            let (lo, hi) = if affine {
                (0, (1i32 << bits) - 1)
            } else {
                (-(1i32 << (bits - 1)), (1i32 << (bits - 1)) - 1)
            };
            let raw: Vec<i32> = (0..n * k)
                .map(|i| match i % 7 {
                    0 => lo,
                    1 => hi,
                    _ => lo + (g.next() % (hi - lo + 1) as u32) as i32,
                })
                .collect();
            let bytes: Vec<u8> = raw.iter().map(|&c| c as i8 as u8).collect();
            let gs = if group == 0 { k } else { group };
            let gpr = k.div_ceil(gs);
            let scale: Vec<f32> = (0..n * gpr).map(|_| 0.01 + g.unif().abs()).collect();
            let zero: Vec<i32> = (0..n * gpr)
                .map(|i| match (affine, i % 5) {
                    (false, _) => 0,
                    (true, 0) => lo,
                    (true, 1) => hi,
                    _ => lo + (g.next() % (hi - lo + 1) as u32) as i32,
                })
                .collect();
            let lb =
                LowBit::from_int(n, k, &bytes, !affine, bits, &scale, &zero, gs).expect("layout");
            let pan = lb.a8_panels().expect("integer zero points fit the panels");
            let kb = k.div_ceil(QK);
            let codes: Vec<i64> = (0..n * k)
                .map(|i| raw[i] as i64 - zero[(i / k) * gpr + (i % k) / gs] as i64)
                .collect();
            let sc: Vec<f64> = (0..n * kb)
                .map(|i| scale[(i / kb) * gpr + (i % kb) * QK / gs] as f64)
                .collect();
            let what = format!("{bits}b affine={affine} g{group}");
            check_weight_only(&what, pan, &codes, &sc, n, k, &MS[..4], &mut g);
            if n * k < 20_000 {
                check_weight_only(&what, pan, &codes, &sc, n, k, &MS[4..], &mut g);
            }
        }
        // Real-valued zero points (HQQ) do not fit: the f32 path stays.
        let lb = LowBit::from_int_real_zero(2, 64, &[3u8; 128], false, 4, &[1.0; 4], &[0.5; 4], 32)
            .unwrap();
        assert!(lb.a8_panels().is_none());
    }

    #[test]
    fn code_book_q8_activations_match_the_reference() {
        use crate::nn::kernels::lowbit::LowBit;
        use crate::quant::codebook::NF4_CODE;
        let mut g = Lcg(31);
        // The book rounded to signed 8 bits, written out independently of the kernels.
        let tmax = NF4_CODE.iter().fold(0f64, |a, &v| a.max((v as f64).abs()));
        let t8: Vec<i64> = NF4_CODE
            .iter()
            .map(|&t| (127.0 * t as f64 / tmax).round() as i64)
            .collect();
        for (n, k, bs) in [
            (37usize, 96usize, 64usize),
            (20, 256, 64),
            (300, 448, 64),
            (17, 64, 32),
        ] {
            let len = n * k;
            let idx: Vec<u8> = (0..len)
                .map(|i| (g.next() % 16) as u8 ^ (i % 2) as u8)
                .collect();
            let packed: Vec<u8> = idx.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
            let absmax: Vec<f32> = (0..len.div_ceil(bs))
                .map(|_| 0.05 + g.unif().abs())
                .collect();
            let lb = LowBit::from_table(n, k, &packed, &NF4_CODE, &absmax, bs).expect("layout");
            let pan = lb.a8_panels().expect("whole-chunk rows fit the panels");
            let codes: Vec<i64> = idx.iter().map(|&i| t8[i as usize]).collect();
            let kb = k / QK;
            let sc: Vec<f64> = (0..n * kb)
                .map(|i| absmax[((i / kb) * k + (i % kb) * QK) / bs] as f64 * tmax / 127.0)
                .collect();
            let ms: &[usize] = if len < 20_000 { &MS } else { &MS[..3] };
            check_weight_only("nf4", pan, &codes, &sc, n, k, ms, &mut g);
        }
        // Rows that straddle two absmax blocks keep the f32 path.
        let lb = LowBit::from_table(2, 40, &[0x12; 40], &NF4_CODE, &[1.0; 2], 40).unwrap();
        assert!(lb.a8_panels().is_none());
    }

    /// Exact integer block sums of the affine and code-book panels: unit scales and
    /// activations that are their own q8 codes.
    #[test]
    fn affine_and_table_integer_sums_are_exact() {
        let mut g = Lcg(37);
        let lut: [u8; 16] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(5));
        // k ≤ 384: |partial sums| ≤ 384·255·127 < 2^24, exact in f32.
        for (m, n, k) in SHAPES.into_iter().filter(|s| s.2 <= 384) {
            let kb = k / QK;
            for variant in 0..3 {
                let nib = variant != 1;
                let codes: Vec<u8> = (0..n * k)
                    .map(|_| (g.next() % if nib { 16 } else { 256 }) as u8)
                    .collect();
                let zeros: Vec<u8> = (0..n * kb).map(|_| (g.next() % 256) as u8).collect();
                let row = |ch: usize, r: &mut [u8]| r.copy_from_slice(&codes[ch * k..][..k]);
                let pan = match variant {
                    0 => PanelBlocks::from_codes_affine(
                        BlockKind::Q4_0,
                        n,
                        k,
                        row,
                        |_, _| 1.0,
                        |ch, b| zeros[ch * kb + b] % 16,
                    ),
                    1 => PanelBlocks::from_codes_affine(
                        BlockKind::Q8_0,
                        n,
                        k,
                        row,
                        |_, _| 1.0,
                        |ch, b| zeros[ch * kb + b],
                    ),
                    _ => PanelBlocks::from_table_codes(n, k, lut, row, |_, _| 1.0),
                };
                let x: Vec<f32> = (0..m * k)
                    .map(|i| match (i % QK, g.next() % 4) {
                        (0, 0) => 127.0,
                        (0, _) => -127.0,
                        _ => (g.next() % 255) as f32 - 127.0,
                    })
                    .collect();
                let a = ActBlocks::quantize(Isa::Portable, BlockKind::Q4_1, &x, m, k);
                for isa in paths() {
                    let mut y = vec![0f32; m * n];
                    matmul_with(isa, &pan, &a, &mut y);
                    for r in 0..m {
                        for c in 0..n {
                            let mut want = 0i64;
                            for e in 0..k {
                                let u = codes[c * k + e] as i64;
                                let v = match variant {
                                    0 => u - (zeros[c * kb + e / QK] % 16) as i64,
                                    1 => u - zeros[c * kb + e / QK] as i64,
                                    _ => lut[u as usize] as i64 - 128,
                                };
                                want += v * x[r * k + e] as i64;
                            }
                            assert_eq!(
                                y[r * n + c] as i64,
                                want,
                                "variant {variant} {isa:?} m{m} n{n} k{k} @({r},{c})"
                            );
                        }
                    }
                }
            }
        }
    }
}
