//! The many-row product of [`LowBit`] (prefill, batches): the codes re-laid once, on first
//! use, in the order of the dense f32 GEMM's panels ([`TileCodes`]); per call each tile of
//! `nr` output rows is decoded once into a cache-resident f32 panel (a thread's scratch
//! buffer, reused across calls) which the f32 GEMM's own register tiles
//! ([`gemm_f32::panel_block`]) then multiply with every activation row.
//!
//! Why a second code layout: the row layout (32 columns of one output row per chunk) suits
//! the GEMV, but a panel holds one column of `nr` output rows per step. Decoding a panel from
//! rows took a 16 × 16 in-register transpose per 256 weights (64 shuffles, more work than
//! the decoding), scalar stores for tiles of fewer than 16 rows, and a zeroed panel and
//! output buffer per call: at MNIST's batch 64 the 4-bit layers took 1.2× the f32 GEMM's
//! time, while that GEMM runs at about one 512-bit FMA per cycle. Here step `p` of tile `t`
//! holds the codes of rows `t·nr ..< t·nr + nr` at column `p`, so a panel row is two
//! 16-byte loads, widening, one table permute per 16 weights and one multiply by a vector
//! of per-row scales: ~4 vector operations per 64 weights on the FMA ports against the 256
//! FMAs that 64 activation rows spend on them. On AVX-512 the first four activation rows
//! are multiplied while the panel is decoded (`x86::decode_mul64`), so the decoding's
//! stores and shuffles overlap FMAs instead of running on their own.
//!
//! The decoded values are bit for bit those of [`LowBit::weight`] (the same one or two
//! roundings, `(n − z')·s` or `table[n]·s`), so products differ from `x · Ŵᵀ` only by
//! float summation order. The row layout stays (the GEMV and the q8 panels read it); this
//! copy costs half a byte per weight plus one scale (and zero point) per row and segment.

use super::{Codes, LowBit, CHUNK};
use crate::nn::kernels::gemm_f32;
use crate::nn::kernels::{Isa, SendPtr};
use rayon::prelude::*;
use std::cell::RefCell;

/// Activation rows per register tile (the f32 GEMM's).
const MR: usize = gemm_f32::MR;
/// Fewest activation rows per part when a GEMM's rows are split between threads (each
/// part decodes its tiles itself).
const PART_ROWS: usize = 128;
/// Depth up to which one panel holds all of `k` (64 × 1024 f32 = 256 KiB, in L2): MNIST's
/// 784 is then one block instead of 768 + a 16-step remainder.
const KC_ONE: usize = 1024;
/// Deeper rows are cut into equal blocks of at most this many steps (as the f32 GEMM).
const KC: usize = 768;

/// A `[rows, cols]` low-bit weight in panel order: tiles of `nr` output rows, each
/// `[cols][step]` bytes. Nibbles: byte `j` of a step holds lane `j` in its low nibble and
/// lane `j + nr/2` in its high one; bytes: one per lane. Lanes past the matrix have code 0
/// and scale 0 (they decode to zeros). Each tile's columns are cut into segments over which
/// no row's scale or zero point changes (the scale groups; 16 columns for code-book rows
/// split at 16, single columns at worst), each with a vector of `nr` per-row scales.
#[derive(Clone)]
pub(super) struct TileCodes {
    nr: usize,
    cols: usize,
    tiles: usize,
    /// Bytes per step (`nr / 2` or `nr`).
    step: usize,
    bytes: bool,
    codes: Vec<u8>,
    /// A nibble's value before scaling: the code book, `n`, or `n − z'` (one zero point for
    /// every group, exact: small integers).
    base: [f32; 16],
    /// Segment starts (columns), tile after tile; tile `t`'s are `first[t] .. first[t + 1]`
    /// and begin with 0.
    starts: Vec<u32>,
    first: Vec<usize>,
    /// `[segment][nr]` scales, and zero points (subtracted before scaling) where rows have
    /// their own (affine int-N, bytes); empty otherwise.
    scale: Vec<f32>,
    zero: Vec<f32>,
}

impl TileCodes {
    /// The layout of `lb` for panels `nr` wide (a multiple of 16).
    pub(super) fn new(lb: &LowBit, nr: usize) -> TileCodes {
        assert!(nr >= 16 && nr.is_multiple_of(16), "panel width {nr}");
        let bytes = lb.kind == Codes::Byte;
        let lane_zero = bytes || (lb.kind == Codes::Nibble && lb.uniform_zero.is_none());
        let base: [f32; 16] = match (lb.kind, lb.uniform_zero) {
            (Codes::Table | Codes::SplitTable, _) => lb.table,
            (Codes::Nibble, Some(z)) => std::array::from_fn(|n| n as f32 - z),
            _ => std::array::from_fn(|n| n as f32),
        };
        // (scale, zero point) of row o at column p, as `LowBit::weight` applies them.
        let param = |o: usize, p: usize| -> (f32, f32) {
            let g = o * lb.gpr + p / (lb.cpg * CHUNK);
            match lb.kind {
                Codes::SplitTable => (lb.split_scale(g, p % CHUNK), 0.0),
                Codes::Table => (lb.scale[g], 0.0),
                _ => (lb.scale[g], if lane_zero { lb.zero[g] } else { 0.0 }),
            }
        };
        let (rows, cols) = (lb.rows, lb.cols);
        let tiles = rows.div_ceil(nr);
        let step = if bytes { nr } else { nr / 2 };
        let mut codes = vec![0u8; tiles * cols * step];
        codes
            .par_chunks_mut(cols * step)
            .enumerate()
            .for_each(|(t, tile)| {
                for o in t * nr..((t + 1) * nr).min(rows) {
                    let j = o - t * nr;
                    for p in 0..cols {
                        let n = lb.code(o, p);
                        if bytes {
                            tile[p * step + j] = n;
                        } else {
                            tile[p * step + j % step] |= n << (4 * (j / step));
                        }
                    }
                }
            });
        // Scales can change only at chunk boundaries, or at 16-column halves (split code
        // books): look there, or everywhere for splits anywhere in a chunk.
        let anywhere = lb.kind == Codes::SplitTable && !lb.split_halves;
        let segments: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)> = (0..tiles)
            .into_par_iter()
            .map(|t| {
                let (mut st, mut sc, mut ze) = (Vec::new(), Vec::new(), Vec::new());
                let mut prev: Vec<(u32, u32)> = Vec::new();
                for p in 0..cols {
                    if !(p == 0 || anywhere || p.is_multiple_of(16)) {
                        continue;
                    }
                    let cur: Vec<(f32, f32)> = (0..nr)
                        .map(|j| {
                            let o = t * nr + j;
                            if o < rows {
                                param(o, p)
                            } else {
                                (0.0, 0.0)
                            }
                        })
                        .collect();
                    let bits: Vec<(u32, u32)> = cur
                        .iter()
                        .map(|(s, z)| (s.to_bits(), z.to_bits()))
                        .collect();
                    if p == 0 || bits != prev {
                        st.push(p as u32);
                        sc.extend(cur.iter().map(|v| v.0));
                        if lane_zero {
                            ze.extend(cur.iter().map(|v| v.1));
                        }
                        prev = bits;
                    }
                }
                (st, sc, ze)
            })
            .collect();
        let mut tc = TileCodes {
            nr,
            cols,
            tiles,
            step,
            bytes,
            codes,
            base,
            starts: Vec::new(),
            first: Vec::with_capacity(tiles + 1),
            scale: Vec::new(),
            zero: Vec::new(),
        };
        for (st, sc, ze) in segments {
            tc.first.push(tc.starts.len());
            tc.starts.extend(st);
            tc.scale.extend(sc);
            tc.zero.extend(ze);
        }
        tc.first.push(tc.starts.len());
        tc
    }

    /// Panel width.
    pub(super) fn nr(&self) -> usize {
        self.nr
    }

    /// Bytes held (codes and per-segment parameters).
    pub(super) fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scale.len() + self.zero.len() + self.starts.len())
    }

    /// `panel[q·nr + j] = W[t·nr + j, p0 + q]` for `q < kc`, `j < nr` (zeros past the
    /// matrix's rows), exactly [`LowBit::weight`]'s values.
    pub(super) fn decode(&self, isa: Isa, t: usize, p0: usize, kc: usize, panel: &mut [f32]) {
        let nr = self.nr;
        assert!(panel.len() >= kc * nr);
        let mut p = p0;
        while p < p0 + kc {
            let (run, end) = self.run(t, p, p0 + kc);
            let out = &mut panel[(p - p0) * nr..(end - p0) * nr];
            match (isa.min(Isa::detected()), nr) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512 is detected (capped above); `run` is a whole number of
                // steps of 64 lanes and `out` as many panel rows (checked in the callee).
                (Isa::Avx512, 64) => unsafe { x86::decode64(&run, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 + FMA are detected (the build's floor); shapes as above.
                (Isa::Avx2, 16) => unsafe { x86::decode16(&run, out) },
                _ => decode_portable(&run, nr, out),
            }
            p = end;
        }
    }

    /// The steps of tile `t` from column `p` to the end of its segment or `stop`, whichever
    /// comes first (`p < stop <= cols`), with the segment's parameters; and that end.
    fn run(&self, t: usize, p: usize, stop: usize) -> (Run<'_>, usize) {
        let (nr, step) = (self.nr, self.step);
        assert!(t < self.tiles && p < stop && stop <= self.cols);
        let segs = &self.starts[self.first[t]..self.first[t + 1]];
        // The segment holding p (the first starts at 0).
        let s = segs.partition_point(|&st| st as usize <= p) - 1;
        let end = segs.get(s + 1).map_or(self.cols, |&e| e as usize).min(stop);
        let g = self.first[t] + s;
        let run = Run {
            codes: &self.codes[(t * self.cols + p) * step..(t * self.cols + end) * step],
            base: &self.base,
            scale: &self.scale[g * nr..(g + 1) * nr],
            zero: (!self.zero.is_empty()).then(|| &self.zero[g * nr..(g + 1) * nr]),
            bytes: self.bytes,
        };
        (run, end)
    }
}

/// A run of steps that share one segment's parameters.
struct Run<'a> {
    /// Whole steps: `steps · step` bytes.
    codes: &'a [u8],
    base: &'a [f32; 16],
    /// `nr` lanes each.
    scale: &'a [f32],
    zero: Option<&'a [f32]>,
    bytes: bool,
}

/// Any panel width, plain Rust.
fn decode_portable(run: &Run, nr: usize, out: &mut [f32]) {
    let step = if run.bytes { nr } else { nr / 2 };
    for (c, o) in run.codes.chunks_exact(step).zip(out.chunks_exact_mut(nr)) {
        for j in 0..nr {
            let v = if run.bytes {
                c[j] as f32
            } else {
                run.base[((c[j % step] >> (4 * (j / step))) & 15) as usize]
            };
            o[j] = match run.zero {
                Some(z) => (v - z[j]) * run.scale[j],
                None => v * run.scale[j],
            };
        }
    }
}

/// Rows `r0 .. r1` (activations `x`, `[m, cols]`) times tile `t` into `y` (`[m, rows]`):
/// the tile decoded one depth block at a time into `panel` (on AVX-512 while multiplying
/// the first four rows), each block through the f32 register tiles for the other rows.
///
/// # Safety
/// `y` is valid for writes of `[m, rows]` and no other thread writes rows `r0..r1` of
/// tile `t`'s columns meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows(
    lb: &LowBit,
    tc: &TileCodes,
    isa: Isa,
    x: &[f32],
    (r0, r1): (usize, usize),
    t: usize,
    y: *mut f32,
    panel: &mut Vec<f32>,
) {
    let (nr, k, rows) = (tc.nr, lb.cols, lb.rows);
    let kb = block_depth(k);
    if panel.len() < kb * nr {
        panel.resize(kb * nr, 0.0);
    }
    let width = nr.min(rows - t * nr);
    // AVX-512: the first (up to) 4 rows are multiplied while the panel is decoded.
    let fused = if cfg!(target_arch = "x86_64") && isa.min(Isa::detected()) == Isa::Avx512 {
        (r1 - r0).min(4)
    } else {
        0
    };
    let mut k0 = 0;
    while k0 < k {
        let kc = kb.min(k - k0);
        // SAFETY (both blocks): rows r0..r1 and columns t·nr .. t·nr + width of y (row
        // stride `rows`) are this call's alone (the caller's contract); the slices are
        // bounds-checked in the callees; AVX-512 is detected where `fused > 0`.
        #[cfg(target_arch = "x86_64")]
        if fused > 0 {
            let (xs, at, acc) = (&x[r0 * k + k0..], (t, k0, kc), k0 > 0);
            unsafe {
                let c = y.add(r0 * rows + t * nr);
                match fused {
                    4 => x86::decode_mul64::<4>(tc, at, panel, xs, k, c, rows, width, acc),
                    3 => x86::decode_mul64::<3>(tc, at, panel, xs, k, c, rows, width, acc),
                    2 => x86::decode_mul64::<2>(tc, at, panel, xs, k, c, rows, width, acc),
                    _ => x86::decode_mul64::<1>(tc, at, panel, xs, k, c, rows, width, acc),
                }
            }
        }
        if fused == 0 {
            tc.decode(isa, t, k0, kc, panel);
        }
        let r = r0 + fused;
        if r < r1 {
            unsafe {
                gemm_f32::panel_block(
                    isa,
                    &x[r * k + k0..],
                    r1 - r,
                    k,
                    kc,
                    panel,
                    y.add(r * rows + t * nr),
                    rows,
                    width,
                    k0 > 0,
                )
            };
        }
        k0 += kc;
    }
}

/// Steps per depth block for rows of `k` columns.
fn block_depth(k: usize) -> usize {
    if k <= KC_ONE {
        k
    } else {
        k.div_ceil(k.div_ceil(KC))
    }
}

thread_local! {
    /// Each thread's decoded panel, kept between calls (no allocation or zeroing per call:
    /// a decode writes every value before the micro-kernels read it).
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `x [m, cols] · Wᵀ` → `[m, rows]` through [`TileCodes`] on path `isa`; items are tiles
/// × parts of the rows, over rayon's pool.
pub(super) fn gemm(lb: &LowBit, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * lb.cols, "activation size");
    let isa = isa.min(Isa::detected());
    let tc = lb.tile_codes(gemm_f32::panel_width(isa));
    let tiles = tc.tiles;
    let mut y = vec![0f32; m * lb.rows];
    if m == 0 {
        return y;
    }
    // Few tiles (a 192-row projection is 3 tiles of 64): split the activation rows too, each
    // part decoding its own panels; only parts of at least PART_ROWS rows, over which the
    // decoding is repaid.
    let threads = rayon::current_num_threads().max(1);
    let parts = if tiles >= 4 * threads {
        1
    } else {
        (4 * threads).div_ceil(tiles).min(m / PART_ROWS).max(1)
    };
    let rb = m.div_ceil(parts).next_multiple_of(MR);
    let parts = m.div_ceil(rb);
    let yp = SendPtr(y.as_mut_ptr());
    let run = |item: usize| {
        let (t, b) = (item % tiles, item / tiles);
        let rows = (b * rb, ((b + 1) * rb).min(m));
        PANEL.with(|cell| {
            let mut own = Vec::new();
            let mut held = cell.try_borrow_mut();
            let panel = match held.as_deref_mut() {
                Ok(p) => p,
                Err(_) => &mut own,
            };
            // SAFETY: item (t, b) alone writes rows `rows` × tile t's columns of `y`, which
            // outlives the loop.
            unsafe { tile_rows(lb, tc, isa, x, rows, t, yp.get(), panel) };
        });
    };
    if tiles * parts == 1 || m * lb.rows * lb.cols < super::SERIAL_WORK {
        (0..tiles * parts).for_each(run);
    } else {
        (0..tiles * parts).into_par_iter().for_each(run);
    }
    y
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Run, TileCodes};
    use std::arch::x86_64::*;

    /// 64 lanes a step (AVX-512): nibbles are 32 bytes, byte `j` lanes `j` and `j + 32`;
    /// the two 16-byte halves widened to 32-bit lanes give lanes 0–15 / 16–31 from their
    /// low nibbles and 32–47 / 48–63 from their high ones, each looked up in the 16-entry
    /// base table by one `vpermps` (which reads the index's low 4 bits only).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn decode64(run: &Run, out: &mut [f32]) {
        // SAFETY: AVX-512 per the caller; the callee asserts the bounds.
        unsafe {
            match (run.bytes, run.zero.is_some()) {
                (false, false) => decode64_with::<false, false>(run, out),
                (false, true) => decode64_with::<false, true>(run, out),
                (true, false) => decode64_with::<true, false>(run, out),
                (true, true) => decode64_with::<true, true>(run, out),
            }
        }
    }

    /// [`decode64`] for one kind: byte codes or nibbles, with or without zero points.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn decode64_with<const BYTES: bool, const ZERO: bool>(run: &Run, out: &mut [f32]) {
        let step = if BYTES { 64 } else { 32 };
        let steps = run.codes.len() / step;
        assert!(run.bytes == BYTES && run.zero.is_some() == ZERO);
        assert!(run.codes.len() == steps * step && out.len() >= steps * 64);
        // SAFETY (whole body): step s reads bytes s·step .. s·step + step of `codes` and
        // writes floats s·64 .. s·64 + 64 of `out` (both asserted above); the parameters
        // are checked in `params64`.
        unsafe {
            let (base, sc, ze) = params64::<ZERO>(run);
            let (c, o) = (run.codes.as_ptr(), out.as_mut_ptr());
            for s in 0..steps {
                let w = step64::<BYTES, ZERO>(c.add(s * step), base, &sc, &ze);
                for (i, w) in w.into_iter().enumerate() {
                    _mm512_storeu_ps(o.add(s * 64 + 16 * i), w);
                }
            }
        }
    }

    /// A run's base table, 4 vectors of scales, and of zero points (zeros if none).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn params64<const ZERO: bool>(run: &Run) -> (__m512, [__m512; 4], [__m512; 4]) {
        assert!(run.scale.len() >= 64 && run.zero.is_none_or(|z| z.len() >= 64));
        let zero = run.zero.unwrap_or(run.scale);
        // SAFETY: `base` holds 16 floats, `scale` and `zero` 64 (asserted).
        unsafe {
            let (s, z) = (run.scale.as_ptr(), zero.as_ptr());
            let mut sc = [_mm512_setzero_ps(); 4];
            let mut ze = [_mm512_setzero_ps(); 4];
            for v in 0..4 {
                sc[v] = _mm512_loadu_ps(s.add(16 * v));
                if ZERO {
                    ze[v] = _mm512_loadu_ps(z.add(16 * v));
                }
            }
            (_mm512_loadu_ps(run.base.as_ptr()), sc, ze)
        }
    }

    /// The 64 weights of the step at `p` (32 nibble bytes or 64 code bytes), exactly
    /// `(v − z)·s` or `v·s` with `v` the base table's entry or the byte.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `p` readable for one step.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn step64<const BYTES: bool, const ZERO: bool>(
        p: *const u8,
        base: __m512,
        sc: &[__m512; 4],
        ze: &[__m512; 4],
    ) -> [__m512; 4] {
        // SAFETY: one step of bytes at `p` (the caller's contract).
        let v = unsafe {
            if BYTES {
                let f = |o: usize| {
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                        p.add(o) as *const __m128i
                    )))
                };
                [f(0), f(16), f(32), f(48)]
            } else {
                let e0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                let e1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
                [
                    _mm512_permutexvar_ps(e0, base),
                    _mm512_permutexvar_ps(e1, base),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(e0), base),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(e1), base),
                ]
            }
        };
        let mut w = v;
        for i in 0..4 {
            w[i] = if ZERO {
                _mm512_mul_ps(_mm512_sub_ps(v[i], ze[i]), sc[i])
            } else {
                _mm512_mul_ps(v[i], sc[i])
            };
        }
        w
    }

    /// `R` (1–4) activation rows times columns `p0 .. p0 + kc` of tile `t`, decoding the
    /// tile's panel on the way: `panel` gets exactly what [`decode64`] writes, and
    /// `c[r·ldc + j] (+)= Σ_{q < kc} x[r·ldx + q] · panel[q·64 + j]` for `r < R`, `j < cols`
    /// (`+=` when `accumulate`), summed in `q` order from zero as the f32 GEMM's register
    /// tile sums. The decoding's stores and shuffles run beside this pass's FMAs instead of
    /// on their own (separately they cost ~3.5% of MNIST's batch-64 layers).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL; `c` valid for reads and writes at `r·ldc + j`
    /// (`r < R`, `j < cols`), by this thread alone (the rest is asserted).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn decode_mul64<const R: usize>(
        tc: &TileCodes,
        (t, p0, kc): (usize, usize, usize),
        panel: &mut [f32],
        x: &[f32],
        ldx: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        // SAFETY: AVX-512 and `c` per the caller.
        unsafe {
            match (tc.bytes, !tc.zero.is_empty()) {
                (false, false) => decode_mul64_with::<R, false, false>(
                    tc,
                    (t, p0, kc),
                    panel,
                    x,
                    ldx,
                    c,
                    ldc,
                    cols,
                    accumulate,
                ),
                (false, true) => decode_mul64_with::<R, false, true>(
                    tc,
                    (t, p0, kc),
                    panel,
                    x,
                    ldx,
                    c,
                    ldc,
                    cols,
                    accumulate,
                ),
                (true, false) => decode_mul64_with::<R, true, false>(
                    tc,
                    (t, p0, kc),
                    panel,
                    x,
                    ldx,
                    c,
                    ldc,
                    cols,
                    accumulate,
                ),
                (true, true) => decode_mul64_with::<R, true, true>(
                    tc,
                    (t, p0, kc),
                    panel,
                    x,
                    ldx,
                    c,
                    ldc,
                    cols,
                    accumulate,
                ),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn decode_mul64_with<const R: usize, const BYTES: bool, const ZERO: bool>(
        tc: &TileCodes,
        (t, p0, kc): (usize, usize, usize),
        panel: &mut [f32],
        x: &[f32],
        ldx: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        assert!(tc.nr == 64 && tc.bytes == BYTES && (1..=4).contains(&R));
        assert!(panel.len() >= kc * 64 && cols <= 64 && ldc >= cols && ldx >= kc);
        assert!(x.len() >= (R - 1) * ldx + kc);
        let step = if BYTES { 64 } else { 32 };
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let (xp, out) = (x.as_ptr(), panel.as_mut_ptr());
        let mut p = p0;
        while p < p0 + kc {
            let (run, end) = tc.run(t, p, p0 + kc);
            assert!(run.zero.is_some() == ZERO && run.codes.len() == (end - p) * step);
            let (base, sc, ze) = params64::<ZERO>(&run);
            for q in p - p0..end - p0 {
                // SAFETY: step q − (p − p0) of `run` is inside its codes (asserted); panel
                // row q < kc and activation column q < kc of rows r < R are inside `panel`
                // and `x` (asserted above).
                unsafe {
                    let w = step64::<BYTES, ZERO>(
                        run.codes.as_ptr().add((q - (p - p0)) * step),
                        base,
                        &sc,
                        &ze,
                    );
                    for (i, &w) in w.iter().enumerate() {
                        _mm512_storeu_ps(out.add(q * 64 + 16 * i), w);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = _mm512_set1_ps(*xp.add(r * ldx + q));
                        for i in 0..4 {
                            acc[i] = _mm512_fmadd_ps(a, w[i], acc[i]);
                        }
                    }
                }
            }
            p = end;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &sum) in acc.iter().enumerate() {
                let left = cols.saturating_sub(16 * v).min(16);
                if left == 0 {
                    break;
                }
                let mask: __mmask16 = if left == 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                // SAFETY: only the `left` columns of this vector of row r < R, inside the
                // caller's bounds on `c`.
                unsafe {
                    let at = c.add(r * ldc + 16 * v);
                    let sum = if accumulate {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), sum)
                    } else {
                        sum
                    };
                    _mm512_mask_storeu_ps(at, mask, sum);
                }
            }
        }
    }

    /// 16 lanes a step (AVX2): nibbles are 8 bytes, byte `j` lanes `j` and `j + 8`, looked
    /// up by two permutes and a blend ([`crate::nn::kernels::lowbit`]'s `lookup16`).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn decode16(run: &Run, out: &mut [f32]) {
        let step = if run.bytes { 16 } else { 8 };
        let steps = run.codes.len() / step;
        assert!(run.codes.len() == steps * step && out.len() >= steps * 16);
        assert!(run.scale.len() >= 16 && run.zero.is_none_or(|z| z.len() >= 16));
        // SAFETY (whole body): as in `decode64` with 16 lanes a step.
        unsafe {
            let (t0, t1) = (
                _mm256_loadu_ps(run.base.as_ptr()),
                _mm256_loadu_ps(run.base.as_ptr().add(8)),
            );
            let sc = [
                _mm256_loadu_ps(run.scale.as_ptr()),
                _mm256_loadu_ps(run.scale.as_ptr().add(8)),
            ];
            let ze = run.zero.map(|z| {
                [
                    _mm256_loadu_ps(z.as_ptr()),
                    _mm256_loadu_ps(z.as_ptr().add(8)),
                ]
            });
            let (c, o) = (run.codes.as_ptr(), out.as_mut_ptr());
            for s in 0..steps {
                let p = c.add(s * step);
                let v = if run.bytes {
                    [
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            p as *const __m128i,
                        ))),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            p.add(8) as *const __m128i
                        ))),
                    ]
                } else {
                    let e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
                    [
                        super::super::x86::lookup16(e, t0, t1),
                        super::super::x86::lookup16(_mm256_srli_epi32::<4>(e), t0, t1),
                    ]
                };
                for (i, v) in v.into_iter().enumerate() {
                    let w = match ze {
                        Some(z) => _mm256_mul_ps(_mm256_sub_ps(v, z[i]), sc[i]),
                        None => _mm256_mul_ps(v, sc[i]),
                    };
                    _mm256_storeu_ps(o.add(s * 16 + 8 * i), w);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every layout kind, decoded on every path, is bit for bit `LowBit::weight` (ragged
    /// rows and columns, depth blocks starting mid-segment).
    #[test]
    fn decoded_panels_equal_the_weights_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let table: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.3) / 7.0);
        let mut cases: Vec<LowBit> = Vec::new();
        for &(rows, cols, group, bits, signed, affine) in &[
            (70usize, 784usize, 64usize, 4u8, true, false),
            (37, 100, 32, 4, false, true),
            (9, 200, 64, 3, true, false),
            (130, 77, 0, 2, false, true),
            (17, 300, 96, 8, true, true),
            (5, 45, 45, 6, false, false),
        ] {
            let qmin: i32 = if signed { -(1 << (bits - 1)) } else { 0 };
            let qmax = qmin + (1 << bits) - 1;
            let codes: Vec<u8> = (0..rows * cols)
                .map(|_| rng.gen_range(qmin..=qmax) as u8)
                .collect();
            let np = match group {
                0 => 1,
                g if g >= cols => rows,
                g => rows * cols.div_ceil(g),
            };
            let scale: Vec<f32> = (0..np).map(|_| rng.gen_range(0.001..0.1)).collect();
            let zero: Vec<i32> = (0..np)
                .map(|_| {
                    if affine {
                        rng.gen_range(qmin..=qmax)
                    } else {
                        0
                    }
                })
                .collect();
            cases.push(
                LowBit::from_int(rows, cols, &codes, signed, bits, &scale, &zero, group).unwrap(),
            );
        }
        let real: Vec<f32> = (0..13 * 4).map(|_| rng.gen_range(-1.0..17.0)).collect();
        let codes: Vec<u8> = (0..13 * 256).map(|_| rng.gen_range(0..16)).collect();
        cases.push(
            LowBit::from_int_real_zero(13, 256, &codes, false, 4, &[0.03; 52], &real, 64).unwrap(),
        );
        for &(rows, cols, bs) in &[(70usize, 784usize, 64usize), (33, 100, 32), (20, 256, 128)] {
            let len = rows * cols;
            let packed: Vec<u8> = (0..len.div_ceil(2)).map(|_| rng.gen()).collect();
            let absmax: Vec<f32> = (0..len.div_ceil(bs))
                .map(|_| rng.gen_range(0.1..3.0))
                .collect();
            cases.push(LowBit::from_table(rows, cols, &packed, &table, &absmax, bs).unwrap());
        }
        for lb in &cases {
            for isa in Isa::available() {
                let nr = gemm_f32::panel_width(isa);
                let tc = TileCodes::new(lb, nr);
                let (rows, cols) = lb.shape();
                for t in 0..tc.tiles {
                    // The whole depth, and a block from a column inside a segment.
                    for (p0, kc) in [(0, cols), (cols / 3 + 1, cols - cols / 3 - 1)] {
                        let mut panel = vec![f32::NAN; kc * nr];
                        tc.decode(isa, t, p0, kc, &mut panel);
                        for q in 0..kc {
                            for j in 0..nr {
                                let (o, got) = (t * nr + j, panel[q * nr + j]);
                                let what =
                                    format!("{lb:?} {isa:?} tile {t} column {} lane {j}", p0 + q);
                                if o < rows {
                                    assert_eq!(
                                        got.to_bits(),
                                        lb.weight(o, p0 + q).to_bits(),
                                        "{what}"
                                    );
                                } else {
                                    // Padding lanes: a code times scale 0 (either sign).
                                    assert_eq!(got, 0.0, "{what}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
