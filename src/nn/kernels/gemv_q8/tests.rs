//! Every path of the q8-activation GEMV against references written here from the stored
//! codes and parameters (no kernel or layout code): exact integers where the arithmetic
//! is exact, an f64 sum of the same quantized operands otherwise, and the f32-activation
//! path within the activation-rounding bound.
#![allow(clippy::needless_range_loop)]

use super::*;
use rand::{Rng, SeedableRng};

/// Reference activation quantization: `d = max|x| / 127`, `q = round(x · (1/d))`.
fn ref_quant(x: &[f32]) -> (Vec<i32>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut d = Vec::new();
    for xs in x.chunks(32) {
        let amax = xs.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let dc = amax / 127.0;
        let id = if dc > 0.0 { 1.0 / dc } else { 0.0 };
        q.extend(xs.iter().map(|&v| (v * id).round() as i32));
        d.push(dc);
    }
    (q, d)
}

/// Parameter index of (row, column) for `from_int`'s `group` convention.
fn param(o: usize, p: usize, cols: usize, group: usize) -> usize {
    if group == 0 {
        0
    } else if group >= cols {
        o
    } else {
        o * cols.div_ceil(group) + p / group
    }
}

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 31),
    (4, 33),
    (7, 81),
    (5, 128),
    (9, 160),
    (130, 577),
    (61, 1100),
    // Above SERIAL_WORK: rows split over threads (the others run on the calling thread).
    (520, 544),
];
const _: () = assert!(520 * 544 >= crate::nn::kernels::SERIAL_WORK);

/// Integer activations with |x| = 127 somewhere in each chunk (so `d = 1`, `q = x`),
/// unit scales and integer zero points: every path must give the integer sum exactly
/// (all partial sums are integers below 2^24).
#[test]
fn integer_sums_are_exact_on_every_path() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for &(rows, cols) in SHAPES {
        for &group in &[32usize, 64, 0, 4096] {
            let np = rows * cols.div_ceil(group.max(1)).max(1);
            let codes: Vec<u8> = (0..rows * cols).map(|_| rng.gen_range(0..16)).collect();
            let zero: Vec<i32> = (0..np).map(|_| rng.gen_range(0..16)).collect();
            let scale = vec![1f32; np];
            let lb = LowBit::from_int(rows, cols, &codes, false, 4, &scale, &zero, group)
                .expect("layout");
            assert!(supports(&lb));
            let mut x: Vec<f32> = (0..cols)
                .map(|_| rng.gen_range(-127..=127) as f32)
                .collect();
            for c in x.chunks_mut(32) {
                let j = rng.gen_range(0..c.len());
                c[j] = if rng.gen_bool(0.5) { 127.0 } else { -127.0 };
            }
            for isa in Isa::available() {
                let mut y = vec![0f32; rows];
                gemv(&lb, isa, &x, &mut y);
                for o in 0..rows {
                    let want: i64 = (0..cols)
                        .map(|p| {
                            let z = zero[param(o, p, cols, group)] as i64;
                            (codes[o * cols + p] as i64 - z) * x[p] as i64
                        })
                        .sum();
                    assert_eq!(y[o], want as f32, "{isa:?} {rows}x{cols} g{group} row {o}");
                }
            }
        }
    }
}

/// The same for a code book whose values are `k/127` with `max|k| = 127`: the 8-bit book
/// is exact and the result is the integer sum times `1/127`.
#[test]
fn code_book_integer_sums_are_exact_on_every_path() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut k: [i32; 16] = std::array::from_fn(|_| rng.gen_range(-127..=127));
    k[3] = -127;
    let table: [f32; 16] = std::array::from_fn(|n| k[n] as f32 / 127.0);
    for &(rows, cols) in SHAPES.iter().filter(|s| s.1 % 32 == 0) {
        for &bs in &[32usize, 64] {
            let len = rows * cols;
            let codes: Vec<u8> = (0..len).map(|_| rng.gen_range(0..16)).collect();
            let mut packed = vec![0u8; len.div_ceil(2)];
            for (e, &c) in codes.iter().enumerate() {
                packed[e / 2] |= c << (4 * (1 - (e & 1)));
            }
            let absmax = vec![1f32; len.div_ceil(bs)];
            let lb = LowBit::from_table(rows, cols, &packed, &table, &absmax, bs).expect("layout");
            assert!(supports(&lb));
            let mut x: Vec<f32> = (0..cols)
                .map(|_| rng.gen_range(-127..=127) as f32)
                .collect();
            for c in x.chunks_mut(32) {
                c[0] = 127.0;
            }
            for isa in Isa::available() {
                let mut y = vec![0f32; rows];
                gemv(&lb, isa, &x, &mut y);
                for o in 0..rows {
                    let want: i64 = (0..cols)
                        .map(|p| k[codes[o * cols + p] as usize] as i64 * x[p] as i64)
                        .sum();
                    assert_eq!(
                        y[o],
                        (1.0f32 / 127.0) * want as f32,
                        "{isa:?} {rows}x{cols} b{bs} row {o}"
                    );
                }
            }
        }
    }
}

/// Random scales, zero points and activations: each path against the f64 sum of the same
/// quantized operands `Σ (n − z')·s·d·q`. An f32 evaluation of that sum in any order is
/// within `(terms + 2)·ε·Σ|s·d·(n + z')·q|` (the `z'` part because the zero-point term is
/// summed separately and subtracted).
#[test]
fn int_codes_match_f64_of_the_quantized_operands() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for &(rows, cols) in SHAPES {
        for &(signed, group) in &[(true, 32usize), (true, 64), (false, 64), (false, 0)] {
            let np = rows * cols.div_ceil(group.max(1)).max(1);
            let codes: Vec<u8> = (0..rows * cols)
                .map(|_| {
                    if signed {
                        rng.gen_range(-8i8..=7) as u8
                    } else {
                        rng.gen_range(0..16)
                    }
                })
                .collect();
            let zero: Vec<i32> = (0..np)
                .map(|_| if signed { 0 } else { rng.gen_range(0..16) })
                .collect();
            let scale: Vec<f32> = (0..np).map(|_| rng.gen_range(0.001..0.1)).collect();
            let lb = LowBit::from_int(rows, cols, &codes, signed, 4, &scale, &zero, group)
                .expect("layout");
            let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
            let (q, d) = ref_quant(&x);
            for isa in Isa::available() {
                let mut y = vec![0f32; rows];
                gemv(&lb, isa, &x, &mut y);
                for o in 0..rows {
                    let (mut e, mut mag) = (0f64, 0f64);
                    for p in 0..cols {
                        let i = param(o, p, cols, group);
                        let n = if signed {
                            codes[o * cols + p] as i8 as f64 + 8.0
                        } else {
                            codes[o * cols + p] as f64
                        };
                        let z = if signed { 8.0 } else { zero[i] as f64 };
                        let sd = scale[i] as f64 * d[p / 32] as f64 * q[p] as f64;
                        e += (n - z) * sd;
                        mag += (n + z) * sd.abs();
                    }
                    let tol = (cols as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                    let got = y[o] as f64;
                    assert!(
                        (got - e).abs() <= tol,
                        "{isa:?} {rows}x{cols} g{group} row {o}: {got} vs {e} (tol {tol})"
                    );
                }
            }
        }
    }
}

/// NF4's code book through the 8-bit book against the f64 sum of `t8·(max|t|/127)·s·d·q`,
/// with the bound above (`t8 + 128` as the magnitude: the AVX-512 path's offset codes).
#[test]
fn nf4_matches_f64_of_the_quantized_operands() {
    const NF4: [f32; 16] = crate::quant::codebook::NF4_CODE;
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    for &(rows, cols) in SHAPES.iter().filter(|s| s.1 % 32 == 0) {
        let (len, bs) = (rows * cols, 64);
        let codes: Vec<u8> = (0..len).map(|_| rng.gen_range(0..16)).collect();
        let mut packed = vec![0u8; len.div_ceil(2)];
        for (e, &c) in codes.iter().enumerate() {
            packed[e / 2] |= c << (4 * (1 - (e & 1)));
        }
        let absmax: Vec<f32> = (0..len.div_ceil(bs))
            .map(|_| rng.gen_range(0.01..0.5))
            .collect();
        let lb = LowBit::from_table(rows, cols, &packed, &NF4, &absmax, bs).expect("layout");
        let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let (q, d) = ref_quant(&x);
        let t8: Vec<f64> = NF4.iter().map(|t| (*t as f64 * 127.0).round()).collect();
        for isa in Isa::available() {
            let mut y = vec![0f32; rows];
            gemv(&lb, isa, &x, &mut y);
            for o in 0..rows {
                let (mut e, mut mag) = (0f64, 0f64);
                for p in 0..cols {
                    let e0 = o * cols + p;
                    let sd = absmax[e0 / bs] as f64 * d[p / 32] as f64 * q[p] as f64 / 127.0;
                    let t = t8[codes[e0] as usize];
                    e += t * sd;
                    mag += (t.abs() + 256.0) * sd.abs();
                }
                let tol = (cols as f64 + 4.0) * f32::EPSILON as f64 * mag + 1e-30;
                let got = y[o] as f64;
                assert!(
                    (got - e).abs() <= tol,
                    "{isa:?} {rows}x{cols} row {o}: {got} vs {e} (tol {tol})"
                );
            }
        }
    }
}

/// Against the exact f32-activation GEMV: activation rounding moves each product by at
/// most `|Ŵ|·d/2`, so `|y_q8 − y| ≤ Σ_p |Ŵ_p|·d_c/2` plus both paths' float error.
#[test]
fn close_to_the_f32_activation_path() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    for &(rows, cols) in SHAPES {
        let group = 64;
        let np = rows * cols.div_ceil(group);
        let codes: Vec<u8> = (0..rows * cols).map(|_| rng.gen_range(0..16)).collect();
        let zero: Vec<i32> = (0..np).map(|_| rng.gen_range(0..16)).collect();
        let scale: Vec<f32> = (0..np).map(|_| rng.gen_range(0.001..0.1)).collect();
        let lb =
            LowBit::from_int(rows, cols, &codes, false, 4, &scale, &zero, group).expect("layout");
        let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let (_, d) = ref_quant(&x);
        let exact = lb.matmul_with(Isa::Portable, &x, 1);
        for isa in Isa::available() {
            let mut y = vec![0f32; rows];
            gemv(&lb, isa, &x, &mut y);
            for o in 0..rows {
                let (mut bound, mut mag) = (0f64, 0f64);
                for p in 0..cols {
                    let i = param(o, p, cols, group);
                    let w = (codes[o * cols + p] as f64 - zero[i] as f64) * scale[i] as f64;
                    bound += w.abs() * d[p / 32] as f64 / 2.0;
                    mag += (codes[o * cols + p] as f64 + zero[i] as f64)
                        * scale[i] as f64
                        * (x[p].abs() as f64 + d[p / 32] as f64);
                }
                let tol = bound + 2.0 * (cols as f64 + 2.0) * f32::EPSILON as f64 * mag;
                let diff = (y[o] as f64 - exact[o] as f64).abs();
                assert!(diff <= tol, "{isa:?} {rows}x{cols} row {o}: {diff} > {tol}");
            }
        }
    }
}

#[test]
fn other_layouts_are_not_taken_and_zero_rows_are_zero() {
    // Byte codes (5–8 bits) keep the f32 path.
    let lb = LowBit::from_int(2, 40, &[3u8; 80], false, 8, &[0.5; 2], &[1; 2], 40).unwrap();
    assert!(!supports(&lb));
    // An all-zero activation row gives exact zeros (d = 0, no NaN from 1/d).
    let lb = LowBit::from_int(3, 70, &[5u8; 210], false, 4, &[0.5; 3], &[2; 3], 70).unwrap();
    for isa in Isa::available() {
        let mut y = vec![1f32; 3];
        gemv(&lb, isa, &[0f32; 70], &mut y);
        assert_eq!(y, vec![0f32; 3], "{isa:?}");
    }
    assert_eq!(
        "q8".parse::<DecodeActivations>().unwrap(),
        DecodeActivations::Q8
    );
    assert!("int8".parse::<DecodeActivations>().is_err());
}
