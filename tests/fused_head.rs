//! The CPU perplexity path's fused output layer (`Llama::tail_target_log_probs`: the
//! output-layer product and the log-softmax at each target in one pass, no logits written)
//! against the unfused pair it replaces (`forward_tail`, then `log_softmax` at the target)
//! on the tiny Llama (`tests/fixtures/llama-tiny`), for the whole window and for its tail;
//! and where it must not run (a quantized output layer, two windows at once) it declines.
//!
//! Tolerance: both sides compute the same f32 logits (the same GEMM tiles, bit for bit);
//! they differ only in the order of the sum of exponentials over the vocabulary (the fused
//! one adds per 512-column slice, then rescales each slice's sum once), so the error of
//! `ln Σ exp` is bounded by the sums' relative error, (vocab / 8 + slices + 8) · 2⁻²³ each
//! side: under 1e-5 here. The f64 check of the same kernel is in `llm_f32`'s unit tests.

mod common;
use candle_core::{Device, Tensor};
use common::tiny_llama;
use quantlab::arch::llama::Llama;

#[test]
fn fused_head_matches_log_softmax_of_the_logits() {
    let m = tiny_llama("");
    let vocab = m.cfg.vocab_size;
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    for rows in [ids.len(), 17, 1] {
        let targets: Vec<u32> = (0..rows)
            .map(|r| ((r * 7919 + 11) % vocab) as u32)
            .collect();
        let fused = m
            .tail_target_log_probs(&x, &mut m.new_cache(), rows, &targets)
            .unwrap()
            .expect("the fused path runs for an f32 output layer on the CPU");
        let logits = m.forward_tail(&x, &mut m.new_cache(), rows).unwrap();
        let lp = Llama::log_softmax(&logits.squeeze(0).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let slices = vocab.div_ceil(512) as f64;
        let tol = 2.0 * (vocab as f64 / 8.0 + slices + 8.0) * f32::EPSILON as f64;
        for (r, (&g, &t)) in fused.iter().zip(&targets).enumerate() {
            let want = lp[r][t as usize];
            assert!(
                ((g - want) as f64).abs() <= tol + 2.0 * f32::EPSILON as f64 * want.abs() as f64,
                "rows {rows}, row {r}: fused {g} vs log_softmax {want}"
            );
        }
    }
}

#[test]
fn fused_head_declines_where_it_does_not_apply() {
    let ids: Vec<u32> = (0..8).collect();
    // A quantized output layer.
    let m = tiny_llama("*=q8_0");
    let x = Tensor::from_vec(ids.clone(), (1, 8), &Device::Cpu).unwrap();
    assert!(m
        .tail_target_log_probs(&x, &mut m.new_cache(), 8, &ids)
        .unwrap()
        .is_none());
    // Two windows at once, and a target count that is not the row count.
    let m = tiny_llama("");
    let two = Tensor::from_vec([ids.clone(), ids.clone()].concat(), (2, 8), &Device::Cpu).unwrap();
    assert!(m
        .tail_target_log_probs(
            &two,
            &mut m.new_cache(),
            8,
            &[ids.clone(), ids.clone()].concat()
        )
        .unwrap()
        .is_none());
    assert!(m
        .tail_target_log_probs(&x, &mut m.new_cache(), 8, &ids[..3])
        .unwrap()
        .is_none());
    // Bad input is an error, not a panic.
    assert!(m
        .tail_target_log_probs(&x, &mut m.new_cache(), 9, &ids)
        .is_err());
}
