//! CPU time per call of the exact 4-bit weight-only products (`nn::kernels::lowbit`,
//! f32 activations) beside the dense f32 GEMM (`gemm_f32`) on the same shapes: MNIST's
//! layers at batch 1 and 64, SmolLM2's at 1 (decode) and 512 (prefill). Process CPU clock
//! (a loaded machine's descheduling does not count), one rayon thread unless `THREADS`
//! says otherwise; best and median of 7 repetitions, in µs.
//! `cargo run --release --example lowbit_cpu_time [mnist|decode|prefill]` (`M=6,64`: the
//! MNIST batch sizes).
use quantlab::nn::kernels::gemm_f32::{self, panel_width, PackedWeight};
use quantlab::nn::kernels::lowbit::LowBit;
use quantlab::nn::kernels::Isa;
use std::hint::black_box;
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_ns;

/// Best and median µs per call of 7 repetitions of `n` calls, on a pool thread.
fn time(n: usize, f: impl FnMut() + Send) -> (f64, f64) {
    rayon::scope(|_| clock::best_and_median_us(cpu_ns, n, f))
}

fn main() {
    let threads = std::env::var("THREADS").map_or(1, |v| v.parse().unwrap());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let which = std::env::args().nth(1).unwrap_or_else(|| "mnist".into());
    let cases: Vec<(usize, usize, usize)> = match which.as_str() {
        "decode" => [
            (576, 576),
            (192, 576),
            (1536, 576),
            (576, 1536),
            (49152, 576),
        ]
        .iter()
        .map(|&(o, i)| (o, i, 1))
        .collect(),
        "prefill" => [(576, 576), (192, 576), (1536, 576), (576, 1536)]
            .iter()
            .map(|&(o, i)| (o, i, 512))
            .collect(),
        // `M=6,64` picks the batch sizes (default 1 and 64).
        _ => std::env::var("M")
            .ok()
            .map_or(vec![1, 64], |v| {
                v.split(',').map(|m| m.trim().parse().unwrap()).collect()
            })
            .iter()
            .flat_map(|&m| [(256, 784, m), (256, 256, m), (10, 256, m)])
            .collect(),
    };
    let isas: Vec<Isa> = match std::env::var("ISA").ok().as_deref() {
        Some("all") => Isa::available(),
        _ => vec![Isa::selected()],
    };
    println!("{threads} thread(s); µs per call, best / median of 7");
    for (o, i, m) in cases {
        let x: Vec<f32> = (0..m * i)
            .map(|k| ((k * 31) % 17) as f32 * 0.1 - 0.8)
            .collect();
        let w: Vec<f32> = (0..o * i)
            .map(|k| ((k * 5) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let codes: Vec<u8> = (0..o * i).map(|k| ((k * 7919) % 16) as u8).collect();
        let int4 = |g: usize| {
            let np = o * i.div_ceil(g);
            LowBit::from_int(o, i, &codes, false, 4, &vec![0.01; np], &vec![8; np], g).unwrap()
        };
        let packed: Vec<u8> = (0..(o * i).div_ceil(2)).map(|k| (k * 37) as u8).collect();
        let table: [f32; 16] = std::array::from_fn(|k| k as f32 / 7.5 - 1.0);
        let nf4 = LowBit::from_table(o, i, &packed, &table, &vec![0.5; (o * i).div_ceil(64)], 64)
            .unwrap();
        let n = ((2e8 / (2.0 * (m * o * i) as f64)) as usize).clamp(3, 2000);
        for &isa in &isas {
            let pw = PackedWeight::new(&w, o, i, panel_width(isa));
            let f = time(n, || {
                black_box(gemm_f32::matmul_with(isa, black_box(&x), m, &pw));
            });
            let mut row = format!(
                "{:8?} {o:5}x{i:4} m {m:3}: f32 {:8.1} {:8.1}",
                isa, f.0, f.1
            );
            for (name, lb) in [
                ("i4g64", int4(64)),
                ("i4g32", int4(32)),
                ("nf4", nf4.clone()),
            ] {
                let t = time(n, || {
                    black_box(lb.matmul_with(isa, black_box(&x), m));
                });
                row += &format!(" | {name} {:8.1} {:8.1} ({:.2}x)", t.0, t.1, f.0 / t.0);
            }
            println!("{row}");
            if m > 1 {
                // The two several-row products called directly, whatever m picks.
                let mut row = format!("{:8?} {o:5}x{i:4} m {m:3}:", isa);
                for (name, lb) in [("i4g64", int4(64)), ("nf4", nf4.clone())] {
                    let p = time(n, || {
                        black_box(lb.gemm(isa, black_box(&x), m));
                    });
                    let g = time(n, || {
                        black_box(lb.gemm_multi(isa, black_box(&x), m));
                    });
                    row += &format!(" | {name} panels {:8.1} multi-row {:8.1}", p.0, g.0);
                }
                println!("{row}");
            }
        }
    }
}
