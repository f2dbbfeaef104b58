//! The lab's MNIST classifier: 784 → 256 → ReLU → 256 → ReLU → 10, layers `fc1..fc3`.

use crate::load::{write_safetensors, SafetensorsSource};
use crate::nn::{HasLinears, QLinear};
use crate::quant::io::write_atomically;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    pub model_type: String,
    pub input_size: usize,
    pub hidden_sizes: Vec<usize>,
    pub num_classes: usize,
}

impl Default for MlpConfig {
    fn default() -> Self {
        MlpConfig {
            model_type: "mlp".into(),
            input_size: 784,
            hidden_sizes: vec![256, 256],
            num_classes: 10,
        }
    }
}

impl MlpConfig {
    /// (in, out) of each layer, in order.
    pub fn layer_shapes(&self) -> Vec<(usize, usize)> {
        let mut sizes = vec![self.input_size];
        sizes.extend(&self.hidden_sizes);
        sizes.push(self.num_classes);
        sizes.windows(2).map(|w| (w[0], w[1])).collect()
    }

    pub fn validate(&self) -> Result<()> {
        if self.model_type != "mlp" {
            bail!("config model_type is '{}', expected 'mlp'", self.model_type);
        }
        if self.input_size == 0 || self.num_classes == 0 || self.hidden_sizes.contains(&0) {
            bail!("MLP config has a zero-sized layer: {self:?}");
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub config: MlpConfig,
    pub layers: Vec<QLinear>,
}

pub fn layer_name(i: usize) -> String {
    format!("fc{}", i + 1)
}

impl Mlp {
    /// Builds the model from named tensors (`fc1.weight`, `fc1.bias`, ...).
    pub fn from_tensors(config: MlpConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        config.validate()?;
        let mut layers = Vec::new();
        for (i, (fan_in, fan_out)) in config.layer_shapes().into_iter().enumerate() {
            let name = layer_name(i);
            let w = tensors
                .get(&format!("{name}.weight"))
                .with_context(|| format!("missing tensor {name}.weight"))?;
            if w.dims() != [fan_out, fan_in] {
                bail!(
                    "{name}.weight has shape {:?}; the config asks for [{fan_out}, {fan_in}]",
                    w.dims()
                );
            }
            let b = tensors.get(&format!("{name}.bias")).cloned();
            layers.push(QLinear::new(&name, w.clone(), b)?);
        }
        Ok(Mlp { config, layers })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// Pushes calibration images through the model in batches of 64 (the outputs are
    /// dropped; layers gathering statistics see every batch).
    pub fn calibrate(&self, images: &Tensor) -> Result<()> {
        let n = images.dim(0)?;
        let mut start = 0;
        while start < n {
            let len = 64.min(n - start);
            self.forward(&images.narrow(0, start, len)?)?;
            start += len;
        }
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        self.layers.iter().map(QLinear::num_params).sum()
    }

    /// Writes `model.safetensors` (the layers' stored tensors, quantized or not, with
    /// each layer's format in the metadata) and `config.json`. Returns the safetensors
    /// file's size in bytes.
    pub fn save(&self, dir: &Path) -> Result<u64> {
        let mut stored = Vec::new();
        for l in &self.layers {
            stored.extend(l.stored_tensors()?);
        }
        let linears: Vec<&QLinear> = self.layers.iter().collect();
        let mut meta: HashMap<String, String> = crate::nn::checkpoint::layers_metadata(&linears)?
            .into_iter()
            .collect();
        meta.insert("format".to_string(), "pt".to_string());
        let bytes = write_safetensors(&dir.join("model.safetensors"), &stored, meta)?;
        write_atomically(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&self.config)?.as_bytes(),
        )?;
        Ok(bytes)
    }

    /// Loads a checkpoint written by [`Mlp::save`] (quantized or not) or by PyTorch with
    /// the same names.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: MlpConfig = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{} is not a valid MLP config", cfg_path.display()))?;
        cfg.validate()?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            bail!("{} is missing", weights.display());
        }
        let mut src = SafetensorsSource::open(std::slice::from_ref(&weights))?;
        let mut layers = Vec::new();
        for (i, (fan_in, fan_out)) in cfg.layer_shapes().into_iter().enumerate() {
            let name = layer_name(i);
            let l = QLinear::load(&name, &mut src, false, device)?;
            if (l.out_features, l.in_features) != (fan_out, fan_in) {
                bail!(
                    "{name} in {} has shape [{}, {}]; the config asks for [{fan_out}, {fan_in}]",
                    weights.display(),
                    l.out_features,
                    l.in_features
                );
            }
            layers.push(l);
        }
        Ok(Mlp {
            config: cfg,
            layers,
        })
    }
}

impl HasLinears for Mlp {
    fn linears(&self) -> Vec<&QLinear> {
        self.layers.iter().collect()
    }

    fn linears_mut(&mut self) -> Vec<&mut QLinear> {
        self.layers.iter_mut().collect()
    }
}
