//! Row-wise log-softmax written into a buffer the caller reuses, for beam search: each
//! decode step turns `[rows, vocab]` logits (Marian: 128 × 15258 at batch 32, beam 4) into
//! log-probabilities, and candle's op chain (max, subtract, libm `expf`, sum, `ln`,
//! subtract: six tensors) plus a `Vec` per row cost a quarter of a dynamic-int8 decode.
//!
//! Bit-identical to [`llm_f32::log_softmax`] (the same maximum, the same polynomial
//! [`exp`], the exponentials summed in the same eight lanes in the same order, the same
//! final subtraction), without its output allocation.
//!
//! [`llm_f32::log_softmax`]: super::llm_f32::log_softmax

use super::llm_f32::exp;
use rayon::prelude::*;

/// Values from which rows are split over rayon's threads (as the other row ops of
/// `llm_f32`).
const PAR_MIN: usize = 1 << 15;

/// `dst ← log_softmax(src)` row by row (rows of `cols`): `(v - max) - ln Σ exp(v - max)`.
/// Panics if the lengths differ or are not whole rows (callers size both from one shape).
pub fn log_softmax_into(src: &[f32], dst: &mut [f32], cols: usize) {
    assert!(
        cols > 0 && src.len() == dst.len() && src.len().is_multiple_of(cols),
        "log_softmax_into: {} and {} values, rows of {cols}",
        src.len(),
        dst.len()
    );
    if src.len() >= PAR_MIN {
        src.par_chunks(cols)
            .zip(dst.par_chunks_mut(cols))
            .for_each(|(s, d)| row(s, d));
    } else {
        src.chunks(cols)
            .zip(dst.chunks_mut(cols))
            .for_each(|(s, d)| row(s, d));
    }
}

/// One row; `llm_f32::log_softmax`'s arithmetic step for step: the exponentials are
/// written into `dst` first (a plain map over `exp` vectorises; summed as they are
/// computed, the loop stayed scalar), summed in eight lanes, then overwritten.
#[inline]
fn row(src: &[f32], dst: &mut [f32]) {
    let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = exp(v - max);
    }
    let ln = sum8(dst).ln();
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = (v - max) - ln;
    }
}

/// `llm_f32::sum`: eight lanes, then the remainder.
#[inline]
fn sum8(v: &[f32]) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels::llm_f32;

    fn values(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * spread
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn bit_identical_to_llm_f32_log_softmax() {
        // Widths with and without a tail of eight, one row and enough rows to split.
        for (rows, cols, spread) in [
            (1, 1, 3.0),
            (1, 7, 3.0),
            (3, 8, 10.0),
            (5, 1001, 20.0),
            (128, 15258, 15.0),
            (2, 15258, 80.0),
        ] {
            let x = values(rows * cols, (rows * cols) as u64, spread);
            let mut got = vec![f32::NAN; x.len()];
            log_softmax_into(&x, &mut got, cols);
            assert_eq!(
                bits(&got),
                bits(&llm_f32::log_softmax(&x, cols)),
                "{rows} × {cols}"
            );
        }
    }

    #[test]
    fn close_to_f64() {
        let cols = 15258;
        let x = values(3 * cols, 11, 12.0);
        let mut got = vec![0f32; x.len()];
        log_softmax_into(&x, &mut got, cols);
        for (src, out) in x.chunks(cols).zip(got.chunks(cols)) {
            let max = src.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let ln: f64 = src
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

    #[test]
    fn infinities_give_what_candle_gives() {
        // A row with −∞ entries (banned tokens) keeps them −∞; the rest stays normalised.
        let x = [f32::NEG_INFINITY, 0.0, 0.0, f32::NEG_INFINITY];
        let mut got = [0f32; 4];
        log_softmax_into(&x, &mut got, 4);
        assert_eq!(got[0], f32::NEG_INFINITY);
        assert_eq!(got[3], f32::NEG_INFINITY);
        assert!((got[1] - (-std::f32::consts::LN_2)).abs() < 1e-7);
    }

    #[test]
    #[should_panic(expected = "rows of 3")]
    fn refuses_partial_rows() {
        log_softmax_into(&[0.0; 4], &mut [0.0; 4], 3);
    }
}
