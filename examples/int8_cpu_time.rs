//! Per-call time of the int8 product (`gemm_u8_i8_f32_with`: u8 activations, per-channel
//! i8 weights, the dynamic/static int8 kernel) against the weight-only int8 panels with q8
//! activations (`w:i8:sym:ch0` under `--activations q8`: the GGML-style Q8_0 VNNI panels),
//! on SmolLM2's decode shapes (m = 1, 2, 4). Process CPU clock, one rayon thread by
//! default (a loaded machine's descheduling does not count); `THREADS=2 WALL=1` for the
//! two-thread wall time. Minimum and median over 7 batches. `STREAM=1`: each call takes
//! the next of enough copies of the weight (≥ 96 MB) that it comes from memory, as in a
//! decode step, instead of from cache.
//! `SHAPES=marian`: the shared MarianMT's products instead (d_model 256, ffn 1024, 15258
//! target tokens; decode rows = 4 beams × sentences still running, default m = 1, 4, 8, 32,
//! 128), int8 only.
//! `cargo run --release --example int8_cpu_time`.
use quantlab::nn::kernels::lowbit::LowBit;
use quantlab::nn::kernels::{self, ActRows, Isa, PackedI8};
use std::hint::black_box;
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_or_wall_ns as cpu_ns;

/// (min, median) µs per call over 7 batches, on a pool thread (as the model runs).
fn time(f: impl FnMut() + Send, calls: usize) -> (f64, f64) {
    rayon::scope(|_| time_here(f, calls))
}

fn time_here(mut f: impl FnMut(), calls: usize) -> (f64, f64) {
    f();
    clock::best_and_median_us(cpu_ns, calls, f)
}

fn main() {
    let threads = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let only: Option<Vec<usize>> = std::env::var("MS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect());
    let stream = std::env::var("STREAM").is_ok_and(|v| v == "1");
    println!(
        "threads {threads}, paths {:?}, streamed {stream}",
        Isa::available()
    );
    let marian = std::env::var("SHAPES").is_ok_and(|v| v == "marian");
    let shapes: &[(usize, usize)] = if marian {
        &[(256, 256), (1024, 256), (256, 1024), (15258, 256)]
    } else {
        &[
            (576, 576),
            (192, 576),
            (1536, 576),
            (576, 1536),
            (49152, 576),
        ]
    };
    let default_ms = if marian {
        vec![1, 4, 8, 32, 128]
    } else {
        vec![1, 2, 4]
    };
    for &(o, i) in shapes {
        let n = o * i;
        let codes: Vec<i8> = (0..n).map(|k| ((k * 7919) % 255) as i8).collect();
        let copies = if stream { (96 << 20) / n + 1 } else { 1 };
        let packed: Vec<PackedI8> = (0..copies).map(|_| PackedI8::new(&codes, o, i)).collect();
        let sw = vec![0.01f32; o];
        let byte: Vec<u8> = codes.iter().map(|&c| (c as i32 + 128) as u8).collect();
        let lb: Vec<LowBit> = (0..if marian { 0 } else { copies })
            .map(|_| {
                let l = LowBit::from_int(o, i, &byte, false, 8, &vec![0.01; o], &vec![128; o], i)
                    .unwrap();
                let _ = l.a8_panels();
                l
            })
            .collect();
        let kp = packed[0].kp;
        let calls = (20_000_000 / n).clamp(2, 400);
        for m in only.clone().unwrap_or(default_ms.clone()) {
            let x: Vec<f32> = (0..m * i).map(|k| ((k * 31) % 17) as f32 - 8.0).collect();
            let (lo, hi) = kernels::min_max(&x);
            let (s, z) = kernels::activation_qparams_u8(lo, hi);
            let mut line = format!("{o:>5}x{i:<4} m{m}");
            for isa in Isa::available() {
                if isa == Isa::Portable {
                    continue;
                }
                // The whole dynamic call: quantize the input, then the product.
                let mut c = 0;
                let (t, tm) = time(
                    || {
                        c = (c + 1) % copies;
                        let a = ActRows::per_tensor(&x, m, i, kp, s, z);
                        drop(black_box(kernels::gemm_u8_i8_f32_with(
                            isa, &a, &packed[c], &sw, None,
                        )))
                    },
                    calls,
                );
                line += &format!("  int8/{} {t:7.1} (med {tm:7.1})", isa.name());
                if !marian && lb[0].matmul_a8(isa, &x, m).is_some() {
                    let mut c = 0;
                    let (q, qm) = time(
                        || {
                            c = (c + 1) % copies;
                            drop(black_box(lb[c].matmul_a8(isa, &x, m).unwrap()))
                        },
                        calls,
                    );
                    line += &format!("  w:i8-a:q8/{} {q:7.1} (med {qm:7.1})", isa.name());
                }
            }
            println!("{line} µs");
        }
    }
}
