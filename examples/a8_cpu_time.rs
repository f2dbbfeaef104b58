//! Per-call CPU time of the weight-only products with q8 activations (`--activations q8`:
//! `LowBit::matmul_a8`, the 16-row VNNI panels on AVX-512) against the same weights with
//! f32 activations (`LowBit::gemv` / `gemm` through `matmul_with` with the switch off), on
//! SmolLM2's shapes for decode (m = 1) and prefill (m = 512). One rayon thread, process CPU
//! clock (a loaded machine's descheduling does not count): minimum and median over
//! repetitions. Symmetric int-4 (g32 and g64) runs exactly the GGML Q4_0 panel kernel and
//! w:i8 the Q8_0 one, so the rows compare the extensions (affine zero points, the NF4 code
//! book) with them. `cargo run --release --example a8_cpu_time`.
use quantlab::nn::kernels::lowbit::LowBit;
use quantlab::nn::kernels::{gemv_q8, Isa};
use quantlab::quant::codebook::NF4_CODE;
use std::hint::black_box;
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_ns;

/// (min, median) µs per call over 7 batches.
fn time(mut f: impl FnMut(), calls: usize) -> (f64, f64) {
    f();
    clock::best_and_median_us(cpu_ns, calls, f)
}

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .unwrap();
    let isa = Isa::selected();
    println!("path {}", isa.name());
    for &(o, i) in &[(576usize, 576usize), (1536, 576), (576, 1536)] {
        let n = o * i;
        let nib: Vec<u8> = (0..n).map(|k| ((k * 7919) % 16) as u8).collect();
        let byte: Vec<u8> = (0..n).map(|k| ((k * 7919) % 255) as u8).collect();
        let g = |gs: usize| o * i.div_ceil(gs);
        let zeros = |gs: usize| -> Vec<i32> { (0..g(gs)).map(|k| (k % 16) as i32).collect() };
        let packed: Vec<u8> = nib.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let weights: Vec<(&str, LowBit)> = vec![
            (
                "w:i4:sym:g32",
                LowBit::from_int(
                    o,
                    i,
                    &nib,
                    false,
                    4,
                    &vec![0.01; g(32)],
                    &vec![8; g(32)],
                    32,
                )
                .unwrap(),
            ),
            (
                "w:i4:sym:g64",
                LowBit::from_int(
                    o,
                    i,
                    &nib,
                    false,
                    4,
                    &vec![0.01; g(64)],
                    &vec![8; g(64)],
                    64,
                )
                .unwrap(),
            ),
            (
                "w:i4:asym:g64",
                LowBit::from_int(o, i, &nib, false, 4, &vec![0.01; g(64)], &zeros(64), 64).unwrap(),
            ),
            (
                "nf4 b64",
                LowBit::from_table(o, i, &packed, &NF4_CODE, &vec![0.5; n / 64], 64).unwrap(),
            ),
            (
                "w:i8:sym:ch0",
                LowBit::from_int(o, i, &byte, false, 8, &vec![0.01; o], &vec![128; o], i).unwrap(),
            ),
        ];
        for m in [1usize, 512] {
            let x: Vec<f32> = (0..m * i).map(|k| ((k * 31) % 17) as f32 - 8.0).collect();
            let calls = if m == 1 { 200 } else { 2 };
            for (name, lb) in &weights {
                let (f, fm) = time(|| drop(black_box(lb.matmul_with(isa, &x, m))), calls);
                let (q, qm) = time(
                    || drop(black_box(lb.matmul_a8(isa, &x, m).expect("a q8 kernel"))),
                    calls,
                );
                // The one-row q8 GEMV (`gemv_q8`: the portable path's, and AVX2's before the
                // AVX2 panels), where it serves this layout.
                let row = if m == 1 && gemv_q8::supports(lb) {
                    let mut y = vec![0f32; o];
                    let (g, gm) = time(|| gemv_q8::gemv(lb, isa, &x, black_box(&mut y)), calls);
                    format!("  gemv_q8 {g:9.1} µs (med {gm:9.1})")
                } else {
                    String::new()
                };
                println!(
                    "{o}x{i} m{m:<4} {name:14} f32-act {f:9.1} µs (med {fm:9.1})  a:q8 {q:9.1} µs (med {qm:9.1})  f32/q8 {:.2}{row}",
                    fm / qm
                );
            }
        }
    }
}
