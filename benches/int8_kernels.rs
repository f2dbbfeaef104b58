//! int8 linear layers on real shapes against candle's f32 matmul in the same run:
//! the MNIST MLP (784×256, 256×256, 256×10 at 1 and 64 rows), SmolLM2-135M (576×576,
//! 576×1536, 1536×576 at 1 and 512 rows) and Marian (512×512, 512×2048 at 1 and 64 rows).
//! Shapes are `in × out`. `f32` is the layer's f32 forward (candle matmul + bias),
//! `dynamic-int8` the whole int8 forward (quantize input, GEMM, epilogue), and `gemm/<isa>`
//! the kernel alone on pre-quantized input, for every path this CPU runs.
//! Sample counts are small so the whole bench takes about a minute; compare ratios within
//! one run.

use criterion::{criterion_group, criterion_main, Criterion};
use quantlab::nn::kernels::{self, ActRows, Isa, PackedI8};
use quantlab::nn::QLinear;
use quantlab::quant::random;
use std::hint::black_box;
use std::time::Duration;

const SHAPES: &[(&str, usize, usize, &[usize])] = &[
    ("mlp", 784, 256, &[1, 64]),
    ("mlp", 256, 256, &[1, 64]),
    ("mlp", 256, 10, &[1, 64]),
    ("smollm2", 576, 576, &[1, 512]),
    ("smollm2", 576, 1536, &[1, 512]),
    ("smollm2", 1536, 576, &[1, 512]),
    ("marian", 512, 512, &[1, 64]),
    ("marian", 512, 2048, &[1, 64]),
];

fn bench(c: &mut Criterion) {
    for &(model, k, n, ms) in SHAPES {
        let w = random::randn(&[n, k], 0).unwrap();
        let b = random::randn(&[n], 2).unwrap();
        let mut g = c.benchmark_group(format!("{model}_{k}x{n}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300));
        let f32_layer = QLinear::new("fc", w.clone(), Some(b.clone())).unwrap();
        let mut int8 = QLinear::new("fc", w.clone(), Some(b.clone())).unwrap();
        int8.convert(&"dynamic-int8".parse().unwrap(), None)
            .unwrap();
        let codes: Vec<i8> = (0..n * k).map(|i| ((i * 7919) % 255) as i8).collect();
        let packed = PackedI8::new(&codes, n, k);
        let sw = vec![0.01f32; n];
        for &m in ms {
            let x = random::randn(&[m, k], 1).unwrap();
            g.bench_function(format!("m{m}/f32"), |bch| {
                bch.iter(|| f32_layer.forward(black_box(&x)).unwrap())
            });
            g.bench_function(format!("m{m}/dynamic-int8"), |bch| {
                bch.iter(|| int8.forward(black_box(&x)).unwrap())
            });
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (lo, hi) = kernels::min_max(&xs);
            let (s, z) = kernels::activation_qparams_u8(lo, hi);
            let rows = ActRows::per_tensor(&xs, m, k, packed.kp, s, z);
            for isa in Isa::available().into_iter().skip(1) {
                g.bench_function(format!("m{m}/gemm-{}", isa.name()), |bch| {
                    bch.iter(|| {
                        kernels::gemm_u8_i8_f32_with(isa, black_box(&rows), &packed, &sw, None)
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
