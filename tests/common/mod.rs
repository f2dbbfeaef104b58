//! What several integration tests share (a `tests/common/mod.rs` is not a test binary of
//! its own; each test that needs it says `mod common;`).

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
    let mut m = Llama::from_hf_dir(&dir, &candle_core::Device::Cpu).unwrap();
    if !plan.is_empty() {
        let plan: Plan = plan.parse().unwrap();
        apply_plan(&mut m, &plan, |_| Ok(())).unwrap();
    }
    m
}
