//! Non-uniform 4-bit quantization as bitsandbytes does it: the NF4 and FP4 code
//! books, block-wise absmax scaling, and "double quantization" of the absmax values
//! with bitsandbytes' 8-bit dynamic map. Decision thresholds are bitsandbytes' own
//! constants (csrc `dQuantizeNF4` / `dQuantizeFP4`), so codes match bit for bit.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The two 4-bit data types of bitsandbytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FourBitType {
    Nf4,
    Fp4,
}

/// NF4 code book (`get_4bit_type("nf4")`), indexed by code.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Decision thresholds of `dQuantizeNF4`, ascending: code = how many of them x exceeds.
const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_4,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_4,
    0.642_786_9,
    0.861_478_4,
];

/// FP4 (E2M1, bias 3) code book, `get_4bit_type("fp4")`: values 0, 0.0625, 8, 12, 4, 6, 2, 3
/// divided by 12, with bit 3 the sign.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// `dQuantizeFP4`'s magnitude thresholds, ascending, and the 3-bit code for each bin.
const FP4_THRESHOLDS: [f32; 7] = [
    0.002_604_17,
    0.085_937_5,
    0.208_333_33,
    0.291_666_67,
    0.416_666_7,
    0.583_333,
    0.833_333_3,
];
const FP4_MAGNITUDE_CODES: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

impl FourBitType {
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBitType::Nf4 => &NF4_CODE,
            FourBitType::Fp4 => &FP4_CODE,
        }
    }

    /// Maps a value already divided by its block's absmax to a 4-bit code.
    pub fn encode(self, x: f32) -> u8 {
        match self {
            FourBitType::Nf4 => NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8,
            FourBitType::Fp4 => {
                let sign = if x < 0.0 { 0b1000 } else { 0 };
                let bin = FP4_THRESHOLDS.iter().filter(|&&t| x.abs() > t).count();
                FP4_MAGNITUDE_CODES[bin] + sign
            }
        }
    }
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`):
/// 7 decades of exponents, each with linearly spaced fractions, plus 0 and 1, sorted.
pub fn dynamic_map_signed() -> [f32; 256] {
    let max_exponent_bits = 7i32;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let items = (1usize << i) + 1;
        let bounds = linspace_f32(0.1, 1.0, items);
        let decade = 10f64.powi(-(max_exponent_bits - 1) + i) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(decade * mean);
            data.push(-(decade * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `torch.linspace` in f32: the first half counts up from start, the second down from end.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// Index of the code-book entry nearest to x (ties to the lower entry); `code` sorted ascending.
fn nearest_index(code: &[f32], x: f32) -> u8 {
    let pos = code.partition_point(|&c| c < x);
    if pos == 0 {
        return 0;
    }
    if pos == code.len() {
        return (code.len() - 1) as u8;
    }
    let (lo, hi) = (code[pos - 1], code[pos]);
    if (x - lo) <= (hi - x) {
        (pos - 1) as u8
    } else {
        pos as u8
    }
}

fn block_absmax(x: &[f32], blocksize: usize) -> Vec<f32> {
    x.chunks(blocksize)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect()
}

fn check_input(x: &[f32], blocksize: usize, what: &str) -> Result<()> {
    if x.is_empty() {
        bail!("cannot quantize an empty {what}");
    }
    if blocksize == 0 {
        bail!("block size must be at least 1");
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        bail!(
            "{what} has a non-finite value ({}) at index {i}: clean the weights first",
            x[i]
        );
    }
    Ok(())
}

/// 8-bit block-wise quantization with the dynamic map (bitsandbytes `quantize_blockwise`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blockwise8 {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
    pub blocksize: usize,
}

impl Blockwise8 {
    pub fn quantize(x: &[f32], blocksize: usize) -> Result<Self> {
        check_input(x, blocksize, "tensor")?;
        let map = dynamic_map_signed();
        let absmax = block_absmax(x, blocksize);
        let mut codes = Vec::with_capacity(x.len());
        for (block, &m) in x.chunks(blocksize).zip(&absmax) {
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            codes.extend(block.iter().map(|&v| nearest_index(&map, v * inv)));
        }
        Ok(Blockwise8 {
            codes,
            absmax,
            blocksize,
        })
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let map = dynamic_map_signed();
        self.codes
            .chunks(self.blocksize)
            .zip(&self.absmax)
            .flat_map(|(b, &m)| b.iter().map(move |&c| map[c as usize] * m))
            .collect()
    }
}

/// The per-block scales of a 4-bit tensor: plain f32, or themselves quantized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Absmax {
    Plain(Vec<f32>),
    /// bitsandbytes `compress_statistics`: absmax − mean, quantized 8-bit in blocks of 256.
    Double {
        quantized: Blockwise8,
        offset: f32,
    },
}

impl Absmax {
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double { quantized, offset } => quantized
                .dequantize()
                .into_iter()
                .map(|v| v + offset)
                .collect(),
        }
    }

    /// Bytes these scales take when stored.
    pub fn nbytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len() * 4,
            Absmax::Double { quantized, .. } => {
                quantized.codes.len() + quantized.absmax.len() * 4 + 4
            }
        }
    }
}

/// A tensor in NF4 or FP4, packed two codes per byte, first code in the high nibble
/// (bitsandbytes' layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FourBit {
    pub kind: FourBitType,
    pub len: usize,
    pub blocksize: usize,
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// bitsandbytes' default block size for 4-bit weights and for the absmax of double quantization.
pub const DEFAULT_BLOCKSIZE: usize = 64;
pub const DOUBLE_QUANT_BLOCKSIZE: usize = 256;

impl FourBit {
    pub fn quantize(
        x: &[f32],
        kind: FourBitType,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        check_input(x, blocksize, "tensor")?;
        let absmax = block_absmax(x, blocksize);
        let mut codes = Vec::with_capacity(x.len());
        let zero_code = kind.encode(0.0);
        for (block, &m) in x.chunks(blocksize).zip(&absmax) {
            if m == 0.0 {
                codes.extend(std::iter::repeat_n(zero_code, block.len()));
                continue;
            }
            let inv = 1.0 / m;
            codes.extend(block.iter().map(|&v| kind.encode(v * inv)));
        }
        let packed = codes
            .chunks(2)
            .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
            .collect();
        let absmax = if double_quant {
            let offset =
                (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32;
            let centred: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
            Absmax::Double {
                quantized: Blockwise8::quantize(&centred, DOUBLE_QUANT_BLOCKSIZE)?,
                offset,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(FourBit {
            kind,
            len: x.len(),
            blocksize,
            packed,
            absmax,
        })
    }

    /// The 4-bit codes, unpacked.
    pub fn codes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for &b in &self.packed {
            out.push(b >> 4);
            out.push(b & 0x0f);
        }
        out.truncate(self.len);
        out
    }

    /// `code[q] * absmax[block]`, in f32, as bitsandbytes' `dequantize_4bit`.
    pub fn dequantize(&self) -> Vec<f32> {
        let table = self.kind.code();
        let absmax = self.absmax.values();
        self.codes()
            .chunks(self.blocksize)
            .zip(&absmax)
            .flat_map(|(b, &m)| b.iter().map(move |&c| table[c as usize] * m))
            .collect()
    }

    /// Storage: packed codes plus scales.
    pub fn nbytes(&self) -> usize {
        self.packed.len() + self.absmax.nbytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_midpoints_of_the_code_books() {
        for (i, t) in NF4_THRESHOLDS.iter().enumerate() {
            let mid = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
            assert!((t - mid).abs() < 1e-6, "nf4 threshold {i}: {t} vs {mid}");
        }
        let mut mags: Vec<f32> = FP4_CODE[..8].to_vec();
        mags.sort_by(|a, b| a.total_cmp(b));
        for (i, t) in FP4_THRESHOLDS.iter().enumerate() {
            let mid = (mags[i] + mags[i + 1]) / 2.0;
            assert!((t - mid).abs() < 1e-6, "fp4 threshold {i}: {t} vs {mid}");
        }
        for (bin, &c) in FP4_MAGNITUDE_CODES.iter().enumerate() {
            assert_eq!(FP4_CODE[c as usize], mags[bin]);
        }
    }

    #[test]
    fn encoding_picks_the_nearest_code() {
        for kind in [FourBitType::Nf4, FourBitType::Fp4] {
            let code = kind.code();
            for i in -1000..=1000 {
                let x = i as f32 / 1000.0;
                let got = code[kind.encode(x) as usize];
                let best = code
                    .iter()
                    .map(|c| (c - x).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!((got - x).abs() <= best + 1e-6, "{kind:?} x={x} got {got}");
            }
            // Every code reproduces itself.
            for (i, &c) in code.iter().enumerate() {
                let back = kind.encode(c) as usize;
                assert_eq!(code[back], c, "{kind:?} code {i}");
            }
        }
    }

    #[test]
    fn dynamic_map_structure() {
        let m = dynamic_map_signed();
        // Most negative: -(mean of the last two of linspace(0.1, 1, 65)) = -0.99296875.
        assert!((m[0] + 0.992_968_75).abs() < 1e-6);
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert!(m.contains(&0.0));
        // Smallest positive value: 1e-6 * mean(0.1, 1.0) = 0.55e-6.
        let smallest = m
            .iter()
            .copied()
            .filter(|&v| v > 0.0)
            .fold(f32::INFINITY, f32::min);
        assert!((smallest - 0.55e-6).abs() < 1e-12);
    }

    #[test]
    fn nf4_block_by_hand() {
        // Block of 4 with absmax 2: x/2 = [-1, 0, 0.5, 1] -> codes [0, 7, 12, 15]: 0.5 is nearer 0.4407 than 0.5626
        let q = FourBit::quantize(&[-2.0, 0.0, 1.0, 2.0], FourBitType::Nf4, 4, false).unwrap();
        assert_eq!(q.codes(), vec![0, 7, 12, 15]);
        assert_eq!(q.packed, vec![0x07, 0xCF]);
        let d = q.dequantize();
        assert_eq!(d, vec![-2.0, 0.0, 0.440_709_83 * 2.0, 2.0]);
        assert_eq!(q.nbytes(), 2 + 4);
    }

    #[test]
    fn fp4_block_by_hand() {
        // absmax 12 in the block: values in FP4 units 0, 0.0625, 2, 3, 4, 6, 8, 12, -12
        let x = [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, -12.0];
        let q = FourBit::quantize(&x, FourBitType::Fp4, 64, false).unwrap();
        assert_eq!(q.codes(), vec![0, 1, 6, 7, 4, 5, 2, 3, 11]);
        let d = q.dequantize();
        for (a, b) in d.iter().zip(x) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn double_quant_reconstructs_absmax_closely() {
        let x: Vec<f32> = (0..64 * 300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * (1.0 + (i / 64) as f32 * 0.01))
            .collect();
        let plain = FourBit::quantize(&x, FourBitType::Nf4, 64, false).unwrap();
        let double = FourBit::quantize(&x, FourBitType::Nf4, 64, true).unwrap();
        let (a, b) = (plain.absmax.values(), double.absmax.values());
        for (p, d) in a.iter().zip(&b) {
            // the dynamic map has about 3 significant digits per decade
            assert!((p - d).abs() / p < 0.02, "{p} vs {d}");
        }
        assert!(double.nbytes() < plain.nbytes());
        assert_eq!(plain.codes(), double.codes());
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(FourBit::quantize(&[], FourBitType::Nf4, 64, false).is_err());
        assert!(FourBit::quantize(&[1.0, f32::NAN], FourBitType::Nf4, 64, false).is_err());
        assert!(FourBit::quantize(&[1.0], FourBitType::Nf4, 0, false).is_err());
    }
}
