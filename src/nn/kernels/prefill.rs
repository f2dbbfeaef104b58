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

/// Keeps freed heap memory in the process for reuse instead of handing it back to the
/// kernel, so the large activation buffers of a prefill (the output layer's
/// `rows × vocabulary` logits: 50 MB for a 257-row SmolLM2 chunk; 1–3 MB per layer output)
/// are recycled from one chunk to the next rather than mapped afresh each time. glibc maps
/// every allocation above its mmap threshold separately and unmaps it on free (the
/// threshold cannot be set above 32 MiB), so each perplexity chunk paid a page fault and a
/// page clear per 4 KiB of those buffers: about 6% of the run's CPU time. With chunk mmaps
/// off (`M_MMAP_MAX = 0`) every allocation comes from the heaps, and with a 2 GiB trim
/// threshold freed memory stays there. The cost: the process keeps its peak heap resident
/// until it exits (the peak itself does not change). A no-op outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // glibc's malloc.h: M_TRIM_THRESHOLD = -1, M_MMAP_MAX = -4.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        // SAFETY: mallopt only changes glibc malloc's tuning parameters, here with valid
        // parameter numbers and values, before the caller starts any other thread.
        unsafe {
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_MMAP_MAX, 0);
        }
    }
}
