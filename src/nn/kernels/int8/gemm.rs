//! The int8 GEMM driver: `y[i, j] = sa[i] · sw[j] · (Σ_k a[i, k] · W[j, k] − za[i] · Σ_k W[j, k]) + b[j]`.
//!
//! Work is cut into tiles of up to [`MR`] activation rows × [`NP`] weight panels (64 output
//! channels); a micro-kernel computes a tile's i32 sums over the whole depth and the
//! epilogue turns them into f32 outputs while they are still in cache. Tiles run panel
//! group by panel group, so one group of packed weights (64 · kp bytes) stays in L2 while
//! every row block streams past it. Large products are split over threads: by rows when
//! there are enough of them (each thread writes whole output rows), else by panels (GEMV).
//!
//! Decode (at most [`MR`] rows, weights too large for the caches to hold them from one
//! token to the next) walks the weight one panel at a time instead, as the GGML
//! panel kernels do (`ggml_blocks::panels`): the packed bytes are then read in strictly
//! ascending addresses, one stream per thread, and the threads split the panels from about
//! the same size on as there ([`PAR_MIN_WORK_DECODE`]). The integer sums and the epilogue
//! are the same, so the outputs are bit-identical to the tiled walk.

use super::act::ActRows;
use super::pack::{PackedI8, KGROUP, PANEL};
use crate::nn::kernels::Isa;
use rayon::prelude::*;

/// Most activation rows per tile.
pub(super) const MR: usize = 4;
/// Most 16-channel panels per tile.
pub(super) const NP: usize = 4;
/// i32 sums of one tile: `acc[r][p · 16 + c]`.
pub(super) type Acc = [[i32; NP * PANEL]; MR];

/// Products (m · n · kp multiply-adds) below this run on the calling thread: on the MNIST
/// and SmolLM2 shapes (benches/int8_kernels.rs) a rayon split costs more than it saves
/// below roughly this size.
const PAR_MIN_WORK: usize = 1 << 19;
/// The same for a few rows (split by panels: GEMV while decoding). Higher, because between
/// small GEMVs candle's own worker threads still hold the cores: SmolLM2 decoding measured
/// 36–38 tokens/s splitting from 2^19, 43–62 from 2^22 and 43–47 never splitting (loaded
/// 2-core machine, same run), so only the largest (the LM head) are split.
const PAR_MIN_WORK_FEW_ROWS: usize = 1 << 22;
/// The same for the decode walk (at most [`MR`] rows). The GGML panel kernels split from
/// 2^17, and SmolLM2's w:i8 layers with q8 activations decode on them at 183–190 tokens/s
/// (idle machine, two threads), while this kernel, split only from 2^22 (the output
/// layer), decoded at 107–125 on the same shapes. 2^18 splits every SmolLM2 and Marian
/// layer (≥ 512·512, weights streamed from memory while decoding) but none of the MNIST
/// MLP's (≤ 784·256, in cache, ~2 µs a call at batch 1: a rayon round trip costs more).
const PAR_MIN_WORK_DECODE: usize = 1 << 18;

/// The driver's thresholds: the constants above unless `QUANTLAB_INT8_TUNE` says otherwise
/// (`walk_rows=4,walk_bytes=262144,split_decode=262144,split_few=4194304,split_rows=524288`,
/// any subset, read once), for A/B timing of one binary on whole models
/// (`examples/marian_cpu_time`, `quantlab bench`). They choose the walk order and the
/// thread split only, never the arithmetic: the outputs are the same bits whatever they say.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    /// Products of at most this many rows walk weights of at least `walk_bytes` one panel
    /// at a time (module doc) and split over threads from `split_decode` multiply-adds.
    walk_rows: usize,
    walk_bytes: usize,
    split_decode: usize,
    /// Split point of the other products of too few rows to split by rows.
    split_few: usize,
    /// Split point of products split by rows.
    split_rows: usize,
}

impl Tuning {
    fn get() -> &'static Tuning {
        static T: std::sync::OnceLock<Tuning> = std::sync::OnceLock::new();
        T.get_or_init(|| {
            let mut t = Tuning {
                walk_rows: MR,
                walk_bytes: PAR_MIN_WORK_DECODE,
                split_decode: PAR_MIN_WORK_DECODE,
                split_few: PAR_MIN_WORK_FEW_ROWS,
                split_rows: PAR_MIN_WORK,
            };
            if let Ok(spec) = std::env::var("QUANTLAB_INT8_TUNE") {
                t.apply(&spec);
                eprintln!("int8 kernel thresholds (QUANTLAB_INT8_TUNE): {t:?}");
            }
            t
        })
    }

    /// Applies `key=value,…`; a malformed item is reported and skipped (a timing knob
    /// must not stop a run).
    fn apply(&mut self, spec: &str) {
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let Some((key, Ok(value))) = item.split_once('=').map(|(k, v)| (k, v.parse())) else {
                eprintln!("QUANTLAB_INT8_TUNE: '{item}' is not key=integer, ignored");
                continue;
            };
            match key {
                "walk_rows" => self.walk_rows = value,
                "walk_bytes" => self.walk_bytes = value,
                "split_decode" => self.split_decode = value,
                "split_few" => self.split_few = value,
                "split_rows" => self.split_rows = value,
                _ => eprintln!(
                    "QUANTLAB_INT8_TUNE: unknown key '{key}' (walk_rows, walk_bytes, split_decode, split_few, split_rows), ignored"
                ),
            }
        }
    }
}

/// What a micro-kernel reads: `nr` activation rows of `stride` bytes and `np` packed panels
/// of `panel_stride` bytes, summed over `groups` groups of four k positions.
pub(super) struct Tile<'a> {
    pub a: &'a [u8],
    pub stride: usize,
    pub w: &'a [i8],
    pub panel_stride: usize,
    pub groups: usize,
}

impl Tile<'_> {
    /// The bounds every micro-kernel relies on for `nr` rows and `np` panels (asserted
    /// before any raw-pointer loop).
    pub fn check(&self, nr: usize, np: usize) {
        assert!(
            (1..=MR).contains(&nr) && (1..=NP).contains(&np),
            "tile shape"
        );
        assert!(self.stride >= self.groups * KGROUP && self.panel_stride >= self.groups * 64);
        assert!(self.a.len() >= (nr - 1) * self.stride + self.groups * KGROUP);
        assert!(self.w.len() >= (np - 1) * self.panel_stride + self.groups * 64);
    }
}

/// The product with the path [`Isa::selected`] names.
pub fn gemm_u8_i8_f32(
    a: &ActRows,
    w: &PackedI8,
    w_scale: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    gemm_u8_i8_f32_with(Isa::selected(), a, w, w_scale, bias)
}

/// The product with a given path: `[a.m, w.n]` f32, row-major. Panics if `isa` is not one
/// this CPU runs or the operands do not fit each other (callers build them from one shape).
pub fn gemm_u8_i8_f32_with(
    isa: Isa,
    a: &ActRows,
    w: &PackedI8,
    w_scale: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(
        isa <= Isa::detected(),
        "kernel path {} not available",
        isa.name()
    );
    assert!(
        a.k == w.k && a.stride == w.kp,
        "activation rows do not fit the weight"
    );
    assert!(a.codes.len() == a.m * a.stride && a.scale.len() == a.m && a.zero_point.len() == a.m);
    assert_eq!(w_scale.len(), w.n, "one weight scale per output channel");
    assert!(
        bias.is_none_or(|b| b.len() == w.n),
        "one bias per output channel"
    );
    let (m, n) = (a.m, w.n);
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let job = Job {
        isa,
        a,
        w,
        w_scale,
        bias,
    };
    let panels = w.panels();
    let threads = rayon::current_num_threads();
    let work = m * n * w.kp;
    let tune = Tuning::get();
    let by_rows = m >= 2 * MR * threads;
    let min_work = if by_rows {
        tune.split_rows
    } else if m <= tune.walk_rows {
        tune.split_decode
    } else {
        tune.split_few
    };
    if threads < 2 || work < min_work {
        job.run(0..m, 0..panels, &mut out, n, 0);
    } else if by_rows {
        // Whole output rows per task, in multiples of MR, a few tasks per thread.
        let rows = m.div_ceil(2 * threads).next_multiple_of(MR);
        out.par_chunks_mut(rows * n).enumerate().for_each(|(t, o)| {
            let r0 = t * rows;
            job.run(r0..(r0 + rows).min(m), 0..panels, o, n, 0)
        });
    } else {
        // Few rows: split the panels; each task fills its own columns, copied in after.
        // Decode: a few ranges per thread, as the GGML panels (a thread that finishes
        // early takes another).
        let tasks = if m <= tune.walk_rows {
            4 * threads
        } else {
            2 * threads
        };
        let per = panels.div_ceil(tasks).max(1);
        let firsts: Vec<usize> = (0..panels).step_by(per).collect();
        let parts: Vec<Vec<f32>> = firsts
            .par_iter()
            .map(|&p0| {
                let p1 = (p0 + per).min(panels);
                let width = (p1 * PANEL).min(n) - p0 * PANEL;
                let mut part = vec![0f32; m * width];
                job.run(0..m, p0..p1, &mut part, width, p0 * PANEL);
                part
            })
            .collect();
        for (&p0, part) in firsts.iter().zip(&parts) {
            let width = part.len() / m;
            for (dst, src) in out.chunks_exact_mut(n).zip(part.chunks_exact(width)) {
                dst[p0 * PANEL..p0 * PANEL + width].copy_from_slice(src);
            }
        }
    }
    out
}

struct Job<'a> {
    isa: Isa,
    a: &'a ActRows,
    w: &'a PackedI8,
    w_scale: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl Job<'_> {
    /// Rows `rows` × panels `panels` into `out`, whose row 0 is activation row `rows.start`,
    /// with `ldo` floats per row, and whose column 0 is output channel `col0`.
    fn run(
        &self,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        out: &mut [f32],
        ldo: usize,
        col0: usize,
    ) {
        let (stride, ps) = (self.a.stride, self.w.panel_stride());
        let mut acc: Acc = [[0; NP * PANEL]; MR];
        // Decode walks one panel at a time (module doc) through weights that stream from
        // memory; small ones (MNIST's layers, in cache) keep the tiles, whose activation
        // broadcasts serve four panels: measured 0.0050-0.0052 ms against 0.0055-0.0056
        // walking (MNIST lab, dynamic int8 batch-1 p50, three alternating runs each).
        let tune = Tuning::get();
        let walk = rows.len() <= tune.walk_rows && self.w.n * self.w.kp >= tune.walk_bytes;
        let step = if walk { 1 } else { NP };
        for p0 in panels.clone().step_by(step) {
            let np = step.min(panels.end - p0);
            for r0 in rows.clone().step_by(MR) {
                let nr = MR.min(rows.end - r0);
                let tile = Tile {
                    a: &self.a.codes[r0 * stride..(r0 + nr) * stride],
                    stride,
                    w: &self.w.data()[p0 * ps..(p0 + np) * ps],
                    panel_stride: ps,
                    groups: self.w.kp / KGROUP,
                };
                block(self.isa, &tile, nr, np, &mut acc);
                for (r, sums) in acc.iter().enumerate().take(nr) {
                    let i = r0 + r;
                    let o = &mut out[(i - rows.start) * ldo..(i - rows.start + 1) * ldo];
                    self.epilogue(i, p0, np, sums, o, col0);
                }
            }
        }
    }

    /// Row `i`'s sums for panels `p0..p0 + np` rescaled into `o` (the row's output, whose
    /// column 0 is channel `col0`): `(sa · sw[j]) · (acc − za · Σw[j]) as f32 (+ b[j])`,
    /// the same float operations in the same order as the scalar definition.
    fn epilogue(&self, i: usize, p0: usize, np: usize, sums: &[i32], o: &mut [f32], col0: usize) {
        let (sa, za) = (self.a.scale[i], self.a.zero_point[i]);
        let n = self.w.n;
        for p in 0..np {
            let j = (p0 + p) * PANEL;
            let cnt = PANEL.min(n - j);
            let s = &sums[p * PANEL..p * PANEL + cnt];
            let (sw, rs) = (&self.w_scale[j..j + cnt], &self.w.row_sum[j..j + cnt]);
            let b = self.bias.map(|b| &b[j..j + cnt]);
            let d = &mut o[j - col0..j - col0 + cnt];
            if cnt == PANEL {
                // Fixed-size views: the compiler vectorises the 16 lanes without alias checks.
                let (s, sw, rs, d) = (fixed(s), fixed(sw), fixed(rs), fixed_mut(d));
                rescale(s, sa, za, sw, rs, b.map(fixed), d);
            } else {
                rescale(s, sa, za, sw, rs, b, d);
            }
        }
    }
}

fn fixed<T>(v: &[T]) -> &[T; PANEL] {
    v.try_into().expect("a full panel")
}

fn fixed_mut<T>(v: &mut [T]) -> &mut [T; PANEL] {
    v.try_into().expect("a full panel")
}

/// `d[c] = sa · sw[c] · (s[c] − za · rs[c]) as f32 (+ b[c])`, i32 arithmetic wrapping like
/// the SIMD sums.
#[inline(always)]
fn rescale<S, F, D>(s: &S, sa: f32, za: i32, sw: &F, rs: &S, b: Option<&F>, d: &mut D)
where
    S: AsRef<[i32]> + ?Sized,
    F: AsRef<[f32]> + ?Sized,
    D: AsMut<[f32]> + ?Sized,
{
    let (s, sw, rs, d) = (s.as_ref(), sw.as_ref(), rs.as_ref(), d.as_mut());
    match b {
        Some(b) => {
            let b = b.as_ref();
            for c in 0..d.len() {
                let centred = s[c].wrapping_sub(za.wrapping_mul(rs[c]));
                d[c] = sa * sw[c] * centred as f32 + b[c];
            }
        }
        None => {
            for c in 0..d.len() {
                let centred = s[c].wrapping_sub(za.wrapping_mul(rs[c]));
                d[c] = sa * sw[c] * centred as f32;
            }
        }
    }
}

/// One tile's sums with the given path.
pub(super) fn block(isa: Isa, t: &Tile, nr: usize, np: usize, acc: &mut Acc) {
    t.check(nr, np);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `gemm_u8_i8_f32_with` asserted isa <= Isa::detected(), so the CPU has
        // AVX-512 F/BW/VL + VNNI; the tile's bounds were checked just above.
        Isa::Avx512 => unsafe { super::avx512::block(t, nr, np, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, the CPU has AVX2; bounds checked.
        Isa::Avx2 => unsafe { super::avx2::block(t, nr, np, acc) },
        _ => super::portable::block(t, nr, np, acc),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_applies_known_keys_and_skips_malformed_items() {
        let mut t = Tuning {
            walk_rows: MR,
            walk_bytes: 1,
            split_decode: 2,
            split_few: 3,
            split_rows: 4,
        };
        t.apply("walk_rows=2,bogus,split_few=7,,zzz=1,split_rows=x");
        assert_eq!(t.walk_rows, 2);
        assert_eq!(t.split_few, 7);
        // Untouched: not named, or named with a value that is not an integer.
        assert_eq!((t.walk_bytes, t.split_decode, t.split_rows), (1, 2, 4));
    }
}
