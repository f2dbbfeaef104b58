//! Quantize / dequantize throughput on a 4096×4096 f32 tensor, per scheme.
//! Throughput is reported in bytes of f32 input per second (criterion's GB/s).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quantlab::quant::{self, codebook::FourBit, random, FourBitType, Scheme};
use std::hint::black_box;

const N: usize = 4096;

fn bench(c: &mut Criterion) {
    let x = random::randn(&[N, N], 0).unwrap();
    let flat = random::randn_vec(N * N, 0);
    let mut g = c.benchmark_group("quant_4096x4096");
    g.throughput(Throughput::Bytes((N * N * 4) as u64));
    g.sample_size(10);
    for spec in [
        "u8:affine:tensor",
        "i8:sym:ch0",
        "i4:sym:g64",
        "u4:affine:g128",
    ] {
        let s: Scheme = spec.parse().unwrap();
        g.bench_function(format!("quantize/{spec}"), |b| {
            b.iter(|| quant::quantize(black_box(&x), &s).unwrap())
        });
        let q = quant::quantize(&x, &s).unwrap();
        g.bench_function(format!("dequantize/{spec}"), |b| {
            b.iter(|| black_box(&q).dequantize().unwrap())
        });
    }
    for (name, kind) in [("nf4", FourBitType::Nf4), ("fp4", FourBitType::Fp4)] {
        g.bench_function(format!("quantize/{name}"), |b| {
            b.iter(|| FourBit::quantize(black_box(&flat), kind, 64, false).unwrap())
        });
        let q = FourBit::quantize(&flat, kind, 64, false).unwrap();
        g.bench_function(format!("dequantize/{name}"), |b| {
            b.iter(|| black_box(&q).dequantize())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
