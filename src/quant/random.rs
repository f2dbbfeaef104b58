//! Seeded normal samples for demos and benchmarks (Box–Muller on a seeded PRNG), so a
//! run is reproducible without depending on a framework's generator.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

pub fn randn_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

pub fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(randn_vec(n, seed), shape, &Device::Cpu)?)
}
