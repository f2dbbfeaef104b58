//! Sequential (stage-by-stage) calibration of the Llama decoder, for methods whose
//! statistics must come from the already quantized model (GPTQ's `true_sequential`).
//! Per block: q/k/v read the attention norm's output; o reads the attention computed with
//! the quantized q/k/v; gate/up read the second norm's output after the quantized o;
//! down reads `silu(gate) · up` of the quantized gate/up. Each stage's layers are converted
//! as soon as their inputs have been observed. The hidden states of all calibration windows
//! are kept between blocks (samples × seqlen × hidden f32: 150 MB for 128 × 512 × 576), so
//! every block runs once. The arithmetic is that of the CPU forward pass.

use super::partial::host;
use super::Llama;
use crate::nn::kernels::llm_f32::{self, add_in_place, KvHeads};
use crate::nn::{CalibrateInStages, StageSink};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

impl CalibrateInStages for Llama {
    type Input = Vec<u32>;

    fn calibrate_in_stages(
        &mut self,
        windows: &[Vec<u32>],
        sink: &mut dyn StageSink,
    ) -> Result<()> {
        let c = self.cfg.clone();
        let super::partial::AttnDims {
            hs,
            nh,
            nkv,
            hd,
            eps,
            scale,
            pairs,
        } = self.attn_dims();
        for w in windows {
            if w.is_empty() || w.len() > c.max_position_embeddings {
                bail!(
                    "a calibration window has {} tokens: use 1 to {} (the model's context)",
                    w.len(),
                    c.max_position_embeddings
                );
            }
            if let Some(&id) = w.iter().find(|&&id| id as usize >= c.vocab_size) {
                bail!(
                    "token id {id} is outside the vocabulary of {}",
                    c.vocab_size
                );
            }
        }
        // The last block with a layer that needs its inputs: later blocks need not run.
        let wanted = |b: &super::Block| {
            [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down]
                .iter()
                .any(|l| sink.wants(l))
        };
        let head_wanted = sink.wants(&self.lm_head);
        let last = if head_wanted {
            self.blocks.len()
        } else {
            match self.blocks.iter().rposition(wanted) {
                Some(i) => i + 1,
                None => return Ok(()),
            }
        };
        if !self.device.is_cpu() || self.embed.dtype() != DType::F32 {
            return self.calibrate_on_device(windows, sink, last, head_wanted);
        }
        let dev = Device::Cpu;
        let mut xs: Vec<Vec<f32>> = windows
            .iter()
            .map(|w| {
                let ids = Tensor::from_slice(w, w.len(), &dev)?;
                host(&self.embed.index_select(&ids, 0)?)
            })
            .collect::<Result<_>>()?;
        let tensor = |v: Vec<f32>, cols: usize| -> Result<Tensor> {
            let rows = v.len() / cols;
            Ok(Tensor::from_vec(v, (rows, cols), &dev)?)
        };
        let n = windows.len() as u64;
        let nblocks = self.blocks.len();
        let Llama {
            blocks,
            cos_host,
            sin_host,
            ..
        } = self;
        let start = std::time::Instant::now();
        for (bi, b) in blocks.iter_mut().enumerate().take(last) {
            // Its layers are converted below: a stacked copy of the old ones is stale.
            b.clear_fused();
            let bar = crate::progress::bar(4 * n, &format!("block {}/{nblocks}", bi + 1), true);
            let attn_norm = host(&b.attn_norm)?;
            let ffn_norm = host(&b.ffn_norm)?;
            // q, k, v: the attention norm's output.
            for x in &xs {
                let h = tensor(llm_f32::rms_norm(x, &attn_norm, eps), hs)?;
                sink.observe(&[&b.q, &b.k, &b.v], &h)?;
                bar.inc(1);
            }
            sink.convert(&mut [&mut b.q, &mut b.k, &mut b.v])?;
            // o: the attention output with the quantized q, k, v.
            let mut ys = Vec::with_capacity(xs.len());
            for x in &xs {
                let t = x.len() / hs;
                let h = tensor(llm_f32::rms_norm(x, &attn_norm, eps), hs)?;
                let mut q = host(&b.q.forward(&h)?)?;
                let mut k = host(&b.k.forward(&h)?)?;
                let v = host(&b.v.forward(&h)?)?;
                llm_f32::rope(&mut q, nh, hd, 0, cos_host, sin_host, pairs);
                llm_f32::rope(&mut k, nkv, hd, 0, cos_host, sin_host, pairs);
                let mut kv = KvHeads::default();
                kv.append(&k, &v, nkv, hd);
                let y = tensor(
                    llm_f32::causal_attention(&q, t, nh, hd, &kv, 0, scale),
                    nh * hd,
                )?;
                sink.observe(&[&b.o], &y)?;
                ys.push(y);
                bar.inc(1);
            }
            sink.convert(&mut [&mut b.o])?;
            for (x, y) in xs.iter_mut().zip(ys.drain(..)) {
                add_in_place(x, &host(&b.o.forward(&y)?)?);
            }
            // gate, up: the second norm's output after the quantized attention.
            for x in &xs {
                let h = tensor(llm_f32::rms_norm(x, &ffn_norm, eps), hs)?;
                sink.observe(&[&b.gate, &b.up], &h)?;
                bar.inc(1);
            }
            sink.convert(&mut [&mut b.gate, &mut b.up])?;
            // down: silu(gate) · up of the quantized gate and up.
            let mut acts = Vec::with_capacity(xs.len());
            for x in &xs {
                let h = tensor(llm_f32::rms_norm(x, &ffn_norm, eps), hs)?;
                let mut g = host(&b.gate.forward(&h)?)?;
                let u = host(&b.up.forward(&h)?)?;
                llm_f32::silu_mul(&mut g, &u);
                let a = tensor(g, c.intermediate_size)?;
                sink.observe(&[&b.down], &a)?;
                acts.push(a);
                bar.inc(1);
            }
            sink.convert(&mut [&mut b.down])?;
            for (x, a) in xs.iter_mut().zip(acts.drain(..)) {
                add_in_place(x, &host(&b.down.forward(&a)?)?);
            }
            bar.finish_and_clear();
            eprintln!(
                "calibrated block {}/{nblocks} ({:.0} s)",
                bi + 1,
                start.elapsed().as_secs_f64()
            );
        }
        if head_wanted {
            let norm = host(&self.norm)?;
            for x in &xs {
                let h = tensor(llm_f32::rms_norm(x, &norm, eps), hs)?;
                sink.observe(&[&self.lm_head], &h)?;
            }
            sink.convert(&mut [&mut self.lm_head])?;
        }
        Ok(())
    }
}

impl Llama {
    /// The staged pass with tensor ops on the model's device (a GPU, or activations other
    /// than f32): the same stages as the host pass, each computed as the forward pass
    /// computes it on that device ([`Llama::attention_heads`], candle's RMSNorm and SiLU).
    /// The hidden states of every window stay on the device between blocks; the statistics
    /// collectors accumulate there too (`nn::calib`), so nothing returns to the host until
    /// a stage's layers are converted.
    fn calibrate_on_device(
        &mut self,
        windows: &[Vec<u32>],
        sink: &mut dyn StageSink,
        last: usize,
        head_wanted: bool,
    ) -> Result<()> {
        let dev = self.device.clone();
        let hs = self.cfg.hidden_size;
        let mut xs = windows
            .iter()
            .map(|w| {
                let ids = Tensor::from_slice(w, w.len(), &dev)?;
                Ok(self
                    .embed
                    .index_select(&ids, 0)?
                    .reshape((1, w.len(), hs))?)
            })
            .collect::<Result<Vec<Tensor>>>()?;
        // The blocks are converted while `self` runs attention: take them out meanwhile
        // (attention reads only the configuration, rotary tables and device).
        let mut blocks = std::mem::take(&mut self.blocks);
        let r = self.device_blocks(&mut blocks[..last], &mut xs, sink, windows.len());
        self.blocks = blocks;
        r?;
        if head_wanted {
            let eps = self.cfg.rms_norm_eps as f32;
            for x in &xs {
                let h = candle_nn::ops::rms_norm(x, &self.norm, eps)?;
                sink.observe(&[&self.lm_head], &h.squeeze(0)?)?;
            }
            sink.convert(&mut [&mut self.lm_head])?;
        }
        Ok(())
    }

    fn device_blocks(
        &self,
        blocks: &mut [super::Block],
        xs: &mut [Tensor],
        sink: &mut dyn StageSink,
        n: usize,
    ) -> Result<()> {
        let eps = self.cfg.rms_norm_eps as f32;
        let fused = crate::nn::cuda::enabled(&self.device);
        let nblocks = self.cfg.num_hidden_layers;
        let start = std::time::Instant::now();
        let norm = |x: &Tensor, w: &Tensor| candle_nn::ops::rms_norm(x, w, eps);
        for (bi, b) in blocks.iter_mut().enumerate() {
            let bar =
                crate::progress::bar(4 * n as u64, &format!("block {}/{nblocks}", bi + 1), true);
            // q, k, v: the attention norm's output.
            for x in xs.iter() {
                sink.observe(&[&b.q, &b.k, &b.v], &norm(x, &b.attn_norm)?.squeeze(0)?)?;
                bar.inc(1);
            }
            sink.convert(&mut [&mut b.q, &mut b.k, &mut b.v])?;
            // o: the attention output with the quantized q, k, v.
            let mut ys = Vec::with_capacity(xs.len());
            for x in xs.iter() {
                let t = x.dim(1)?;
                let mask = if fused { None } else { self.causal_mask(t, 0)? };
                let h = norm(x, &b.attn_norm)?;
                let y = self.attention_heads(b, &h, 0, mask.as_ref(), &mut None)?;
                sink.observe(&[&b.o], &y.squeeze(0)?)?;
                ys.push(y);
                bar.inc(1);
            }
            sink.convert(&mut [&mut b.o])?;
            for (x, y) in xs.iter_mut().zip(ys.drain(..)) {
                *x = (&*x + b.o.forward(&y)?)?;
            }
            // gate, up: the second norm's output after the quantized attention.
            for x in xs.iter() {
                sink.observe(&[&b.gate, &b.up], &norm(x, &b.ffn_norm)?.squeeze(0)?)?;
                bar.inc(1);
            }
            sink.convert(&mut [&mut b.gate, &mut b.up])?;
            // down: silu(gate) · up of the quantized gate and up.
            let mut acts = Vec::with_capacity(xs.len());
            for x in xs.iter() {
                let h = norm(x, &b.ffn_norm)?;
                let a = (candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?;
                sink.observe(&[&b.down], &a.squeeze(0)?)?;
                acts.push(a);
                bar.inc(1);
            }
            sink.convert(&mut [&mut b.down])?;
            for (x, a) in xs.iter_mut().zip(acts.drain(..)) {
                *x = (&*x + b.down.forward(&a)?)?;
            }
            bar.finish_and_clear();
            eprintln!(
                "calibrated block {}/{nblocks} on {:?} ({:.0} s)",
                bi + 1,
                self.device.location(),
                start.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::calib::{Collector, Statistic};
    use crate::nn::{apply_plan_in_stages, HasLinears, Plan, QLinear};

    fn tiny() -> Llama {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama-tiny");
        Llama::from_hf_dir(std::path::Path::new(dir), &Device::Cpu).unwrap()
    }

    fn windows() -> Vec<Vec<u32>> {
        vec![vec![1, 5, 9, 2, 7, 3, 3, 8, 11, 40], vec![4, 4, 6]]
    }

    /// Records each stage's inputs and the conversion order; converts nothing.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<(Vec<String>, Collector)>,
        order: Vec<String>,
    }

    impl StageSink for Recorder {
        fn wants(&self, _: &QLinear) -> bool {
            true
        }

        fn observe(&mut self, layers: &[&QLinear], x: &Tensor) -> Result<()> {
            let names: Vec<String> = layers.iter().map(|l| l.name.clone()).collect();
            let i = match self.seen.iter().position(|(n, _)| *n == names) {
                Some(i) => i,
                None => {
                    let c = Collector::new(&[Statistic::InputHessian], layers[0].in_features);
                    self.seen.push((names, c));
                    self.seen.len() - 1
                }
            };
            self.seen[i].1.observe(x)
        }

        fn convert(&mut self, layers: &mut [&mut QLinear]) -> Result<()> {
            self.order.extend(layers.iter().map(|l| l.name.clone()));
            Ok(())
        }
    }

    /// Unquantized, the stages feed every layer exactly what the forward pass feeds it,
    /// and hand every layer over once, in order.
    #[test]
    fn stages_see_what_the_forward_pass_feeds_each_layer() {
        let mut m = tiny();
        for l in m.linears() {
            l.start_calibration(&[Statistic::InputHessian]);
        }
        for w in windows() {
            let ids = Tensor::from_slice(&w, (1, w.len()), &Device::Cpu).unwrap();
            m.forward(&ids, &mut m.new_cache(), false).unwrap();
        }
        let mut want = std::collections::HashMap::new();
        for l in m.linears() {
            want.insert(l.name.clone(), l.take_calibration().unwrap().unwrap());
        }
        let mut rec = Recorder::default();
        m.calibrate_in_stages(&windows(), &mut rec).unwrap();
        let names: Vec<String> = m.linears().iter().map(|l| l.name.clone()).collect();
        assert_eq!(rec.order, names);
        assert_eq!(rec.seen.len(), 4 * m.blocks.len() + 1);
        for (group, c) in rec.seen {
            let got = c.finish().unwrap();
            let h = got.hessian.unwrap();
            let scale = h.iter().fold(0f64, |a, v| a.max(v.abs()));
            for name in group {
                let want = &want[&name];
                assert_eq!(want.rows, got.rows, "{name}");
                let want = want.hessian.as_ref().unwrap();
                let diff = h
                    .iter()
                    .zip(want.iter())
                    .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
                assert!(diff <= 1e-5 * scale, "{name}: {diff} of {scale}");
            }
        }
    }

    /// The tensor pass (what a GPU runs), forced on the CPU, feeds every stage what the
    /// host pass feeds it (the same arithmetic up to summation order and `exp`), in the
    /// same order.
    #[test]
    fn the_device_pass_matches_the_host_pass() {
        let mut host_rec = Recorder::default();
        tiny()
            .calibrate_in_stages(&windows(), &mut host_rec)
            .unwrap();
        let mut m = tiny();
        let mut dev_rec = Recorder::default();
        let last = m.blocks.len();
        m.calibrate_on_device(&windows(), &mut dev_rec, last, true)
            .unwrap();
        assert_eq!(dev_rec.order, host_rec.order);
        assert_eq!(dev_rec.seen.len(), host_rec.seen.len());
        for ((names, a), (names2, b)) in dev_rec.seen.into_iter().zip(host_rec.seen) {
            assert_eq!(names, names2);
            let (a, b) = (a.finish().unwrap(), b.finish().unwrap());
            assert_eq!(a.rows, b.rows);
            let (a, b) = (a.hessian.unwrap(), b.hessian.unwrap());
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5 * scale, "{names:?}: {diff} of {scale}");
        }
    }

    #[test]
    fn gptq_plans_convert_every_layer_in_stages() {
        let mut m = tiny();
        let plan: Plan = "lm_head=keep;*.mlp.down_proj=gptq:i4:sym:g32;*=w:i4:sym:g32"
            .parse()
            .unwrap();
        let layers = apply_plan_in_stages(&mut m, &plan, &windows(), |_| {
            panic!("a sequential plan does not calibrate in one pass")
        })
        .unwrap();
        assert_eq!(layers.len(), m.linears().len());
        for l in &layers {
            let want = plan.method_for(&l.name);
            if !want.is_keep() {
                assert_eq!(l.method, want, "{}", l.name);
            }
        }
        let ids = Tensor::from_slice(&[1u32, 2, 3], (1, 3), &Device::Cpu).unwrap();
        let y = m.forward(&ids, &mut m.new_cache(), false).unwrap();
        assert!(crate::quant::uniform::all_finite(&y).unwrap());
        // GPTQ on the output layer needs its inputs too: the last stage provides them.
        let mut m = tiny();
        let plan: Plan = "model.layers.0.*=gptq:i8:sym:ch0;lm_head=gptq:i4:sym:g32"
            .parse()
            .unwrap();
        apply_plan_in_stages(&mut m, &plan, &windows(), |_| Ok(())).unwrap();
        assert_eq!(m.lm_head.method.to_string(), "gptq:i4:sym:g32");
        assert!(apply_plan_in_stages(&mut tiny(), &plan, &[], |_| Ok(())).is_err());
    }
}
