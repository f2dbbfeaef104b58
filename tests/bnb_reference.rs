//! quantlab against bitsandbytes itself: `scripts/bnb_reference.py` (bitsandbytes 0.50.2,
//! CPU) wrote tests/fixtures/bnb_reference.json from one small layer and input with planted
//! outlier columns. NF4/FP4 codes and absmax, and LLM.int8's integer codes and outlier
//! columns, must be bit-identical; LLM.int8's output must agree with bitsandbytes' (which
//! works in fp16) within fp16 rounding, and with the script's float64 evaluation of the same
//! definition within f32 rounding.

use candle_core::{Device, Tensor};
use quantlab::nn::format::int8::{ActQuant, Int8};
use quantlab::nn::format::llm_int8::LlmInt8;
use quantlab::nn::format::WeightFormat;
use quantlab::nn::kernels::Isa;
use quantlab::quant::codebook::Absmax;
use quantlab::quant::{FourBit, FourBitType};
use serde_json::Value;

fn fixture() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bnb_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn shape(f: &Value) -> (usize, usize, usize) {
    let s = ints(&f["shape"]);
    (s[0] as usize, s[1] as usize, s[2] as usize)
}

#[test]
fn nf4_and_fp4_codes_and_absmax_are_bitsandbytes_bit_for_bit() {
    let f = fixture();
    let w = f32s(&f["w"]);
    let blocksize = f["blocksize"].as_u64().unwrap() as usize;
    let from_cpu = f["device"] == "cpu";
    for (key, kind, dq) in [
        ("nf4", FourBitType::Nf4, false),
        ("nf4:dq", FourBitType::Nf4, true),
        ("fp4", FourBitType::Fp4, false),
        ("fp4:dq", FourBitType::Fp4, true),
    ] {
        let want = &f["fourbit"][key];
        let q = FourBit::quantize(&w, kind, blocksize, dq).unwrap();
        let want_packed = ints(&want["packed"]);
        assert_eq!(q.packed.len(), want_packed.len(), "{key} packed length");
        let mut zero_sign = 0;
        for (i, (&got, &w)) in q.packed.iter().zip(&want_packed).enumerate() {
            for shift in [4, 0] {
                let (g, w) = ((got >> shift) & 15, (w as u8 >> shift) & 15);
                // bitsandbytes' CPU kernel (the default backend's `bucketize` over the
                // sorted code book, where +0 and -0 tie) gives values below FP4's smallest
                // step the opposite zero sign to its CUDA kernel (`dQuantizeFP4`, sign from
                // the input), which quantlab follows: both decode to 0. Only that is allowed.
                if g != w && from_cpu && kind == FourBitType::Fp4 && g & 7 == 0 && w & 7 == 0 {
                    zero_sign += 1;
                    continue;
                }
                assert_eq!(
                    g,
                    w,
                    "{key} code {} (byte {i})",
                    2 * i + (shift == 0) as usize
                );
            }
        }
        if kind == FourBitType::Nf4 || !from_cpu {
            assert_eq!(zero_sign, 0);
        }
        match &q.absmax {
            Absmax::Plain(a) => {
                assert!(!dq);
                assert_eq!(a, &f32s(&want["absmax"]), "{key} absmax");
            }
            Absmax::Double { quantized, offset } => {
                assert!(dq);
                let codes: Vec<i64> = quantized.codes.iter().map(|&b| b as i64).collect();
                assert_eq!(codes, ints(&want["absmax_codes"]), "{key} absmax codes");
                assert_eq!(
                    quantized.absmax,
                    f32s(&want["absmax_scales"]),
                    "{key} absmax scales"
                );
                assert_eq!(
                    *offset,
                    want["offset"].as_f64().unwrap() as f32,
                    "{key} offset"
                );
            }
        }
    }
}

#[test]
fn llm_int8_codes_columns_and_output_match_bitsandbytes() {
    let f = fixture();
    let (m, k, n) = shape(&f);
    let t = f["threshold"].as_f64().unwrap() as f32;
    let w = Tensor::from_vec(f32s(&f["w"]), (n, k), &Device::Cpu).unwrap();
    let x = f32s(&f["x"]);
    let bias = f32s(&f["bias"]);
    let b8 = &f["int8"];

    // Weight: CB codes and SCB = absmax (quantlab keeps absmax / 127, the same f32 op).
    let l = LlmInt8::quantize(&w, t).unwrap();
    let cb: Vec<i64> = l.weight.codes.iter().map(|&c| c as i64).collect();
    assert_eq!(cb, ints(&b8["cb"]), "weight codes");
    let scb = f32s(&b8["scb"]);
    for (s, a) in l.weight.scale.iter().zip(&scb) {
        assert_eq!(*s, a / 127.0, "weight scale");
    }
    // The per-token W8A8 weight is the same quantization.
    let tok = Int8::quantize_absmax(&w, ActQuant::PerToken).unwrap();
    assert_eq!(tok.codes, l.weight.codes);

    // Input: CA codes (outlier columns zeroed), SCA row absmax, outlier columns.
    let (a, cols) = l.quantize_input(&x, m);
    let cols: Vec<i64> = cols.iter().map(|&c| c as i64).collect();
    assert_eq!(cols, ints(&b8["outlier_cols"]), "outlier columns");
    let ca: Vec<i64> = (0..m)
        .flat_map(|i| {
            a.codes[i * a.stride..i * a.stride + k]
                .iter()
                .map(|&u| u as i64 - 128)
        })
        .collect();
    assert_eq!(ca, ints(&b8["ca"]), "activation codes");
    for (s, r) in a.scale.iter().zip(f32s(&b8["sca"])) {
        assert_eq!(*s, r / 127.0, "activation scale");
    }

    // Output, on every kernel path.
    let bnb = f64s(&b8["out_fp16"]);
    let exact = f64s(&f["f64"]["out"]);
    let mag = f64s(&f["f64"]["magnitude"]);
    for isa in Isa::available() {
        let y = l.forward_slice(isa, &x, m, Some(&bias)).unwrap();
        for i in 0..m * n {
            let got = y[i] as f64;
            // f32: rounding of the scale product, the i32 → f32 conversion (exact here),
            // the outlier products and the running sum: a few f32 ulps of the magnitudes.
            let tol32 = 8.0 * f32::EPSILON as f64 * mag[i];
            assert!(
                (got - exact[i]).abs() <= tol32,
                "{isa:?} [{i}] {got} vs f64 {}",
                exact[i]
            );
            // bitsandbytes rounds the int8 part to fp16, the dequantized outlier weights to
            // fp16 and the sum to fp16 again: three half-ulps (2^-11 relative) of the
            // magnitudes, and one more for the summation order: 4 · 2^-11.
            let tol16 = 4.0 * 2f64.powi(-11) * mag[i];
            assert!(
                (got - bnb[i]).abs() <= tol16,
                "{isa:?} [{i}] {got} vs bitsandbytes {}",
                bnb[i]
            );
        }
    }
    // The format's own forward (the selected path) gives the same numbers.
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let bt = Tensor::from_vec(bias.clone(), n, &Device::Cpu).unwrap();
    let y = l.forward(&xt, Some(&bt)).unwrap().flatten_all().unwrap();
    let want = l
        .forward_slice(Isa::selected(), &x, m, Some(&bias))
        .unwrap();
    assert_eq!(y.to_vec1::<f32>().unwrap(), want);
}
