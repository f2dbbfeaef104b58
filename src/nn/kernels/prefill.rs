//! The one switch for integer activations of weight-only formats ([`ActivationMode`]).
//!
//! Weight-only int-N / NF4 / FP4 products are exact by default: activations multiply as
//! f32, so the lab measures the weight quantization alone. `--activations q8` runs them as
//! llama.cpp runs Q4_0/Q8_0 — activations quantized to 32-element q8 blocks, exact integer
//! block sums (16-channel panels, `ggml_blocks::panels`, on AVX-512 VNNI and AVX2; on the
//! portable path the one-row product takes `gemv_q8` and several rows stay f32) — for
//! decode and prefill alike. It
//! adds activation rounding error, so it is off unless asked for, and `quantlab bench`,
//! perplexity and KL reports label numbers measured with it (`a:q8`).
//!
//! Aliases kept for old scripts: `--decode-activations` (hidden CLI flag) and the
//! environment variables `QUANTLAB_ACTIVATIONS`, `QUANTLAB_DECODE_ACTIVATIONS` and
//! `QUANTLAB_PREFILL_ACT` (read when no flag sets the mode).

use std::sync::atomic::{AtomicU8, Ordering};

/// Environment variables read, in order, when nothing set the mode explicitly.
pub const ACT_ENVS: [&str; 3] = [
    "QUANTLAB_ACTIVATIONS",
    "QUANTLAB_DECODE_ACTIVATIONS",
    "QUANTLAB_PREFILL_ACT",
];

/// What weight-only layers multiply their weights with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationMode {
    /// The activations as they are (exact: `x · Ŵᵀ` up to summation order). The default.
    #[default]
    F32,
    /// Quantized to 8 bits per 32 values, integer dot products (llama.cpp's approach).
    Q8,
}

impl ActivationMode {
    pub fn name(self) -> &'static str {
        match self {
            ActivationMode::F32 => "f32",
            ActivationMode::Q8 => "q8",
        }
    }
}

impl std::str::FromStr for ActivationMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(ActivationMode::F32),
            "q8" => Ok(ActivationMode::Q8),
            _ => anyhow::bail!("activations are 'f32' or 'q8', not '{s}'"),
        }
    }
}

/// 0: not set yet (read the environment on first use), 1: f32, 2: q8.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the process-wide mode (the CLI's `--activations`).
pub fn set_activations(a: ActivationMode) {
    MODE.store(
        match a {
            ActivationMode::F32 => 1,
            ActivationMode::Q8 => 2,
        },
        Ordering::Relaxed,
    );
}

/// The process-wide mode: as set, else from the first alias variable present, else f32.
pub fn activations() -> ActivationMode {
    match MODE.load(Ordering::Relaxed) {
        1 => ActivationMode::F32,
        2 => ActivationMode::Q8,
        _ => {
            let mut mode = ActivationMode::F32;
            if let Some((name, v)) = ACT_ENVS
                .iter()
                .find_map(|&n| std::env::var(n).ok().map(|v| (n, v)))
            {
                match v.parse() {
                    Ok(m) => mode = m,
                    Err(_) => {
                        eprintln!("warning: {name}={v} is not q8 or f32; activations stay f32")
                    }
                }
            }
            // A concurrent explicit set wins over the environment.
            let _ = MODE.compare_exchange(
                0,
                if mode == ActivationMode::Q8 { 2 } else { 1 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            activations()
        }
    }
}

/// Whether weight-only products may quantize their activations to q8 blocks.
pub fn q8_activations() -> bool {
    activations() == ActivationMode::Q8
}

/// A label for reports: ` a:q8` when on, empty when off.
pub fn label() -> &'static str {
    if q8_activations() {
        " a:q8"
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
