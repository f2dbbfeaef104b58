//! `quantlab bench-gemv`: the packed decode GEMV (`nn::format::packed_cuda`) against the
//! dense product of the activation dtype (cuBLAS on a GPU) on the same shapes in one run.
//! The packed matrices are synthetic (random codes and scales: the kernel's time does not
//! depend on the values), so the largest shapes cost no quantization time. Rows `a:q8`:
//! the same codes against activations quantized to 8 bits per 32 columns
//! (`packed_cuda::q8`): the fused kernel (one launch, the quantization in each block's
//! prologue) and `a:q8 2-launch` (a quantization launch, then the GEMV) in the same run.

use crate::nn::format::packed_cuda::q8::{self, Route};
use crate::nn::format::packed_cuda::{Kernel, PackedLayout, PackedWeight};
use crate::nn::kernels::prefill::ActivationMode;
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::time::Instant;

/// SmolLM2-135M's projections, then 7B–70B-sized ones (`out x in`).
const SHAPES: &str =
    "576x576,192x576,1536x576,576x1536,49152x576,4096x4096,14336x4096,8192x8192,28672x8192";

#[derive(clap::Args, Debug)]
pub struct BenchGemvArgs {
    /// Weight shapes `OUTxIN`, comma separated.
    #[arg(long, default_value = SHAPES)]
    pub shapes: String,
    /// Packed formats: `q8` (8-bit, one scale per row), `q4gG` (4-bit affine, groups of G),
    /// `nf4` (code book, blocks of 64), comma separated.
    #[arg(long, default_value = "q8,q4g64,q4g128,nf4")]
    pub formats: String,
    /// Activation rows (1 = one decoded token), at most 8.
    #[arg(short = 'm', long, default_value_t = 1)]
    pub rows: usize,
    /// Timed calls per measurement (after 5 warm-up calls).
    #[arg(short = 'r', long, default_value_t = 200)]
    pub reps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Packed kernels to time, comma separated: `v1`, `v2`, `v3` (v2 and v3 take m <= 2;
    /// above, their rows repeat v1).
    #[arg(long, default_value = "v1,v2,v3")]
    pub kernels: String,
}

fn parse_kernel(k: &str) -> Result<(String, Kernel)> {
    let kernel = match k.trim() {
        "v1" => Kernel::V1,
        "v2" => Kernel::V2,
        "v3" => Kernel::V3,
        other => bail!("unknown packed kernel '{other}': v1, v2 or v3"),
    };
    Ok((k.trim().to_string(), kernel))
}

fn parse_format(f: &str) -> Result<(u32, bool, usize)> {
    Ok(match f {
        "q8" => (8, false, 0),
        "nf4" => (4, true, 64),
        _ => match f.strip_prefix("q4g").map(str::parse::<usize>) {
            Some(Ok(g)) if g > 0 => (4, false, g),
            _ => bail!("unknown packed format '{f}': q8, q4gG or nf4"),
        },
    })
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (n, k) = s
        .split_once('x')
        .with_context(|| format!("shape '{s}' is not OUTxIN"))?;
    let n: usize = n
        .trim()
        .parse()
        .with_context(|| format!("in shape '{s}'"))?;
    let k: usize = k
        .trim()
        .parse()
        .with_context(|| format!("in shape '{s}'"))?;
    if n == 0 || k == 0 {
        bail!("shape '{s}' is empty");
    }
    Ok((n, k))
}

/// Mean µs per call of `f` over `reps` calls, the device synchronised around them.
fn time(device: &Device, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / reps as f64)
}

pub fn report(a: &BenchGemvArgs, device: &Device) -> Result<Report> {
    if a.rows == 0 || a.rows > crate::nn::format::packed_cuda::MAX_ROWS {
        bail!("-m must be 1 to 8");
    }
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let shapes: Vec<_> = a
        .shapes
        .split(',')
        .map(parse_shape)
        .collect::<Result<_>>()?;
    let formats: Vec<_> = a
        .formats
        .split(',')
        .map(|f| parse_format(f).map(|p| (f.to_string(), p)))
        .collect::<Result<_>>()?;
    let kernels: Vec<_> = a
        .kernels
        .split(',')
        .map(parse_kernel)
        .collect::<Result<_>>()?;
    let dtype = crate::device::activation_dtype(device);
    let dname = crate::device::dtype_name(dtype);
    let mut t = Table::new(
        "bench_gemv",
        "Decode GEMV: packed codes against the dense product",
        &["shape", "weights", "µs", "GB/s", "× dense"],
    );
    for (i, &(n, k)) in shapes.iter().enumerate() {
        let seed = a.seed + i as u64;
        let x = Tensor::randn(0f32, 1.0, (a.rows, k), device)?.to_dtype(dtype)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), device)?.to_dtype(dtype)?;
        let wt = w.t()?;
        let dense_us = time(device, a.reps, || Ok(x.matmul(&wt)?))?;
        let dense_bytes = n * k * dtype.size_in_bytes();
        drop((wt, w));
        let shape = format!("{n}x{k}");
        let gbs = |bytes: usize, us: f64| bytes as f64 / us / 1e3;
        t.push(vec![
            Cell::Text(shape.clone()),
            Cell::Text(format!("{dname} (dense)")),
            Cell::f(dense_us, 2),
            Cell::f(gbs(dense_bytes, dense_us), 0),
            Cell::f(1.0, 2),
        ]);
        for (name, (bits, table, group)) in &formats {
            let layout = PackedLayout::synthetic(n, k, *bits, *table, *group, seed);
            let p = PackedWeight::upload(&layout, device)?;
            // Each kernel on its own row.
            for (kname, kernel) in &kernels {
                let p = p.with_kernel(*kernel);
                let us = time(device, a.reps, || p.gemv(&x))?;
                t.push(vec![
                    Cell::Text(shape.clone()),
                    Cell::Text(format!("{name} {kname}")),
                    Cell::f(us, 2),
                    Cell::f(gbs(p.device_bytes(), us), 0),
                    Cell::f(dense_us / us, 2),
                ]);
            }
            // The q8-activation kernel (`--activations q8`), where the layout takes it:
            // fused, then the two launches.
            if a.rows <= q8::MAX_ROWS && q8::eligible(&p) {
                for (label, route) in [
                    ("a:q8", Route::Fused { max_blocks: 0 }),
                    ("a:q8 2-launch", Route::TwoLaunch),
                ] {
                    let p = p
                        .with_activations(Some(ActivationMode::Q8))
                        .with_q8_route(route);
                    let us = time(device, a.reps, || p.gemv(&x))?;
                    t.push(vec![
                        Cell::Text(shape.clone()),
                        Cell::Text(format!("{name} {label}")),
                        Cell::f(us, 2),
                        Cell::f(gbs(p.device_bytes(), us), 0),
                        Cell::f(dense_us / us, 2),
                    ]);
                }
            }
        }
    }
    t.note(format!(
        "{}, {dname} activations, m = {} row(s); mean over {} calls after 5 warm-up calls, device synchronised around them. GB/s = bytes of the weight (codes + scales) / time; × dense = dense time / packed time, same run. a:q8 rows: activations quantized to 8 bits per 32 columns, then a dp4a GEMV: fused (one launch; QUANTLAB_Q8_BLOCKS_PER_SM, if set, fixes its grid) or 2-launch (quantization, then the GEMV).",
        crate::device::describe(device),
        a.rows,
        a.reps
    ));
    Ok(Report {
        tables: vec![t],
        notes: Vec::new(),
    })
}
