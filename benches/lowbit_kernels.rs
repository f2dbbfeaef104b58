//! Weight-only low-bit kernels (nn::kernels::lowbit through `QLinear`) against candle's
//! f32 matmul (also what a cached dequantized matrix costs) and candle's `QMatMul` on
//! Q4_0 (and the kernel alone, with f32 or q8 activations: `gemv_q8` rows and the
//! `--activations q8` panels; for many rows the exact panel GEMM beside the dense f32 GEMM's
//! packed kernel), on SmolLM2-135M's shapes (`out × in`) for decoding (m = 1)
//! and prefill (m = 512), and the MNIST MLP's three layers at batch 1 and 64. Compare rows
//! of one run: the machine is shared.
//!
//! `cargo bench --bench lowbit_kernels` (about a minute); `QUANTLAB_KERNEL=avx2` or
//! `portable` to time a lower path.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;
use criterion::{criterion_group, criterion_main, Criterion};
use quantlab::nn::kernels::lowbit::LowBit;
use quantlab::nn::kernels::Isa;
use quantlab::nn::kernels::{gemm_f32, gemv_q8};
use quantlab::nn::QLinear;
use quantlab::quant::random;
use std::hint::black_box;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    // (out, in, activation rows).
    let mut cases = Vec::new();
    for &(o, i) in &[(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        cases.push((o, i, 1));
        cases.push((o, i, 512));
    }
    cases.push((49152, 576, 1));
    // The MNIST MLP's layers at batch 1 and 64 (64 rows take the panel GEMM; 10 × 256 the
    // several-row GEMV).
    for &(o, i) in &[(256, 784), (256, 256), (10, 256)] {
        cases.push((o, i, 1));
        cases.push((o, i, 64));
    }
    for (o, i, m) in cases {
        let w = random::randn(&[o, i], 0).unwrap();
        let x = random::randn(&[m, i], 1).unwrap();
        let mut g = c.benchmark_group(format!("{o}x{i}/m{m}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(600));
        let wt = w.t().unwrap();
        g.bench_function("candle_f32_matmul", |b| {
            b.iter(|| black_box(&x).matmul(&wt).unwrap())
        });
        if i % 32 == 0 {
            let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()).unwrap();
            g.bench_function("candle_q4_0", |b| {
                b.iter(|| q.forward(black_box(&x)).unwrap())
            });
        }
        for method in ["w:i4:sym:g64", "w:i4:sym:g32", "nf4"] {
            let mut l = QLinear::new("layer", w.clone(), None).unwrap();
            l.convert(&method.parse().unwrap(), None).unwrap();
            g.bench_function(method, |b| b.iter(|| l.forward(black_box(&x)).unwrap()));
        }
        // The kernel alone (no tensors, no layer), on every path this CPU has.
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
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if m == 1 {
            let mut y = vec![0f32; o];
            for isa in Isa::available() {
                g.bench_function(format!("kernel_i4_g64_{}", isa.name()), |b| {
                    b.iter(|| lb.gemv(isa, black_box(&xs), &mut y))
                });
                // The row GEMV with activations quantized to q8 blocks (`gemv_q8`).
                g.bench_function(format!("kernel_i4_g64_q8_{}", isa.name()), |b| {
                    b.iter(|| gemv_q8::gemv(&lb, isa, black_box(&xs), &mut y))
                });
                // What `--activations q8` runs: the 16-row VNNI panels on AVX-512, the row
                // GEMV above elsewhere.
                g.bench_function(format!("kernel_i4_g64_a8_{}", isa.name()), |b| {
                    b.iter(|| lb.matmul_a8(isa, black_box(&xs), 1))
                });
            }
        }
        // Many rows: the exact panel GEMM (codes in panel order, decoded once per call)
        // against the dense f32 GEMM's packed kernel on the same shape, every path.
        if m > 1 {
            let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for isa in Isa::available() {
                let pw = gemm_f32::PackedWeight::new(&ws, o, i, gemm_f32::panel_width(isa));
                g.bench_function(format!("kernel_f32_{}", isa.name()), |b| {
                    b.iter(|| gemm_f32::matmul_with(isa, black_box(&xs), m, &pw))
                });
                g.bench_function(format!("kernel_i4_g64_{}", isa.name()), |b| {
                    b.iter(|| lb.matmul_with(isa, black_box(&xs), m))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
