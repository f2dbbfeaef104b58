//! The packed f32 matmul (`kernels::gemm_f32`) against candle's matmul on SmolLM2-135M's
//! layer shapes (`[out, in]`), for one activation row (decoding) and 512 rows (prefill).
//! Compare the two rows of one shape in the same run: the machine is shared and noisy.
//! `cargo bench --bench f32_kernels` (about a minute).

use candle_core::Tensor;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quantlab::nn::kernels::gemm_f32::{self, PackedWeight};
use quantlab::quant::random;
use std::hint::black_box;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let shapes = [
        (576, 576),
        (192, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
    ];
    for (n, k) in shapes {
        let w = random::randn(&[n, k], 0).unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let packed = PackedWeight::for_selected(&wv, n, k);
        let mut g = c.benchmark_group(format!("{n}x{k}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1500));
        for m in [1usize, 512] {
            if n == 49152 && m == 512 {
                g.sample_size(10);
            }
            let x = random::randn(&[m, k], 1).unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            g.throughput(Throughput::Elements((m * n * k) as u64));
            g.bench_function(format!("m{m}/candle"), |b| {
                b.iter(|| black_box(&x).matmul(&w.t().unwrap()).unwrap())
            });
            g.bench_function(format!("m{m}/packed"), |b| {
                b.iter(|| {
                    let y = gemm_f32::matmul(black_box(&xv), m, &packed);
                    Tensor::from_vec(y, (m, n), &candle_core::Device::Cpu).unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
