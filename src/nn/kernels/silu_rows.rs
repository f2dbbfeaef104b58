//! SiLU (swish, `v / (1 + e^-v)`) over a plain f32 slice, bit-identical to candle's `silu`
//! (the same formula with libm's `expf`), for models whose activations go through candle
//! tensors otherwise (MarianMT's feed-forward). From 64K values on (Marian decoding 32
//! sentences × 4 beams: 128 × 1024) candle hands the work to its own barrier thread pool,
//! and its spin-waiting against rayon's workers on a 2-core machine cost more than the
//! activation itself: a sixth of a dynamic-int8 translation's CPU samples were the main
//! thread waiting at candle's barrier. Here large slices are split over rayon's pool, the
//! one every other kernel uses.
//!
//! The polynomial `llm_f32::exp` would vectorise, but it is not bit-identical: with it,
//! 5 of the 1000 test_2016_flickr dynamic-int8 translations changed (a dynamic int8
//! layer's activation scale moves with any value of the batch).

use rayon::prelude::*;

/// Values from which the work is split over rayon's threads (candle's own threshold).
const PAR_MIN: usize = 1 << 16;
/// Values per rayon task.
const PAR_CHUNK: usize = 1 << 14;

/// `v ← v / (1 + e^-v)`, candle's `silu` bit for bit.
pub fn silu_in_place(v: &mut [f32]) {
    let f = |c: &mut [f32]| {
        for x in c.iter_mut() {
            *x = *x / (1.0 + (-*x).exp());
        }
    };
    if v.len() >= PAR_MIN {
        v.par_chunks_mut(PAR_CHUNK).for_each(f);
    } else {
        f(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn bit_identical_to_candle() {
        // Below and above the split, and the values where exp over/underflows.
        for n in [1usize, 1000, PAR_MIN + 4321] {
            let mut xs: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 20_011) as f32 * 0.011 - 110.0)
                .collect();
            xs[0] = f32::INFINITY;
            if n > 5 {
                xs[1..5].copy_from_slice(&[f32::NEG_INFINITY, -0.0, 89.0, -104.0]);
            }
            let t = candle_core::Tensor::new(xs.as_slice(), &candle_core::Device::Cpu).unwrap();
            let candle = t.silu().unwrap().to_vec1::<f32>().unwrap();
            let mut got = xs.clone();
            silu_in_place(&mut got);
            assert_eq!(bits(&got), bits(&candle), "{n} values");
        }
    }

    #[test]
    fn close_to_f64() {
        let xs: Vec<f32> = (0..20_001).map(|i| (i as f32 - 10_000.0) * 0.011).collect();
        let mut got = xs.clone();
        silu_in_place(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = x as f64 / (1.0 + (-x as f64).exp());
            let tol = 4.0 * f32::EPSILON as f64 * want.abs().max(1e-30);
            assert!(
                (g as f64 - want).abs() <= tol,
                "silu({x}) = {g}, f64 {want}"
            );
        }
    }
}
