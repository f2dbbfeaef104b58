//! CPU kernels behind the weight formats, each with a portable path and SIMD paths chosen
//! at run time (`isa`), so one binary runs at its best on AVX2-only and AVX-512 machines.

pub mod gemm_f32;
pub mod gemv_q8;
pub mod ggml_blocks;
pub mod int8;
pub mod isa;
pub mod llm_f32;
pub mod lowbit;
pub mod prefill;
pub mod silu_rows;
pub mod team;

pub use int8::*;
pub use isa::Isa;

/// Products of fewer multiply-adds than this (activation rows × output columns × inner
/// length) run on the calling thread without entering rayon (f32 GEMM, low-bit GEMV and
/// panel GEMM). A rayon call from outside its pool (the MNIST lab's forward runs on the main
/// thread) hands the job over and sleeps on a latch: tens of µs under load, more than MNIST's
/// 784 → 256 layer at batch 1 (200k multiply-adds, ~10 µs on one core) takes to compute.
/// Measured (2-core EPYC, loaded, MNIST at batch 1, 4000 interleaved rounds), 2^16 → 2^18:
/// fp32 43 → 16 µs, w:i4:sym:g64 40 → 14 µs, nf4 41 → 15 µs a forward. int8's decode
/// threshold is the same; SmolLM2's decode products (stacked q|k|v 553k, o 332k) and Marian's
/// (512 × 512 = 2^18 and up) are not below it.
pub const SERIAL_WORK: usize = 1 << 18;

/// `f(o0, ys)` over blocks of `y`'s rows (each a multiple of 4 rows, `o0` its first), as
/// `tasks_per_thread` tasks a rayon thread; all of `y` in one call on this thread when the
/// product's `work` (multiply-adds) is below [`SERIAL_WORK`]. The GEMVs' row split.
pub fn for_row_blocks(
    y: &mut [f32],
    work: usize,
    tasks_per_thread: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    use rayon::prelude::*;
    if work < SERIAL_WORK {
        f(0, y);
        return;
    }
    let tasks = rayon::current_num_threads().max(1) * tasks_per_thread;
    let block = y.len().div_ceil(tasks).div_ceil(4).max(1) * 4;
    y.par_chunks_mut(block)
        .enumerate()
        .for_each(|(b, ys)| f(b * block, ys));
}

/// A raw output pointer handed to rayon tasks that each write a disjoint part of one
/// buffer (tiles, column ranges, heads): the one shared way kernels split an output.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: every user hands it only to tasks writing disjoint elements of a buffer that
// outlives them (each call site states which).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the field).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Whether packed weights may ask for transparent huge pages (`QUANTLAB_HUGEPAGES` not
/// `off`/`0`): the f32 panels (`gemm_f32`) and the quantized panels (`ggml_blocks::aligned`).
/// Off gives ordinary heap pages, for A/B timing; the arithmetic is the same either way.
pub(crate) fn huge_pages_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("QUANTLAB_HUGEPAGES").is_ok_and(|v| v == "off" || v == "0"))
}
