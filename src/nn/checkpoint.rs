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
/// Metadata key holding the plan that made a checkpoint (also written into GGUF files).
pub const PLAN_KEY: &str = "quantlab.plan";

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

/// The per-layer map of a source written by quantlab (its JSON, parsed once when the
/// file was opened); `None` for other checkpoints.
fn layer_map(
    src: &dyn TensorSource,
) -> Result<Option<&serde_json::Map<String, serde_json::Value>>> {
    let Some(meta) = src.metadata() else {
        return Ok(None);
    };
    if !meta.contains_key(LAYERS_KEY) {
        return Ok(None);
    }
    match meta.get(VERSION_KEY).map(String::as_str) {
        Some(VERSION) => {}
        other => bail!(
            "{}: quantized checkpoint layout version {other:?}, this build reads {VERSION:?}",
            src.origin()
        ),
    }
    match src.metadata_json(LAYERS_KEY).and_then(|v| v.as_object()) {
        Some(m) => Ok(Some(m)),
        None => bail!("{}: metadata '{LAYERS_KEY}' is corrupt", src.origin()),
    }
}

fn parse_layer(src: &dyn TensorSource, name: &str, v: &serde_json::Value) -> Result<StoredLayer> {
    serde_json::from_value(v.clone())
        .with_context(|| format!("{}: the record of layer '{name}' is corrupt", src.origin()))
}

/// Every layer record of a source written by quantlab; `None` for other checkpoints.
pub fn stored_layers(src: &dyn TensorSource) -> Result<Option<BTreeMap<String, StoredLayer>>> {
    let Some(map) = layer_map(src)? else {
        return Ok(None);
    };
    map.iter()
        .map(|(k, v)| Ok((k.clone(), parse_layer(src, k, v)?)))
        .collect::<Result<_>>()
        .map(Some)
}

/// Whether a quantlab checkpoint records layer `name`.
pub fn has_stored_layer(src: &dyn TensorSource, name: &str) -> Result<bool> {
    Ok(layer_map(src)?.is_some_and(|m| m.contains_key(name)))
}

/// The record of one layer, when the source is a quantlab checkpoint.
pub fn stored_layer(src: &dyn TensorSource, name: &str) -> Result<Option<StoredLayer>> {
    let Some(map) = layer_map(src)? else {
        return Ok(None);
    };
    match map.get(name) {
        Some(v) => parse_layer(src, name, v).map(Some),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{write_safetensors, NamedTensor, RawTensor, SafetensorsSource};
    use std::collections::HashMap;

    fn source(meta: &[(&str, &str)]) -> (tempfile::TempDir, SafetensorsSource) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let t = NamedTensor {
            name: "x".into(),
            tensor: RawTensor::f32s(&[1.0]),
        };
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        write_safetensors(&path, &[t], meta).unwrap();
        let src = SafetensorsSource::open(std::slice::from_ref(&path)).unwrap();
        (dir, src)
    }

    #[test]
    fn records_are_read_and_bad_ones_named() {
        let rec = r#"{"fc":{"format":"f32","shape":[1,1],"meta":null,"method":"f32"}}"#;
        let (_d, src) = source(&[(VERSION_KEY, VERSION), (LAYERS_KEY, rec)]);
        assert!(has_stored_layer(&src, "fc").unwrap());
        assert!(!has_stored_layer(&src, "other").unwrap());
        assert_eq!(stored_layer(&src, "fc").unwrap().unwrap().shape, (1, 1));
        let (_d, plain) = source(&[]);
        assert!(stored_layer(&plain, "fc").unwrap().is_none());
        let (_d, bad) = source(&[(VERSION_KEY, VERSION), (LAYERS_KEY, "{not json")]);
        let e = stored_layer(&bad, "fc").unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        let (_d, future) = source(&[(VERSION_KEY, "9"), (LAYERS_KEY, rec)]);
        let e = stored_layer(&future, "fc").unwrap_err().to_string();
        assert!(e.contains("version"), "{e}");
        let broken = r#"{"fc":{"format":"f32"}}"#;
        let (_d, b) = source(&[(VERSION_KEY, VERSION), (LAYERS_KEY, broken)]);
        let e = stored_layer(&b, "fc").unwrap_err().to_string();
        assert!(e.contains("'fc'") && e.contains("corrupt"), "{e}");
    }
}
