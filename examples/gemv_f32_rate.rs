//! Decode-shaped f32 GEMV (one activation row) over SmolLM2's per-token weight stream
//! (30 blocks of q|k|v 960×576, o 576×576, gate|up 3072×576, down 576×1536, then the
//! 49152×576 output layer: 538 MB, far beyond the caches), in GB of weights per CPU-second
//! (a loaded machine's descheduling does not count) and per wall-second, one rayon thread
//! unless `THREADS` says otherwise. Beside the library's kernel (`gemm_f32`, its panels
//! on huge pages unless `QUANTLAB_HUGEPAGES=off`): the same panel walk with 512-bit and
//! with 256-bit vectors over panels of this file's own (on 2 MiB-aligned huge pages with
//! `HUGE=1`), and a plain streaming read of the same bytes (the ceiling).
//!
//! `cargo run --release --example gemv_f32_rate` (`REPS`, default 5).
use quantlab::nn::kernels::gemm_f32::{matmul_with, panel_width, PackedWeight};
use quantlab::nn::kernels::Isa;
use std::hint::black_box;
use std::time::Instant;
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_ns;

fn env(key: &str, default: usize) -> usize {
    std::env::var(key).map_or(default, |v| v.parse().unwrap())
}

extern "C" {
    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
}

/// Panels of 64 columns, `[k][64]` each, 64-byte aligned (2 MiB and huge pages with
/// `HUGE=1`).
struct Panels {
    buf: Vec<f32>,
    off: usize,
    n: usize,
    k: usize,
}

impl Panels {
    fn new(w: &[f32], n: usize, k: usize) -> Self {
        let len = n.div_ceil(64) * 64 * k;
        let (mut buf, off) = if std::env::var("HUGE").is_ok_and(|v| v == "1") {
            const H: usize = 512 * 1024; // floats in 2 MiB
            let mut buf: Vec<f32> = Vec::with_capacity(len.div_ceil(H) * H + H);
            let off = buf.as_ptr().align_offset(2 << 20);
            // SAFETY: the range lies inside the allocation (capacity) and starts on a
            // 2 MiB boundary; madvise only changes how its pages are backed.
            unsafe {
                madvise(
                    buf.as_mut_ptr().add(off).cast(),
                    len.div_ceil(H) * H * 4,
                    14,
                )
            };
            buf.resize(off + len, 0.0);
            (buf, off)
        } else {
            let buf = vec![0f32; len + 16];
            let off = buf.as_ptr().align_offset(64).min(15);
            (buf, off)
        };
        for j in 0..n {
            for p in 0..k {
                buf[off + (j / 64) * 64 * k + p * 64 + j % 64] = w[j * k + p];
            }
        }
        Panels { buf, off, n, k }
    }

    fn data(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.n.div_ceil(64) * 64 * self.k]
    }
}

/// One row through every panel with four 512-bit accumulators per k step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemv_zmm(x: &[f32], w: &Panels, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let (k, data) = (w.k, w.data());
    assert!(x.len() >= k && y.len() >= w.n.div_ceil(64) * 64);
    for p in 0..w.n.div_ceil(64) {
        let b = data.as_ptr().add(p * 64 * k);
        let mut acc = [_mm512_setzero_ps(); 4];
        for (q, &xq) in x[..k].iter().enumerate() {
            let a = _mm512_set1_ps(xq);
            for (v, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(a, _mm512_load_ps(b.add(q * 64 + 16 * v)), *acc);
            }
        }
        for (v, &acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(y.as_mut_ptr().add(p * 64 + 16 * v), acc);
        }
    }
}

/// The same with eight 256-bit accumulators per k step.
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_ymm(x: &[f32], w: &Panels, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let (k, data) = (w.k, w.data());
    assert!(x.len() >= k && y.len() >= w.n.div_ceil(64) * 64);
    for p in 0..w.n.div_ceil(64) {
        let b = data.as_ptr().add(p * 64 * k);
        let mut acc = [_mm256_setzero_ps(); 8];
        for (q, &xq) in x[..k].iter().enumerate() {
            let a = _mm256_set1_ps(xq);
            for (v, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(a, _mm256_load_ps(b.add(q * 64 + 8 * v)), *acc);
            }
        }
        for (v, &acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.as_mut_ptr().add(p * 64 + 8 * v), acc);
        }
    }
}

/// Sum of every value (eight vector chains): a pure read of the stream.
fn stream_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let chunks = v.chunks_exact(64);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + rest
}

fn main() {
    let threads = env("THREADS", 1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let reps = env("REPS", 5);
    let isa = Isa::selected();
    let mut shapes = Vec::new();
    for _ in 0..30 {
        shapes.extend([(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)]);
    }
    shapes.push((49152, 576));
    let values = |i: usize, len: usize| -> Vec<f32> {
        (0..len)
            .map(|j| ((j * 5 + i) % 11) as f32 * 0.01 - 0.05)
            .collect()
    };
    let weights: Vec<PackedWeight> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| PackedWeight::new(&values(i, n * k), n, k, panel_width(isa)))
        .collect();
    let own: Vec<Panels> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| Panels::new(&values(i, n * k), n, k))
        .collect();
    let raw: Vec<Vec<f32>> = shapes.iter().map(|&(n, k)| vec![0.5f32; n * k]).collect();
    let bytes: usize = shapes.iter().map(|&(n, k)| n * k * 4).sum();
    let xs: Vec<Vec<f32>> = [576usize, 1536]
        .iter()
        .map(|&k| (0..k).map(|i| (i % 7) as f32 * 0.1).collect())
        .collect();
    let x_for = |k: usize| if k == 576 { &xs[0] } else { &xs[1] };
    println!(
        "kernel path {isa:?}, {threads} thread(s), {:.1} MB per token",
        bytes as f64 / 1e6
    );
    let run = |name: &str, f: &(dyn Fn() + Sync)| {
        let (mut cpu, mut wall) = (Vec::new(), Vec::new());
        f();
        for _ in 0..reps {
            let (c0, w0) = (cpu_ns(), Instant::now());
            rayon::scope(|_| f());
            cpu.push(bytes as f64 / ((cpu_ns() - c0) as f64));
            wall.push(bytes as f64 / w0.elapsed().as_nanos() as f64);
        }
        cpu.sort_by(|a, b| b.partial_cmp(a).unwrap());
        wall.sort_by(|a, b| b.partial_cmp(a).unwrap());
        println!(
            "{name:16} GB per CPU-s best {:5.1} median {:5.1} | per wall-s best {:5.1} median {:5.1}",
            cpu[0],
            cpu[reps / 2],
            wall[0],
            wall[reps / 2],
        );
    };
    run("gemv (library)", &|| {
        for w in &weights {
            black_box(matmul_with(isa, black_box(x_for(w.k())), 1, w));
        }
    });
    if isa == Isa::Avx512 {
        run("own zmm (1 thr)", &|| {
            for w in &own {
                let mut y = vec![0f32; w.n.div_ceil(64) * 64];
                // SAFETY: AVX-512 is the selected (so available) path.
                unsafe { gemv_zmm(x_for(w.k), w, &mut y) };
                black_box(y);
            }
        });
        run("own ymm (1 thr)", &|| {
            for w in &own {
                let mut y = vec![0f32; w.n.div_ceil(64) * 64];
                // SAFETY: AVX2 + FMA are in the build's baseline.
                unsafe { gemv_ymm(x_for(w.k), w, &mut y) };
                black_box(y);
            }
        });
    }
    run("stream read", &|| {
        use rayon::prelude::*;
        for r in &raw {
            let s: f32 = r
                .par_chunks(r.len().div_ceil(threads))
                .map(stream_sum)
                .sum();
            black_box(s);
        }
    });
}
