//! Property tests: round trips of the quantization core hold for arbitrary inputs.

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use quantlab::quant::{self, codebook::FourBit, pack, FourBitType, Scheme};

fn scheme_strategy() -> impl Strategy<Value = (Scheme, usize)> {
    (
        2u8..=8,
        any::<bool>(),
        any::<bool>(),
        0usize..3,
        any::<bool>(),
    )
        .prop_map(|(bits, signed, sym, gran, reduce)| {
            let mut s = Scheme::new(bits, signed).unwrap();
            if sym {
                s = s.symmetric();
            }
            if reduce && bits > 2 {
                s = s.with_reduce_range(true);
            }
            let s = match gran {
                0 => s,
                1 => s.per_channel(0),
                _ => s.per_group(4),
            };
            (s, gran)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Inside the representable range, dequantization is within half a step of the input.
    #[test]
    fn error_is_at_most_half_a_step_inside_the_range(
        (scheme, _) in scheme_strategy(),
        values in prop::collection::vec(-100.0f32..100.0, 16),
    ) {
        let x = Tensor::from_vec(values.clone(), (2, 8), &Device::Cpu).unwrap();
        let q = quant::quantize(&x, &scheme).unwrap();
        let d = q.dequantize().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (qmin, qmax) = scheme.qrange();
        let rows = q.params.len();
        let per_row = 16 / rows;
        for (i, (&v, &y)) in values.iter().zip(&d).enumerate() {
            let r = i / per_row;
            let (s, z) = (q.params.scale[r], q.params.zero_point[r]);
            let lo = (qmin - z) as f32 * s;
            let hi = (qmax - z) as f32 * s;
            if v >= lo && v <= hi {
                prop_assert!((v - y).abs() <= s / 2.0 * (1.0 + 1e-4) + 1e-6,
                    "{scheme}: x={v} deq={y} scale={s}");
            }
        }
    }

    #[test]
    fn packing_round_trips(bits in 1u8..=8, raw in prop::collection::vec(any::<u8>(), 0..100)) {
        let codes: Vec<u8> = raw.iter().map(|c| c & ((1u16 << bits) - 1) as u8).collect();
        let packed = pack::pack(&codes, bits).unwrap();
        prop_assert_eq!(packed.len(), pack::packed_len(codes.len(), bits));
        prop_assert_eq!(pack::unpack(&packed, bits, codes.len()).unwrap(), codes);
    }

    /// 4-bit: each value lands on the code-book entry nearest to x / absmax.
    #[test]
    fn four_bit_picks_nearest_entry(values in prop::collection::vec(-10.0f32..10.0, 1..200), nf in any::<bool>()) {
        let kind = if nf { FourBitType::Nf4 } else { FourBitType::Fp4 };
        let q = FourBit::quantize(&values, kind, 64, false).unwrap();
        let d = q.dequantize();
        let absmax = q.absmax.values();
        for (i, (&v, &y)) in values.iter().zip(&d).enumerate() {
            let m = absmax[i / 64];
            let best = kind.code().iter().map(|c| (c * m - v).abs()).fold(f32::INFINITY, f32::min);
            prop_assert!((y - v).abs() <= best + 1e-5 * m.max(1.0));
        }
    }
}
