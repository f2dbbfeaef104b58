//! Forward time of one quantized linear layer the size of Marian's output projection
//! (15258 × 256) per method, for 4 activation rows (a beam-4 decoding step) and 128 rows
//! (a batch). Compare each method with the f32 row of the same run.

use criterion::{criterion_group, criterion_main, Criterion};
use quantlab::nn::QLinear;
use quantlab::quant::random;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let w = random::randn(&[15258, 256], 0).unwrap();
    let mut g = c.benchmark_group("qlinear_15258x256");
    g.sample_size(10);
    for m in [4usize, 128] {
        let x = random::randn(&[m, 256], 1).unwrap();
        for method in [
            "f32",
            "f16",
            "dynamic-int8",
            "w:i4:sym:g64",
            "w:i8:sym:ch0",
            "nf4",
        ] {
            let mut l = QLinear::new("lm_head", w.clone(), None).unwrap();
            l.convert(&method.parse().unwrap(), None).unwrap();
            g.bench_function(format!("m{m}/{method}"), |b| {
                b.iter(|| l.forward(black_box(&x)).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
