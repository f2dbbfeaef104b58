//! Statistics of a layer's inputs gathered while calibration data runs through the model:
//! each layer keeps only its own running summaries (a range observer, a Hessian sum, a
//! per-channel maximum), never the activations themselves.

use crate::quant::{Observer, ObserverKind, Scheme};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

/// What an algorithm needs to know about a layer's inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Statistic {
    /// The (min, max) range of the inputs as an observer calibrates it (for u8 codes).
    InputRange(ObserverKind),
    /// `H = 2/N · Σ x xᵀ` over the N input rows (GPTQ's Hessian of the layer's loss).
    InputHessian,
    /// `max |x|` per input channel (for activation-aware scaling: AWQ, SmoothQuant).
    InputChannelAbsMax,
    /// `mean |x|` per input channel over all input rows (AWQ's activation statistic).
    InputChannelAbsMean,
}

/// The statistics gathered for one layer.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    /// Input rows seen.
    pub rows: usize,
    pub input_range: Option<(f32, f32)>,
    /// Row-major `[in, in]`.
    pub hessian: Option<Vec<f64>>,
    pub channel_absmax: Option<Vec<f32>>,
    pub channel_absmean: Option<Vec<f32>>,
}

impl Calibration {
    /// Whether the statistic `s` is present.
    pub fn has(&self, s: &Statistic) -> bool {
        match s {
            Statistic::InputRange(_) => self.input_range.is_some(),
            Statistic::InputHessian => self.hessian.is_some(),
            Statistic::InputChannelAbsMax => self.channel_absmax.is_some(),
            Statistic::InputChannelAbsMean => self.channel_absmean.is_some(),
        }
    }

    /// The statistics of the inputs `x / s` (channel `j` divided by `s[j] > 0`), after a
    /// scale was folded into the layer that feeds this one. Per-channel statistics and the
    /// Hessian transform exactly; a per-tensor input range does not (the observer saw
    /// mixed channels), so it is dropped and must be gathered again.
    pub fn rescale_inputs(&mut self, s: &[f32]) -> Result<()> {
        let k = s.len();
        if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            bail!("input scales must be finite and positive");
        }
        for v in [&mut self.channel_absmax, &mut self.channel_absmean]
            .into_iter()
            .flatten()
        {
            if v.len() != k {
                bail!("{} input scales for statistics of {} channels", k, v.len());
            }
            for (a, d) in v.iter_mut().zip(s) {
                *a /= d;
            }
        }
        if let Some(h) = &mut self.hessian {
            if h.len() != k * k {
                bail!("{k} input scales for a Hessian of {} entries", h.len());
            }
            for (r, row) in h.chunks_mut(k).enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    *v /= s[r] as f64 * s[c] as f64;
                }
            }
        }
        self.input_range = None;
        Ok(())
    }
}

/// Accumulates the requested statistics batch by batch.
#[derive(Debug, Clone)]
pub struct Collector {
    in_features: usize,
    rows: usize,
    observer: Option<Observer>,
    xtx: Option<Vec<f64>>,
    absmax: Option<Vec<f32>>,
    /// Σ |x| per channel, in f64.
    abssum: Option<Vec<f64>>,
    /// Inputs on a GPU: the same sums kept on the device (XᵀX and Σ |x| in f64, the
    /// channel maxima in f32), added into the host ones once, in `finish`. Copying a
    /// k × k Gram matrix back per batch would cost more than computing it.
    on_device: [Option<Tensor>; 3],
}

impl Collector {
    pub fn new(needs: &[Statistic], in_features: usize) -> Self {
        let mut c = Collector {
            in_features,
            rows: 0,
            observer: None,
            xtx: None,
            absmax: None,
            abssum: None,
            on_device: [None, None, None],
        };
        for s in needs {
            match *s {
                Statistic::InputRange(kind) => {
                    let act = Scheme::new(8, false).expect("u8 is valid");
                    c.observer = Some(Observer::new(kind, act));
                }
                Statistic::InputHessian => c.xtx = Some(vec![0.0; in_features * in_features]),
                Statistic::InputChannelAbsMax => c.absmax = Some(vec![0.0; in_features]),
                Statistic::InputChannelAbsMean => c.abssum = Some(vec![0.0; in_features]),
            }
        }
        c
    }

    /// Adds a batch of inputs `[m, in]` (f32).
    pub fn observe(&mut self, x: &Tensor) -> Result<()> {
        let (m, k) = x.dims2()?;
        if k != self.in_features {
            bail!(
                "calibration input has {k} features, the layer {}",
                self.in_features
            );
        }
        if m == 0 {
            return Ok(());
        }
        crate::quant::uniform::ensure_finite(x, "calibration inputs")?;
        if let Some(o) = &mut self.observer {
            o.observe(x)?;
        }
        if !x.device().is_cpu() {
            return self.observe_on_device(x, m);
        }
        if let Some(acc) = &mut self.xtx {
            // One f32 GEMM per batch, summed in f64 across batches.
            let x = x.to_dtype(DType::F32)?;
            let g = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
            for (a, v) in acc.iter_mut().zip(g) {
                *a += v as f64;
            }
        }
        if let Some(mx) = &mut self.absmax {
            let b = x.abs()?.max(D::Minus2)?.to_vec1::<f32>()?;
            for (a, v) in mx.iter_mut().zip(b) {
                *a = a.max(v);
            }
        }
        if let Some(acc) = &mut self.abssum {
            let b = x
                .abs()?
                .to_dtype(DType::F64)?
                .sum(D::Minus2)?
                .to_vec1::<f64>()?;
            for (a, v) in acc.iter_mut().zip(b) {
                *a += v;
            }
        }
        self.rows += m;
        Ok(())
    }

    /// [`Collector::observe`] for inputs on a GPU: the same per-batch f32 GEMM and sums,
    /// accumulated on the device.
    fn observe_on_device(&mut self, x: &Tensor, m: usize) -> Result<()> {
        let x = x.to_dtype(DType::F32)?;
        let add = |acc: &mut Option<Tensor>, v: Tensor, max: bool| -> Result<()> {
            *acc = Some(match acc.take() {
                None => v,
                Some(a) if max => a.maximum(&v)?,
                Some(a) => (a + v)?,
            });
            Ok(())
        };
        if self.xtx.is_some() {
            let g = x.t()?.matmul(&x)?.to_dtype(DType::F64)?;
            add(&mut self.on_device[0], g, false)?;
        }
        if self.absmax.is_some() {
            add(&mut self.on_device[1], x.abs()?.max(D::Minus2)?, true)?;
        }
        if self.abssum.is_some() {
            let s = x.abs()?.to_dtype(DType::F64)?.sum(D::Minus2)?;
            add(&mut self.on_device[2], s, false)?;
        }
        self.rows += m;
        Ok(())
    }

    pub fn finish(mut self) -> Result<Calibration> {
        let [xtx, absmax, abssum] = std::mem::take(&mut self.on_device);
        if let (Some(acc), Some(d)) = (&mut self.xtx, xtx) {
            for (a, v) in acc.iter_mut().zip(d.flatten_all()?.to_vec1::<f64>()?) {
                *a += v;
            }
        }
        if let (Some(acc), Some(d)) = (&mut self.absmax, absmax) {
            for (a, v) in acc.iter_mut().zip(d.to_vec1::<f32>()?) {
                *a = a.max(v);
            }
        }
        if let (Some(acc), Some(d)) = (&mut self.abssum, abssum) {
            for (a, v) in acc.iter_mut().zip(d.to_vec1::<f64>()?) {
                *a += v;
            }
        }
        if self.rows == 0 {
            bail!("calibration saw no inputs: give at least one non-empty calibration sample");
        }
        let n = self.rows as f64;
        Ok(Calibration {
            rows: self.rows,
            input_range: self
                .observer
                .map(|o| o.range())
                .transpose()
                .context("calibrating the input range")?,
            hessian: self
                .xtx
                .map(|h| h.into_iter().map(|v| 2.0 * v / n).collect()),
            channel_absmax: self.absmax,
            channel_absmean: self
                .abssum
                .map(|a| a.into_iter().map(|v| (v / n) as f32).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_computed_statistics_over_two_batches() {
        let needs = [
            Statistic::InputRange(ObserverKind::MinMax),
            Statistic::InputHessian,
            Statistic::InputChannelAbsMax,
            Statistic::InputChannelAbsMean,
        ];
        let mut c = Collector::new(&needs, 2);
        let a = Tensor::new(&[[1f32, -2.0], [3.0, 0.5]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[-4f32, 1.0]], &Device::Cpu).unwrap();
        c.observe(&a).unwrap();
        c.observe(&b).unwrap();
        let s = c.finish().unwrap();
        assert_eq!(s.rows, 3);
        assert_eq!(s.input_range, Some((-4.0, 3.0)));
        // Σ x xᵀ = [[1+9+16, -2+1.5-4], [., 4+0.25+1]] = [[26, -4.5], [-4.5, 5.25]]; × 2/3.
        let h = s.hessian.clone().unwrap();
        let want = [26.0, -4.5, -4.5, 5.25].map(|v| v * 2.0 / 3.0);
        for (g, w) in h.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{h:?}");
        }
        assert_eq!(s.channel_absmax.as_deref(), Some(&[4.0f32, 2.0][..]));
        // (1 + 3 + 4) / 3, (2 + 0.5 + 1) / 3.
        let mean = s.channel_absmean.clone().unwrap();
        assert!((mean[0] - 8.0 / 3.0).abs() < 1e-6 && (mean[1] - 3.5 / 3.0).abs() < 1e-6);
        assert!(needs.iter().all(|n| s.has(n)));
        // Inputs divided by (2, 0.5): maxima (2, 4), means halved / doubled, H_jk / (s_j s_k).
        let mut r = s.clone();
        r.rescale_inputs(&[2.0, 0.5]).unwrap();
        assert_eq!(r.channel_absmax.as_deref(), Some(&[2.0f32, 4.0][..]));
        let m = r.channel_absmean.clone().unwrap();
        assert!((m[0] - 4.0 / 3.0).abs() < 1e-6 && (m[1] - 7.0 / 3.0).abs() < 1e-6);
        let h = r.hessian.clone().unwrap();
        let want = [26.0 / 4.0, -4.5, -4.5, 5.25 * 4.0].map(|v| v * 2.0 / 3.0);
        for (g, w) in h.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{h:?}");
        }
        assert!(
            r.input_range.is_none(),
            "a per-tensor range cannot be rescaled"
        );
        assert!(!r.has(&Statistic::InputRange(ObserverKind::MinMax)));
        let mut bad = s.clone();
        assert!(bad.rescale_inputs(&[1.0]).is_err());
        assert!(bad.rescale_inputs(&[1.0, 0.0]).is_err());
    }

    #[test]
    fn no_data_and_bad_data_are_errors() {
        let c = Collector::new(&[Statistic::InputHessian], 2);
        assert!(c.finish().unwrap_err().to_string().contains("no inputs"));
        let mut c = Collector::new(&[Statistic::InputChannelAbsMax], 2);
        let bad = Tensor::new(&[[f32::NAN, 1.0]], &Device::Cpu).unwrap();
        assert!(c.observe(&bad).is_err());
        let wrong = Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        assert!(c.observe(&wrong).is_err());
    }
}
