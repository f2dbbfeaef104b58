//! What a per-layer plan can do to one linear layer.

use crate::quant::{FourBitSpec, ObserverKind, Scheme};
use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq)]
pub enum Method {
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
}

impl Method {
    /// Short dtype label for tables.
    pub fn dtype_label(&self) -> String {
        match self {
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
            "f32" | "fp32" | "none" | "keep" => Method::F32,
            "f16" | "fp16" => Method::F16,
            "bf16" => Method::Bf16,
            "dynamic-int8" | "dint8" => Method::DynamicInt8,
            _ => bail!(
                "unknown quantization method '{s}': use f32, f16, bf16, dynamic-int8, static-int8[:observer], w:<scheme> (e.g. w:i4:sym:g64), nf4[:dq] or fp4[:dq]"
            ),
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
        ] {
            let m: Method = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
        }
        assert!("int9".parse::<Method>().is_err());
        assert!("w:i9".parse::<Method>().is_err());
        assert!("static-int8:nope".parse::<Method>().is_err());
    }
}
