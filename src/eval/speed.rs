//! Throughput as llama-bench measures it, so the two tools' rows compare directly:
//! `pp N` is one forward over N prompt tokens from an empty KV cache (logits for the last
//! position only, as llama.cpp computes them), `tg N` is N single-token steps from an
//! empty cache. Tokens are drawn from a seeded generator over the vocabulary (llama-bench
//! uses random tokens too): throughput must not depend on what the model predicts.

use crate::arch::llama::Llama;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::time::Instant;

/// One llama-bench test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeedTest {
    /// Prompt processing: one batch of this many tokens.
    Prompt(usize),
    /// Text generation: this many one-token steps.
    Generate(usize),
}

impl SpeedTest {
    /// llama-bench's name for the test (`pp512`, `tg128`).
    pub fn name(&self) -> String {
        match self {
            SpeedTest::Prompt(n) => format!("pp{n}"),
            SpeedTest::Generate(n) => format!("tg{n}"),
        }
    }

    pub fn tokens(&self) -> usize {
        match self {
            SpeedTest::Prompt(n) | SpeedTest::Generate(n) => *n,
        }
    }
}

/// Tokens per second of each timed repetition.
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    pub test: SpeedTest,
    pub samples: Vec<f64>,
}

impl Throughput {
    pub fn mean(&self) -> f64 {
        self.samples.iter().sum::<f64>() / self.samples.len().max(1) as f64
    }

    /// Sample standard deviation (n − 1), 0 for one sample.
    pub fn std(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.samples.iter().map(|s| (s - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    }
}

/// A seeded stream of token ids below `vocab` (the project's seeded generator, as
/// `quant::random` uses it).
pub fn token_stream(vocab: usize, seed: u64) -> impl FnMut() -> u32 {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    move || rng.gen_range(0..vocab as u32)
}

/// Runs `test` once untimed (warm-up: caches, lazily built buffers) and `reps` times timed.
pub fn measure(model: &Llama, test: SpeedTest, reps: usize, seed: u64) -> Result<Throughput> {
    if reps == 0 {
        bail!("--reps must be at least 1");
    }
    let n = test.tokens();
    if n == 0 {
        bail!("{}: a test needs at least one token", test.name());
    }
    if n > model.cfg.max_position_embeddings {
        bail!(
            "{}: {n} tokens exceed the model's context of {} positions",
            test.name(),
            model.cfg.max_position_embeddings
        );
    }
    let mut next = token_stream(model.cfg.vocab_size, seed);
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let ids: Vec<u32> = (0..n).map(|_| next()).collect();
        let secs = run_once(model, test, &ids)?;
        if rep > 0 {
            samples.push(n as f64 / secs);
        }
    }
    Ok(Throughput { test, samples })
}

/// Seconds for one run of `test` over `ids`, the device synchronised at both ends.
fn run_once(model: &Llama, test: SpeedTest, ids: &[u32]) -> Result<f64> {
    let device = &model.device;
    let mut cache = model.new_cache();
    let inputs: Vec<Tensor> = match test {
        SpeedTest::Prompt(_) => vec![Tensor::new(ids, device)?.unsqueeze(0)?],
        SpeedTest::Generate(_) => ids
            .iter()
            .map(|&t| Tensor::new(&[t], device)?.unsqueeze(0))
            .collect::<candle_core::Result<_>>()?,
    };
    synchronize(device)?;
    let start = Instant::now();
    for x in &inputs {
        let logits = model.forward(x, &mut cache, true)?;
        // Reading one value back makes sure the work is done on any device.
        logits
            .flatten_all()?
            .narrow(0, 0, 1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
    }
    synchronize(device)?;
    Ok(start.elapsed().as_secs_f64())
}

fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_by_hand() {
        let t = Throughput {
            test: SpeedTest::Prompt(512),
            samples: vec![100.0, 110.0, 120.0],
        };
        assert_eq!(t.mean(), 110.0);
        assert!((t.std() - 10.0).abs() < 1e-12);
        assert_eq!(t.test.name(), "pp512");
        assert_eq!(SpeedTest::Generate(128).name(), "tg128");
    }

    #[test]
    fn tokens_stay_in_the_vocabulary_and_repeat_with_the_seed() {
        let a: Vec<u32> = std::iter::repeat_with(token_stream(7, 3))
            .take(200)
            .collect();
        let b: Vec<u32> = std::iter::repeat_with(token_stream(7, 3))
            .take(200)
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t < 7));
        // every id appears: the stream covers the vocabulary
        assert!((0..7).all(|v| a.contains(&v)));
    }
}
