//! Per-call CPU time of the decode GEMVs on SmolLM2's shapes, one rayon thread, measured with the
//! process CPU clock (so a loaded machine's descheduling does not count): the minimum
//! and median over repetitions. `cargo run --release --example gemv_cpu_time`.
use quantlab::nn::kernels::lowbit::LowBit;
use quantlab::nn::kernels::{gemv_q8, Isa};
use std::hint::black_box;
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_or_wall_ns as cpu_ns;

/// Runs on a pool thread (as the Llama forward pass does), so a kernel's split is a `join`.
/// `OUTSIDE=1`: from the main thread instead (each split injected into the pool).
/// `WALL=1`: wall-clock time instead of process CPU time (for `THREADS=2`).
fn time(f: impl FnMut() + Send) -> (f64, f64) {
    if std::env::var("OUTSIDE").is_ok_and(|v| v == "1") {
        clock::best_and_median_us(cpu_ns, 50, f)
    } else {
        rayon::scope(|_| clock::best_and_median_us(cpu_ns, 50, f))
    }
}

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(std::env::var("THREADS").map_or(1, |v| v.parse().unwrap()))
        .build_global()
        .unwrap();
    for &(o, i) in &[
        (576usize, 576usize),
        (192, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
    ] {
        let codes: Vec<u8> = (0..o * i).map(|k| ((k * 7919) % 16) as u8).collect();
        let groups = o * i.div_ceil(64);
        let lb = LowBit::from_int(
            o,
            i,
            &codes,
            false,
            4,
            &vec![0.01; groups],
            &vec![8; groups],
            64,
        )
        .unwrap();
        let xs: Vec<f32> = (0..i).map(|k| ((k * 31) % 17) as f32 - 8.0).collect();
        let mut y = vec![0f32; o];
        for isa in Isa::available() {
            let (a, am) = time(|| lb.gemv(isa, black_box(&xs), &mut y));
            let (b, bm) = time(|| gemv_q8::gemv(&lb, isa, black_box(&xs), &mut y));
            println!(
                "{o}x{i} {:8} f32 {a:9.1} µs (med {am:9.1})  q8 {b:9.1} µs (med {bm:9.1})  {:.2}x  q8 {:.1} Gw/s",
                isa.name(),
                a / b,
                (o * i) as f64 / b / 1e3
            );
        }
    }
}
