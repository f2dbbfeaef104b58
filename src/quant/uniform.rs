//! Uniform (integer) quantization of candle tensors: quantize, dequantize and
//! fake-quantize at any granularity. The element-wise math runs as candle ops, so
//! it runs on whatever device the tensor lives on.

use super::params::QParams;
use super::scheme::{Granularity, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

/// A quantized tensor: integer codes plus the parameters that map them back to reals.
#[derive(Debug, Clone)]
pub struct QTensor {
    pub scheme: Scheme,
    /// Codes in the original shape, as U8 holding the code's bit pattern
    /// (two's complement for signed schemes, as i8 storage would).
    pub codes: Tensor,
    pub params: QParams,
}

/// The 2-D view in which every row shares one (scale, zero point) pair.
struct RowView {
    rows: Tensor,
    /// Permutation applied before flattening (per-channel on a non-leading axis).
    permuted_dims: Option<(Vec<usize>, Vec<usize>)>,
    dims: Vec<usize>,
    /// Zeros appended to the last dimension so that groups tile it (ragged last group).
    pad: usize,
}

impl RowView {
    fn new(x: &Tensor, g: Granularity) -> Result<Self> {
        let dims = x.dims().to_vec();
        let numel = x.elem_count();
        if numel == 0 {
            bail!("cannot quantize an empty tensor of shape {dims:?}");
        }
        let (rows, permuted_dims) = match g {
            Granularity::PerTensor => (x.reshape((1, numel))?, None),
            Granularity::PerGroup { size } => {
                let last = *dims.last().unwrap_or(&1);
                // A group longer than the row is the row: the zeros that padding would add
                // change no (zero-including) range, and padding each row up to a huge group
                // would allocate without bound.
                let size = size.min(last);
                let pad = (size - last % size) % size;
                if pad > 0 {
                    let outer = numel / last;
                    let padded = x.reshape((outer, last))?.pad_with_zeros(1, 0, pad)?;
                    let rows = padded.reshape((outer * (last + pad) / size, size))?;
                    return Ok(RowView {
                        rows,
                        permuted_dims: None,
                        dims,
                        pad,
                    });
                }
                (x.reshape((numel / size, size))?, None)
            }
            Granularity::PerChannel { axis } => {
                if axis == 0 {
                    (x.reshape((dims[0], numel / dims[0]))?, None)
                } else {
                    let mut perm: Vec<usize> = vec![axis];
                    perm.extend((0..dims.len()).filter(|&d| d != axis));
                    let p = x.permute(perm.clone())?.contiguous()?;
                    let pdims = p.dims().to_vec();
                    (
                        p.reshape((dims[axis], numel / dims[axis]))?,
                        Some((perm, pdims)),
                    )
                }
            }
        };
        Ok(RowView {
            rows,
            permuted_dims,
            dims,
            pad: 0,
        })
    }

    /// Puts a tensor of the row view's shape back into the original layout.
    fn restore(&self, t: Tensor) -> Result<Tensor> {
        if self.pad > 0 {
            let last = *self.dims.last().unwrap_or(&1);
            let outer = self.dims.iter().product::<usize>() / last;
            let t = t.reshape((outer, last + self.pad))?.narrow(1, 0, last)?;
            return Ok(t.contiguous()?.reshape(self.dims.as_slice())?);
        }
        match &self.permuted_dims {
            None => Ok(t.reshape(self.dims.as_slice())?),
            Some((perm, pdims)) => {
                let mut inverse = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i;
                }
                Ok(t.reshape(pdims.as_slice())?
                    .permute(inverse)?
                    .contiguous()?)
            }
        }
    }
}

/// Whether every value is finite, on the tensor's own device: `x · 0` is 0 for finite
/// values and NaN for NaN and ±inf, and the sum keeps a NaN (a max would skip it).
pub fn all_finite(x: &Tensor) -> Result<bool> {
    let x = x.to_dtype(DType::F32)?;
    Ok((&x * 0.0)?.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// Fails with a clear message if the tensor holds NaN or infinite values.
pub fn ensure_finite(x: &Tensor, what: &str) -> Result<()> {
    if !all_finite(x)? {
        bail!("{what} contains NaN or infinite values: quantization needs finite numbers (clean the weights or inputs first)");
    }
    Ok(())
}

/// Per-row minima and maxima of the scheme's row view (the scheme's own ranges).
pub fn row_ranges(x: &Tensor, scheme: &Scheme) -> Result<(Vec<f32>, Vec<f32>)> {
    scheme.validate_for_shape(x.dims())?;
    let view = RowView::new(&x.to_dtype(DType::F32)?, scheme.granularity)?;
    let mins = view.rows.min(D::Minus1)?.to_vec1::<f32>()?;
    let maxs = view.rows.max(D::Minus1)?.to_vec1::<f32>()?;
    Ok((mins, maxs))
}

/// Computes the scheme's parameters from the tensor's own ranges.
pub fn qparams_for(x: &Tensor, scheme: &Scheme) -> Result<QParams> {
    ensure_finite(x, "tensor to quantize")?;
    let (mins, maxs) = row_ranges(x, scheme)?;
    QParams::from_ranges(scheme, &mins, &maxs)
}

/// Quantizes with parameters computed from the tensor itself.
pub fn quantize(x: &Tensor, scheme: &Scheme) -> Result<QTensor> {
    let params = qparams_for(x, scheme)?;
    quantize_with(x, scheme, params)
}

/// Round half to even, element-wise, with candle ops (candle's `round` rounds ties away from zero).
pub fn round_half_even_tensor(x: &Tensor) -> Result<Tensor> {
    let r = x.round()?;
    let d = (&r - x)?;
    let tie = d.abs()?.eq(0.5)?;
    let half = (&r * 0.5)?;
    let odd = half.ne(&half.floor()?)?;
    let fix = tie.mul(&odd)?;
    let corrected = (&r - (&d * 2.0)?)?;
    Ok(fix.where_cond(&corrected, &r)?)
}

fn column(values: &[f32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, (values.len(), 1), device)?)
}

/// The element-wise quantization as candle ops (any device).
fn quantize_rows_ops(
    rows: &Tensor,
    inv: &[f32],
    zp: &[f32],
    qmin: i32,
    qmax: i32,
) -> Result<Tensor> {
    let device = rows.device();
    let scaled = rows.broadcast_mul(&column(inv, device)?)?;
    let q = round_half_even_tensor(&scaled)?
        .broadcast_add(&column(zp, device)?)?
        .clamp(qmin as f32, qmax as f32)?;
    // Two's complement bit pattern in a byte: negative codes wrap to 256 + q.
    let as_byte = q.lt(0f32)?.where_cond(&(&q + 256.0)?, &q)?;
    Ok(as_byte.to_dtype(DType::U8)?)
}

/// The same computation in one pass over CPU memory (3x the op chain's throughput in benches/quant.rs).
fn quantize_rows_cpu(
    rows: &Tensor,
    inv: &[f32],
    zp: &[f32],
    qmin: i32,
    qmax: i32,
) -> Result<Tensor> {
    let (r, c) = rows.dims2()?;
    let data = rows.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let (lo, hi) = (qmin as f32, qmax as f32);
    let mut out = Vec::with_capacity(data.len());
    for (row, (&s, &z)) in data.chunks(c).zip(inv.iter().zip(zp)) {
        out.extend(
            row.iter()
                .map(|&v| ((v * s).round_ties_even() + z).clamp(lo, hi) as i32 as i8 as u8),
        );
    }
    Ok(Tensor::from_vec(out, (r, c), rows.device())?)
}

/// Quantizes with given parameters: `q = clamp(round_half_even(x * (1/scale)) + zp, qmin, qmax)`.
pub fn quantize_with(x: &Tensor, scheme: &Scheme, params: QParams) -> Result<QTensor> {
    scheme.validate_for_shape(x.dims())?;
    let view = RowView::new(&x.to_dtype(DType::F32)?, scheme.granularity)?;
    let rows = view.rows.dim(0)?;
    if params.len() != rows {
        bail!(
            "scheme {scheme} needs {rows} (scale, zero point) pairs for shape {:?}, got {}",
            x.dims(),
            params.len()
        );
    }
    let device = x.device();
    let inv: Vec<f32> = params.scale.iter().map(|s| 1.0f32 / s).collect();
    let zp: Vec<f32> = params.zero_point.iter().map(|&z| z as f32).collect();
    let (qmin, qmax) = scheme.qrange();
    let bytes = if device.is_cpu() {
        quantize_rows_cpu(&view.rows, &inv, &zp, qmin, qmax)?
    } else {
        quantize_rows_ops(&view.rows, &inv, &zp, qmin, qmax)?
    };
    let codes = view.restore(bytes)?;
    Ok(QTensor {
        scheme: *scheme,
        codes,
        params,
    })
}

impl QTensor {
    /// The shape of the original tensor.
    pub fn dims(&self) -> &[usize] {
        self.codes.dims()
    }

    /// Codes as signed integers in an F32 tensor (exact for 8 bits or fewer).
    pub fn codes_f32(&self) -> Result<Tensor> {
        let c = self.codes.to_dtype(DType::F32)?;
        if self.scheme.signed {
            Ok(c.ge(128f32)?.where_cond(&(&c - 256.0)?, &c)?)
        } else {
            Ok(c)
        }
    }

    /// Codes as plain integers (CPU), in row-major order of the original shape.
    pub fn codes_i32(&self) -> Result<Vec<i32>> {
        Ok(self
            .codes_f32()?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v as i32)
            .collect())
    }

    /// Codes packed `bits` bits each (signed codes in offset binary), as stored on disk.
    pub fn packed_codes(&self) -> Result<Vec<u8>> {
        let bits = self.scheme.bits;
        let codes = self.codes_i32()?;
        let raw = if self.scheme.signed {
            super::pack::to_offset_binary(&codes, bits)?
        } else {
            codes.iter().map(|&c| c as u8).collect()
        };
        super::pack::pack(&raw, bits)
    }

    /// Bytes as stored: codes packed `bits` bits each, one f32 scale per group and, for
    /// affine schemes, one byte of zero point per group (it fits the code width). The one
    /// rule every size in quantlab uses for uniform schemes.
    pub fn nbytes(&self) -> usize {
        let n: usize = self.dims().iter().product();
        let zp = if self.scheme.mode == super::scheme::Mode::Affine {
            1
        } else {
            0
        };
        super::pack::packed_len(n, self.scheme.bits) + self.params.len() * (4 + zp)
    }

    /// Rebuilds a tensor from codes packed by [`QTensor::packed_codes`] and its parameters.
    pub fn from_packed(
        scheme: Scheme,
        shape: &[usize],
        packed: &[u8],
        params: QParams,
        device: &Device,
    ) -> Result<Self> {
        let count: usize = shape.iter().product();
        let raw = super::pack::unpack(packed, scheme.bits, count)?;
        let bytes: Vec<u8> = if scheme.signed {
            super::pack::from_offset_binary(&raw, scheme.bits)
                .into_iter()
                .map(|c| c as i8 as u8)
                .collect()
        } else {
            raw
        };
        let codes = Tensor::from_vec(bytes, shape, device)?;
        Ok(QTensor {
            scheme,
            codes,
            params,
        })
    }

    /// `(q - zp) * scale`, in f32, in the original shape.
    pub fn dequantize(&self) -> Result<Tensor> {
        let c = self.codes_f32()?;
        let view = RowView::new(&c, self.scheme.granularity)?;
        let device = c.device();
        let zp: Vec<f32> = self.params.zero_point.iter().map(|&z| z as f32).collect();
        let deq = if device.is_cpu() {
            let (r, cols) = view.rows.dims2()?;
            let data = view.rows.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let mut out = Vec::with_capacity(data.len());
            for (row, (&s, &z)) in data.chunks(cols).zip(self.params.scale.iter().zip(&zp)) {
                out.extend(row.iter().map(|&q| (q - z) * s));
            }
            Tensor::from_vec(out, (r, cols), device)?
        } else {
            view.rows
                .broadcast_sub(&column(&zp, device)?)?
                .broadcast_mul(&column(&self.params.scale, device)?)?
        };
        view.restore(deq)
            .context("restoring the dequantized tensor to its shape")
    }
}

/// Quantize then dequantize: the values a quantized model actually sees.
pub fn fake_quantize(x: &Tensor, scheme: &Scheme) -> Result<Tensor> {
    quantize(x, scheme)?.dequantize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::scheme::Convention;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn tensor_rounding_is_half_even() {
        let x = t(&[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4, -2.6, 1e9], &[9]);
        let r = round_half_even_tensor(&x)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(r, vec![0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 2.0, -3.0, 1e9]);
    }

    #[test]
    fn cpu_fast_path_equals_the_op_chain() {
        let v: Vec<f32> = (0..400)
            .map(|i| ((i * 7919) % 997) as f32 / 50.0 - 10.0 + if i % 8 == 0 { 0.5 } else { 0.0 })
            .collect();
        let rows = t(&v, &[4, 100]);
        let inv = [3.0f32, 0.5, 1.0, 10.0];
        let zp = [0.0f32, 10.0, -3.0, 128.0];
        for (qmin, qmax) in [(-128, 127), (0, 255), (-4, 3)] {
            let a = quantize_rows_cpu(&rows, &inv, &zp, qmin, qmax)
                .unwrap()
                .to_vec2::<u8>()
                .unwrap();
            let b = quantize_rows_ops(&rows, &inv, &zp, qmin, qmax)
                .unwrap()
                .to_vec2::<u8>()
                .unwrap();
            assert_eq!(a, b, "range {qmin}..{qmax}");
        }
    }

    #[test]
    fn signed_codes_round_trip_through_bytes() {
        let s = Scheme::new(8, true).unwrap().symmetric();
        let x = t(&[-1.0, -0.5, 0.0, 0.5, 1.0], &[5]);
        let q = quantize(&x, &s).unwrap();
        // scale = 2/255 in f32, whose reciprocal rounds to 127.49999 (not 127.5), so -1 maps
        // to -127, as PyTorch's `1.0f / scale` gives too; 0.5 * 127.49999 rounds to 64.
        assert_eq!(q.codes_i32().unwrap(), vec![-127, -64, 0, 64, 127]);
        let d = q.dequantize().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(d[4], 127.0 * q.params.scale[0]);
    }

    #[test]
    fn per_channel_axis1_matches_transposed_axis0() {
        let data: Vec<f32> = (0..12).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let x = t(&data, &[3, 4]);
        let s1 = Scheme::new(8, false).unwrap().per_channel(1);
        let s0 = Scheme::new(8, false).unwrap().per_channel(0);
        let a = quantize(&x, &s1).unwrap();
        let b = quantize(&x.t().unwrap().contiguous().unwrap(), &s0).unwrap();
        assert_eq!(a.params, b.params);
        let da = a.dequantize().unwrap();
        let db = b.dequantize().unwrap().t().unwrap();
        assert_eq!(
            da.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            db.contiguous()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn per_group_uses_one_range_per_group() {
        // Two groups of 2: [0, 1] and [10, 30]
        let x = t(&[0.0, 1.0, 10.0, 30.0], &[1, 4]);
        let s = Scheme::new(8, false).unwrap().per_group(2);
        let q = quantize(&x, &s).unwrap();
        assert_eq!(q.params.scale, vec![1.0 / 255.0, 30.0 / 255.0]);
        let d = q
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in d.iter().zip([0.0, 1.0, 10.0, 30.0]) {
            assert!((a - b).abs() <= 30.0 / 255.0 / 2.0 + 1e-6);
        }
    }

    #[test]
    fn ragged_last_group_matches_explicit_zero_padding() {
        // 6 columns in groups of 4: the second group holds 2 values (padded with zeros,
        // which cannot move a range that already contains 0).
        let v = [0.5f32, -1.0, 2.0, 0.25, 3.0, -0.5];
        let x = t(&v, &[1, 6]);
        let s = Scheme::new(4, true).unwrap().per_group(4);
        let q = quantize(&x, &s).unwrap();
        assert_eq!(q.params.len(), 2);
        let padded = t(&[0.5, -1.0, 2.0, 0.25, 3.0, -0.5, 0.0, 0.0], &[1, 8]);
        let qp = quantize(&padded, &s).unwrap();
        assert_eq!(q.params, qp.params);
        assert_eq!(
            q.codes_i32().unwrap(),
            qp.codes_i32().unwrap()[..6].to_vec()
        );
        assert_eq!(q.dequantize().unwrap().dims(), &[1, 6]);
    }

    #[test]
    fn a_group_longer_than_the_row_is_the_row_without_padding() {
        // Rows of 6 in groups of 2^40: one group per row, the same parameters and codes as
        // zero-padding each row to 8 (groups of 8), and nothing allocated for the padding.
        let v = [
            0.5f32, -1.0, 2.0, 0.25, 3.0, -0.5, 1.5, 0.0, -2.0, 0.75, 0.1, 0.2,
        ];
        let x = t(&v, &[2, 6]);
        for base in [
            Scheme::new(4, true).unwrap().symmetric(),
            Scheme::new(4, false).unwrap().affine(),
        ] {
            let s = base.per_group(1 << 40);
            let s8 = base.per_group(8);
            let q = quantize(&x, &s).unwrap();
            assert_eq!(q.params.len(), 2);
            let mut padded = v[..6].to_vec();
            padded.extend([0.0, 0.0]);
            padded.extend(&v[6..]);
            padded.extend([0.0, 0.0]);
            let qp = quantize(&t(&padded, &[2, 8]), &s8).unwrap();
            assert_eq!(q.params, qp.params);
            let (c, cp) = (q.codes_i32().unwrap(), qp.codes_i32().unwrap());
            assert_eq!(c[..6], cp[..6]);
            assert_eq!(c[6..], cp[8..14]);
            assert_eq!(q.dequantize().unwrap().dims(), &[2, 6]);
        }
    }

    #[test]
    fn handout_codes_can_leave_zero_outside() {
        let s = Scheme::new(2, false)
            .unwrap()
            .with_convention(Convention::Handout);
        let x = t(&[1.0, 2.0, 3.0, 4.0], &[4]);
        let q = quantize(&x, &s).unwrap();
        assert_eq!(q.codes_i32().unwrap(), vec![0, 1, 2, 3]);
        let d = q.dequantize().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(d, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn nan_and_bad_groups_are_errors() {
        let s = Scheme::new(8, false).unwrap();
        let x = t(&[0.0, f32::NAN], &[2]);
        let e = quantize(&x, &s).unwrap_err().to_string();
        assert!(e.contains("NaN"), "{e}");
        let x = t(&[0.0, f32::INFINITY], &[2]);
        assert!(quantize(&x, &s).is_err());
        let g = Scheme::new(4, false)
            .unwrap()
            .per_group(3)
            .with_convention(Convention::Handout);
        assert!(quantize(&t(&[0.0; 4], &[1, 4]), &g).is_err());
        let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(quantize(&empty, &s).is_err());
    }
}
