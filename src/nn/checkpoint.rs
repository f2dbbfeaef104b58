//! How quantized layers are recorded in a checkpoint: each layer's tensors under
//! `<layer>.<part>` and, in the safetensors metadata under [`LAYERS_KEY`], a JSON map from
//! layer name to its format id, shape, format parameters and the plan method that made it.

use super::QLinear;
use crate::load::TensorSource;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Metadata key of the per-layer map.
pub const LAYERS_KEY: &str = "quantlab.layers";
/// Metadata key of the checkpoint layout version.
pub const VERSION_KEY: &str = "quantlab.format_version";
pub const VERSION: &str = "1";

/// One layer's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredLayer {
    pub format: String,
    pub shape: (usize, usize),
    #[serde(default)]
    pub meta: serde_json::Value,
    pub method: String,
}

impl StoredLayer {
    pub fn of(l: &QLinear) -> Self {
        StoredLayer {
            format: l.weight.id().to_string(),
            shape: (l.out_features, l.in_features),
            meta: l.weight.meta(),
            method: l.method.to_string(),
        }
    }
}

/// The per-layer map of a source written by quantlab; `None` for other checkpoints.
pub fn stored_layers(src: &dyn TensorSource) -> Result<Option<BTreeMap<String, StoredLayer>>> {
    let Some(meta) = src.metadata() else {
        return Ok(None);
    };
    let Some(json) = meta.get(LAYERS_KEY) else {
        return Ok(None);
    };
    match meta.get(VERSION_KEY).map(String::as_str) {
        Some(VERSION) => {}
        other => bail!(
            "{}: quantized checkpoint layout version {other:?}, this build reads {VERSION:?}",
            src.origin()
        ),
    }
    let map = serde_json::from_str(json)
        .with_context(|| format!("{}: metadata '{LAYERS_KEY}' is corrupt", src.origin()))?;
    Ok(Some(map))
}

/// The record of one layer, when the source is a quantlab checkpoint.
pub fn stored_layer(src: &dyn TensorSource, name: &str) -> Result<Option<StoredLayer>> {
    let Some(map) = stored_layers(src)? else {
        return Ok(None);
    };
    match map.get(name) {
        Some(l) => Ok(Some(l.clone())),
        None => bail!(
            "{} is a quantized checkpoint without layer '{name}': it was written for another model",
            src.origin()
        ),
    }
}

/// The metadata entries describing `layers`.
pub fn layers_metadata(layers: &[&QLinear]) -> Result<Vec<(String, String)>> {
    let map: BTreeMap<&str, StoredLayer> = layers
        .iter()
        .map(|l| (l.name.as_str(), StoredLayer::of(l)))
        .collect();
    Ok(vec![
        (VERSION_KEY.to_string(), VERSION.to_string()),
        (LAYERS_KEY.to_string(), serde_json::to_string(&map)?),
    ])
}
