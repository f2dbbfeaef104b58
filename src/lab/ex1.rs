//! Exercise 1: 8-bit affine (uint8) quantization of `torch.randn(4,4)` and `torch.randn(8,8)`
//! drawn after `torch.manual_seed(999)`, in the handout's convention and in PyTorch's.

use crate::data::DataDir;
use crate::quant::io::{save_f32, save_qtensor};
use crate::quant::{quantize, Convention, ErrorStats, Scheme};
use crate::report::{matrix_table, Cell, Report, Table};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Where the recorded inputs live inside the data folder.
pub const INPUTS_FILE: &str = "lab/ex1_inputs.json";

/// One quantized matrix under one convention.
#[derive(Debug, Clone)]
pub struct Ex1Case {
    pub input: String,
    pub convention: Convention,
    pub scale: f32,
    pub zero_point: i32,
    pub dequantized: Vec<Vec<f64>>,
    pub error: ErrorStats,
    /// Payload bytes: 4 per f32 value; 1 per u8 code plus a 4-byte scale and zero point.
    pub f32_bytes: usize,
    pub quantized_bytes: usize,
    /// Sizes of the safetensors files actually written (headers included).
    pub f32_file_bytes: u64,
    pub quantized_file_bytes: u64,
}

pub fn load_inputs(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let mut out = Vec::new();
    for (key, size) in [("randn_4x4", 4usize), ("randn_8x8", 8)] {
        let rows: Vec<Vec<f32>> = serde_json::from_value(
            v.get(key)
                .cloned()
                .with_context(|| format!("{} has no '{key}'", path.display()))?,
        )
        .with_context(|| format!("'{key}' in {} is not a matrix of numbers", path.display()))?;
        // The exercise is about these shapes: any other is a wrong file, not a variant.
        let n = rows.len();
        if n != size || rows.iter().any(|r| r.len() != size) {
            let widths: Vec<String> = rows.iter().map(|r| r.len().to_string()).collect();
            bail!(
                "'{key}' in {} must be {size}×{size} numbers: it has {n} rows (of {} values)",
                path.display(),
                if widths.is_empty() {
                    "no".to_string()
                } else {
                    widths.join(", ")
                }
            );
        }
        if rows.iter().flatten().any(|v| !v.is_finite()) {
            bail!("'{key}' in {} holds a non-finite value", path.display());
        }
        let m = size;
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        out.push((
            key.to_string(),
            Tensor::from_vec(flat, (n, m), &Device::Cpu)?,
        ));
    }
    Ok(out)
}

pub fn run(data: &DataDir) -> Result<Vec<Ex1Case>> {
    let path = data.require(
        INPUTS_FILE,
        "it holds torch.randn draws after torch.manual_seed(999); copy the lab's ex1_inputs.json there",
    )?;
    run_on(&load_inputs(&path)?)
}

pub fn run_on(inputs: &[(String, Tensor)]) -> Result<Vec<Ex1Case>> {
    let dir = tempfile::tempdir().context("creating a temporary folder for size measurements")?;
    let mut cases = Vec::new();
    for (name, x) in inputs {
        let f32_file = save_f32(x, name, &dir.path().join(format!("{name}.f32.safetensors")))?;
        for convention in [Convention::Handout, Convention::Pytorch] {
            let scheme = Scheme::new(8, false)?.with_convention(convention);
            let q = quantize(x, &scheme)?;
            let deq = q.dequantize()?;
            let qfile = save_qtensor(
                &q,
                &dir.path()
                    .join(format!("{name}.{convention:?}.safetensors")),
            )?;
            cases.push(Ex1Case {
                input: name.clone(),
                convention,
                scale: q.params.scale[0],
                zero_point: q.params.zero_point[0],
                dequantized: super::rows_f64(&deq)?,
                error: ErrorStats::between(x, &deq)?,
                f32_bytes: x.elem_count() * 4,
                quantized_bytes: x.elem_count() + 8,
                f32_file_bytes: f32_file,
                quantized_file_bytes: qfile,
            });
        }
    }
    Ok(cases)
}

fn convention_name(c: Convention) -> &'static str {
    match c {
        Convention::Handout => "handout (zero point truncated)",
        Convention::Pytorch => "pytorch (zero point rounded)",
    }
}

pub fn report(cases: &[Ex1Case]) -> Report {
    let mut summary = Table::new(
        "ex1_summary",
        "Exercise 1: 8-bit affine quantization (u8, per tensor)",
        &[
            "input",
            "convention",
            "scale",
            "zero point",
            "mean abs error",
            "max abs error",
            "SQNR (dB)",
            "f32 bytes",
            "u8 bytes",
            "f32 file bytes",
            "u8 file bytes",
        ],
    );
    let mut tables = Vec::new();
    for c in cases {
        summary.push(vec![
            c.input.clone().into(),
            convention_name(c.convention).into(),
            Cell::f(c.scale as f64, 8),
            c.zero_point.into(),
            Cell::f(c.error.mean_abs, 10),
            Cell::f(c.error.max_abs, 10),
            Cell::f(c.error.sqnr_db, 2),
            c.f32_bytes.into(),
            c.quantized_bytes.into(),
            Cell::Int(c.f32_file_bytes as i64),
            Cell::Int(c.quantized_file_bytes as i64),
        ]);
        if c.convention == Convention::Handout {
            tables.push(matrix_table(
                &format!("ex1_dequantized_{}", c.input),
                &format!("Dequantized {} (handout convention)", c.input),
                &c.dequantized,
                4,
            ));
        }
    }
    summary.note("u8 bytes = one byte per code + 4-byte scale + 4-byte zero point; file bytes include the safetensors header and metadata.");
    tables.insert(0, summary);
    Report {
        tables,
        notes: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases() -> Vec<Ex1Case> {
        let data = DataDir::resolve(None).expect("ex1 needs ../shared/data (or QUANTLAB_DATA)");
        run(&data).unwrap()
    }

    #[test]
    fn reproduces_the_handout_values() {
        let cases = cases();
        let h4 = cases
            .iter()
            .find(|c| c.input == "randn_4x4" && c.convention == Convention::Handout)
            .unwrap();
        let want = [
            [-0.2623, 1.3991, 0.2842, 1.0275],
            [-0.9838, -3.4104, 1.4866, 0.2405],
            [1.4866, -0.3716, 0.0874, 2.1424],
            [0.6340, -1.1587, -0.7870, 0.0656],
        ];
        for (r, w) in h4.dequantized.iter().zip(want) {
            for (a, b) in r.iter().zip(w) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
        assert!(
            (h4.error.mean_abs - 0.006_312_363_781_034_946_4).abs() < 1e-6,
            "{}",
            h4.error.mean_abs
        );
        assert!(
            (h4.error.max_abs - 0.011_491_775_512_695_312).abs() < 1e-6,
            "{}",
            h4.error.max_abs
        );
        let h8 = cases
            .iter()
            .find(|c| c.input == "randn_8x8" && c.convention == Convention::Handout)
            .unwrap();
        assert!(
            (h8.error.mean_abs - 0.005_860_863_253_474_235_5).abs() < 1e-6,
            "{}",
            h8.error.mean_abs
        );
        assert!(
            (h8.error.max_abs - 0.011_491_775_512_695_312).abs() < 1e-6,
            "{}",
            h8.error.max_abs
        );
    }

    #[test]
    fn pytorch_convention_differs_only_in_the_zero_point() {
        let cases = cases();
        for pair in cases.chunks(2) {
            let (h, p) = (&pair[0], &pair[1]);
            assert_eq!(h.scale, p.scale);
            // truncation toward zero vs rounding: they differ by at most one
            assert!((h.zero_point - p.zero_point).abs() <= 1);
            assert_eq!(h.quantized_bytes, h.f32_bytes / 4 + 8);
        }
    }
}
