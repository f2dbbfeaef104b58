//! Group scales stored as IEEE half precision (f16), as GPTQ checkpoints and llama.cpp's
//! block types store them: 2 bytes a group instead of 4, so 3-bit codes in groups of 64
//! cost 3.25 bits per weight instead of 3.5.
//!
//! A quantizer that stores f16 scales must *use* the f16 value when it rounds the weights
//! (GPTQ's error feedback, RTN's codes), so the codes fit the scale that is kept; these
//! helpers give that value. Rounding is to nearest, ties to even (`half::f16::from_f32`).

use anyhow::{bail, Result};
use half::f16;

/// `s` rounded to the nearest f16, as f32. A non-zero scale too small for f16 becomes the
/// smallest f16 subnormal of its sign (never 0: a zero scale would divide by zero); a
/// scale beyond f16's range (65504) is an error.
pub fn round_scale(s: f32) -> Result<f32> {
    if !s.is_finite() {
        bail!("scale {s} is not finite");
    }
    let h = f16::from_f32(s);
    if h.is_infinite() {
        bail!("scale {s} does not fit f16 (largest 65504): keep f32 scales for this layer");
    }
    let r = h.to_f32();
    if r == 0.0 && s != 0.0 {
        return Ok(f16::from_bits(1).to_f32().copysign(s));
    }
    Ok(r)
}

/// Rounds every scale with [`round_scale`].
pub fn round_scales(scales: &mut [f32]) -> Result<()> {
    for s in scales {
        *s = round_scale(*s)?;
    }
    Ok(())
}

/// Whether `s` is exactly an f16 value (stores without loss).
pub fn is_f16(s: f32) -> bool {
    f16::from_f32(s).to_f32() == s || (s.is_nan() && f16::from_f32(s).is_nan())
}

/// Little-endian f16 bytes of scales that are exact f16 values (checked).
pub fn to_bytes(scales: &[f32]) -> Result<Vec<u8>> {
    if let Some(s) = scales.iter().find(|s| !is_f16(**s)) {
        bail!("scale {s} is not an f16 value: round it with round_scale before storing");
    }
    Ok(scales
        .iter()
        .flat_map(|&s| f16::from_f32(s).to_le_bytes())
        .collect())
}

/// Scales from little-endian f16 bytes.
pub fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_f16_and_never_to_zero() {
        // 1 + 2^-11 is the tie between 1 and 1 + 2^-10: ties to even keeps 1.
        assert_eq!(round_scale(1.0 + 2f32.powi(-11)).unwrap(), 1.0);
        assert_eq!(
            round_scale(1.0 + 3.0 * 2f32.powi(-12)).unwrap(),
            1.0 + 2f32.powi(-10)
        );
        assert_eq!(
            round_scale(-0.0123).unwrap(),
            f16::from_f32(-0.0123).to_f32()
        );
        assert_eq!(round_scale(1e-12).unwrap(), 2f32.powi(-24));
        assert_eq!(round_scale(-1e-12).unwrap(), -(2f32.powi(-24)));
        assert_eq!(round_scale(0.0).unwrap(), 0.0);
        assert!(round_scale(1e6).is_err());
        assert!(round_scale(f32::NAN).is_err());
        let v = [0.5f32, -0.013_671_875, 2f32.powi(-24)];
        assert_eq!(from_bytes(&to_bytes(&v).unwrap()), v);
        assert!(to_bytes(&[0.1]).is_err());
    }
}
