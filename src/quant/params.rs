//! Turning a value range into (scale, zero point), in the two conventions users meet:
//! PyTorch's observers and the lab handout's hand-written formula.

use super::scheme::{Convention, Mode, Scheme};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Scales and zero points, one pair per row of the scheme's row view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i32>,
}

impl QParams {
    /// Computes one (scale, zero point) pair per (min, max) range.
    ///
    /// All arithmetic is in f32 as PyTorch and the handout do, so results match bit for bit.
    pub fn from_ranges(scheme: &Scheme, mins: &[f32], maxs: &[f32]) -> Result<Self> {
        if mins.len() != maxs.len() {
            bail!(
                "got {} minima but {} maxima: each range needs both",
                mins.len(),
                maxs.len()
            );
        }
        let mut scale = Vec::with_capacity(mins.len());
        let mut zero_point = Vec::with_capacity(mins.len());
        for (&lo, &hi) in mins.iter().zip(maxs) {
            if !lo.is_finite() || !hi.is_finite() {
                bail!("range [{lo}, {hi}] is not finite: the data holds NaN or infinite values; clean or clip the input first");
            }
            if lo > hi {
                bail!("range minimum {lo} is above its maximum {hi}");
            }
            let (s, z) = match scheme.convention {
                Convention::Pytorch => pytorch_qparams(scheme, lo, hi),
                Convention::Handout => handout_qparams(scheme, lo, hi),
            };
            scale.push(s);
            zero_point.push(z);
        }
        Ok(QParams { scale, zero_point })
    }

    pub fn len(&self) -> usize {
        self.scale.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scale.is_empty()
    }
}

/// Zero point of a symmetric scheme: 0 for signed ranges, the middle for unsigned ones
/// (PyTorch uses 128 for quint8).
pub fn symmetric_zero_point(qmin: i32, qmax: i32, signed: bool) -> i32 {
    if signed {
        0
    } else {
        (qmin + qmax + 1) / 2
    }
}

/// PyTorch `_ObserverBase._calculate_qparams`.
fn pytorch_qparams(scheme: &Scheme, lo: f32, hi: f32) -> (f32, i32) {
    let (qmin, qmax) = scheme.qrange();
    let min_neg = lo.min(0.0);
    let max_pos = hi.max(0.0);
    match scheme.mode {
        Mode::Symmetric => {
            let amax = (-min_neg).max(max_pos);
            let scale = (amax / ((qmax - qmin) as f32 / 2.0)).max(f32::EPSILON);
            (scale, symmetric_zero_point(qmin, qmax, scheme.signed))
        }
        Mode::Affine => {
            let scale = ((max_pos - min_neg) / (qmax - qmin) as f32).max(f32::EPSILON);
            let zp = qmin - round_half_even(min_neg / scale) as i32;
            (scale, zp.clamp(qmin, qmax))
        }
    }
}

/// The lab handout: scale from the data's own range, zero point truncated toward zero.
/// A constant tensor (max == min) gets scale 1 so that nothing divides by zero.
fn handout_qparams(scheme: &Scheme, lo: f32, hi: f32) -> (f32, i32) {
    let (qmin, qmax) = scheme.qrange();
    match scheme.mode {
        Mode::Symmetric => {
            let amax = lo.abs().max(hi.abs());
            let scale = amax / ((qmax - qmin) as f32 / 2.0);
            let scale = if scale > 0.0 { scale } else { 1.0 };
            (scale, symmetric_zero_point(qmin, qmax, scheme.signed))
        }
        Mode::Affine => {
            let scale = (hi - lo) / (qmax - qmin) as f32;
            let scale = if scale > 0.0 { scale } else { 1.0 };
            let zp = (qmin as f32 - lo / scale).trunc() as i32;
            (scale, zp)
        }
    }
}

/// Round half to even, as `torch.round` and C's `nearbyint` do.
pub fn round_half_even(x: f32) -> f32 {
    let r = x.round();
    if (r - x).abs() == 0.5 && r % 2.0 != 0.0 {
        r - (r - x) * 2.0
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_even_matches_nearbyint() {
        for (x, want) in [
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.5, -0.0),
            (-1.5, -2.0),
            (-2.5, -2.0),
            (2.4, 2.0),
            (2.6, 3.0),
        ] {
            assert_eq!(round_half_even(x), want, "{x}");
        }
    }

    #[test]
    fn pytorch_affine_uint8_by_hand() {
        // min -1, max 3 -> scale 4/255, zp = 0 - round(-1 / (4/255)) = round(63.75) = 64
        let s = Scheme::new(8, false).unwrap();
        let p = QParams::from_ranges(&s, &[-1.0], &[3.0]).unwrap();
        assert_eq!(p.scale[0], 4.0f32 / 255.0);
        assert_eq!(p.zero_point[0], 64);
        // Range not containing zero is widened to include it.
        let p = QParams::from_ranges(&s, &[1.0], &[3.0]).unwrap();
        assert_eq!(p.scale[0], 3.0f32 / 255.0);
        assert_eq!(p.zero_point[0], 0);
    }

    #[test]
    fn pytorch_symmetric_by_hand() {
        let s = Scheme::new(8, true).unwrap().symmetric();
        let p = QParams::from_ranges(&s, &[-2.0], &[1.0]).unwrap();
        assert_eq!(p.scale[0], 2.0f32 / 127.5);
        assert_eq!(p.zero_point[0], 0);
        let u = Scheme::new(8, false).unwrap().symmetric();
        let p = QParams::from_ranges(&u, &[-2.0], &[1.0]).unwrap();
        assert_eq!(p.zero_point[0], 128);
        // All-zero input: scale clamps at f32 epsilon, as in PyTorch.
        let p = QParams::from_ranges(&s, &[0.0], &[0.0]).unwrap();
        assert_eq!(p.scale[0], f32::EPSILON);
    }

    #[test]
    fn handout_truncates_the_zero_point() {
        // min -1, max 3, 8 bits: scale 4/255; 0 - (-1)/scale = 63.75 -> 63 (PyTorch: 64)
        let s = Scheme::new(8, false)
            .unwrap()
            .with_convention(Convention::Handout);
        let p = QParams::from_ranges(&s, &[-1.0], &[3.0]).unwrap();
        assert_eq!(p.zero_point[0], 63);
        // Handout keeps the data's own range: min 1, max 3 -> scale 2/255, zp trunc(-127.5) = -127
        let p = QParams::from_ranges(&s, &[1.0], &[3.0]).unwrap();
        assert_eq!(p.scale[0], 2.0f32 / 255.0);
        assert_eq!(p.zero_point[0], -127);
    }

    #[test]
    fn non_finite_ranges_are_errors() {
        let s = Scheme::new(8, false).unwrap();
        assert!(QParams::from_ranges(&s, &[f32::NAN], &[1.0]).is_err());
        assert!(QParams::from_ranges(&s, &[0.0], &[f32::INFINITY]).is_err());
        assert!(QParams::from_ranges(&s, &[2.0], &[1.0]).is_err());
    }
}
