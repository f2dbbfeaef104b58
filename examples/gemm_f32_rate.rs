//! Throughput of the f32 prefill GEMM (`gemm_f32`) on SmolLM2's prefill shapes, in GFLOP/s
//! of process CPU time (a loaded machine's descheduling does not count), one rayon thread
//! unless `THREADS` says otherwise: the best and the median of 7 repetitions. With
//! `THREADS=2` or more, also GFLOP/s of wall-clock time and the pool's utilisation (CPU time
//! over wall time × threads: below 1 where a thread waits at the end of a product) — read
//! those on an otherwise idle machine only.
//! `cargo run --release --example gemm_f32_rate`.
use quantlab::nn::kernels::gemm_f32::{matmul_with, panel_width, PackedWeight};
use quantlab::nn::kernels::Isa;
use std::hint::black_box;
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_ns;

fn main() {
    let threads = std::env::var("THREADS").map_or(1, |v| v.parse().unwrap());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let isa = Isa::selected();
    println!("kernel path {isa:?}, {threads} thread(s)");
    for &(m, k, n) in &[
        (512usize, 576usize, 576usize),
        (512, 576, 192),
        (512, 576, 960),
        (512, 576, 3072),
        (512, 576, 1536),
        (512, 1536, 576),
        (257, 576, 49152),
    ] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let pw = PackedWeight::new(&w, n, k, panel_width(isa));
        let reps = (2e10 / (2.0 * (m * n * k) as f64)).clamp(1.0, 50.0) as usize;
        let flop = 2.0 * (m * n * k) as f64;
        let (mut v, mut wall, mut util) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..7 {
            let (t0, w0) = (cpu_ns(), std::time::Instant::now());
            rayon::scope(|_| {
                for _ in 0..reps {
                    black_box(matmul_with(isa, black_box(&x), m, &pw));
                }
            });
            let s = (cpu_ns() - t0) as f64 / 1e9 / reps as f64;
            let ws = w0.elapsed().as_secs_f64() / reps as f64;
            v.push(flop / s / 1e9);
            wall.push(flop / ws / 1e9);
            util.push(s / (ws * threads as f64));
        }
        for l in [&mut v, &mut wall, &mut util] {
            l.sort_by(|a, b| b.partial_cmp(a).unwrap());
        }
        print!(
            "m {m:4} k {k:5} n {n:6}: {:6.1} GFLOP/s per CPU-second (best), {:6.1} (median)",
            v[0], v[3]
        );
        if threads > 1 {
            print!(
                "; wall {:6.1} (best) {:6.1} (median) GFLOP/s, utilisation {:.3} (median)",
                wall[0], wall[3], util[3]
            );
        }
        println!();
    }
}
