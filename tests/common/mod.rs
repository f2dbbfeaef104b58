//! What several integration tests share (a `tests/common/mod.rs` is not a test binary of
//! its own; each test that needs it says `mod common;`).

use candle_core::{Device, Tensor};
use quantlab::arch::llama::Llama;
use quantlab::nn::{apply_plan, Plan};
use std::path::PathBuf;

/// The tiny Llama fixture (`tests/fixtures/llama-tiny`) on the CPU, with `plan` applied
/// (none when empty).
pub fn tiny_llama(plan: &str) -> Llama {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/llama-tiny"
    ));
    let mut m = Llama::from_hf_dir(&dir, &Device::Cpu).unwrap();
    if !plan.is_empty() {
        let plan: Plan = plan.parse().unwrap();
        apply_plan(&mut m, &plan, |_| Ok(())).unwrap();
    }
    m
}

/// Logits of every position of `ids`, fed one token at a time through one cache (the
/// decode path: forward passes of one row).
#[allow(dead_code)] // not every test binary that includes this module decodes
pub fn decode_logits(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache();
    let mut out = Vec::new();
    for &id in ids {
        let x = Tensor::from_vec(vec![id], (1, 1), &Device::Cpu).unwrap();
        let l = m.forward(&x, &mut cache, true).unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}
