//! Exercise 0: a 4×3 tensor affinely quantized to 2 bits (codes 0..3) by hand.

use crate::quant::{quantize, Convention, Scheme};
use crate::report::{matrix_table, Cell, Report, Table};
use anyhow::Result;
use candle_core::{Device, Tensor};

/// The handout's input.
pub const INPUT: [[f32; 3]; 4] = [
    [0.22, 0.52, 0.13],
    [0.29, 1.00, 0.73],
    [0.44, 0.00, 0.33],
    [0.59, 0.97, 0.78],
];

#[derive(Debug, Clone)]
pub struct Ex0 {
    pub scale: f32,
    pub zero_point: i32,
    pub codes: Vec<Vec<i32>>,
    pub dequantized: Vec<Vec<f64>>,
    pub abs_error: Vec<Vec<f64>>,
}

pub fn run() -> Result<Ex0> {
    let flat: Vec<f32> = INPUT.iter().flatten().copied().collect();
    let x = Tensor::from_vec(flat, (4, 3), &Device::Cpu)?;
    // min is 0, so the handout's and PyTorch's conventions agree here.
    let scheme = Scheme::new(2, false)?.with_convention(Convention::Handout);
    let q = quantize(&x, &scheme)?;
    let deq = q.dequantize()?;
    let err = (&x - &deq)?.abs()?;
    Ok(Ex0 {
        scale: q.params.scale[0],
        zero_point: q.params.zero_point[0],
        codes: q.codes_i32()?.chunks(3).map(|c| c.to_vec()).collect(),
        dequantized: super::rows_f64(&deq)?,
        abs_error: super::rows_f64(&err)?,
    })
}

pub fn report(r: &Ex0) -> Report {
    let mut params = Table::new(
        "ex0_params",
        "Exercise 0: 2-bit affine quantization (u2, per tensor)",
        &["scale", "zero point"],
    );
    params.push(vec![Cell::f(r.scale as f64, 6), r.zero_point.into()]);
    let codes: Vec<Vec<f64>> = r
        .codes
        .iter()
        .map(|row| row.iter().map(|&c| c as f64).collect())
        .collect();
    Report {
        tables: vec![
            params,
            matrix_table("ex0_codes", "Codes", &codes, 0),
            matrix_table("ex0_dequantized", "Dequantized", &r.dequantized, 2),
            matrix_table("ex0_abs_error", "Absolute error", &r.abs_error, 2),
        ],
        notes: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round2(m: &[Vec<f64>]) -> Vec<Vec<f64>> {
        m.iter()
            .map(|r| r.iter().map(|v| (v * 100.0).round() / 100.0).collect())
            .collect()
    }

    #[test]
    fn reproduces_the_handout() {
        let r = run().unwrap();
        assert_eq!(
            r.codes,
            vec![vec![1, 2, 0], vec![1, 3, 2], vec![1, 0, 1], vec![2, 3, 2]]
        );
        assert_eq!(r.zero_point, 0);
        assert!((r.scale - 1.0 / 3.0).abs() < 1e-7);
        assert_eq!(
            round2(&r.dequantized),
            vec![
                vec![0.33, 0.67, 0.0],
                vec![0.33, 1.0, 0.67],
                vec![0.33, 0.0, 0.33],
                vec![0.67, 1.0, 0.67]
            ]
        );
        assert_eq!(
            round2(&r.abs_error),
            vec![
                vec![0.11, 0.15, 0.13],
                vec![0.04, 0.0, 0.06],
                vec![0.11, 0.0, 0.0],
                vec![0.08, 0.03, 0.11]
            ]
        );
    }
}
