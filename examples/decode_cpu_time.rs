//! CPU time per decoded token of a Llama model under plans, with fused q/k/v and gate/up
//! projections on and off alternately in one process (so a loaded machine's descheduling
//! does not count and both settings see the same machine). One rayon thread by default
//! (`THREADS=2` for two; then idle workers' spinning counts too).
//!
//! `cargo run --release --example decode_cpu_time -- MODEL [PLAN...]` (no plan: f32).
//! `TOKENS` decoded tokens per measurement (default 64), `REPS` measurements (default 5),
//! `WALL=1` wall-clock time instead of CPU time.
use candle_core::{Device, Tensor};
use quantlab::arch::llama::LoadAs;
use quantlab::nn::{apply_plan, Plan};
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_ns;

fn wall_ns() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

/// Process CPU time, or wall-clock time with `WALL=1`.
fn now_ns() -> u64 {
    if std::env::var("WALL").is_ok_and(|v| v == "1") {
        wall_ns()
    } else {
        cpu_ns()
    }
}

fn env(key: &str, default: usize) -> usize {
    std::env::var(key).map_or(default, |v| v.parse().unwrap())
}

fn main() -> anyhow::Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(env("THREADS", 1))
        .build_global()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .expect("usage: decode_cpu_time MODEL [PLAN...]");
    let mut plans: Vec<String> = args[1..].to_vec();
    if plans.is_empty() {
        plans.push(String::new());
    }
    let (tokens, reps) = (env("TOKENS", 64), env("REPS", 5));
    for plan in &plans {
        let mut m = quantlab::model::load_llm(model, LoadAs::F32, &Device::Cpu)?.model;
        if !plan.is_empty() {
            let p: Plan = plan.parse()?;
            apply_plan(&mut m, &p, |_| Ok(()))?;
        }
        let mut per = [Vec::new(), Vec::new()];
        for rep in 0..reps + 1 {
            for (slot, on) in [(0, false), (1, true)] {
                m.set_fused_projections(on);
                let mut cache = m.new_cache();
                // One token untimed: switching rebuilds the stacked weights.
                let x = Tensor::from_vec(vec![1u32], (1, 1), &Device::Cpu)?;
                m.forward(&x, &mut cache, true)?;
                let t0 = now_ns();
                for k in 0..tokens {
                    let id = ((k * 7919 + 13) % 49000) as u32;
                    let x = Tensor::from_vec(vec![id], (1, 1), &Device::Cpu)?;
                    std::hint::black_box(m.forward(&x, &mut cache, true)?);
                }
                // The first round warms up (and builds the stacked weights).
                if rep > 0 {
                    per[slot].push((now_ns() - t0) as f64 / tokens as f64 / 1e3);
                }
            }
        }
        for v in &mut per {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        }
        let med = |v: &Vec<f64>| v[v.len() / 2];
        println!(
            "{:24} separate {:7.0} µs/token (min {:7.0})  fused {:7.0} (min {:7.0})  fused/separate {:.3} (min {:.3})",
            if plan.is_empty() { "f32" } else { plan },
            med(&per[0]),
            per[0][0],
            med(&per[1]),
            per[1][0],
            med(&per[1]) / med(&per[0]),
            per[1][0] / per[0][0]
        );
    }
    Ok(())
}
