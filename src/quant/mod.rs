//! Tensor-level quantization: schemes, parameters, observers, code books, packing and
//! storage. Nothing here knows about models.

pub mod awq;
pub mod codebook;
pub mod fp8;
pub mod gptq;
pub mod half_scale;
pub mod histogram;
pub mod hqq;
pub mod io;
pub mod metrics;
pub mod observer;
pub mod pack;
pub mod params;
pub mod rtn_variants;
pub mod scheme;
pub mod smooth;
pub mod uniform;

pub use codebook::{FourBit, FourBitType};
pub use metrics::ErrorStats;
pub use observer::{Observer, ObserverKind};
pub use params::QParams;
pub use scheme::{Convention, Granularity, Mode, Scheme};
pub use uniform::{fake_quantize, quantize, quantize_with, QTensor};
pub mod random;

/// A 4-bit code-book spec from the command line: `nf4`, `fp4`, `nf4:dq`, `fp4:b128:dq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FourBitSpec {
    pub kind: FourBitType,
    pub blocksize: usize,
    pub double_quant: bool,
}

impl FourBitSpec {
    /// `Ok(None)` when the spec names no 4-bit code book (it may be a uniform scheme).
    pub fn parse(spec: &str) -> anyhow::Result<Option<Self>> {
        let mut parts = spec.split(':');
        let kind = match parts.next() {
            Some("nf4") => FourBitType::Nf4,
            Some("fp4") => FourBitType::Fp4,
            _ => return Ok(None),
        };
        let mut s = FourBitSpec {
            kind,
            blocksize: codebook::DEFAULT_BLOCKSIZE,
            double_quant: false,
        };
        for p in parts {
            if p == "dq" {
                s.double_quant = true;
            } else if let Some(b) = p.strip_prefix('b') {
                s.blocksize = b
                    .parse()
                    .map_err(|_| anyhow::anyhow!("invalid block size '{p}' in '{spec}'"))?;
                if s.blocksize == 0 {
                    anyhow::bail!("block size must be at least 1 in '{spec}'");
                }
            } else {
                anyhow::bail!("unknown part '{p}' in '{spec}': use nf4|fp4[:b<block>][:dq]");
            }
        }
        Ok(Some(s))
    }
}
