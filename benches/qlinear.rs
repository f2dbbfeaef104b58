//! Forward time of one linear layer per weight format on the real shapes of the lab's
//! models, through the same `QLinear` the models run: candle f32 and candle's GGML
//! `QMatMul` (q8_0, q4_0) are the baselines measured in the same run as quantlab's own
//! int8, int4 and NF4 kernels. Shapes are `out × in` with `m` activation rows: batch 1
//! (decode) and a batch (MLP 64, SmolLM2 512-token prefill, Marian 64).
//!
//! Run one model's group with e.g. `cargo bench --bench qlinear -- smollm2`; compare rows
//! of one run only (the CPU features used are printed first).

use criterion::{criterion_group, criterion_main, Criterion};
use quantlab::nn::kernels::isa;
use quantlab::nn::QLinear;
use quantlab::quant::random;
use std::hint::black_box;
use std::time::Duration;

const METHODS: [&str; 7] = [
    "f32",
    "q8_0",
    "q4_0",
    "dynamic-int8",
    "w:i4:sym:g64",
    "w:i4:sym:g32",
    "nf4",
];

/// A model's benchmark group: its name, layer shapes `(out, in)`, and the activation rows
/// each is timed at.
type Group = (&'static str, Vec<(usize, usize)>, Vec<usize>);

fn models() -> Vec<Group> {
    vec![
        ("mlp", vec![(256, 784), (256, 256), (10, 256)], vec![1, 64]),
        (
            "smollm2",
            vec![
                (576, 576),
                (192, 576),
                (1536, 576),
                (576, 1536),
                (49152, 576),
            ],
            vec![1, 512],
        ),
        (
            "marian",
            vec![(512, 512), (2048, 512), (15258, 512)],
            vec![1, 64],
        ),
    ]
}

fn bench(c: &mut Criterion) {
    eprintln!("CPU kernels: {}", isa::describe());
    for (model, shapes, batches) in models() {
        let mut g = c.benchmark_group(model);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for (seed, &(out, inp)) in shapes.iter().enumerate() {
            let w = random::randn(&[out, inp], seed as u64).unwrap();
            for &m in &batches {
                // The 49152-row output layer is timed at decode only: its prefill is the
                // f32 logits of every position, a different question.
                if out > 40_000 && m > 1 {
                    continue;
                }
                let x = random::randn(&[m, inp], 1000 + seed as u64).unwrap();
                for method in METHODS {
                    let mut l = QLinear::new("layer", w.clone(), None).unwrap();
                    l.convert(&method.parse().unwrap(), None).unwrap();
                    g.bench_function(format!("{out}x{inp}/m{m}/{method}"), |b| {
                        b.iter(|| l.forward(black_box(&x)).unwrap())
                    });
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
