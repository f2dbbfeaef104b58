//! Per-call CPU time of the GGML Q8_0 / Q4_0 decode GEMV (`kernels::ggml_blocks`, activation
//! quantization included) on SmolLM2-135M's shapes, against candle's `QMatMul` on the same
//! blocks, and the sum over one token's products (30 layers × q, k, v, o, gate, up, down +
//! the 49152-row output layer). Process CPU time, so a loaded machine's descheduling does not
//! count; min and median of 7 repetitions. Runs on a rayon pool thread as the decode loop does.
//! `cargo run --release --example ggml_gemv_cpu_time` (`THREADS=2 WALL=1` for wall time on
//! both cores; `ISA=avx2` for one path only).
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use quantlab::nn::kernels::ggml_blocks::{
    matmul_with, panels, ActBlocks, BlockKind, Packed, PackedBlocks, PanelBlocks,
};
use quantlab::nn::kernels::Isa;
use std::hint::black_box;
#[path = "support/clock.rs"]
mod clock;
use clock::cpu_or_wall_ns as cpu_ns;

fn time(f: impl FnMut() + Send, calls: usize) -> (f64, f64) {
    rayon::scope(|_| clock::best_and_median_us(cpu_ns, calls, f))
}

/// (out, in, products per token).
const SHAPES: [(usize, usize, usize); 5] = [
    (576, 576, 60),
    (192, 576, 60),
    (1536, 576, 60),
    (576, 1536, 30),
    (49152, 576, 1),
];

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(std::env::var("THREADS").map_or(1, |v| v.parse().unwrap()))
        .build_global()
        .unwrap();
    let only = std::env::var("ISA").ok();
    for (name, t, kind) in [
        ("q8_0", GgmlDType::Q8_0, BlockKind::Q8_0),
        ("q4_0", GgmlDType::Q4_0, BlockKind::Q4_0),
    ] {
        let isas: Vec<Isa> = Isa::available()
            .into_iter()
            .filter(|i| only.as_deref().is_none_or(|o| o == i.name()))
            .collect();
        let mut token = vec![0f64; isas.len()];
        let mut token_candle = 0f64;
        let mut token_panel = vec![0f64; isas.len()];
        for &(o, i, per_token) in &SHAPES {
            let wf: Vec<f32> = (0..o * i)
                .map(|k| (((k * 7919) % 1000) as f32 - 500.0) / 300.0)
                .collect();
            let w = Tensor::from_vec(wf, (o, i), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, t).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let packed = PackedBlocks::from_ggml(kind, &bytes, o, i).unwrap();
            let candle = QMatMul::from_qtensor(q).unwrap();
            // `M=512`: that many activation rows (prefill) in the per-shape timings.
            let m: usize = std::env::var("M").map_or(1, |v| v.parse().unwrap());
            let xs: Vec<f32> = (0..m * i).map(|k| ((k * 31) % 17) as f32 - 8.0).collect();
            let xt = Tensor::from_vec(xs.clone(), (m, i), &Device::Cpu).unwrap();
            let calls = (20_000_000 / (m * o * i)).clamp(3, 200);
            let mut y = vec![0f32; m * o];
            let (c, cm) = time(
                || {
                    black_box(candle.forward(black_box(&xt)).unwrap());
                },
                calls,
            );
            token_candle += c * per_token as f64;
            let mut line = format!("{name} {o:>5}x{i:<4} candle {c:8.1} µs (med {cm:8.1})");
            for (j, &isa) in isas.iter().enumerate() {
                let (a, am) = time(
                    || {
                        let act = ActBlocks::quantize(isa, kind, black_box(&xs), m, i);
                        matmul_with(isa, &packed, &act, &mut y);
                    },
                    calls,
                );
                token[j] += a * per_token as f64;
                let gbs = packed.bytes() as f64 / a / 1e3;
                line += &format!(" | {} {a:8.1} (med {am:8.1}) {gbs:5.1} GB/s", isa.name());
            }
            let pb = PanelBlocks::from_rows(&packed);
            for (j, &isa) in isas.iter().enumerate().filter(|(_, &i)| i != Isa::Portable) {
                let (a, am) = time(
                    || {
                        let act = ActBlocks::quantize(isa, kind, black_box(&xs), m, i);
                        panels::matmul_with(isa, &pb, &act, &mut y);
                    },
                    calls,
                );
                token_panel[j] += a * per_token as f64;
                line += &format!(" | panel-{} {a:8.1} (med {am:8.1})", isa.name());
            }
            println!("{line}");
        }
        for (j, isa) in isas.iter().enumerate().filter(|(_, &i)| i != Isa::Portable) {
            println!(
                "{name} per token: panel-{} {:.2} ms",
                isa.name(),
                token_panel[j] / 1e3
            );
        }
        let mut line = format!("{name} per token: candle {:.2} ms", token_candle / 1e3);
        for (j, isa) in isas.iter().enumerate() {
            line += &format!(" | {} {:.2} ms", isa.name(), token[j] / 1e3);
        }
        println!("{line}");
        stream(kind, name, &isas);
    }
}

/// One token's products on distinct weights (the whole model's bytes, far past the L3
/// cache, as in decode): CPU time per token of each path, weights streamed from memory.
fn stream(kind: BlockKind, name: &str, isas: &[Isa]) {
    let bb = kind.block_bytes();
    let mut shapes = Vec::new();
    for _ in 0..30 {
        for &(o, i, per) in &SHAPES[..4] {
            for _ in 0..per / 30 {
                shapes.push((o, i));
            }
        }
    }
    shapes.push((49152, 576));
    let mut seed = 1u64;
    let mut bytes_of = |o: usize, i: usize| -> Vec<u8> {
        let mut v = Vec::with_capacity(o * i / 32 * bb);
        for _ in 0..o * i / 32 {
            v.extend(half::f16::from_f32(0.01).to_le_bytes());
            for _ in 2..bb {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v.push((seed >> 56) as u8);
            }
        }
        v
    };
    let raw: Vec<(usize, usize, Vec<u8>)> = shapes
        .iter()
        .map(|&(o, i)| (o, i, bytes_of(o, i)))
        .collect();
    let mut line = format!("{name} streamed token ({} products):", raw.len());
    let mut layouts: Vec<(String, Vec<Packed>)> = isas
        .iter()
        .map(|&isa| {
            let ws = raw
                .iter()
                .map(|(o, i, b)| Packed::Rows(PackedBlocks::from_ggml(kind, b, *o, *i).unwrap()))
                .collect();
            (isa.name().to_string(), ws)
        })
        .collect();
    for &isa in isas.iter().filter(|&&i| i != Isa::Portable) {
        let ws = raw
            .iter()
            .map(|(o, i, b)| {
                Packed::Panels(PanelBlocks::from_rows(
                    &PackedBlocks::from_ggml(kind, b, *o, *i).unwrap(),
                ))
            })
            .collect();
        layouts.push((format!("panel-{}", isa.name()), ws));
    }
    drop(raw);
    let xs: Vec<f32> = (0..1536).map(|k| ((k * 31) % 17) as f32 - 8.0).collect();
    for (label, ws) in layouts {
        let isa = isas
            .iter()
            .copied()
            .find(|i| label.trim_start_matches("panel-") == i.name())
            .unwrap();
        let (t, tm) = time(
            || {
                for w in &ws {
                    let y = match w {
                        Packed::Rows(r) => {
                            let a = ActBlocks::quantize(isa, kind, &xs[..r.k], 1, r.k);
                            let mut y = vec![0f32; r.n];
                            matmul_with(isa, r, &a, &mut y);
                            y
                        }
                        Packed::Panels(p) => {
                            let a = ActBlocks::quantize(isa, kind, &xs[..p.k], 1, p.k);
                            let mut y = vec![0f32; p.n];
                            panels::matmul_with(isa, p, &a, &mut y);
                            y
                        }
                    };
                    black_box(y);
                }
            },
            3,
        );
        line += &format!(" | {label} {:.2} ms (med {:.2})", t / 1e3, tm / 1e3);
        drop(ws);
    }
    println!("{line}");
}
