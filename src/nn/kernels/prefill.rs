//! The opt-in switch for integer-activation prefill of weight-only formats.
//!
//! Weight-only int-N prefill is exact by default: activations multiply as f32, so the lab
//! measures the weight quantization alone. `QUANTLAB_PREFILL_ACT=q8` lets symmetric int-N
//! weights (one integer zero point: `w:iN:sym`) run their many-row products as llama.cpp
//! runs Q4_0/Q8_0 — activations quantized to 32-element q8 blocks, exact integer block sums
//! with AVX-512 VNNI (`ggml_blocks::panels`) — which adds activation rounding error. It is
//! off unless asked for, and `quantlab bench` labels rows measured with it.

use std::sync::OnceLock;

/// The environment variable (`q8` turns the integer-activation prefill on; `f32` or unset
/// keeps it off).
pub const ACT_ENV: &str = "QUANTLAB_PREFILL_ACT";

/// Whether weight-only int-N prefill may quantize its activations to q8 blocks.
pub fn q8_activations() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| match std::env::var(ACT_ENV) {
        Err(_) => false,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "q8" | "int8" | "i8" => true,
            "" | "f32" | "off" | "0" => false,
            other => {
                eprintln!("warning: {ACT_ENV}={other} is not q8 or f32; prefill keeps f32 activations");
                false
            }
        },
    })
}

/// A label for reports: empty when off.
pub fn label() -> &'static str {
    if q8_activations() {
        " +q8-act prefill"
    } else {
        ""
    }
}
