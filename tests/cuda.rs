//! CPU and CUDA agree, format by format (built only with `--features cuda`; run on a GPU
//! machine: `cargo test --release --features cuda --test cuda`, or the test binary carried
//! there by `scripts/gpu-stage.sh`). Without a GPU these tests fail: a CUDA build is for a
//! GPU machine, and a missing device must not pass as agreement.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use quantlab::arch::llama::Llama;
use quantlab::nn::HasLinears;
use std::path::PathBuf;

/// The fixture, under the checkout named by `CARGO_MANIFEST_DIR` at run time (set it when
/// running the carried test binary from another checkout), else where it was built.
fn dir() -> PathBuf {
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(root).join("tests/fixtures/llama-tiny")
}

fn gpu() -> Device {
    Device::new_cuda(0).expect("this test needs CUDA device 0 (a GPU machine)")
}

/// Log-probabilities `[seq, vocab]` of a fixed sequence, in f32 on the host.
fn log_probs(m: &Llama) -> Vec<Vec<f32>> {
    let ids: Vec<u32> = (0..40u32)
        .map(|i| (i * 37 + 11) % m.cfg.vocab_size as u32)
        .collect();
    let x = Tensor::from_vec(ids, (1, 40), &m.device).unwrap();
    let logits = m.forward(&x, &mut m.new_cache(), false).unwrap();
    Llama::log_softmax(&logits.squeeze(0).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn planned(plan: &str, device: &Device) -> Llama {
    let mut m = Llama::from_hf_dir(&dir(), device).unwrap();
    quantlab::nn::apply_plan(&mut m, &plan.parse().unwrap(), |_| Ok(())).unwrap();
    m
}

/// Every weight format's log-probs on CUDA (f32 activations) against the CPU path.
/// Tolerance: 2e-3 on log-probabilities where both devices multiply the same numbers (f32
/// sums in another order, cuBLAS vs our kernels). GGML types quantize activations to 8 bits
/// differently on each side (llama.cpp's q8_0 blocks in our CPU kernels, q8_1 in candle's
/// CUDA kernels): on this tiny random model, whose log-probs reach −12, that moved them by
/// 0.14 (seen on the H200); on SmolLM2 the two give perplexities within 0.03%. Dynamic int8
/// is looser than exact because a value on a rounding tie may round the other way on the
/// device (half away from zero vs half to even).
#[test]
fn every_format_agrees_with_the_cpu() {
    let gpu = gpu();
    for (plan, tol) in [
        ("keep", 2e-3),
        ("*=f16", 2e-3),
        ("*=bf16", 2e-3),
        ("*=w:i8:sym:ch0", 2e-3),
        ("*=w:i4:sym:g32", 2e-3),
        ("*=w:u3:affine:g64", 2e-3),
        ("*=nf4", 2e-3),
        ("*=fp4:b32", 2e-3),
        ("*=fp8", 2e-3),
        ("*=fp8:tensor", 2e-3),
        // Activations cast to E4M3 on each side: E4M3 codes are 2^-4 apart, so a summation-
        // order difference (larger on the FP8 tensor cores, see below) that moves a value
        // across a rounding boundary moves it by 6%, and on this random model such flips
        // compound through two layers to 0.31 in log-probs (measured on the H200). A broken
        // product or scale moves them by several units.
        ("*=fp8:dyn", 0.6),
        ("*=q8_0", 0.3),
        ("*=q4_0", 0.3),
        ("*=dynamic-int8", 2e-2),
    ] {
        eprintln!("plan {plan}");
        let cpu = log_probs(&planned(plan, &Device::Cpu));
        let m = planned(plan, &gpu);
        assert!(
            m.linears().iter().all(|l| l.weight.device().is_cuda()),
            "{plan}"
        );
        let d = max_diff(&cpu, &log_probs(&m));
        assert!(d < tol, "{plan}: max |Δ log p| = {d} (tolerance {tol})");
    }
}

/// bf16 activations on the GPU stay within bf16's rounding of the f32 result: bf16 keeps
/// 8 significant bits, the tiny random model's log-probs reach about −12, so each rounding
/// of a value that size moves it by up to 0.05 and a few of them add up (0.10 seen).
#[test]
fn bf16_activations_track_f32() {
    let gpu = gpu();
    let f32_lp = log_probs(&planned("keep", &gpu));
    let mut m = planned("keep", &gpu);
    m.set_dtype(DType::BF16).unwrap();
    let d = max_diff(&f32_lp, &log_probs(&m));
    assert!(d < 0.3, "bf16 vs f32 max |Δ log p| = {d}");
    assert!(
        d > 0.0,
        "bf16 run identical to f32: the dtype was not applied"
    );
}

/// The tensor-core products (cuBLASLt s8·s8→s32 and e4m3·e4m3→f32) against their CPU
/// reference on ragged row counts and SmolLM2's shapes: int8 sums are exact integers
/// (below 2^24 here, so exact in f32 too); FP8 products are exact in f32 and only the
/// summation order differs (relative 1e-5 of the sum of |products|).
#[test]
fn tensor_core_products_match_the_cpu() {
    use quantlab::nn::cuda_lt::{lt_matmul, LtInput};
    let gpu = gpu();
    for (m, k, n) in [(1, 576, 192), (37, 576, 1536), (130, 1536, 576)] {
        let a: Vec<u8> = (0..m * k)
            .map(|i| ((i * 2654435761usize) >> 7) as u8)
            .collect();
        let w: Vec<u8> = (0..n * k).map(|i| ((i * 40503usize) >> 3) as u8).collect();
        let at = Tensor::from_vec(a, (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let cpu = lt_matmul(&at, &wt, LtInput::I8)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let dev = lt_matmul(
            &at.to_device(&gpu).unwrap(),
            &wt.to_device(&gpu).unwrap(),
            LtInput::I8,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        assert_eq!(cpu, dev, "int8 {m}x{k}x{n}");
        let f = |n_: usize, seed: f32| {
            let v: Vec<u8> = (0..n_ * k)
                .map(|i| quantlab::quant::fp8::encode(((i as f32 + seed) * 0.618).sin() * 100.0))
                .collect();
            Tensor::from_vec(v, (n_, k), &Device::Cpu).unwrap()
        };
        let (af, wf) = (f(m, 0.5), f(n, 3.0));
        let cpu = lt_matmul(&af, &wf, LtInput::Fp8)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let dev = lt_matmul(
            &af.to_device(&gpu).unwrap(),
            &wf.to_device(&gpu).unwrap(),
            LtInput::Fp8,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        // Σ|products| bounds the rounding of any summation order: f32 accumulation gives
        // about 1e-6 of it. Hopper's FP8 MMA accumulates with fewer bits between its
        // promotions to f32 (about 14: DeepSeek-V3 §3.3.2): 4.7e-4 was measured on the H200,
        // so the bound is 2e-3; a wrong layout or scale is off by orders more.
        let (a8, w8) = (af.to_vec2::<u8>().unwrap(), wf.to_vec2::<u8>().unwrap());
        let dec = quantlab::quant::fp8::decode;
        let mut worst = 0f64;
        for r in 0..m {
            for j in 0..n {
                let abs: f64 = (0..k)
                    .map(|t| (dec(a8[r][t]) as f64 * dec(w8[j][t]) as f64).abs())
                    .sum();
                let d = (cpu[r][j] - dev[r][j]).abs() as f64;
                worst = worst.max(d / abs.max(1.0));
            }
        }
        eprintln!("fp8 {m}x{k}x{n}: max |Δ| / Σ|products| = {worst:e}");
        assert!(worst <= 2e-3, "fp8 {m}x{k}x{n}: {worst:e}");
    }
}

/// W8A8 layers (int8 and FP8 per token) run on tensor cores on the GPU and agree with the
/// CPU kernels: same codes and scales (the row quantizers follow the CPU rules bit for bit),
/// so the layers differ only
/// in the f32 products' summation order, hence the tolerance of the emulated rows.
#[test]
fn w8a8_layers_use_tensor_cores_and_agree_with_the_cpu() {
    let gpu = gpu();
    for (plan, tol) in [("*=w8a8:token", 2e-2), ("*=fp8:dyn", 0.6)] {
        let cpu = log_probs(&planned(plan, &Device::Cpu));
        let m = planned(plan, &gpu);
        let described: Vec<String> = m.linears().iter().map(|l| l.weight.describe()).collect();
        assert!(
            described.iter().all(|d| d.contains("tensor cores")),
            "{plan}: {described:?}"
        );
        let d = max_diff(&cpu, &log_probs(&m));
        assert!(d < tol, "{plan}: max |Δ log p| = {d} (tolerance {tol})");
    }
}
/// Largest |a − b| of two tensors, in f32 on the host.
fn tensor_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The fused CUDA kernels (`kernels/cuda/fused.cu`) against the ops' CPU versions on the
/// same inputs, on ragged shapes (columns not a multiple of the warp, one query position
/// as in decoding, stacked heads) and rows of whole 16-byte vectors (the register-resident
/// softmax kernel). Causal softmax: f32 within 1e-5 (probabilities ≤ 1,
/// `__expf` is within a few ulp); bf16/f16 outputs within one rounding of the value
/// (2^-8 and 2^-11 below 1, so 4e-3 and 1e-3). NLL: f32 sums of 49152 exps against f64
/// sums, within 1e-3 on values around 10–20.
#[test]
fn fused_kernels_match_their_cpu_reference() {
    let gpu = gpu();
    for (batch, heads, t, total) in [
        (2, 3, 5, 37),
        (1, 9, 1, 513),
        (3, 2, 130, 130),
        (1, 1, 33, 40),
        (2, 3, 64, 512),
        (1, 2, 7, 2048),
        (1, 1, 3, 1000),
        (2, 9, 1, 640),
    ] {
        let s = Tensor::randn(0f32, 4., (batch, heads * t, total), &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 4e-3), (DType::F16, 1e-3)] {
            let s = s.to_dtype(dtype).unwrap();
            let want = quantlab::nn::cuda::causal_softmax(&s, t, 0.125).unwrap();
            let got =
                quantlab::nn::cuda::causal_softmax(&s.to_device(&gpu).unwrap(), t, 0.125).unwrap();
            assert_eq!(got.dtype(), dtype);
            let d = tensor_diff(&want, &got);
            assert!(
                d <= tol,
                "softmax {dtype:?} {batch}×{heads}×{t}×{total}: {d}"
            );
        }
    }
    // Rotary embedding with the head transpose, both pair layouts, at an offset. Outputs
    // reach about 10 (random tables): within one rounding there (f32 1e-5 allows a fused
    // multiply-add; bf16 2^-4, f16 2^-7 between 8 and 16).
    let (b, t, heads, hd) = (2, 9, 3, 64);
    let x = Tensor::randn(0f32, 1., (b, t, heads * hd), &Device::Cpu).unwrap();
    let cos = Tensor::randn(0f32, 1., (32, hd / 2), &Device::Cpu).unwrap();
    let sin = Tensor::randn(0f32, 1., (32, hd / 2), &Device::Cpu).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.07), (DType::F16, 0.01)] {
        let (x, c, s) = (
            x.to_dtype(dtype).unwrap(),
            cos.to_dtype(dtype).unwrap(),
            sin.to_dtype(dtype).unwrap(),
        );
        for il in [false, true] {
            let want = quantlab::nn::cuda::rope_heads(&x, &c, &s, heads, 5, il).unwrap();
            let g = |v: &Tensor| v.to_device(&gpu).unwrap();
            let got = quantlab::nn::cuda::rope_heads(&g(&x), &g(&c), &g(&s), heads, 5, il).unwrap();
            assert_eq!(got.dims(), [b, heads, t, hd]);
            let d = tensor_diff(&want, &got);
            assert!(d <= tol, "rope {dtype:?} interleaved {il}: {d}");
        }
    }
    for (rows, vocab) in [(5, 49152), (3, 1001), (1, 31)] {
        let x = Tensor::randn(0f32, 3., (rows, vocab), &Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 7919) % vocab as u32)
            .collect();
        let targets = Tensor::from_vec(targets, rows, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dtype).unwrap();
            let want = quantlab::nn::cuda::nll_rows(&x, &targets).unwrap();
            let got = quantlab::nn::cuda::nll_rows(
                &x.to_device(&gpu).unwrap(),
                &targets.to_device(&gpu).unwrap(),
            )
            .unwrap();
            let d = tensor_diff(&want, &got);
            assert!(d <= 1e-3, "nll {dtype:?} {rows}×{vocab}: {d}");
        }
    }
}

/// Dynamic u8 activation fake-quantization with its range kept on the device, against
/// the op's CPU version (the CPU int8 kernel's rule): the same f32 operations in the same
/// order (IEEE division and products, round half to even), so bit-identical. Sizes from
/// one element to more blocks than the partial-range buffer holds.
#[test]
fn device_fake_quant_is_bit_identical_to_the_cpu_rule() {
    let gpu = gpu();
    for n in [1usize, 37, 4099, 3_000_001] {
        let x = Tensor::randn(0.3f32, 2., n, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dtype).unwrap();
            let want = quantlab::nn::cuda::fake_quant_u8_dynamic(&x).unwrap();
            let got =
                quantlab::nn::cuda::fake_quant_u8_dynamic(&x.to_device(&gpu).unwrap()).unwrap();
            assert_eq!(tensor_diff(&want, &got), 0.0, "{dtype:?} n={n}");
        }
    }
    let bad = Tensor::from_vec(vec![1f32, f32::INFINITY, 2.0], 3, &gpu).unwrap();
    let out = quantlab::nn::cuda::fake_quant_u8_dynamic(&bad).unwrap();
    assert!(out.to_vec1::<f32>().unwrap().iter().all(|v| v.is_nan()));
}

/// The model with fused attention (the GPU default) against the composed candle ops
/// (`QUANTLAB_FUSED=0`) on the same device, and the fused NLL against −log_softmax at
/// the target. f32: only summation order differs (1e-4 on log-probs near −12). bf16: the
/// composed path rounds the scaled scores to bf16 once more than the fused one, which
/// keeps them in f32 (same reasoning as `bf16_activations_track_f32`: 0.3).
#[test]
fn fused_attention_and_nll_match_the_composed_ops() {
    use quantlab::eval::perplexity::{perplexity_of_windows, windows, Protocol};
    let gpu = gpu();
    let ids: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 384).collect();
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 0.3)] {
        let mut m = planned("keep", &gpu);
        m.set_dtype(dtype).unwrap();
        std::env::set_var("QUANTLAB_FUSED", "0");
        let composed = log_probs(&m);
        std::env::remove_var("QUANTLAB_FUSED");
        assert!(quantlab::nn::cuda::enabled(&gpu));
        let fused = log_probs(&m);
        let d = max_diff(&composed, &fused);
        eprintln!("{dtype:?}: fused vs composed attention max |Δ log p| = {d}");
        assert!(d < tol, "{dtype:?}: fused vs composed attention {d}");
        // Perplexity NLLs: from log-probs (log_probs = true) and from the fused kernel.
        let ws = windows(
            &ids,
            Protocol::LlamaCpp {
                ctx: 32,
                bos: false,
            },
            None,
            None,
        )
        .unwrap();
        let bar = indicatif::ProgressBar::hidden();
        let mut seen = [0usize; 2];
        let mut run = |lp: bool, k: usize| {
            perplexity_of_windows(
                &m,
                &ws,
                Protocol::LlamaCpp {
                    ctx: 32,
                    bos: false,
                },
                4,
                lp,
                &bar,
                |_, _, l, _| {
                    assert_eq!(l.is_some(), lp);
                    seen[k] += 1;
                    Ok(None)
                },
            )
            .unwrap()
        };
        let (a, b) = (run(true, 0), run(false, 1));
        assert_eq!(seen, [ws.len(), ws.len()]);
        let d = a
            .token_nll
            .iter()
            .flatten()
            .zip(b.token_nll.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        eprintln!("{dtype:?}: fused vs log_softmax NLL max Δ = {d}");
        assert!(d < 1e-4, "{dtype:?}: fused NLL differs by {d}");
    }
}

/// Sequential calibration (GPTQ) runs on a CUDA model: the staged pass and the Hessian
/// sums stay on the device. Against the same plan calibrated on the CPU: the Hessians
/// differ by f32 summation order, which can move a few GPTQ rounding decisions, so the
/// log-probs are compared loosely (0.3, as for bf16); a missing or wrong calibration
/// (RTN, or Hessians of other inputs) moves them by more on this model.
#[test]
fn gptq_calibrates_on_the_gpu() {
    use quantlab::nn::apply_plan_in_stages;
    let windows: Vec<Vec<u32>> = (0..6u32)
        .map(|s| (0..48u32).map(|i| (i * 31 + s * 7 + 3) % 384).collect())
        .collect();
    let plan: quantlab::nn::Plan = "lm_head=keep;*=gptq:i4:sym:g32".parse().unwrap();
    let mut on_cpu = Llama::from_hf_dir(&dir(), &Device::Cpu).unwrap();
    apply_plan_in_stages(&mut on_cpu, &plan, &windows, |_| Ok(())).unwrap();
    let mut on_gpu = Llama::from_hf_dir(&dir(), &gpu()).unwrap();
    apply_plan_in_stages(&mut on_gpu, &plan, &windows, |_| Ok(())).unwrap();
    assert!(on_gpu.linears().iter().all(|l| l.weight.device().is_cuda()));
    let d = max_diff(&log_probs(&on_cpu), &log_probs(&on_gpu));
    eprintln!("GPTQ calibrated on the GPU vs the CPU: max |Δ log p| = {d}");
    assert!(d < 0.3, "GPTQ on the GPU vs the CPU: {d}");
}

/// A weight-only host format of a seeded random `[n, k]` matrix: `w:<scheme>` or nf4/fp4.
fn packed_host(
    method: &str,
    n: usize,
    k: usize,
    seed: u64,
) -> std::sync::Arc<dyn quantlab::nn::format::WeightFormat> {
    use quantlab::nn::format::fourbit::FourBitWeight;
    use quantlab::nn::format::grouped::Grouped;
    use quantlab::quant::FourBitType;
    let w = quantlab::quant::random::randn(&[n, k], seed).unwrap();
    match method {
        "nf4" => {
            std::sync::Arc::new(FourBitWeight::quantize(&w, FourBitType::Nf4, 64, false).unwrap())
        }
        "fp4:b32:dq" => {
            std::sync::Arc::new(FourBitWeight::quantize(&w, FourBitType::Fp4, 32, true).unwrap())
        }
        s => {
            let scheme = s.strip_prefix("w:").unwrap();
            if let Some(base) = scheme.strip_suffix(":f16-scales") {
                std::sync::Arc::new(
                    Grouped::quantize_f16_scales(&w, &base.parse().unwrap(), "fc").unwrap(),
                )
            } else {
                std::sync::Arc::new(Grouped::quantize(&w, &scheme.parse().unwrap(), "fc").unwrap())
            }
        }
    }
}

/// The packed decode GEMV (`kernels/cuda/gemv.cuh`) against its CPU reference (the same
/// layout and index arithmetic, `packed_cuda::GemvShape::gemv_reference`) on ragged shapes
/// (rows not a multiple of the 4 rows a block takes, columns not of 8, 32 or the group),
/// m = 1..8, every activation dtype and kernel (4-bit and 8-bit int codes, the NF4/FP4
/// table). Both sides multiply the same decoded weights with the same (dtype-rounded)
/// inputs in f32; only the summation order differs, bounded by 1e-5 of Σ|w·x| (k ≤ 1000
/// f32 terms; beyond, 1.2e-8·k: the reference adds k/8 runs in sequence, each step within
/// 2^-24 of the running sum, on both sides), plus one rounding of the output in bf16/f16
/// (2^-7 of |y|, twice bf16's half-ulp). The CPU reference is itself checked against the host formats in
/// `packed_cuda`'s unit tests (exact weights, f32 products).
#[test]
fn packed_gemv_matches_its_cpu_reference() {
    use quantlab::nn::format::packed_cuda::{Kernel, PackedLayout, PackedWeight};
    let gpu = gpu();
    let mut checked = 0;
    for method in [
        "w:i4:sym:g32",
        "w:u4:affine:g64",
        "w:i8:sym:ch0",
        "w:u8:affine:g128",
        "w:u3:affine:g64",
        "w:i2:sym:g16",
        "w:i4:sym:g12",
        "w:i4:sym:g64:f16-scales",
        "nf4",
        "fp4:b32:dq",
    ] {
        // The last two: several v3 activation tiles (4096 columns each), the last ragged.
        for (n, k) in [
            (1, 64),
            (37, 128),
            (101, 320),
            (6, 1000),
            (257, 576),
            (19, 9000),
            (5, 4100),
        ] {
            let h = packed_host(method, n, k, (n + k) as u64);
            let Some(layout) = PackedLayout::from_format(h.as_ref()) else {
                // NF4/FP4 blocks that cross rows have no packed layout (dequantized path).
                let block = if method == "nf4" { 64 } else { 32 };
                assert!(
                    !method.starts_with('w') && k % block != 0,
                    "{method} {n}x{k}: no packed layout"
                );
                continue;
            };
            let cpu = PackedWeight::upload(&layout, &Device::Cpu).unwrap();
            let dev0 = PackedWeight::upload(&layout, &gpu).unwrap();
            let w = h.dequantize().unwrap().to_vec2::<f32>().unwrap();
            // Every kernel where it applies (v2 and v3 take at most 2 rows); v1 and v2
            // only up to 1000 columns (their loops do not change with the length).
            let kernels: Vec<_> = if k > 1000 {
                vec![(1, Kernel::V3), (2, Kernel::V3)]
            } else {
                (1..=8)
                    .map(|m| (m, Kernel::V1))
                    .chain([
                        (1, Kernel::V2),
                        (2, Kernel::V2),
                        (1, Kernel::V3),
                        (2, Kernel::V3),
                    ])
                    .collect()
            };
            for (m, kernel) in kernels {
                let dev = dev0.with_kernel(kernel);
                let x = quantlab::quant::random::randn(&[m, k], m as u64).unwrap();
                for dt in [DType::F32, DType::BF16, DType::F16] {
                    let xd = x.to_dtype(dt).unwrap();
                    let want = cpu
                        .gemv(&xd)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap();
                    let got = dev
                        .gemv(&xd.to_device(&gpu).unwrap())
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap();
                    let xs = xd.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                    let out_round = if dt == DType::F32 { 0.0 } else { 1.0 / 128.0 };
                    for i in 0..m {
                        for r in 0..n {
                            let mag: f32 = (0..k).map(|c| (w[r][c] * xs[i][c]).abs()).sum();
                            let d = (want[i][r] - got[i][r]).abs();
                            let tol = (1.2e-8 * k as f32).max(1e-5) * mag
                                + out_round * want[i][r].abs()
                                + 1e-6;
                            assert!(d <= tol, "{method} {n}x{k} m={m} {dt:?} {kernel:?} ({i}, {r}): {} vs {} (tolerance {tol})", got[i][r], want[i][r]);
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 300, "only {checked} cases ran");
}

/// The v2 and v3 kernels' stacked launches (q|k|v split outputs, gate|up with SiLU)
/// against the CPU reference, rows not a multiple of a block's, m = 1 and 2; tolerance as
/// above.
#[test]
fn packed_gemv_v2_stacks_match_the_cpu() {
    use quantlab::nn::format::packed_cuda::{Kernel, PackedLayout, PackedWeight};
    let gpu = gpu();
    for (method, kernel) in ["w:i4:sym:g64", "w:i8:sym:ch0", "nf4", "w:u4:affine:g32"]
        .into_iter()
        .flat_map(|m| [(m, Kernel::V2), (m, Kernel::V3)])
    {
        let k = 576;
        let up = |n: usize, seed: u64, dev: &Device| {
            let h = packed_host(method, n, k, seed);
            PackedWeight::upload(&PackedLayout::from_format(h.as_ref()).unwrap(), dev).unwrap()
        };
        let cpu: Vec<_> = [(77, 1), (77, 2), (13, 3)]
            .iter()
            .map(|&(n, s)| up(n, s, &Device::Cpu))
            .collect();
        let dev: Vec<_> = [(77, 1), (77, 2), (13, 3)]
            .iter()
            .map(|&(n, s)| up(n, s, &gpu).with_kernel(kernel))
            .collect();
        let glu_c = PackedWeight::stack(&[&cpu[0], &cpu[1]]).unwrap().unwrap();
        let glu_d = PackedWeight::stack(&[&dev[0], &dev[1]])
            .unwrap()
            .unwrap()
            .with_kernel(kernel);
        let qkv_c = PackedWeight::stack(&[&cpu[0], &cpu[1], &cpu[2]])
            .unwrap()
            .unwrap();
        let qkv_d = PackedWeight::stack(&[&dev[0], &dev[1], &dev[2]])
            .unwrap()
            .unwrap()
            .with_kernel(kernel);
        for m in [1, 2] {
            for dt in [DType::F32, DType::BF16] {
                let x = quantlab::quant::random::randn(&[m, k], 10 + m as u64)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let xg = x.to_device(&gpu).unwrap();
                let f = |t: Tensor| {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .to_device(&Device::Cpu)
                        .unwrap()
                };
                // Relative to the largest output: f32 summation order (k = 576 terms), or
                // one bf16 rounding of either side (2^-8 each).
                let rel = if dt == DType::F32 { 1e-5 } else { 1.0 / 64.0 };
                let check = |a: Tensor, b: Tensor, what: &str| {
                    let (a, b) = (f(a), f(b));
                    let big = a
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let d = tensor_diff(&a, &b);
                    assert!(
                        d <= rel * big + 1e-6,
                        "{method} {kernel:?} m={m} {dt:?} {what}: {d} of {big}"
                    );
                };
                check(
                    glu_c.gemv_glu(&x).unwrap(),
                    glu_d.gemv_glu(&xg).unwrap(),
                    "GLU",
                );
                for (a, b) in qkv_c
                    .gemv_parts(&x)
                    .unwrap()
                    .into_iter()
                    .zip(qkv_d.gemv_parts(&xg).unwrap())
                {
                    check(a, b, "split");
                }
            }
        }
    }
}

/// Decode through the packed GEMV: a weight-only model on the GPU fed one token at a time
/// (every product has m = 1, so every layer takes the packed kernel) against the CPU's
/// one forward over the whole sequence. Same tolerance as the formats' prefill agreement.
#[test]
fn packed_decode_agrees_with_the_cpu() {
    let gpu = gpu();
    for plan in ["*=w:i4:sym:g32", "*=w:i8:sym:ch0", "*=nf4"] {
        let cpu = log_probs(&planned(plan, &Device::Cpu));
        let m = planned(plan, &gpu);
        let packed = m
            .linears()
            .iter()
            .filter(|l| l.weight.describe().contains("packed GEMV"))
            .count();
        assert!(packed > 0, "{plan}: no layer has the packed GEMV");
        let ids: Vec<u32> = (0..40u32)
            .map(|i| (i * 37 + 11) % m.cfg.vocab_size as u32)
            .collect();
        let mut cache = m.new_cache();
        let mut rows = Vec::new();
        for &id in &ids {
            let x = Tensor::from_vec(vec![id], (1, 1), &gpu).unwrap();
            let logits = m.forward(&x, &mut cache, false).unwrap();
            let lp = Llama::log_softmax(&logits.squeeze(0).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            rows.push(lp.last().unwrap().clone());
        }
        let d = max_diff(&cpu, &rows);
        assert!(
            d < 2e-3,
            "{plan} decode: max |Δ log p| = {d} ({packed} packed layers)"
        );
    }
}

/// The q8 activation quantization kernel (`kernels/cuda/gemv_q8.cuh`) against its CPU
/// reference, bit for bit (codes, f16-rounded scales, block sums), in both code orders, on
/// ragged widths, f32/bf16/f16 inputs, with a block of zeros and a large outlier.
#[test]
fn q8_activation_quantization_is_bit_identical_to_the_cpu() {
    use quantlab::nn::format::packed_cuda::q8;
    let gpu = gpu();
    for k in [1, 31, 33, 100, 576, 1000] {
        for m in [1, 2] {
            let mut xs = quantlab::quant::random::randn(&[m, k], k as u64)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            xs[0][..k.min(32)].fill(0.0);
            if k > 40 {
                xs[m - 1][40] = -1e4;
            }
            let x = Tensor::new(xs, &Device::Cpu).unwrap();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let xd = x.to_dtype(dt).unwrap();
                for perm in [false, true] {
                    let want = q8::quantize_rows(&xd, perm).unwrap();
                    let got = q8::quantize_rows(&xd.to_device(&gpu).unwrap(), perm).unwrap();
                    assert_eq!(got, want, "k={k} m={m} {dt:?} perm={perm}");
                }
            }
        }
    }
}

/// The q8-activation GEMV (`gemv_q8.cuh`) against its CPU reference (`q8::reference`,
/// itself checked against the CPU q8 route in tests/packed_q8.rs) on ragged shapes (rows
/// not a multiple of a block's, columns not of 32), m = 1 and 2, every format it takes
/// (4-bit and 8-bit int codes, symmetric and affine, 3- and 6-bit codes in those layouts,
/// NF4/FP4 code books), f32/bf16/f16 activations, plain, split (q|k|v) and GLU outputs.
/// The integer block sums are exact on both sides and each block adds f32(I)·(s·d): only
/// the order of the ≤ k/32 f32 additions differs, bounded by 4e-6 of Σ|w·x| (2^-24 per
/// addition, ≤ 32 blocks), plus one rounding of the output for bf16/f16 (2^-7 of |y|).
/// Both GPU routes run: the fused kernel (activations quantized in each block's prologue;
/// with the automatic grid and with 3 blocks, each walking many row tiles) and the two
/// launches. Their lanes add the same blocks in the same order, so the fused outputs must
/// equal the two-launch ones bit for bit (which also pins the fused quantization to
/// q8_quantize's, itself bit-identical to the CPU). 40,000 columns take > 48 KB of
/// shared memory (opt-in) at m = 1 and 2; 5,000 rows make many tiles.
#[test]
fn q8_gemv_matches_its_cpu_reference() {
    use quantlab::nn::format::packed_cuda::q8::Route;
    use quantlab::nn::format::packed_cuda::{q8, PackedLayout, PackedWeight};
    let routes = [
        Route::Fused { max_blocks: 0 },
        Route::Fused { max_blocks: 3 },
        Route::TwoLaunch,
    ];
    use quantlab::nn::kernels::prefill::ActivationMode;
    let gpu = gpu();
    let q8on = Some(ActivationMode::Q8);
    let mut checked = 0;
    for method in [
        "w:i4:sym:g32",
        "w:u4:affine:g64",
        "w:i8:sym:ch0",
        "w:u8:affine:g128",
        "w:u3:affine:g64",
        "w:i6:sym:g32",
        "nf4",
        "fp4:b32:dq",
    ] {
        for (n, k) in [
            (1, 64),
            (37, 128),
            (101, 320),
            (6, 1000),
            (257, 576),
            (5000, 96),
            (19, 40000),
        ] {
            let h = packed_host(method, n, k, (n + k) as u64);
            let Some(layout) = PackedLayout::from_format(h.as_ref()) else {
                assert!(
                    !method.starts_with('w'),
                    "{method} {n}x{k}: no packed layout"
                );
                continue;
            };
            let cpu = PackedWeight::upload(&layout, &Device::Cpu)
                .unwrap()
                .with_activations(q8on);
            let dev = PackedWeight::upload(&layout, &gpu)
                .unwrap()
                .with_activations(q8on);
            if !q8::eligible(&cpu) {
                // Groups that are not whole 32-column blocks (e.g. 1000 columns per row
                // block of 64) keep the exact kernels.
                continue;
            }
            let w = h.dequantize().unwrap().to_vec2::<f32>().unwrap();
            for m in [1, 2] {
                let x = quantlab::quant::random::randn(&[m, k], 3 * m as u64).unwrap();
                for dt in [DType::F32, DType::BF16, DType::F16] {
                    let xd = x.to_dtype(dt).unwrap();
                    let f = |t: Tensor| {
                        t.to_dtype(DType::F32)
                            .unwrap()
                            .to_device(&Device::Cpu)
                            .unwrap()
                            .to_vec2::<f32>()
                            .unwrap()
                    };
                    let want = f(cpu.gemv(&xd).unwrap());
                    let xg = xd.to_device(&gpu).unwrap();
                    let outs: Vec<_> = routes
                        .iter()
                        .map(|&r| f(dev.with_q8_route(r).gemv(&xg).unwrap()))
                        .collect();
                    for (got, route) in outs.iter().zip(&routes) {
                        assert_eq!(
                            got,
                            outs.last().unwrap(),
                            "{method} {n}x{k} m={m} {dt:?}: {route:?} against two launches"
                        );
                    }
                    let got = &outs[0];
                    let xs = xd.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                    let out_round = if dt == DType::F32 { 0.0 } else { 1.0 / 128.0 };
                    for i in 0..m {
                        for r in 0..n {
                            let mag: f32 = (0..k).map(|c| (w[r][c] * xs[i][c]).abs()).sum();
                            let d = (want[i][r] - got[i][r]).abs();
                            let tol = 4e-6 * mag + out_round * want[i][r].abs() + 1e-6;
                            assert!(d <= tol, "{method} {n}x{k} m={m} {dt:?} ({i}, {r}): {} vs {} (tolerance {tol})", got[i][r], want[i][r]);
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 250, "only {checked} cases ran");
    // Stacks: q|k|v split outputs and gate|up with SiLU, as the decode step launches them.
    for method in ["w:i4:sym:g64", "w:i8:sym:ch0", "nf4", "w:u4:affine:g32"] {
        let k = 576;
        let up = |n: usize, seed: u64, dev: &Device| {
            let h = packed_host(method, n, k, seed);
            PackedWeight::upload(&PackedLayout::from_format(h.as_ref()).unwrap(), dev)
                .unwrap()
                .with_activations(q8on)
        };
        let parts = [(77, 1), (77, 2), (13, 3)];
        let cpu: Vec<_> = parts.iter().map(|&(n, s)| up(n, s, &Device::Cpu)).collect();
        let dev: Vec<_> = parts.iter().map(|&(n, s)| up(n, s, &gpu)).collect();
        let glu_c = PackedWeight::stack(&[&cpu[0], &cpu[1]]).unwrap().unwrap();
        let glu_d = PackedWeight::stack(&[&dev[0], &dev[1]]).unwrap().unwrap();
        let qkv_c = PackedWeight::stack(&[&cpu[0], &cpu[1], &cpu[2]])
            .unwrap()
            .unwrap();
        let qkv_d = PackedWeight::stack(&[&dev[0], &dev[1], &dev[2]])
            .unwrap()
            .unwrap();
        for m in [1, 2] {
            for dt in [DType::F32, DType::BF16] {
                let x = quantlab::quant::random::randn(&[m, k], 10 + m as u64)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let xg = x.to_device(&gpu).unwrap();
                let rel = if dt == DType::F32 { 1e-5 } else { 1.0 / 64.0 };
                let check = |a: Tensor, b: Tensor, what: &str| {
                    let f = |t: Tensor| {
                        t.to_dtype(DType::F32)
                            .unwrap()
                            .to_device(&Device::Cpu)
                            .unwrap()
                    };
                    let (a, b) = (f(a), f(b));
                    let big = a
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let d = tensor_diff(&a, &b);
                    assert!(
                        d <= rel * big + 1e-6,
                        "q8 {method} m={m} {dt:?} {what}: {d} of {big}"
                    );
                };
                for route in routes {
                    let (glu_d, qkv_d) = (glu_d.with_q8_route(route), qkv_d.with_q8_route(route));
                    check(
                        glu_c.gemv_glu(&x).unwrap(),
                        glu_d.gemv_glu(&xg).unwrap(),
                        "GLU",
                    );
                    for (a, b) in qkv_c
                        .gemv_parts(&x)
                        .unwrap()
                        .into_iter()
                        .zip(qkv_d.gemv_parts(&xg).unwrap())
                    {
                        check(a, b, "split");
                    }
                }
            }
        }
    }
}
