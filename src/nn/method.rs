//! What a per-layer plan rule names: an algorithm from the registry, compared and printed
//! by its plan spelling.

use super::algo::{keep::Keep, Algorithm};
use anyhow::Result;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

#[derive(Clone)]
pub struct Method(Arc<dyn Algorithm>);

impl Method {
    /// Leave the layer as loaded.
    pub fn keep() -> Self {
        Method(Arc::new(Keep))
    }

    pub fn algorithm(&self) -> &dyn Algorithm {
        self.0.as_ref()
    }

    /// Short dtype label for tables.
    pub fn dtype_label(&self) -> String {
        self.0.label()
    }

    pub fn nominal_bits(&self) -> u32 {
        self.0.nominal_bits()
    }

    pub fn is_keep(&self) -> bool {
        self.0.keeps_layer()
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.0.spec() == other.0.spec()
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Method({})", self.0.spec())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.spec())
    }
}

impl FromStr for Method {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        super::registry::parse_algorithm(s).map(Method)
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
        assert_eq!("Q4K".parse::<Method>().unwrap().to_string(), "q4_k");
        assert_eq!("Q4_1".parse::<Method>().unwrap().to_string(), "q4_1");
        assert_eq!("fp32".parse::<Method>().unwrap(), "f32".parse().unwrap());
        assert_eq!(
            "static-int8".parse::<Method>().unwrap().to_string(),
            "static-int8:minmax"
        );
        for bad in ["q7_0", "int9", "w:i9", "static-int8:nope", "static-int8x"] {
            assert!(bad.parse::<Method>().is_err(), "{bad}");
        }
        let e = "int9".parse::<Method>().unwrap_err().to_string();
        assert!(e.contains("w:<scheme>") && e.contains("nf4"), "{e}");
    }

    #[test]
    fn labels_and_nominal_bits() {
        let cases = [
            ("keep", "as loaded", 32),
            ("f16", "fp16", 16),
            ("static-int8", "qint8", 8),
            ("w:u3:affine:g64", "uint3", 3),
            ("fp4:dq", "fp4", 4),
            ("q5_k", "q5_k", 5),
            ("q2_k", "q2_k", 2),
        ];
        for (s, label, bits) in cases {
            let m: Method = s.parse().unwrap();
            assert_eq!(
                (m.dtype_label().as_str(), m.nominal_bits()),
                (label, bits),
                "{s}"
            );
        }
    }
}
