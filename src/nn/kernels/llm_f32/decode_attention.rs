//! Attention of a decode step: a few query rows against the whole KV cache.
//!
//! The query heads that share one key/value head (SmolLM2-135M: 3 of 9) are done together,
//! so each cached key and value row is read once for all of them, and their scores live in
//! one scratch buffer per thread instead of a fresh `Vec` per head.
//!
//! Every head's arithmetic is that of the former per-head loop, operation for operation
//! (the same eight-lane dot, scale, softmax, and `out += p·v` per column in key order), so
//! results are bit-identical to it whichever grouping or thread runs a head.

use super::{dot, softmax_in_place, KvHeads};
use crate::nn::kernels::{team, SendPtr};
use std::cell::Cell;

/// Multiply-adds (`rows · heads · keys · head_dim`) from which a step splits its heads over
/// rayon's threads (SmolLM2-135M: from 29 keys). On the 2-core EPYC, splitting every step
/// decoded q4_0 0–15% faster than never splitting at 128 and at 384 tokens (3 alternating
/// rounds each, loaded machine); below this a step's attention is ~1 µs, a fork/join's cost.
const SPLIT_WORK: usize = 1 << 14;

thread_local! {
    /// Scores of the heads a pass is working on (`heads · keys`), kept between steps.
    static SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Whether a step of `t` rows, `nh` heads of `hd` over `keys` cached positions splits its
/// heads over threads: on the decode step's spinning team always, else from [`SPLIT_WORK`].
pub(super) fn splits(t: usize, nh: usize, keys: usize, hd: usize) -> bool {
    team::leading() || (t * nh * keys * hd >= SPLIT_WORK && rayon::current_num_threads() > 1)
}

/// Writes `y` (`t` rows of `nh · hd`): the attention of the query rows `q` at positions
/// `offset..offset + t` over the cached keys up to each row's own position. Split (see
/// [`splits`]; tests run both), each key/value head's query heads go in two tasks (3 heads:
/// 2 + 1), so two threads share three groups evenly; otherwise one task per group.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_attention(
    q: &[f32],
    t: usize,
    nh: usize,
    hd: usize,
    kv: &KvHeads,
    offset: usize,
    scale: f32,
    y: &mut [f32],
    split: bool,
) {
    let nkv = kv.k.len();
    assert!(nkv > 0 && nh.is_multiple_of(nkv), "attention heads");
    assert!(
        q.len() == t * nh * hd && y.len() == q.len() && kv.len(hd) >= offset + t,
        "attention sizes"
    );
    if hd == 0 {
        return;
    }
    let rep = nh / nkv;
    let width = nh * hd;
    let per_task = if split { rep.div_ceil(2) } else { rep };
    let parts = rep.div_ceil(per_task);
    let yp = SendPtr(y.as_mut_ptr());
    let task = |item: usize| {
        let (i, g, part) = (item / (nkv * parts), item / parts % nkv, item % parts);
        let h0 = g * rep + part * per_task;
        let h1 = (h0 + per_task).min((g + 1) * rep);
        let keys = offset + i + 1;
        let row = i * width;
        // SAFETY: task (i, g, part) alone writes heads h0..h1 of row i of y: y is t rows of
        // `width` (i < t, h1 ≤ nh) and outlives the tasks.
        let out =
            unsafe { std::slice::from_raw_parts_mut(yp.get().add(row + h0 * hd), (h1 - h0) * hd) };
        attend_heads(
            &q[row + h0 * hd..row + h1 * hd],
            &kv.k[g][..keys * hd],
            &kv.v[g][..keys * hd],
            hd,
            scale,
            out,
        );
    };
    let tasks = t * nkv * parts;
    if split {
        team::for_each(tasks, task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// `out` (heads of `hd`) = attention of the query heads `qs` (heads of `hd`) over all rows
/// of `kh`/`vh`. Key-major: each key row is read from the cache once and used by every
/// head while it is in L1; likewise each value row.
fn attend_heads(qs: &[f32], kh: &[f32], vh: &[f32], hd: usize, scale: f32, out: &mut [f32]) {
    let heads = qs.len() / hd;
    let keys = kh.len() / hd;
    let mut scores = SCORES.take();
    if scores.len() < heads * keys {
        scores.resize(heads * keys, 0.0);
    }
    let s = &mut scores[..heads * keys];
    for (j, k) in kh.chunks_exact(hd).enumerate() {
        for (r, q) in qs.chunks_exact(hd).enumerate() {
            s[r * keys + j] = dot(q, k) * scale;
        }
    }
    for p in s.chunks_exact_mut(keys) {
        softmax_in_place(p);
    }
    out.fill(0.0);
    for (j, v) in vh.chunks_exact(hd).enumerate() {
        for (o, p) in out.chunks_exact_mut(hd).zip(s.chunks_exact(keys)) {
            let w = p[j];
            for (o, &v) in o.iter_mut().zip(v) {
                *o += w * v;
            }
        }
    }
    SCORES.set(scores);
}

/// The former decode loop, one head at a time with its own score vector: the reference
/// the grouped passes must equal bit for bit.
#[cfg(test)]
fn per_head_reference(
    q: &[f32],
    t: usize,
    nh: usize,
    hd: usize,
    kv: &KvHeads,
    offset: usize,
    scale: f32,
) -> Vec<f32> {
    let rep = nh / kv.k.len();
    let width = nh * hd;
    let mut y = vec![0f32; t * width];
    for i in 0..t {
        for h in 0..nh {
            let keys = offset + i + 1;
            let (kh, vh) = (&kv.k[h / rep], &kv.v[h / rep]);
            let qh = &q[i * width + h * hd..i * width + (h + 1) * hd];
            let mut s: Vec<f32> = (0..keys)
                .map(|j| dot(qh, &kh[j * hd..(j + 1) * hd]) * scale)
                .collect();
            softmax_in_place(&mut s);
            let out = &mut y[i * width + h * hd..i * width + (h + 1) * hd];
            for (j, &p) in s.iter().enumerate() {
                for (o, &v) in out.iter_mut().zip(&vh[j * hd..(j + 1) * hd]) {
                    *o += p * v;
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::super::tests::lcg;
    use super::*;

    /// Grouped heads (1 to 7 per key/value head, split 2 + 1 ... over threads), head sizes
    /// with and without an eight-lane remainder, odd key counts, rows after a cache, split
    /// and not: bit for bit the per-head loop.
    #[test]
    fn grouped_decode_equals_the_per_head_loop_bit_for_bit() {
        for (nkv, rep, hd) in [
            (3, 3, 64),
            (1, 1, 8),
            (2, 2, 24),
            (1, 4, 16),
            (2, 5, 40),
            (1, 7, 9),
        ] {
            for (t, offset) in [(1, 0), (1, 1), (1, 36), (2, 127), (3, 5), (7, 200)] {
                let nh = nkv * rep;
                let total = offset + t;
                let mut kv = KvHeads::default();
                kv.append(
                    &lcg(total * nkv * hd, 1),
                    &lcg(total * nkv * hd, 2),
                    nkv,
                    hd,
                );
                // Large queries: sharp softmax rows, so a wrong key or order shows.
                let q: Vec<f32> = lcg(t * nh * hd, 3).iter().map(|x| x * 4.0).collect();
                let scale = 1.0 / (hd as f32).sqrt();
                let want = per_head_reference(&q, t, nh, hd, &kv, offset, scale);
                for split in [false, true] {
                    let mut y = vec![f32::NAN; want.len()];
                    decode_attention(&q, t, nh, hd, &kv, offset, scale, &mut y, split);
                    for (k, (g, w)) in y.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "nkv{nkv} rep{rep} hd{hd} t{t} off{offset} split{split} [{k}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// A cache longer than the rows need (a step reads only keys up to its own position).
    #[test]
    fn later_cached_positions_are_not_read() {
        let (nkv, rep, hd, t, offset) = (3, 3, 64, 2, 10);
        let nh = nkv * rep;
        let mut kv = KvHeads::default();
        let n = (offset + t) * nkv * hd;
        kv.append(&lcg(n, 1), &lcg(n, 2), nkv, hd);
        let mut longer = kv.clone();
        let extra = 5 * nkv * hd;
        longer.append(&vec![f32::NAN; extra], &vec![f32::NAN; extra], nkv, hd);
        let q = lcg(t * nh * hd, 3);
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        decode_attention(&q, t, nh, hd, &kv, offset, 0.125, &mut a, false);
        decode_attention(&q, t, nh, hd, &longer, offset, 0.125, &mut b, true);
        assert!(a.iter().all(|v| v.is_finite()));
        assert_eq!(a, b);
    }
}
