//! What a uniform quantization scheme is: bit width, integer range, symmetry and
//! the granularity at which scales are shared. Parsing and validation live here so
//! that every entry point (CLI, plans, tests) rejects impossible specs the same way.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Whether the range is centred on zero (zero point fixed) or fitted to min/max.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Symmetric,
    Affine,
}

/// How many elements share one (scale, zero point) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One pair for the whole tensor.
    PerTensor,
    /// One pair per index along `axis` (PyTorch's per-channel; axis 0 = output rows).
    PerChannel { axis: usize },
    /// One pair per `size` consecutive elements along the last (input) dimension.
    PerGroup { size: usize },
}

/// Which formula turns a range into (scale, zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Convention {
    /// PyTorch observers: the range is widened to contain 0, zero point is
    /// `qmin - round_half_even(min / scale)` clamped to the integer range,
    /// symmetric scale is `max|x| / ((qmax - qmin) / 2)`, scale at least f32 epsilon.
    Pytorch,
    /// The lab handout: the range is the data's own min/max (0 need not be inside),
    /// zero point is `trunc(qmin - min / scale)` (truncated toward zero, not rounded).
    Handout,
}

/// A uniform integer quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheme {
    pub bits: u8,
    pub signed: bool,
    pub mode: Mode,
    pub granularity: Granularity,
    /// PyTorch's `reduce_range`: use one bit less of range (avoids VPMADDUBSW overflow).
    pub reduce_range: bool,
    pub convention: Convention,
}

impl Scheme {
    /// An affine, per-tensor, PyTorch-convention scheme; adjust with the builder methods.
    pub fn new(bits: u8, signed: bool) -> Result<Self> {
        let s = Self::unchecked(bits, signed);
        s.validate()?;
        Ok(s)
    }

    /// The defaults, before validation (the parser validates after applying options).
    fn unchecked(bits: u8, signed: bool) -> Self {
        Scheme {
            bits,
            signed,
            mode: Mode::Affine,
            granularity: Granularity::PerTensor,
            reduce_range: false,
            convention: Convention::Pytorch,
        }
    }

    pub fn symmetric(mut self) -> Self {
        self.mode = Mode::Symmetric;
        self
    }

    pub fn affine(mut self) -> Self {
        self.mode = Mode::Affine;
        self
    }

    pub fn per_channel(mut self, axis: usize) -> Self {
        self.granularity = Granularity::PerChannel { axis };
        self
    }

    pub fn per_group(mut self, size: usize) -> Self {
        self.granularity = Granularity::PerGroup { size };
        self
    }

    pub fn with_reduce_range(mut self, on: bool) -> Self {
        self.reduce_range = on;
        self
    }

    pub fn with_convention(mut self, c: Convention) -> Self {
        self.convention = c;
        self
    }

    /// Checks the parts that do not depend on a tensor's shape.
    pub fn validate(&self) -> Result<()> {
        if !(1..=8).contains(&self.bits) {
            bail!(
                "quantization bit width {} is out of range: use 1 to 8 bits",
                self.bits
            );
        }
        if self.signed && self.bits < 2 {
            bail!("a signed 1-bit range has no room for a sign and a magnitude: use unsigned (u1) or at least 2 bits");
        }
        if self.reduce_range && self.bits < 2 {
            bail!("reduce_range needs at least 2 bits");
        }
        if let Granularity::PerGroup { size } = self.granularity {
            if size == 0 {
                bail!("group size must be at least 1");
            }
        }
        Ok(())
    }

    /// Checks the scheme against a tensor shape (axis exists, group size divides the dimension).
    pub fn validate_for_shape(&self, dims: &[usize]) -> Result<()> {
        self.validate()?;
        match self.granularity {
            Granularity::PerTensor => {}
            Granularity::PerChannel { axis } => {
                if axis >= dims.len() {
                    bail!(
                        "per-channel axis {axis} does not exist in a tensor of shape {dims:?} (rank {})",
                        dims.len()
                    );
                }
            }
            Granularity::PerGroup { size } => {
                let last = *dims
                    .last()
                    .context("per-group quantization needs a tensor with at least one dimension")?;
                // A ragged last group is padded with zeros, which leaves a range that already
                // holds 0 (PyTorch convention) unchanged; the handout's range does not hold 0.
                if last % size != 0 && self.convention == Convention::Handout {
                    bail!(
                        "group size {size} does not divide the last dimension {last} of shape {dims:?}, and the handout convention cannot pad a ragged group: pick a divisor of {last}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The integer range (qmin, qmax) codes are clamped to.
    pub fn qrange(&self) -> (i32, i32) {
        let bits = if self.reduce_range {
            self.bits - 1
        } else {
            self.bits
        } as u32;
        if self.signed {
            (-(1i32 << (bits - 1)), (1i32 << (bits - 1)) - 1)
        } else {
            (0, (1i32 << bits) - 1)
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", if self.signed { 'i' } else { 'u' }, self.bits)?;
        write!(
            f,
            ":{}",
            match self.mode {
                Mode::Symmetric => "sym",
                Mode::Affine => "affine",
            }
        )?;
        match self.granularity {
            Granularity::PerTensor => write!(f, ":tensor")?,
            Granularity::PerChannel { axis } => write!(f, ":ch{axis}")?,
            Granularity::PerGroup { size } => write!(f, ":g{size}")?,
        }
        if self.reduce_range {
            write!(f, ":reduce")?;
        }
        if self.convention == Convention::Handout {
            write!(f, ":handout")?;
        }
        Ok(())
    }
}

/// Parses `i8`, `u4:affine:g64`, `i8:sym:ch0`, `u8:reduce`, `u2:handout`.
/// Defaults: affine, per tensor, PyTorch convention.
impl FromStr for Scheme {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let help = "expected <i|u><bits>[:sym|:affine][:tensor|:ch<axis>|:g<size>][:reduce][:handout], e.g. i8:sym:ch0 or u4:affine:g64";
        let mut parts = spec.trim().split(':');
        let head = parts.next().unwrap_or_default();
        let (signed, digits) = match head.chars().next() {
            Some('i') => (true, &head[1..]),
            Some('u') => (false, &head[1..]),
            _ => bail!("invalid scheme '{spec}': {help}"),
        };
        let bits: u8 = digits
            .parse()
            .with_context(|| format!("invalid bit width in scheme '{spec}': {help}"))?;
        let mut s = Scheme::unchecked(bits, signed);
        for part in parts {
            match part {
                "sym" | "symmetric" => s.mode = Mode::Symmetric,
                "affine" | "asym" => s.mode = Mode::Affine,
                "tensor" => s.granularity = Granularity::PerTensor,
                "reduce" => s.reduce_range = true,
                "handout" => s.convention = Convention::Handout,
                "pytorch" => s.convention = Convention::Pytorch,
                p if p.starts_with("ch") => {
                    let axis = p[2..]
                        .parse()
                        .with_context(|| format!("invalid channel axis '{p}' in '{spec}'"))?;
                    s.granularity = Granularity::PerChannel { axis };
                }
                p if p.starts_with('g') => {
                    let size = p[1..]
                        .parse()
                        .with_context(|| format!("invalid group size '{p}' in '{spec}'"))?;
                    s.granularity = Granularity::PerGroup { size };
                }
                other => bail!("unknown part '{other}' in scheme '{spec}': {help}"),
            }
        }
        s.validate()
            .with_context(|| format!("invalid scheme '{spec}'"))?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for spec in [
            "i8:sym:ch0",
            "u4:affine:g64",
            "u8:affine:tensor:reduce",
            "u2:affine:tensor:handout",
        ] {
            let s: Scheme = spec.parse().unwrap();
            assert_eq!(s.to_string(), spec);
        }
    }

    #[test]
    fn ranges_match_pytorch() {
        assert_eq!(Scheme::new(8, false).unwrap().qrange(), (0, 255));
        assert_eq!(Scheme::new(8, true).unwrap().qrange(), (-128, 127));
        let r = Scheme::new(8, false).unwrap().with_reduce_range(true);
        assert_eq!(r.qrange(), (0, 127));
        let r = Scheme::new(8, true).unwrap().with_reduce_range(true);
        assert_eq!(r.qrange(), (-64, 63));
        assert_eq!(Scheme::new(2, false).unwrap().qrange(), (0, 3));
        assert_eq!(Scheme::new(3, true).unwrap().qrange(), (-4, 3));
    }

    #[test]
    fn rejects_impossible_specs() {
        assert!("i0".parse::<Scheme>().is_err());
        assert!("u9".parse::<Scheme>().is_err());
        assert!("i1".parse::<Scheme>().is_err());
        assert!("i8:g0".parse::<Scheme>().is_err());
        assert!("x8".parse::<Scheme>().is_err());
        assert!("i8:bogus".parse::<Scheme>().is_err());
        let g = Scheme::new(4, true)
            .unwrap()
            .per_group(64)
            .with_convention(Convention::Handout);
        assert!(Scheme::new(4, true)
            .unwrap()
            .per_group(64)
            .validate_for_shape(&[8, 100])
            .is_ok());
        let err = g.validate_for_shape(&[8, 100]).unwrap_err().to_string();
        assert!(err.contains("does not divide"), "{err}");
        let c = Scheme::new(8, true).unwrap().per_channel(2);
        assert!(c.validate_for_shape(&[8, 100]).is_err());
    }
}
