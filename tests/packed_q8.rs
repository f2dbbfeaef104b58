//! The q8-activation packed GEMV's CPU reference (`packed_cuda::q8::reference`, the CUDA
//! kernel's arithmetic) against the CPU q8 route (`--activations q8`: `LowBit::matmul_a8`,
//! the VNNI / AVX2 panels), format by format. Its own test binary: the q8 switch is
//! process-wide. The CUDA kernel is checked against the same reference in tests/cuda.rs,
//! so the chain is GPU = reference = CPU route.
//!
//! Both sides quantize each 32-column block to int8 the same way and sum each block
//! exactly in integers, then add `f32(I)·(s_w·d)` per block in f32: the same numbers, so
//! the outputs differ only by the order of ≤ k/32 f32 additions — bounded here by 4e-6 of
//! Σ|w·x| (2^-24 per addition for ≤ 32 blocks is 2e-6). One activation code off by one
//! would move an output by about s_w·d ≈ 1/(127·k) of Σ|w·x| (≥ 2e-5 at k ≤ 320), so the
//! bound also pins the codes.

use candle_core::{DType, Device, Tensor};
use quantlab::nn::format::fourbit::FourBitWeight;
use quantlab::nn::format::grouped::Grouped;
use quantlab::nn::format::packed_cuda::{q8, PackedLayout, PackedWeight};
use quantlab::nn::format::WeightFormat;
use quantlab::nn::kernels::ggml_blocks::panels::panel_layout;
use quantlab::nn::kernels::prefill::{set_activations, ActivationMode};
use quantlab::nn::kernels::Isa;
use quantlab::quant::FourBitType;
use std::sync::Arc;

fn host(method: &str, n: usize, k: usize, seed: u64) -> Arc<dyn WeightFormat> {
    let w = quantlab::quant::random::randn(&[n, k], seed).unwrap();
    match method {
        "nf4" => Arc::new(FourBitWeight::quantize(&w, FourBitType::Nf4, 64, false).unwrap()),
        "fp4:b32" => Arc::new(FourBitWeight::quantize(&w, FourBitType::Fp4, 32, false).unwrap()),
        s => Arc::new(Grouped::quantize(&w, &s.parse().unwrap(), "fc").unwrap()),
    }
}

#[test]
fn the_kernel_reference_is_the_cpu_q8_route() {
    // The panel route runs on AVX2 and AVX-512 (bit-identical); only a forced portable
    // kernel (`QUANTLAB_KERNEL=portable`) takes the row kernel `gemv_q8`, whose f32 scales
    // are another approximation: that is not what the GPU reproduces, so refuse loudly.
    assert!(
        panel_layout(Isa::selected()),
        "the CPU q8 route compared here is the panel one (AVX2 or AVX-512); run without \
         QUANTLAB_KERNEL=portable"
    );
    set_activations(ActivationMode::Q8);
    let mut checked = 0;
    let mut worst = 0f32;
    for method in [
        "i4:sym:g32",
        "u4:affine:g64",
        "i8:sym:ch0",
        "u8:affine:g128",
        "u3:affine:g64",
        "i6:sym:g32",
        "nf4",
        "fp4:b32",
    ] {
        for (n, k) in [(1, 64), (37, 128), (101, 320), (19, 576)] {
            let h = host(method, n, k, (3 * n + k) as u64);
            let layout = PackedLayout::from_format(h.as_ref()).expect("a packed layout");
            let p = PackedWeight::upload(&layout, &Device::Cpu)
                .unwrap()
                .with_activations(Some(ActivationMode::Q8));
            assert!(q8::eligible(&p), "{method}");
            let w = h.dequantize().unwrap().to_vec2::<f32>().unwrap();
            for m in [1, 2] {
                let x = quantlab::quant::random::randn(&[m, k], 40 + m as u64).unwrap();
                // Row 0: a block of zeros, then one of a large value over small ones.
                let mut xs = x.to_vec2::<f32>().unwrap();
                xs[0][..32].fill(0.0);
                if k > 64 {
                    for (j, v) in xs[0][32..64].iter_mut().enumerate() {
                        *v = 0.01 * j as f32 - 0.1;
                    }
                    xs[0][33] = -300.0;
                }
                let x = Tensor::new(xs.clone(), &Device::Cpu).unwrap();
                let want = h.forward(&x, None).unwrap().to_vec2::<f32>().unwrap();
                let got = p.gemv(&x).unwrap().to_vec2::<f32>().unwrap();
                for i in 0..m {
                    for r in 0..n {
                        let mag: f32 = (0..k).map(|c| (w[r][c] * xs[i][c]).abs()).sum();
                        let d = (want[i][r] - got[i][r]).abs();
                        worst = worst.max(d / mag.max(1e-30));
                        assert!(
                            d <= 4e-6 * mag + 1e-7,
                            "{method} {n}x{k} m={m} ({i}, {r}): {} vs {} of {mag}",
                            got[i][r],
                            want[i][r]
                        );
                    }
                }
                // Not the exact product: the route ran.
                let exact = layout.shape.gemv_reference(
                    &layout.codes,
                    &layout.params,
                    &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    m,
                );
                assert!(
                    exact.iter().zip(got.iter().flatten()).any(|(a, b)| a != b),
                    "{method}: the q8 reference equals the exact product"
                );
                checked += 1;
            }
        }
    }
    set_activations(ActivationMode::F32);
    eprintln!("{checked} cases, largest |Δ| / Σ|w·x| = {worst:e}");
    assert_eq!(checked, 64);
}

/// The quantization on its own: bf16 and f16 activations quantize as their f32 values.
#[test]
fn quantized_rows_of_half_activations_are_those_of_their_f32_values() {
    let x = quantlab::quant::random::randn(&[2, 100], 5).unwrap();
    for dt in [DType::BF16, DType::F16] {
        let xh = x.to_dtype(dt).unwrap();
        let a = q8::quantize_rows(&xh, true).unwrap();
        let b = q8::quantize_rows(&xh.to_dtype(DType::F32).unwrap(), true).unwrap();
        assert_eq!(a, b);
    }
}
