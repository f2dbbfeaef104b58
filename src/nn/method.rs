//! What a per-layer plan can do to one linear layer.

use crate::quant::{FourBitSpec, ObserverKind, Scheme};
use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Leave the layer as it was loaded (f32, or a GGML type kept from a GGUF file).
    Keep,
    /// Keep f32 weights and f32 compute.
    F32,
    /// Weights stored in f16 (PyTorch's dynamic fp16); compute in f32.
    F16,
    /// Weights stored in bf16; compute in f32.
    Bf16,
    /// int8 weights per output channel; activations quantized to u8 per batch at run time;
    /// integer matrix multiply with i32 accumulation.
    DynamicInt8,
    /// int8 weights per output channel; input activations quantized with a range calibrated
    /// on data by the observer; integer matrix multiply.
    StaticInt8(ObserverKind),
    /// Weight-only uniform quantization (round to nearest); dequantized for an f32 matmul.
    WeightOnly(Scheme),
    /// Weight-only NF4 / FP4 (bitsandbytes); dequantized for an f32 matmul.
    FourBit(FourBitSpec),
    /// A GGML block type (llama.cpp's Q8_0, Q4_0, Q4_K...), multiplied by candle's
    /// quantized kernels (activations quantized to Q8 blocks on the fly).
    Ggml(GgmlDType),
}

/// The GGML types a plan can name, with their llama.cpp spelling.
pub const GGML_TYPES: [(&str, GgmlDType); 11] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
    ("q8_k", GgmlDType::Q8K),
];

/// llama.cpp's name of a GGML type (`q4_k`), also for the float types.
pub fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q8_1 => "q8_1",
        other => GGML_TYPES
            .iter()
            .find(|(_, d)| *d == other)
            .map(|(n, _)| *n)
            .unwrap_or("?"),
    }
}

impl Method {
    /// Short dtype label for tables.
    pub fn dtype_label(&self) -> String {
        match self {
            Method::Keep => "as loaded".into(),
            Method::Ggml(t) => ggml_name(*t).into(),
            Method::F32 => "fp32".into(),
            Method::F16 => "fp16".into(),
            Method::Bf16 => "bf16".into(),
            Method::DynamicInt8 | Method::StaticInt8(_) => "qint8".into(),
            Method::WeightOnly(s) => format!("{}{}", if s.signed { "int" } else { "uint" }, s.bits),
            Method::FourBit(f) => format!("{:?}", f.kind).to_lowercase(),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Keep => write!(f, "keep"),
            Method::Ggml(t) => write!(f, "{}", ggml_name(*t)),
            Method::F32 => write!(f, "f32"),
            Method::F16 => write!(f, "f16"),
            Method::Bf16 => write!(f, "bf16"),
            Method::DynamicInt8 => write!(f, "dynamic-int8"),
            Method::StaticInt8(o) => write!(f, "static-int8:{o}"),
            Method::WeightOnly(s) => write!(f, "w:{s}"),
            Method::FourBit(s) => {
                write!(f, "{}", format!("{:?}", s.kind).to_lowercase())?;
                if s.blocksize != crate::quant::codebook::DEFAULT_BLOCKSIZE {
                    write!(f, ":b{}", s.blocksize)?;
                }
                if s.double_quant {
                    write!(f, ":dq")?;
                }
                Ok(())
            }
        }
    }
}

/// Parses `f32`, `f16`, `bf16`, `dynamic-int8`, `static-int8[:observer]`,
/// `w:<scheme>` (e.g. `w:i4:sym:g64`), `nf4[:b<block>][:dq]`, `fp4...`.
impl FromStr for Method {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(f) = FourBitSpec::parse(s)? {
            return Ok(Method::FourBit(f));
        }
        if let Some(rest) = s.strip_prefix("w:") {
            return Ok(Method::WeightOnly(rest.parse()?));
        }
        if let Some(rest) = s.strip_prefix("static-int8") {
            let obs = match rest.strip_prefix(':') {
                Some(o) => o.parse()?,
                None if rest.is_empty() => ObserverKind::MinMax,
                None => bail!("unknown method '{s}'"),
            };
            return Ok(Method::StaticInt8(obs));
        }
        Ok(match s {
            "keep" => Method::Keep,
            "f32" | "fp32" | "none" => Method::F32,
            "f16" | "fp16" => Method::F16,
            "bf16" => Method::Bf16,
            "dynamic-int8" | "dint8" => Method::DynamicInt8,
            _ => {
                let lower = s.to_ascii_lowercase().replace("k", "_k").replace("__", "_");
                match GGML_TYPES.iter().find(|(n, _)| *n == lower) {
                    Some((_, t)) => Method::Ggml(*t),
                    None => bail!(
                        "unknown quantization method '{s}': use keep, f32, f16, bf16, dynamic-int8, static-int8[:observer], \
                         w:<scheme> (e.g. w:i4:sym:g64), nf4[:dq], fp4[:dq] or a GGML type (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k)"
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_round_trip() {
        for s in [
            "f32",
            "f16",
            "bf16",
            "dynamic-int8",
            "static-int8:percentile:99.99",
            "w:i4:sym:g64",
            "nf4",
            "nf4:dq",
            "fp4:b128",
            "keep",
            "q8_0",
            "q4_k",
            "q6_k",
        ] {
            let m: Method = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
        }
        assert_eq!(
            "Q4K".parse::<Method>().unwrap(),
            Method::Ggml(GgmlDType::Q4K)
        );
        assert_eq!(
            "Q4_1".parse::<Method>().unwrap(),
            Method::Ggml(GgmlDType::Q4_1)
        );
        assert!("q7_0".parse::<Method>().is_err());
        assert!("int9".parse::<Method>().is_err());
        assert!("w:i9".parse::<Method>().is_err());
        assert!("static-int8:nope".parse::<Method>().is_err());
    }
}
