//! f32 building blocks of a decoder forward pass on the CPU, on plain slices: RMSNorm,
//! SiLU·mul, rotary embeddings in place, causal attention over a per-head KV cache without
//! a mask tensor or repeated key/value heads, and log-softmax.
//!
//! Each computes the same formula as the candle op it replaces (`candle_nn::ops::rms_norm`,
//! `silu`, `rotary_emb::rope_i` / `rope`, `softmax_last_dim`, `log_softmax`), in the same
//! order of operations per element, with two deliberate differences: sums are taken in
//! another order, and `exp` is [`exp`] below (a polynomial within 2 ulp of the true value,
//! which the compiler vectorises) instead of libm's `expf` (within 1 ulp), which cannot be
//! vectorised and cost more than the attention products themselves. Masked attention
//! scores are skipped rather than added as −∞ (their weight is exactly 0 either way).
//!
//! The loops are written so the compiler vectorises them at the build's baseline
//! (x86-64-v3: AVX2 + FMA); the matrix products go through `gemm_f32`, which picks its
//! path at run time.

use super::gemm_f32::{panel_width, PackedWeight, Region};
use super::{Isa, SendPtr};
use rayon::prelude::*;

mod decode_attention;

/// `e^x` in f32 within 2 ulp over the range where the result is a normal number; 0 below
/// it (libm returns subnormals there: below 1.2e-38, nothing these ops can see), +inf above
/// `ln(f32::MAX)`, NaN for NaN. Cody–Waite reduction `x = n·ln2 + r` with `ln2` split in two,
/// then Cephes' degree-6 polynomial for `e^r` on `|r| ≤ ln2 / 2`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const HI: f32 = 88.376_26; // ln(f32::MAX), rounded down
    const LO: f32 = -87.336_55; // ln(f32::MIN_POSITIVE)
    let xc = x.clamp(LO, HI);
    // Round to nearest with the 1.5·2²³ trick (exact for |t| < 2²²; vectorises, unlike round()).
    let t = xc * std::f32::consts::LOG2_E;
    let big = t + 12_582_912.0;
    let n = big - 12_582_912.0;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * (r * r) + r + 1.0;
    // `n` as an integer, read from the low mantissa bits of `big` (1.5·2²³ + n has the bits
    // 0x4B40_0000 + n for |n| < 2²²; here |n| ≤ 128): the same value as `n as i32`, whose
    // saturating conversion the compiler would not vectorise (a scalar convert per lane).
    let ni = (big.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scaled = e * f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else if x.is_nan() {
        x
    } else {
        scaled
    }
}

/// Sum in eight lanes (vectorises; the order differs from a left-to-right sum).
#[inline]
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// The largest element, −∞ for none; NaN elements are passed over, as `f32::max` does.
/// Sixteen lanes: `fold(f32::NEG_INFINITY, f32::max)` is one dependent chain of
/// compare-and-blend steps per element, which the compiler cannot split (it may not
/// reorder the fold), and it cost more than the exponentials in the softmax of attention
/// and of the output layer. The same value as that fold, since a maximum does not depend
/// on the order it is taken in (a tie between −0 and +0 may give either zero, as
/// `f32::max` may: both give the same differences `x − max`).
#[inline]
pub fn max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            // `x > a` is false for a NaN `x`: skipped.
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Sum of squares in eight lanes.
#[inline]
fn sum_sq(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|x| x * x).sum::<f32>()
}

/// Row-wise RMSNorm of `x` (rows of `w.len()`): `x / sqrt(mean(x²) + eps) · w`, as candle.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "rms_norm: rows of {d}");
    let mut out = vec![0f32; x.len()];
    let row = |(src, dst): (&[f32], &mut [f32])| {
        let m = (sum_sq(src) / d as f32 + eps).sqrt();
        for ((o, &s), &a) in dst.iter_mut().zip(src).zip(w) {
            *o = s / m * a;
        }
    };
    if x.len() >= 1 << 15 {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(row);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(row);
    }
    out
}

/// `x += y` elementwise (a residual connection), split over rayon's threads for a
/// prefill's rows: one pass over `t × hidden` values between two parallel products, which
/// on one thread left the other idle (60 per SmolLM2 chunk). The same sums in any split.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_in_place: lengths");
    pairwise_split(x, y, |a, b| *a += b);
}

/// `g ← silu(g) · u` with `silu(v) = v / (1 + e^-v)`, as candle.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu_mul: lengths");
    pairwise_split(g, u, |a, b| *a = *a / (1.0 + exp(-*a)) * b);
}

/// `f(a[i], b[i])` for every `i`, in chunks of 4096 over rayon's threads from 32K values
/// (a prefill's rows), in order on the calling thread below (a decode step's one row).
fn pairwise_split(a: &mut [f32], b: &[f32], f: impl Fn(&mut f32, f32) + Sync) {
    let run = |(a, b): (&mut [f32], &[f32])| {
        for (x, &y) in a.iter_mut().zip(b) {
            f(x, y);
        }
    };
    if a.len() >= 1 << 15 {
        a.par_chunks_mut(4096).zip(b.par_chunks(4096)).for_each(run);
    } else {
        run((a, b));
    }
}

/// How rotary embeddings pair a head's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairs {
    /// `(2i, 2i+1)` (GGUF's permuted q/k; candle's `rope_i`).
    Adjacent,
    /// `(i, i + d/2)` (Hugging Face; candle's `rope`).
    Halves,
}

/// Rotates `x` (`rows` of `heads · hd`, row `r` at position `pos0 + r`) in place; `cos` and
/// `sin` are `[positions, hd/2]` tables.
pub fn rope(
    x: &mut [f32],
    heads: usize,
    hd: usize,
    pos0: usize,
    cos: &[f32],
    sin: &[f32],
    pairs: RopePairs,
) {
    let (half, width) = (hd / 2, heads * hd);
    assert!(hd.is_multiple_of(2) && width > 0 && x.len().is_multiple_of(width));
    let rows = x.len() / width;
    assert!(cos.len() >= (pos0 + rows) * half && sin.len() >= (pos0 + rows) * half);
    let rotate = |(r, row): (usize, &mut [f32])| rotate_row(row, hd, pos0 + r, cos, sin, pairs);
    // A prefill's rows in parallel (each row is rotated independently).
    if x.len() >= 1 << 15 {
        x.par_chunks_exact_mut(width).enumerate().for_each(rotate);
    } else {
        x.chunks_exact_mut(width).enumerate().for_each(rotate);
    }
}

/// [`rope`] of the queries `q` (`nh` heads) and the keys `k` (`nkv` heads) of the same rows
/// in one pass: a prefill splits over the threads once instead of twice. The same
/// rotation of every row as two calls of [`rope`].
#[allow(clippy::too_many_arguments)]
pub fn rope_qk(
    q: &mut [f32],
    nh: usize,
    k: &mut [f32],
    nkv: usize,
    hd: usize,
    pos0: usize,
    cos: &[f32],
    sin: &[f32],
    pairs: RopePairs,
) {
    let (half, wq, wk) = (hd / 2, nh * hd, nkv * hd);
    assert!(
        hd.is_multiple_of(2) && wq > 0 && wk > 0,
        "rope_qk: head sizes"
    );
    assert!(
        q.len().is_multiple_of(wq) && k.len() / wk == q.len() / wq && k.len().is_multiple_of(wk),
        "rope_qk: rows"
    );
    if q.len() + k.len() < 1 << 15 {
        rope(q, nh, hd, pos0, cos, sin, pairs);
        rope(k, nkv, hd, pos0, cos, sin, pairs);
        return;
    }
    let rows = q.len() / wq;
    assert!(cos.len() >= (pos0 + rows) * half && sin.len() >= (pos0 + rows) * half);
    q.par_chunks_exact_mut(wq)
        .zip(k.par_chunks_exact_mut(wk))
        .enumerate()
        .for_each(|(r, (qr, kr))| {
            rotate_row(qr, hd, pos0 + r, cos, sin, pairs);
            rotate_row(kr, hd, pos0 + r, cos, sin, pairs);
        });
}

/// One row's heads (`hd` features each) rotated to position `pos`.
fn rotate_row(row: &mut [f32], hd: usize, pos: usize, cos: &[f32], sin: &[f32], pairs: RopePairs) {
    let half = hd / 2;
    let c = &cos[pos * half..(pos + 1) * half];
    let s = &sin[pos * half..(pos + 1) * half];
    for h in row.chunks_exact_mut(hd) {
        for i in 0..half {
            let (a, b) = match pairs {
                RopePairs::Adjacent => (2 * i, 2 * i + 1),
                RopePairs::Halves => (i, i + half),
            };
            let (x0, x1) = (h[a], h[b]);
            h[a] = x0 * c[i] - x1 * s[i];
            h[b] = x0 * s[i] + x1 * c[i];
        }
    }
}

/// Keys and values of one layer, one `[len, hd]` row-major buffer per key/value head.
#[derive(Debug, Clone, Default)]
pub struct KvHeads {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl KvHeads {
    /// Appends rows of `k` and `v` (`rows` of `heads · hd`).
    pub fn append(&mut self, k: &[f32], v: &[f32], heads: usize, hd: usize) {
        if self.k.len() != heads {
            self.k = vec![Vec::new(); heads];
            self.v = vec![Vec::new(); heads];
        }
        for (src, dst) in [(k, &mut self.k), (v, &mut self.v)] {
            for row in src.chunks_exact(heads * hd) {
                for (h, d) in dst.iter_mut().enumerate() {
                    d.extend_from_slice(&row[h * hd..(h + 1) * hd]);
                }
            }
        }
    }

    /// Positions held.
    pub fn len(&self, hd: usize) -> usize {
        self.k.first().map_or(0, |k| k.len() / hd.max(1))
    }
}

/// Causal multi-head attention with grouped key/value heads: `q` is `t` rows of
/// `nh · hd` (query `i` at position `offset + i`), `kv` holds `offset + t` positions of
/// `nkv` heads. Returns `t` rows of `nh · hd`: for each head,
/// `softmax(q·Kᵀ · scale over keys ≤ own position) · V`, scores scaled then shifted by their
/// row maximum as candle's `softmax_last_dim` does.
pub fn causal_attention(
    q: &[f32],
    t: usize,
    nh: usize,
    hd: usize,
    kv: &KvHeads,
    offset: usize,
    scale: f32,
) -> Vec<f32> {
    let nkv = kv.k.len();
    assert!(nkv > 0 && nh.is_multiple_of(nkv), "attention heads");
    let total = offset + t;
    assert!(
        kv.len(hd) == total && q.len() == t * nh * hd,
        "attention sizes"
    );
    let rep = nh / nkv;
    let width = nh * hd;
    let mut y = vec![0f32; t * width];
    if t < 8 {
        let split = decode_attention::splits(t, nh, total, hd);
        decode_attention::decode_attention(q, t, nh, hd, kv, offset, scale, &mut y, split);
        return y;
    }
    let isa = Isa::selected();
    let nr = panel_width(isa);
    // Keys and values packed as separate tasks: 2·nkv of them (SmolLM2's 3 key/value
    // heads as 3 tasks kept one of 2 threads waiting for a third of the packing).
    let packed: Vec<PackedWeight> = (0..2 * nkv)
        .into_par_iter()
        .map(|i| {
            let g = i / 2;
            if i % 2 == 0 {
                PackedWeight::new(&kv.k[g], total, hd, nr)
            } else {
                PackedWeight::from_transposed(&kv.v[g], total, hd, nr)
            }
        })
        .collect();
    // Work items: (head, block of query rows); later blocks see more keys.
    const QB: usize = 48;
    let blocks = t.div_ceil(QB);
    let yp = SendPtr(y.as_mut_ptr());
    (0..nh * blocks).into_par_iter().for_each(|item| {
        let (h, b) = (item / blocks, item % blocks);
        let (i0, i1) = (b * QB, ((b + 1) * QB).min(t));
        let rows = i1 - i0;
        let keys = offset + i1; // keys seen by the block's last row
        let (pk, pv) = (&packed[2 * (h / rep)], &packed[2 * (h / rep) + 1]);
        let mut s = vec![0f32; rows * keys];
        Region {
            m: rows,
            n: keys,
            k: hd,
            parallel: false,
        }
        .run(isa, &q[i0 * width + h * hd..], width, pk, &mut s, keys);
        for (r, row) in s.chunks_exact_mut(keys).enumerate() {
            let own = offset + i0 + r + 1;
            for v in &mut row[..own] {
                *v *= scale;
            }
            softmax_in_place(&mut row[..own]);
            row[own..].fill(0.0);
        }
        let mut out = vec![0f32; rows * hd];
        Region {
            m: rows,
            n: hd,
            k: keys,
            parallel: false,
        }
        .run(isa, &s, keys, pv, &mut out, hd);
        for (r, o) in out.chunks_exact(hd).enumerate() {
            // SAFETY: this item alone writes row i0 + r, columns h*hd..(h+1)*hd of y
            // (t rows of `width`, i0 + r < t, (h+1)*hd <= width).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    o.as_ptr(),
                    yp.get().add((i0 + r) * width + h * hd),
                    hd,
                )
            };
        }
    });
    y
}

#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// `v ← exp(v - max) / Σ exp(v - max)`, as candle's `softmax_last_dim`.
pub fn softmax_in_place(v: &mut [f32]) {
    let max = max(v);
    for x in v.iter_mut() {
        *x = exp(*x - max);
    }
    let s = sum(v);
    for x in v.iter_mut() {
        *x /= s;
    }
}

/// Row-wise `log_softmax` of `x` (rows of `cols`): `(v - max) - ln Σ exp(v - max)`, as
/// candle's `log_softmax` (up to the `exp` and summation order described above).
pub fn log_softmax(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    log_softmax_into(x, &mut out, cols);
    out
}

/// Values from which [`log_softmax_into`] splits its rows over rayon's threads.
const LOG_SOFTMAX_PAR_MIN: usize = 1 << 15;

/// [`log_softmax`] into a buffer the caller reuses: beam search turns `[rows, vocab]`
/// logits (Marian: 128 × 15258 at batch 32, beam 4) into log-probabilities at every step,
/// where candle's op chain (six tensors, libm `expf`) and a `Vec` per row cost a quarter of
/// a dynamic-int8 decode. Panics if the lengths differ or are not whole rows (callers size
/// both from one shape).
pub fn log_softmax_into(src: &[f32], dst: &mut [f32], cols: usize) {
    assert!(
        cols > 0 && src.len() == dst.len() && src.len().is_multiple_of(cols),
        "log_softmax: {} and {} values, rows of {cols}",
        src.len(),
        dst.len()
    );
    // The exponentials are written into `dst` first: a plain map over `exp` vectorises;
    // summed as they are computed, the loop stays scalar.
    let row = |(src, dst): (&[f32], &mut [f32])| {
        let max = max(src);
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = exp(s - max);
        }
        let ln = sum(dst).ln();
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = (s - max) - ln;
        }
    };
    if src.len() >= LOG_SOFTMAX_PAR_MIN {
        src.par_chunks(cols)
            .zip(dst.par_chunks_mut(cols))
            .for_each(row);
    } else {
        src.chunks(cols).zip(dst.chunks_mut(cols)).for_each(row);
    }
}

/// The log-probability of each row's target, `log_softmax(x)[r, targets[r]]`, without the
/// `rows × cols` log-softmax tensor (perplexity needs one value per row of the 257 × 49152
/// logits). Bit-identical to [`log_softmax`] at the target: the same maximum, the same
/// `exp`, the sum of exponentials taken in the same eight lanes in the same order, the same
/// final subtraction. A target outside the row gives NaN (the caller checks finiteness).
pub fn target_log_probs(x: &[f32], cols: usize, targets: &[u32]) -> Vec<f32> {
    assert!(
        cols > 0 && x.len() == targets.len() * cols,
        "target_log_probs: {} rows of {cols}",
        targets.len()
    );
    let row = |(src, &t): (&[f32], &u32)| -> f32 {
        let Some(&at) = src.get(t as usize) else {
            return f32::NAN;
        };
        let max = max(src);
        // `sum` of the exponentials, lane by lane as it adds them.
        let mut acc = [0f32; 8];
        let chunks = src.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            let mut e = [0f32; 8];
            for (d, &v) in e.iter_mut().zip(c) {
                *d = exp(v - max);
            }
            for (a, &d) in acc.iter_mut().zip(&e) {
                *a += d;
            }
        }
        let mut tail = [0f32; 8];
        for (d, &v) in tail.iter_mut().zip(rest) {
            *d = exp(v - max);
        }
        let total = acc.iter().sum::<f32>() + tail[..rest.len()].iter().sum::<f32>();
        (at - max) - total.ln()
    };
    if x.len() >= 1 << 15 {
        x.par_chunks(cols)
            .zip(targets.par_iter())
            .map(row)
            .collect()
    } else {
        x.chunks(cols).zip(targets).map(row).collect()
    }
}

/// Output columns per work item of [`head_target_log_probs`]: 96 rows × 512 columns of
/// logits (192 KiB) are computed into a buffer that stays in L2 while their row maxima and
/// sums of exponentials are taken. Fixed (not derived from the thread count), so the
/// result does not depend on the machine's cores.
const HEAD_COLS: usize = 512;

/// Rows per work item of [`head_target_log_probs`] (the GEMM's row block).
const HEAD_ROWS: usize = 96;

/// `target_log_probs(x · Wᵀ, n, targets)` without the `[m, n]` logits: the output layer's
/// product and the log-softmax at each row's target fused. Each work item multiplies a
/// block of rows by a slice of `HEAD_COLS` columns into a cache-resident buffer and keeps,
/// per row, the slice's maximum `m_g`, `s_g = Σ exp(v − m_g)` and the target's logit; then
/// `log p = (v_t − M) − ln Σ_g s_g · exp(m_g − M)` with `M = max_g m_g`. For perplexity
/// (257 × 576 × 49152 per SmolLM2 chunk) this skips writing 50 MB of logits and reading
/// them back.
///
/// The logits are bit-identical to [`gemm_f32::matmul_with`]'s (same tiles); the
/// logsumexp differs from [`target_log_probs`] by summation order and one rounding per
/// slice (`s_g · exp(m_g − M)`): a few ulp of the sum, well under 1e-6 in the
/// log-probability (tested against f64). A target outside the row gives NaN.
///
/// [`gemm_f32::matmul_with`]: super::gemm_f32::matmul_with
pub fn head_target_log_probs(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    targets: &[u32],
) -> Vec<f32> {
    let (n, k) = (w.n(), w.k());
    assert_eq!(
        targets.len(),
        m,
        "head_target_log_probs: one target per row"
    );
    assert!(x.len() >= m * k, "head_target_log_probs: {m} rows of {k}");
    let nr = w.nr();
    let per = (HEAD_COLS / nr).max(1);
    let gcols = per * nr;
    let groups = n.div_ceil(gcols);
    let row_blocks = m.div_ceil(HEAD_ROWS);
    if m == 0 || groups == 0 {
        return vec![f32::NAN; m];
    }
    let mut maxes = vec![f32::NEG_INFINITY; m * groups];
    let mut sums = vec![0f32; m * groups];
    let mut at = vec![f32::NAN; m];
    let (mp, sp, ap) = (
        SendPtr(maxes.as_mut_ptr()),
        SendPtr(sums.as_mut_ptr()),
        SendPtr(at.as_mut_ptr()),
    );
    let item = |buf: &mut Vec<f32>, item: usize| {
        // Row blocks inner: consecutive items reuse the same weight slice.
        let (g, rb) = (item / row_blocks, item % row_blocks);
        let (r0, r1) = (rb * HEAD_ROWS, ((rb + 1) * HEAD_ROWS).min(m));
        let c0 = g * gcols;
        let cols = gcols.min(n - c0);
        super::gemm_f32::matmul_panels(
            isa,
            &x[r0 * k..],
            r1 - r0,
            k,
            w,
            (g * per, (g + 1) * per),
            buf,
            gcols,
        );
        for r in r0..r1 {
            let v = &mut buf[(r - r0) * gcols..(r - r0) * gcols + cols];
            let t = targets[r] as usize;
            let target = (c0..c0 + cols).contains(&t).then(|| v[t - c0]);
            let mx = max(v);
            // The exponentials in place over the whole row, then summed: a loop over a
            // slice the compiler vectorises (`exp`'s range checks become selects), where
            // `*a += exp(e - mx)` over chunks of 8 kept `exp` scalar, branches and all
            // (~15 cycles per logit, 3% of a perplexity run's CPU time). The same sum in
            // the same eight lanes and order as before.
            for e in v.iter_mut() {
                *e = exp(*e - mx);
            }
            let s = sum(v);
            // SAFETY: index r * groups + g (and row r of `at` when the target falls in this
            // item's columns) is written by this item alone: items partition rows × column
            // slices, and a row's target lies in one slice. r < m, g < groups.
            unsafe {
                *mp.get().add(r * groups + g) = mx;
                *sp.get().add(r * groups + g) = s;
                if let Some(v_t) = target {
                    *ap.get().add(r) = v_t;
                }
            }
        }
    };
    let items = groups * row_blocks;
    let scratch = || vec![0f32; HEAD_ROWS.min(m) * gcols];
    if m * n * k < 1 << 16 {
        let mut buf = scratch();
        (0..items).for_each(|i| item(&mut buf, i));
    } else {
        (0..items).into_par_iter().for_each_init(scratch, item);
    }
    (0..m)
        .map(|r| {
            let (mx, s) = (
                &maxes[r * groups..][..groups],
                &sums[r * groups..][..groups],
            );
            let top = mx.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = mx.iter().zip(s).map(|(&g, &s)| s * exp(g - top)).sum();
            (at[r] - top) - total.ln()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        ((a as f64 - b)
            / (b32.next_up() as f64 - b32 as f64)
                .abs()
                .max(f64::MIN_POSITIVE))
        .abs()
    }

    /// `exp` before its integer conversion was made vectorisable (`n as i32`): the values
    /// must not change by a bit.
    fn exp_with_cast(x: f32) -> f32 {
        const HI: f32 = 88.376_26;
        const LO: f32 = -87.336_55;
        let xc = x.clamp(LO, HI);
        let t = xc * std::f32::consts::LOG2_E;
        let n = (t + 12_582_912.0) - 12_582_912.0;
        let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let e = p * (r * r) + r + 1.0;
        let scaled = e * f32::from_bits(((n as i32 + 127) as u32) << 23);
        if x > HI {
            f32::INFINITY
        } else if x < LO {
            0.0
        } else if x.is_nan() {
            x
        } else {
            scaled
        }
    }

    #[test]
    fn exp_is_bit_identical_to_its_cast_form() {
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp(x).to_bits(), exp_with_cast(x).to_bits(), "x = {x}");
            x += 0.000_377;
        }
        for x in [
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::MAX,
            f32::MIN,
            88.376_26,
            88.376_27,
            -87.336_55,
            -87.336_56,
            0.0,
            -0.0,
            1e-30,
        ] {
            assert_eq!(exp(x).to_bits(), exp_with_cast(x).to_bits(), "x = {x}");
        }
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let u = ulps(exp(x), (x as f64).exp());
            worst = worst.max(u);
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// Deterministic values in [-1, 1) (also for `decode_attention`'s tests).
    pub(super) fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// f64 attention with an explicit mask, the way the model wrote it before.
    fn reference(q: &[f32], t: usize, nh: usize, hd: usize, kv: &KvHeads, off: usize) -> Vec<f64> {
        let rep = nh / kv.k.len();
        let scale = 1.0 / (hd as f64).sqrt();
        let mut y = vec![0f64; t * nh * hd];
        for i in 0..t {
            for h in 0..nh {
                let (kh, vh) = (&kv.k[h / rep], &kv.v[h / rep]);
                let keys = off + i + 1;
                let s: Vec<f64> = (0..keys)
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[(i * nh + h) * hd + d] as f64 * kh[j * hd + d] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    y[(i * nh + h) * hd + d] =
                        (0..keys).map(|j| e[j] / z * vh[j * hd + d] as f64).sum();
                }
            }
        }
        y
    }

    #[test]
    fn causal_attention_matches_f64_with_and_without_a_cache() {
        // (t, offset): decoding rows (odd key counts, rows after a long cache: the split
        // decode path), a prefill of ragged length, a chunk after a cache.
        for (t, off) in [
            (1, 0),
            (1, 37),
            (3, 5),
            (2, 126),
            (1, 700),
            (7, 400),
            (61, 0),
            (50, 13),
        ] {
            let (nh, nkv, hd) = (6, 2, 24);
            let mut kv = KvHeads::default();
            let total = off + t;
            kv.append(
                &lcg(total * nkv * hd, 1),
                &lcg(total * nkv * hd, 2),
                nkv,
                hd,
            );
            let q = lcg(t * nh * hd, 3);
            let y = causal_attention(&q, t, nh, hd, &kv, off, 1.0 / (hd as f32).sqrt());
            let r = reference(&q, t, nh, hd, &kv, off);
            // Outputs are convex combinations of values in [-1, 1]: absolute error of a few
            // f32 roundings of the scores (|s| <= hd·scale) and weights.
            for (g, e) in y.iter().zip(&r) {
                assert!((*g as f64 - e).abs() < 2e-5, "t{t} off{off}: {g} vs {e}");
            }
        }
    }

    /// The sixteen-lane maximum equals `f32::max` folded in order, bit for bit: every
    /// length around the lane count, NaNs (passed over), infinities, all-NaN and empty
    /// rows (−∞).
    #[test]
    fn lane_max_equals_the_ordered_fold() {
        for len in 0..70usize {
            for seed in 0..4u64 {
                let mut v: Vec<f32> = lcg(len, 900 + seed).iter().map(|x| x * 50.0).collect();
                if seed == 1 && len > 0 {
                    v[len / 2] = f32::NAN;
                    v[0] = f32::NAN;
                }
                if seed == 2 && len > 3 {
                    v[len - 1] = f32::INFINITY;
                    v[1] = f32::NEG_INFINITY;
                }
                if seed == 3 {
                    v.iter_mut().for_each(|x| *x = f32::NAN);
                }
                let want = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max(&v).to_bits(), want.to_bits(), "len {len} seed {seed}");
            }
        }
    }

    /// The softmax (its lane maximum) against the ordered-fold passes bit for bit, and
    /// against f64.
    #[test]
    fn softmax_equals_the_separate_passes_and_f64() {
        for len in [1usize, 7, 8, 9, 16, 33, 257, 512] {
            let v0: Vec<f32> = lcg(len, 77 + len as u64).iter().map(|x| x * 9.0).collect();
            let mut got = v0.clone();
            softmax_in_place(&mut got);
            let mx = v0.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut want: Vec<f32> = v0.iter().map(|&x| exp(x - mx)).collect();
            let s = sum(&want);
            want.iter_mut().for_each(|x| *x /= s);
            assert_eq!(got, want, "len {len}");
            let m64 = v0.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let z: f64 = v0.iter().map(|&x| (x as f64 - m64).exp()).sum();
            for (&g, &x) in got.iter().zip(&v0) {
                let e = (x as f64 - m64).exp() / z;
                // exp within 2 ulp, the division 1, the sum's relative error at most
                // (len / 8 + 8) roundings (eight lanes, then their total and the tail).
                let tol = (len as f64 / 8.0 + 12.0) * f32::EPSILON as f64 * e + 1e-30;
                assert!((g as f64 - e).abs() <= tol, "len {len}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn norms_activations_and_log_softmax_match_f64() {
        let (rows, d) = (5, 37);
        let x = lcg(rows * d, 4);
        let w = lcg(d, 5);
        let y = rms_norm(&x, &w, 1e-5);
        for r in 0..rows {
            let row = &x[r * d..(r + 1) * d];
            let m =
                (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64 + 1e-5).sqrt();
            for c in 0..d {
                let e = row[c] as f64 / m * w[c] as f64;
                assert!((y[r * d + c] as f64 - e).abs() < 1e-5 * e.abs().max(1.0));
            }
        }
        let mut g: Vec<f32> = lcg(100, 6).iter().map(|v| v * 20.0).collect();
        let u = lcg(100, 7);
        let g0 = g.clone();
        silu_mul(&mut g, &u);
        for ((&a, &x), &b) in g.iter().zip(&g0).zip(&u) {
            let e = x as f64 / (1.0 + (-x as f64).exp()) * b as f64;
            assert!(
                (a as f64 - e).abs() < 1e-5 * e.abs().max(1e-3),
                "{a} vs {e}"
            );
        }
        let z: Vec<f32> = lcg(3 * 50, 8).iter().map(|v| v * 30.0).collect();
        let ls = log_softmax(&z, 50);
        for r in 0..3 {
            let row = &z[r * 50..(r + 1) * 50];
            let mx = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let lz = row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            for c in 0..50 {
                let e = row[c] as f64 - mx - lz;
                assert!((ls[r * 50 + c] as f64 - e).abs() < 1e-5 * e.abs().max(1.0));
            }
        }
    }

    #[test]
    fn target_log_probs_equal_log_softmax_bit_for_bit() {
        for (i, &cols) in [1usize, 7, 8, 9, 31, 1000, 4099].iter().enumerate() {
            let rows = 13;
            let x: Vec<f32> = lcg(rows * cols, 40 + i as u64)
                .iter()
                .map(|v| v * 12.0)
                .collect();
            let targets: Vec<u32> = (0..rows).map(|r| ((r * 7919) % cols) as u32).collect();
            let lp = log_softmax(&x, cols);
            let got = target_log_probs(&x, cols, &targets);
            for (r, (&g, &t)) in got.iter().zip(&targets).enumerate() {
                let want = lp[r * cols + t as usize];
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "cols {cols} row {r}: {g} vs {want}"
                );
                // And against f64, so the pair cannot be wrong together.
                let row = &x[r * cols..(r + 1) * cols];
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
                let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                let exact = row[t as usize] as f64 - lse;
                assert!(
                    (g as f64 - exact).abs() < 1e-5 * (1.0 + exact.abs()),
                    "{g} vs {exact}"
                );
            }
        }
        // Large enough to take the parallel branch.
        let (rows, cols) = (9, 5000);
        let x = lcg(rows * cols, 3);
        let targets: Vec<u32> = (0..rows as u32).map(|r| r * 555).collect();
        let lp = log_softmax(&x, cols);
        for (r, g) in target_log_probs(&x, cols, &targets).iter().enumerate() {
            assert_eq!(g.to_bits(), lp[r * cols + targets[r] as usize].to_bits());
        }
        assert!(target_log_probs(&[0.0, 1.0], 2, &[2])[0].is_nan());
    }

    /// The fused output layer + log-softmax against the unfused pair (the same f32 logits
    /// from `matmul_with`, then `target_log_probs`) and against f64, on every path, ragged
    /// shapes: one row, a few, more than one row block (96); columns not a multiple of the
    /// panel (16/64) or of the 512-column slice; large enough to run in parallel.
    ///
    /// Tolerances: both sides share the logits bit for bit, so they differ only in
    /// `ln Σ exp`: each term within ~3 ulp (two `exp`s and a product instead of one `exp`)
    /// and an f32 sum of `n` positive terms in 8 lanes plus one per slice, so a relative
    /// error of the sum of at most (n / 8 + slices + 8) · 2⁻²³, which is the absolute error
    /// of its logarithm. Against f64 add the logits' own error: `k · 2⁻²³ · Σ|x·w|` for the
    /// target and for the largest logit (the standard bound for any summation order).
    #[test]
    fn head_target_log_probs_match_the_unfused_pair_and_f64() {
        use crate::nn::kernels::gemm_f32::{matmul_with, panel_width};
        for (si, &(m, k, n)) in [
            (1usize, 37usize, 5usize),
            (1, 576, 1100),
            (7, 200, 513),
            (100, 64, 1601),
            (97, 130, 2049),
        ]
        .iter()
        .enumerate()
        {
            let x: Vec<f32> = lcg(m * k, 70 + si as u64).iter().map(|v| v * 3.0).collect();
            let w = lcg(n * k, 80 + si as u64);
            let mut targets: Vec<u32> = (0..m).map(|r| ((r * 7919 + 3) % n) as u32).collect();
            targets[m - 1] = (n - 1) as u32;
            let slices = n.div_ceil(HEAD_COLS) as f64;
            let sum_tol = (n as f64 / 8.0 + slices + 8.0) * f32::EPSILON as f64;
            for isa in Isa::available() {
                let pw = PackedWeight::new(&w, n, k, panel_width(isa));
                let got = head_target_log_probs(isa, &x, m, &pw, &targets);
                let logits = matmul_with(isa, &x, m, &pw);
                let want = target_log_probs(&logits, n, &targets);
                for r in 0..m {
                    let (g, u) = (got[r] as f64, want[r] as f64);
                    assert!(
                        (g - u).abs() <= sum_tol + 2.0 * f32::EPSILON as f64 * u.abs(),
                        "{isa:?} m{m} k{k} n{n} row {r}: fused {g} unfused {u}"
                    );
                    // f64 logits and log-softmax.
                    let xr = &x[r * k..(r + 1) * k];
                    let (mut z, mut err) = (vec![0f64; n], vec![0f64; n]);
                    for j in 0..n {
                        let wr = &w[j * k..(j + 1) * k];
                        z[j] = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        err[j] = (k as f64 + 2.0)
                            * f32::EPSILON as f64
                            * xr.iter()
                                .zip(wr)
                                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                                .sum::<f64>();
                    }
                    let top = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let lse = top + z.iter().map(|&v| (v - top).exp()).sum::<f64>().ln();
                    let t = targets[r] as usize;
                    let exact = z[t] - lse;
                    let max_err = err.iter().copied().fold(0.0, f64::max);
                    let bound =
                        err[t] + max_err + sum_tol + 2.0 * f32::EPSILON as f64 * exact.abs();
                    assert!(
                        (g - exact).abs() <= bound,
                        "{isa:?} m{m} k{k} n{n} row {r}: fused {g} f64 {exact} (bound {bound})"
                    );
                }
            }
        }
        // A target outside the row gives NaN.
        for isa in Isa::available() {
            let pw = PackedWeight::new(&[1.0, 2.0], 2, 1, panel_width(isa));
            assert!(head_target_log_probs(isa, &[1.0], 1, &pw, &[2])[0].is_nan());
        }
    }

    /// Queries and keys rotated in one pass equal two calls of `rope` bit for bit, below
    /// and above the size that splits rows over the threads (SmolLM2's 9 and 3 heads).
    #[test]
    fn rope_qk_equals_rope_of_each() {
        let (nh, nkv, hd) = (9, 3, 64);
        for (rows, pos0) in [(3usize, 5usize), (100, 0), (130, 7)] {
            let cos: Vec<f32> = (0..(pos0 + rows) * hd / 2)
                .map(|i| (i as f32 * 0.013).cos())
                .collect();
            let sin: Vec<f32> = (0..(pos0 + rows) * hd / 2)
                .map(|i| (i as f32 * 0.013).sin())
                .collect();
            for pairs in [RopePairs::Adjacent, RopePairs::Halves] {
                let (q0, k0) = (lcg(rows * nh * hd, 21), lcg(rows * nkv * hd, 22));
                let (mut q, mut k) = (q0.clone(), k0.clone());
                rope_qk(&mut q, nh, &mut k, nkv, hd, pos0, &cos, &sin, pairs);
                let (mut wq, mut wk) = (q0, k0);
                rope(&mut wq, nh, hd, pos0, &cos, &sin, pairs);
                rope(&mut wk, nkv, hd, pos0, &cos, &sin, pairs);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&q), bits(&wq), "q, {rows} rows, {pairs:?}");
                assert_eq!(bits(&k), bits(&wk), "k, {rows} rows, {pairs:?}");
            }
        }
    }

    /// The residual add equals the elementwise sum in order, split over threads or not.
    #[test]
    fn add_in_place_is_the_elementwise_sum() {
        for n in [7usize, 1 << 15, 295_000] {
            let (x0, y) = (lcg(n, 31), lcg(n, 32));
            let mut x = x0.clone();
            add_in_place(&mut x, &y);
            for i in 0..n {
                assert_eq!(
                    x[i].to_bits(),
                    (x0[i] + y[i]).to_bits(),
                    "n {n}, element {i}"
                );
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_like_candle() {
        let (heads, hd, rows, pos0) = (2, 8, 3, 4);
        let x0 = lcg(rows * heads * hd, 9);
        let cos: Vec<f32> = (0..16 * hd / 2).map(|i| (i as f32 * 0.1).cos()).collect();
        let sin: Vec<f32> = (0..16 * hd / 2).map(|i| (i as f32 * 0.1).sin()).collect();
        for pairs in [RopePairs::Adjacent, RopePairs::Halves] {
            let mut x = x0.clone();
            rope(&mut x, heads, hd, pos0, &cos, &sin, pairs);
            let xt = candle_core::Tensor::from_vec(
                x0.clone(),
                (1, rows, heads, hd),
                &candle_core::Device::Cpu,
            )
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
            let c = candle_core::Tensor::from_vec(
                cos[pos0 * hd / 2..(pos0 + rows) * hd / 2].to_vec(),
                (rows, hd / 2),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let s = candle_core::Tensor::from_vec(
                sin[pos0 * hd / 2..(pos0 + rows) * hd / 2].to_vec(),
                (rows, hd / 2),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let want = match pairs {
                RopePairs::Adjacent => candle_nn::rotary_emb::rope_i(&xt, &c, &s),
                RopePairs::Halves => candle_nn::rotary_emb::rope(&xt, &c, &s),
            }
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            assert_eq!(x, want, "{pairs:?}: same formula, bit for bit");
        }
    }

    #[test]
    fn log_softmax_into_matches_f64_at_the_vocabulary_width() {
        // Marian's 15258-word rows, split over threads (3 rows) and not (1 row).
        let cols = 15258;
        for rows in [1, 3] {
            let x: Vec<f32> = lcg(rows * cols, 11).iter().map(|v| v * 12.0).collect();
            let mut got = vec![f32::NAN; x.len()];
            log_softmax_into(&x, &mut got, cols);
            for (src, out) in x.chunks(cols).zip(got.chunks(cols)) {
                let max = src.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let ln = src
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
                for (&v, &o) in src.iter().zip(out) {
                    let want = v as f64 - max - ln;
                    assert!(
                        (o as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{o} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn log_softmax_keeps_banned_tokens_at_minus_infinity() {
        // −∞ entries (tokens a decoding rule banned) stay −∞; the rest stays normalised.
        let x = [f32::NEG_INFINITY, 0.0, 0.0, f32::NEG_INFINITY];
        let mut got = [0f32; 4];
        log_softmax_into(&x, &mut got, 4);
        assert_eq!(got[0], f32::NEG_INFINITY);
        assert_eq!(got[3], f32::NEG_INFINITY);
        assert!((got[1] - (-std::f32::consts::LN_2)).abs() < 1e-7);
    }

    #[test]
    #[should_panic(expected = "rows of 3")]
    fn log_softmax_into_refuses_partial_rows() {
        log_softmax_into(&[0.0; 4], &mut [0.0; 4], 3);
    }
}
