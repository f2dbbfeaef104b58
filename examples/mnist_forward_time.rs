//! The MNIST lab's latency rows measured side by side: the MLP at batch 64 (and 1) as fp32,
//! w:i4:sym:g64 and nf4, forwards *interleaved* (one call of each in turn, repeated), so a
//! loaded machine slows every row alike and the ratios stay comparable. Reports the median
//! wall time per call, the median of the per-round ratios against fp32, and process CPU
//! time per call (both rayon threads).
//!
//! `cargo run --release --example mnist_forward_time -- MODEL_DIR [ROUNDS] [BATCHES]`
//! (MODEL_DIR as `lab mnist --model`, e.g. /work/main/models/mnist-mlp; default 2000 rounds; BATCHES comma-separated,
//! default `64,1`).
use candle_core::{Device, Tensor};
use quantlab::arch::mlp::Mlp;
use quantlab::nn::{apply_plan, Method, Plan};
use std::time::Instant;
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_ns;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "models/mnist-mlp".into());
    let rounds: usize = args.next().map_or(2000, |v| v.parse().unwrap());
    // Optional third argument: the batch sizes to time, comma-separated (default 64,1).
    let batches: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "64,1".to_string())
        .split(',')
        .map(|b| b.parse().expect("batch sizes: comma-separated integers"))
        .collect();
    let base = Mlp::load(std::path::Path::new(&dir), &Device::Cpu)?;
    let mut models = Vec::new();
    for name in ["f32", "w:i4:sym:g64", "nf4"] {
        let method: Method = name.parse()?;
        let mut m = base.clone();
        apply_plan(&mut m, &Plan::uniform(method), |_| Ok(()))?;
        models.push((name, m));
    }
    for batch in batches {
        let x = Tensor::rand(0f32, 1f32, (batch, 784), &Device::Cpu)?;
        // Warm-up (first calls build the kernels' layouts).
        for _ in 0..50 {
            for (_, m) in &models {
                m.forward(&x)?;
            }
        }
        let mut wall = vec![Vec::with_capacity(rounds); models.len()];
        let mut cpu = vec![0u64; models.len()];
        for _ in 0..rounds {
            for (i, (_, m)) in models.iter().enumerate() {
                let (t0, c0) = (Instant::now(), cpu_ns());
                m.forward(&x)?;
                wall[i].push(t0.elapsed().as_secs_f64() * 1e3);
                cpu[i] += cpu_ns() - c0;
            }
        }
        let f32_wall = wall[0].clone();
        for (i, (name, _)) in models.iter().enumerate() {
            let mut ratios: Vec<f64> = f32_wall.iter().zip(&wall[i]).map(|(f, t)| f / t).collect();
            let p50 = median(&mut wall[i].clone());
            println!(
                "B{batch:<3} {name:14} p50 {p50:.4} ms  ×fp32 (median of per-round ratios) {:.3}  CPU {:.4} ms/call",
                median(&mut ratios),
                cpu[i] as f64 / rounds as f64 / 1e6
            );
        }
    }
    Ok(())
}
