//! Compressed weight matrices decoded one output row at a time.
//!
//! A weight-only layer used to dequantize its whole matrix with tensor ops on every call,
//! which made decoding (a few rows of activations per step) ten times slower than f32. Here
//! each output row is decoded straight from the stored codes into a small buffer and
//! multiplied with the few activation rows while it is hot in cache; for many activation
//! rows the whole matrix is decoded once (in parallel) and handed to the f32 matmul. The
//! decoded values are exactly those of the layer's `dequantize`: only summation order differs.

use anyhow::Result;
use candle_core::Tensor;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Runs `f` on the first `n` elements of a contiguous CPU tensor's storage, borrowed in
/// place; `None` for other devices, layouts or element types.
pub fn with_cpu_slice<T, R>(
    t: &candle_core::Tensor,
    n: usize,
    pick: impl Fn(&candle_core::CpuStorage) -> candle_core::Result<&[T]>,
    f: impl FnOnce(&[T]) -> R,
) -> Option<R> {
    if !t.device().is_cpu() || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let all = pick(cpu).ok()?;
    all.get(layout.start_offset()..layout.start_offset() + n)
        .map(f)
}

/// Outputs of fewer values than this get their bias on the calling thread; more are split
/// over rayon by rows (candle's own split starts at 64K values too).
const BIAS_SERIAL: usize = 1 << 16;

/// The `[m, o]` product `y` as a tensor, plus `bias` (`[o]`, f32, on the CPU) added in
/// place: `y + b` per value, the very f32 additions of candle's `broadcast_add`, without
/// its separate output buffer or its barrier thread pool (Marian's output layer at 128 ×
/// 15258 logits spent ~13% of its samples there). The packed f32 and low-bit products
/// return through here. Other biases go through `broadcast_add`.
pub fn with_bias(
    mut y: Vec<f32>,
    (m, o): (usize, usize),
    bias: Option<&candle_core::Tensor>,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    let Some(b) = bias else {
        return Ok(candle_core::Tensor::from_vec(y, (m, o), device)?);
    };
    let added = b.dims() == [o]
        && b.dtype() == candle_core::DType::F32
        && with_cpu_slice(b, o, candle_core::CpuStorage::as_slice::<f32>, |b| {
            add_bias_rows(&mut y, b);
        })
        .is_some();
    let t = candle_core::Tensor::from_vec(y, (m, o), device)?;
    Ok(if added { t } else { t.broadcast_add(b)? })
}

/// `y[r·o + j] += b[j]` for every row `r` of `y` (`o = b.len()`), rows split over rayon
/// for large outputs.
pub fn add_bias_rows(y: &mut [f32], b: &[f32]) {
    let o = b.len();
    if o == 0 {
        return;
    }
    let add = |rows: &mut [f32]| {
        for row in rows.chunks_exact_mut(o) {
            for (v, &c) in row.iter_mut().zip(b) {
                *v += c;
            }
        }
    };
    if y.len() < BIAS_SERIAL {
        add(y);
    } else {
        // About 64K values per task, whole rows.
        let rows = BIAS_SERIAL.div_ceil(o).max(1);
        y.par_chunks_mut(rows * o).for_each(add);
    }
}

/// Up to this many activation rows, multiply row by row instead of decoding the matrix.
pub const SMALL_BATCH: usize = 8;

/// Borrowed view of a compressed `[rows, cols]` weight matrix.
pub enum RowSource<'a> {
    F32(&'a [f32]),
    Half(&'a [f16]),
    /// Codes as u8 bit patterns (two's complement when `signed`); one (scale, zero point)
    /// for the whole matrix (`group == 0`) or per `group` consecutive columns of a row.
    Grouped {
        codes: &'a [u8],
        signed: bool,
        scale: &'a [f32],
        zero: &'a [i32],
        group: usize,
    },
    /// 4-bit codes packed two per byte (high nibble first) over the flattened matrix, a
    /// 16-entry code book and one absmax per `blocksize` elements.
    FourBit {
        packed: &'a [u8],
        table: &'a [f32; 16],
        absmax: &'a [f32],
        blocksize: usize,
    },
    /// FP8 codes looked up in a 256-entry table, times one scale per row (or one for all).
    Fp8 {
        codes: &'a [u8],
        table: &'a [f32; 256],
        scale: &'a [f32],
    },
}

impl RowSource<'_> {
    /// Writes row `o` (of `cols` columns) as f32 into `out`.
    pub fn decode_row(&self, o: usize, cols: usize, out: &mut [f32]) {
        let start = o * cols;
        match self {
            RowSource::F32(w) => out[..cols].copy_from_slice(&w[start..start + cols]),
            RowSource::Half(w) => {
                // Vectorized (F16C) where the processor has it.
                w[start..start + cols].convert_to_f32_slice(&mut out[..cols]);
            }
            RowSource::Grouped {
                codes,
                signed,
                scale,
                zero,
                group,
            } => {
                let row = &codes[start..start + cols];
                let (g, per_row) = if *group == 0 {
                    (cols, 0)
                } else {
                    (*group, cols.div_ceil(*group))
                };
                for (k, (dst, src)) in out.chunks_mut(g).zip(row.chunks(g)).enumerate() {
                    let p = if *group == 0 { 0 } else { o * per_row + k };
                    let (s, z) = (scale[p], zero[p] as f32);
                    for (d, &c) in dst.iter_mut().zip(src) {
                        let q = if *signed { c as i8 as f32 } else { c as f32 };
                        *d = (q - z) * s;
                    }
                }
            }
            RowSource::FourBit {
                packed,
                table,
                absmax,
                blocksize,
            } => {
                let mut i = 0;
                while i < cols {
                    let block = (start + i) / blocksize;
                    let end = ((block + 1) * blocksize - start).min(cols);
                    let scaled: [f32; 16] = std::array::from_fn(|c| table[c] * absmax[block]);
                    for (j, d) in out[i..end].iter_mut().enumerate() {
                        let e = start + i + j;
                        let code = (packed[e / 2] >> (4 * (1 - (e & 1)))) & 0x0f;
                        *d = scaled[code as usize];
                    }
                    i = end;
                }
            }
            RowSource::Fp8 {
                codes,
                table,
                scale,
            } => {
                let s = scale[if scale.len() == 1 { 0 } else { o }];
                for (d, &c) in out[..cols].iter_mut().zip(&codes[start..start + cols]) {
                    *d = table[c as usize] * s;
                }
            }
        }
    }

    /// The whole matrix as f32, row-major.
    pub fn decode_all(&self, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(o, dst)| self.decode_row(o, cols, dst));
        out
    }

    /// `x [m, cols] · Wᵀ` → `[m, rows]`, decoding each weight row once.
    pub fn matmul(&self, x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
        // Output columns in parallel chunks; each chunk decodes its rows into one buffer.
        let chunk = rows
            .div_ceil(rayon::current_num_threads().max(1) * 4)
            .max(16);
        let parts: Vec<Vec<f32>> = (0..rows)
            .step_by(chunk)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|first| {
                let last = (first + chunk).min(rows);
                let mut buf = vec![0f32; cols];
                let mut part = vec![0f32; m * (last - first)];
                for o in first..last {
                    self.decode_row(o, cols, &mut buf);
                    for r in 0..m {
                        part[r * (last - first) + (o - first)] =
                            dot(&x[r * cols..(r + 1) * cols], &buf);
                    }
                }
                part
            })
            .collect();
        let mut y = vec![0f32; m * rows];
        for (ci, part) in parts.iter().enumerate() {
            let first = ci * chunk;
            let width = part.len() / m.max(1);
            for r in 0..m {
                y[r * rows + first..r * rows + first + width]
                    .copy_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        y
    }
}

/// Forward through candle's matmul, or row by row from a CPU slice for few rows.
pub fn forward_rows_or_matmul(
    x: &Tensor,
    bias: Option<&Tensor>,
    shape: (usize, usize),
    rows_view: impl FnOnce(&dyn Fn(&RowSource) -> Vec<f32>) -> Option<Vec<f32>>,
    dense: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let m = x.dim(0)?;
    let (o, i) = shape;
    let direct = if m <= SMALL_BATCH && x.device().is_cpu() {
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        rows_view(&|src: &RowSource| src.matmul(&xs, m, o, i))
    } else {
        None
    };
    let y = match direct {
        Some(y) => Tensor::from_vec(y, (m, o), x.device())?,
        None => x.matmul(&dense()?.t()?)?,
    };
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Forward through a low-bit kernel layout on the CPU (`None` for other devices, so the
/// caller falls back to its generic path): activations borrowed in place when contiguous.
pub fn forward_lowbit(
    kernel: &crate::nn::kernels::lowbit::LowBit,
    x: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
) -> anyhow::Result<Option<candle_core::Tensor>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let (o, cols) = kernel.shape();
    anyhow::ensure!(k == cols, "expected {cols} input features, got {k}");
    let y = match with_cpu_slice(x, m * k, candle_core::CpuStorage::as_slice::<f32>, |xs| {
        kernel.matmul(xs, m)
    }) {
        Some(y) => y,
        None => kernel.matmul(&x.flatten_all()?.to_vec1::<f32>()?, m),
    };
    Ok(Some(with_bias(y, (m, o), bias, x.device())?))
}

/// Dot product in eight independent lanes (lets the compiler vectorize the loop).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bias added in place equals candle's `broadcast_add` bit for bit, on the serial
    /// and the split path, for ragged shapes; other biases still go through candle.
    #[test]
    fn bias_in_place_equals_broadcast_add() {
        let dev = candle_core::Device::Cpu;
        for (m, o) in [
            (1usize, 1usize),
            (1, 15258),
            (3, 7),
            (64, 256),
            (128, 1531),
            (5, 70001),
        ] {
            let y = candle_core::Tensor::randn(0f32, 3.0, (m, o), &dev).unwrap();
            let b = candle_core::Tensor::randn(0f32, 1.0, o, &dev).unwrap();
            let want = y.broadcast_add(&b).unwrap().to_vec2::<f32>().unwrap();
            let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = with_bias(v, (m, o), Some(&b), &dev).unwrap();
            let got = got.to_vec2::<f32>().unwrap();
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert_eq!(g.to_bits(), w.to_bits(), "m {m} o {o}");
            }
        }
        // A [1, o] bias broadcasts through candle; a wrong length is candle's error.
        let y = vec![1f32; 6];
        let b = candle_core::Tensor::new(&[[1f32, 2.0, 3.0]], &dev).unwrap();
        let got = with_bias(y.clone(), (2, 3), Some(&b), &dev).unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            [[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]]
        );
        let bad = candle_core::Tensor::new(&[1f32, 2.0], &dev).unwrap();
        assert!(with_bias(y, (2, 3), Some(&bad), &dev).is_err());
    }

    fn naive(w: &[f32], x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * rows];
        for r in 0..m {
            for o in 0..rows {
                y[r * rows + o] = (0..cols)
                    .map(|i| x[r * cols + i] as f64 * w[o * cols + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn grouped_rows_decode_by_hand_and_multiply_like_f64() {
        // 2 rows x 3 cols, groups of 2 (ragged): params per row: [g0, g1].
        let codes: Vec<u8> = [1i8, -2, 3, -4, 5, 0].iter().map(|&c| c as u8).collect();
        let scale = [0.5, 2.0, 1.0, 0.25];
        let zero = [0, 1, -1, 0];
        let src = RowSource::Grouped {
            codes: &codes,
            signed: true,
            scale: &scale,
            zero: &zero,
            group: 2,
        };
        let w = src.decode_all(2, 3);
        assert_eq!(w, [0.5, -1.0, 4.0, -3.0, 6.0, 0.0]);
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 0.25];
        let y = src.matmul(&x, 2, 2, 3);
        let e = naive(&w, &x, 2, 2, 3);
        for (a, b) in y.iter().zip(&e) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {e:?}");
        }
    }

    #[test]
    fn four_bit_rows_match_the_flat_layout() {
        let table: [f32; 16] = std::array::from_fn(|i| i as f32 - 8.0);
        let packed = [0x1f, 0x80, 0x7a];
        let absmax = [1.0, 10.0];
        let src = RowSource::FourBit {
            packed: &packed,
            table: &table,
            absmax: &absmax,
            blocksize: 4,
        };
        // codes 1,15,8,0 | 7,10 -> (c - 8) * absmax[e / 4]
        assert_eq!(src.decode_all(2, 3), [-7.0, 7.0, 0.0, -8.0, -10.0, 20.0]);
    }

    #[test]
    fn many_rows_split_across_threads_match_naive() {
        let (rows, cols, m) = (100, 37, 3);
        let w: Vec<f16> = (0..rows * cols)
            .map(|i| f16::from_f32(((i * 7919) % 101) as f32 / 50.0 - 1.0))
            .collect();
        let src = RowSource::Half(&w);
        let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let x: Vec<f32> = (0..m * cols).map(|i| (i % 13) as f32 / 7.0 - 0.8).collect();
        let y = src.matmul(&x, m, rows, cols);
        for (a, b) in y.iter().zip(naive(&wf, &x, m, rows, cols)) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}
