//! quantlab's own GGML block kernels (`kernels::ggml_blocks`, through the `Ggml` format's
//! forward) against candle's `QMatMul` on the same quantized tensor, for Q8_0, Q4_0 and
//! Q4_1 on SmolLM2-135M's shapes (`out × in`) at decode (m = 1) and a 512-token prefill
//! (m = 512; the 49152-row output layer only at m = 1). On AVX-512 `quantlab` is the panel
//! kernel (`ggml_blocks::panels`, decode and prefill) and `quantlab-rows` the row kernels it
//! replaced (activation quantization included in both). The weights here stay in cache at
//! decode; `examples/ggml_gemv_cpu_time` also streams a whole token's weights from memory. About a minute:
//! `cargo bench --bench ggml_kernels` (filter e.g. `-- q4_0`). Compare rows of one run.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;
use criterion::{criterion_group, criterion_main, Criterion};
use quantlab::nn::format::ggml::Ggml;
use quantlab::nn::format::WeightFormat;
use quantlab::nn::kernels::ggml_blocks::{matmul_with, ActBlocks, BlockKind, PackedBlocks};
use quantlab::nn::kernels::isa::{self, Isa};
use quantlab::quant::random;
use std::hint::black_box;
use std::time::Duration;

const SHAPES: [(usize, usize); 4] = [(576, 576), (576, 1536), (1536, 576), (49152, 576)];
const TYPES: [(&str, GgmlDType, BlockKind); 3] = [
    ("q8_0", GgmlDType::Q8_0, BlockKind::Q8_0),
    ("q4_0", GgmlDType::Q4_0, BlockKind::Q4_0),
    ("q4_1", GgmlDType::Q4_1, BlockKind::Q4_1),
];

fn bench(c: &mut Criterion) {
    eprintln!(
        "CPU kernels: {}; rayon threads {}",
        isa::describe(),
        rayon::current_num_threads()
    );
    let mut g = c.benchmark_group("ggml");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(700));
    for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
        let w = random::randn(&[out, inp], seed as u64).unwrap();
        for (name, t, kind) in TYPES {
            let q = QTensor::quantize(&w, t).unwrap();
            let data = q.data().unwrap().into_owned();
            let ours = Ggml::new(q).unwrap();
            assert_eq!(
                ours.kernel(),
                "quantlab",
                "set QUANTLAB_GGML_KERNEL=quantlab or unset"
            );
            let q2 = candle_core::quantized::ggml_file::qtensor_from_ggml(
                t,
                &data,
                vec![out, inp],
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let candle = QMatMul::from_qtensor(q2).unwrap();
            let rows = PackedBlocks::from_ggml(kind, &data, out, inp).unwrap();
            for m in [1usize, 512] {
                if out > 40_000 && m > 1 {
                    continue;
                }
                let x = random::randn(&[m, inp], 1000 + seed as u64).unwrap();
                g.bench_function(format!("{out}x{inp}/m{m}/{name}/quantlab"), |b| {
                    b.iter(|| ours.forward(black_box(&x), None).unwrap())
                });
                {
                    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let isa = Isa::selected();
                    g.bench_function(format!("{out}x{inp}/m{m}/{name}/quantlab-rows"), |b| {
                        b.iter(|| {
                            let a = ActBlocks::quantize(isa, kind, black_box(&xs), m, inp);
                            let mut y = vec![0f32; m * out];
                            matmul_with(isa, &rows, &a, &mut y);
                            y
                        })
                    });
                }
                g.bench_function(format!("{out}x{inp}/m{m}/{name}/candle"), |b| {
                    b.iter(|| candle.forward(black_box(&x)).unwrap())
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
