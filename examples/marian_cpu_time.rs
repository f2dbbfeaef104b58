//! `lab marian`'s throughput column on its own, plan against plan in one process: the
//! shared MarianMT translates the first `N` Multi30k test sentences (batches of 32, the
//! model's beam 4, at most 128 new tokens, as the lab) under each plan in turn, `ROUNDS`
//! times alternating, and prints wall seconds, process CPU seconds (all threads; time spent
//! descheduled on a loaded machine does not count) and samples/s per run, then the
//! median ratio of each plan's samples/s to the first plan's.
//!
//! `QUANTLAB_DATA=/work/shared/data cargo run --release --example marian_cpu_time`
//! Env: `N` (sentences, default 320), `ROUNDS` (3), `PLANS` (`;`-separated plans, default
//! `*=f32;*=dynamic-int8`), `BATCH` (32), `MODEL` (a Marian folder; default the shared one).
use quantlab::eval::mt;
use quantlab::eval::seq2seq::Overrides;
use std::time::Instant;
#[path = "support/clock.rs"]
mod clock;

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let n: usize = env("N", 320);
    let rounds: usize = env("ROUNDS", 3);
    let batch: usize = env("BATCH", 32);
    let plans: Vec<String> = env("PLANS", "*=f32;*=dynamic-int8".to_string())
        .split(';')
        .map(str::to_string)
        .collect();
    let data = quantlab::data::DataDir::resolve(None)?;
    let (src, refs) = quantlab::data::read_aligned(
        &data.require("multi30k/test_2016_flickr.en.gz", "set QUANTLAB_DATA")?,
        &data.require("multi30k/test_2016_flickr.de.gz", "set QUANTLAB_DATA")?,
        Some(n),
    )?;
    let model = match std::env::var("MODEL") {
        Ok(m) => m,
        Err(_) => quantlab::model::default_marian_dir()?.display().to_string(),
    };
    let device = candle_core::Device::Cpu;
    let overrides = Overrides {
        max_new_tokens: Some(128),
        ..Default::default()
    };
    let prepared: Vec<_> = plans
        .iter()
        .map(|plan| {
            let p = mt::prepare(&model, Some(plan), None, &device)?;
            let g = overrides.apply(&p.generation)?;
            anyhow::Ok((p, g))
        })
        .collect::<anyhow::Result<_>>()?;
    println!(
        "{} sentences, batch {batch}, {} threads, kernels {}",
        src.len(),
        rayon::current_num_threads(),
        quantlab::nn::kernels::isa::describe()
    );
    let mut rates = vec![Vec::new(); plans.len()];
    for round in 0..rounds {
        for (i, (p, g)) in prepared.iter().enumerate() {
            let (t0, c0) = (Instant::now(), clock::cpu_ns());
            let run = mt::evaluate(p, &src, &refs, g, batch, false)?;
            let (wall, cpu) = (
                t0.elapsed().as_secs_f64(),
                (clock::cpu_ns() - c0) as f64 / 1e9,
            );
            let rate = run.sentences_per_second();
            rates[i].push(rate);
            println!(
                "round {round} {:<20} wall {wall:6.2} s  cpu {cpu:6.2} s  {rate:6.1} samples/s  BLEU {:.2}",
                plans[i], run.bleu.score
            );
        }
    }
    for (i, r) in rates.iter().enumerate().skip(1) {
        let ratios: Vec<String> = r
            .iter()
            .zip(&rates[0])
            .map(|(a, b)| format!("{:.2}", a / b))
            .collect();
        println!("{} / {}: {}", plans[i], plans[0], ratios.join(", "));
    }
    Ok(())
}
