//! End to end: the tiny Llama (`tests/fixtures/llama-tiny`) with 4-bit weight-only layers,
//! decoded one token at a time and prefilled in one forward, with q8 activations
//! (`--activations q8`) against f32 ones. Its own test binary: the choice is process-wide.
//!
//! Tolerance: q8 activations round each input to within `max|x|/254` of its chunk (an
//! 8-bit error), while the weights themselves carry 4-bit rounding error (16× coarser
//! steps). So the logits must move far less under q8 activations than under the weight
//! quantization itself: here at most a quarter of it, measured as the largest logit change
//! over all decoded positions (and not by zero: the path must actually run).

mod common;
use candle_core::{Device, Tensor};
use common::{decode_logits, tiny_llama};
use quantlab::arch::llama::Llama;
use quantlab::nn::kernels::prefill::{set_activations, ActivationMode};

/// Logits of every position from one forward over all of `ids` (the many-row products).
fn prefill(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache();
    let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let l = m.forward(&x, &mut cache, false).unwrap();
    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The tests toggle one process-wide switch: one at a time.
static SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn q8_decode_activations_move_logits_far_less_than_4_bit_weights() {
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 200).collect();
    let base = decode_logits(&tiny_llama(""), &ids);
    for plan in [
        "*=w:i4:sym:g32",
        "*=w:i4:sym:g64",
        "*=w:i4:asym:g32",
        "*=w:i4:asym:g64",
        "*=nf4",
    ] {
        let m = tiny_llama(plan);
        set_activations(ActivationMode::F32);
        let exact = decode_logits(&m, &ids);
        set_activations(ActivationMode::Q8);
        let q8 = decode_logits(&m, &ids);
        set_activations(ActivationMode::F32);
        let (weights, acts) = (max_diff(&base, &exact), max_diff(&exact, &q8));
        assert!(acts > 0.0, "{plan}: the q8 path did not run");
        assert!(
            acts <= 0.25 * weights,
            "{plan}: q8 activations moved logits by {acts}, 4-bit weights by {weights}"
        );
        eprintln!("{plan}: weights {weights:.4}, q8 activations {acts:.4}");
    }
}

#[test]
fn q8_prefill_activations_move_logits_far_less_than_4_bit_weights() {
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let ids: Vec<u32> = (0..40).map(|i| (i * 53 + 11) % 200).collect();
    let base = prefill(&tiny_llama(""), &ids);
    for plan in [
        "*=w:i4:sym:g32",
        "*=w:i4:sym:g64",
        "*=w:i4:asym:g64",
        "*=nf4",
    ] {
        let m = tiny_llama(plan);
        set_activations(ActivationMode::F32);
        let exact = prefill(&m, &ids);
        let again = prefill(&m, &ids);
        set_activations(ActivationMode::Q8);
        let q8 = prefill(&m, &ids);
        set_activations(ActivationMode::F32);
        assert_eq!(exact, again, "{plan}: f32 activations are deterministic");
        let (weights, acts) = (max_diff(&base, &exact), max_diff(&exact, &q8));
        assert!(acts > 0.0, "{plan}: the q8 path did not run");
        assert!(
            acts <= 0.25 * weights,
            "{plan}: q8 activations moved logits by {acts}, 4-bit weights by {weights}"
        );
        eprintln!("{plan} prefill: weights {weights:.4}, q8 activations {acts:.4}");
    }
}
