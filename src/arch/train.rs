//! Training the MLP classifier in Candle: seeded PyTorch-style initialisation, Adam,
//! seeded shuffling, so the same seed gives the same model.

use super::mlp::{layer_name, Mlp, MlpConfig};
use crate::data::mnist::MnistSplit;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    pub progress: bool,
}

impl Default for TrainConfig {
    /// The lab's hyper-parameters: Adam, lr 1e-3, batch 64, 2 epochs.
    fn default() -> Self {
        TrainConfig {
            epochs: 2,
            batch_size: 64,
            lr: 1e-3,
            seed: 0,
            progress: true,
        }
    }
}

/// Loss of every step, for inspection.
pub struct TrainLog {
    pub losses: Vec<f32>,
}

/// torch.nn.Linear's default init: weight and bias uniform in ±1/sqrt(fan_in).
fn init_linear(
    rng: &mut rand::rngs::StdRng,
    fan_in: usize,
    fan_out: usize,
    device: &Device,
) -> Result<(Var, Var)> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let w: Vec<f32> = (0..fan_in * fan_out)
        .map(|_| rng.gen_range(-bound..bound))
        .collect();
    let b: Vec<f32> = (0..fan_out).map(|_| rng.gen_range(-bound..bound)).collect();
    Ok((
        Var::from_tensor(&Tensor::from_vec(w, (fan_out, fan_in), device)?)?,
        Var::from_tensor(&Tensor::from_vec(b, fan_out, device)?)?,
    ))
}

pub fn train(config: &MlpConfig, data: &MnistSplit, tc: &TrainConfig) -> Result<(Mlp, TrainLog)> {
    config.validate()?;
    if data.is_empty() {
        bail!("training set is empty");
    }
    if tc.batch_size == 0 || tc.epochs == 0 {
        bail!("batch size and epochs must be at least 1");
    }
    let device = data.images.device().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(tc.seed);
    let mut params = Vec::new();
    for (fan_in, fan_out) in config.layer_shapes() {
        params.push(init_linear(&mut rng, fan_in, fan_out, &device)?);
    }
    let vars: Vec<Var> = params
        .iter()
        .flat_map(|(w, b)| [w.clone(), b.clone()])
        .collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: tc.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let n = data.len();
    let steps_per_epoch = n.div_ceil(tc.batch_size);
    let bar = crate::progress::bar(
        (steps_per_epoch * tc.epochs) as u64,
        "training",
        tc.progress,
    );
    let mut losses = Vec::new();
    let mut order: Vec<u32> = (0..n as u32).collect();
    for _ in 0..tc.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(tc.batch_size) {
            let idx = Tensor::from_slice(chunk, chunk.len(), &device)?;
            let x = data.images.index_select(&idx, 0)?;
            let y = data.labels.index_select(&idx, 0)?;
            let mut h = x;
            for (i, (w, b)) in params.iter().enumerate() {
                h = h
                    .matmul(&w.as_tensor().t()?)?
                    .broadcast_add(b.as_tensor())?;
                if i + 1 < params.len() {
                    h = h.relu()?;
                }
            }
            let loss = candle_nn::loss::cross_entropy(&h, &y)?;
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()?;
            if !l.is_finite() {
                bail!("training diverged (loss {l}); try a smaller learning rate");
            }
            losses.push(l);
            bar.inc(1);
            bar.set_message(format!("loss {l:.4}"));
        }
    }
    bar.finish_and_clear();
    let mut tensors = HashMap::new();
    for (i, (w, b)) in params.iter().enumerate() {
        tensors.insert(format!("{}.weight", layer_name(i)), w.as_tensor().detach());
        tensors.insert(format!("{}.bias", layer_name(i)), b.as_tensor().detach());
    }
    Ok((
        Mlp::from_tensors(config.clone(), &tensors)?,
        TrainLog { losses },
    ))
}

/// Fraction of correct argmax predictions, evaluated in batches.
pub fn accuracy(model: &Mlp, data: &MnistSplit, batch: usize) -> Result<f64> {
    if data.is_empty() {
        bail!("evaluation set is empty");
    }
    let mut correct = 0usize;
    let n = data.len();
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let x = data.images.narrow(0, start, len)?;
        let y = data.labels.narrow(0, start, len)?;
        let pred = model.forward(&x)?.argmax(D::Minus1)?;
        correct += pred
            .eq(&y)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        start += len;
    }
    Ok(correct as f64 / n as f64)
}
