//! Writing a [`Llama`] back to GGUF, so llama.cpp's own tools can load what a plan made of
//! GGML block types produced. Metadata (hyper-parameters, tokenizer) is copied from the
//! GGUF file the model was read from; tensors are written under their GGUF names: the
//! embedding table and norms as F32, each linear layer as its GGML blocks byte for byte
//! (or F32 when it is dense), `lm_head` as an explicit `output.weight`.
//!
//! The file is GGUF version 2 as written by candle's `gguf_file::write` (32-byte aligned
//! tensor data); llama.cpp reads versions 2 and 3, which differ only in byte order
//! detection.

use super::llama::{gguf_name, gguf_tensor_name, Llama, RopeLayout};
use crate::load::gguf::Gguf;
use crate::nn::format::{dense::Dense, ggml::ggml_name, ggml::Ggml};
use crate::nn::HasLinears;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use std::path::Path;
use std::sync::Arc;

/// Metadata key holding the plan that produced the file, one `layer=method` rule per layer
/// (a plan `quantlab` parses back): the same key as in quantlab's own checkpoints.
pub use crate::nn::checkpoint::PLAN_KEY;

/// Metadata keys of the source not copied: the file type is recomputed, and the alignment
/// is the writer's (32 bytes, GGUF's default, so the key is left out).
const DROPPED_KEYS: [&str; 2] = ["general.file_type", "general.alignment"];

/// Keys this writer sets (a source's own values are replaced).
const ADDED_KEYS: [&str; 2] = ["general.quantized_by", PLAN_KEY];

/// llama.cpp's `llama_ftype` for a file whose linear weights are mostly of type `t`, as
/// llama.cpp itself guesses it from the tensor types; `None` where it has no file type.
fn llama_ftype(t: GgmlDType) -> Option<u32> {
    Some(match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        GgmlDType::Q8_1 | GgmlDType::Q8K => return None,
    })
}

/// Where a tensor goes in the file: the embedding table, the blocks in order, then the
/// final norm and the output layer (llama.cpp finds tensors by name; the order is for
/// people reading a dump).
fn order_key(name: &str) -> (u8, usize) {
    if name.starts_with("token_embd.") {
        return (0, 0);
    }
    if let Some(rest) = name.strip_prefix("blk.") {
        let idx = rest.split('.').next().and_then(|i| i.parse().ok());
        return (1, idx.unwrap_or(usize::MAX));
    }
    if name.starts_with("output_norm.") {
        return (2, 0);
    }
    (3, 0)
}

/// An f32 tensor as a GGML F32 tensor (the values unchanged).
fn f32_tensor(t: &candle_core::Tensor) -> Result<QTensor> {
    Ok(QTensor::quantize(t, GgmlDType::F32)?)
}

/// Writes `model` as a GGUF file at `path`, with the metadata of `source` (the GGUF file
/// it was loaded from): every key/value copied except `general.file_type` (set from the
/// GGML type holding most linear-layer weights) and `general.alignment`, plus
/// `general.quantized_by` and [`PLAN_KEY`]. Every linear layer must be a GGML block type or
/// dense f32; the model's q/k weights must be in GGUF's interleaved rope layout. Written
/// through a temporary file in the same folder, then renamed. Returns the bytes written.
pub fn write_gguf(model: &Llama, source: &Gguf, path: &Path) -> Result<u64> {
    if model.rope_layout != RopeLayout::Interleaved {
        bail!(
            "cannot write GGUF: this model's q/k weights are in Hugging Face's half-split rope layout, \
             while llama.cpp reads GGUF q/k rows permuted for interleaved pairs (and this writer does not \
             permute them), so llama.cpp would rotate the wrong features; only a model loaded from a GGUF \
             file (or a quantlab checkpoint made from one) can be written as GGUF"
        );
    }
    let arch = source.string("general.architecture")?;
    if arch != "llama" {
        bail!(
            "cannot write GGUF: source {} has architecture '{arch}', only llama is written",
            source.path.display()
        );
    }
    let src_cfg = super::llama::LlamaConfig::from_gguf(source)?;
    let c = &model.cfg;
    let shape = |c: &super::llama::LlamaConfig| {
        [
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        ]
    };
    if shape(&src_cfg) != shape(c) {
        bail!(
            "cannot write GGUF: source {} describes another model (vocab, hidden, ffn, layers, heads, kv heads, head dim {:?}; this model {:?})",
            source.path.display(),
            shape(&src_cfg),
            shape(c)
        );
    }

    let mut tensors: Vec<(String, Arc<QTensor>)> = Vec::new();
    for (hf, t) in model.dense_tensors() {
        let name = gguf_tensor_name(&hf)?;
        tensors.push((name, Arc::new(f32_tensor(&t)?)));
    }
    // Parameters per GGML type over the linear layers, for the file type.
    let mut params: Vec<(GgmlDType, usize)> = Vec::new();
    let mut rules = Vec::new();
    for l in model.linears() {
        if l.bias.is_some() {
            bail!(
                "cannot write GGUF: layer {} has a bias, which this writer does not store",
                l.name
            );
        }
        let any = l.weight.as_any();
        let q = if let Some(g) = any.downcast_ref::<Ggml>() {
            let t = g.q.dtype();
            if matches!(t, GgmlDType::Q8K | GgmlDType::Q8_1) {
                bail!(
                    "cannot write GGUF: layer {} is {}, a type llama.cpp uses only for activations (it has no matrix kernel for {} weights); pick another GGML type",
                    l.name,
                    ggml_name(t),
                    ggml_name(t)
                );
            }
            g.q.clone()
        } else if let Some(d) = any.downcast_ref::<Dense>() {
            Arc::new(f32_tensor(&d.weight)?)
        } else {
            bail!(
                "cannot write layer {} to GGUF: it is stored as {} (format '{}'); only GGML block types and f32 can be written to GGUF; use --out DIR for {}",
                l.name,
                l.weight.describe(),
                l.weight.id(),
                l.weight.label()
            );
        };
        match params.iter_mut().find(|(t, _)| *t == q.dtype()) {
            Some((_, n)) => *n += l.num_params(),
            None => params.push((q.dtype(), l.num_params())),
        }
        rules.push(format!("{}={}", l.name, l.method));
        tensors.push((gguf_name(&l.name)?, q));
    }
    tensors.sort_by_key(|(n, _)| order_key(n));

    let mut metadata: Vec<(String, Value)> = source
        .content
        .metadata
        .iter()
        .filter(|(k, _)| !DROPPED_KEYS.contains(&k.as_str()) && !ADDED_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Keep the output stable: keys in name order (the source's own order is not kept by
    // the reader).
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    // The type holding most linear weights names the file (llama.cpp's "mostly Q8_0").
    let main_type = params
        .iter()
        .max_by_key(|(_, n)| *n)
        .map(|(t, _)| *t)
        .context("the model has no linear layers")?;
    if let Some(ft) = llama_ftype(main_type) {
        metadata.push(("general.file_type".into(), Value::U32(ft)));
    }
    metadata.push((
        "general.quantized_by".into(),
        Value::String("quantlab".into()),
    ));
    metadata.push((PLAN_KEY.into(), Value::String(rules.join(";"))));

    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_ref()))
        .collect();
    crate::quant::io::write_atomically_with(path, |w| {
        gguf_file::write(w, &meta_refs, &tensor_refs)
            .with_context(|| format!("writing GGUF {}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::llama::LoadAs;
    use crate::model::{gguf_path, load_llm, LoadedLlm};
    use crate::nn::{apply_plan, Plan};
    use candle_core::{Device, Tensor};
    use std::path::PathBuf;

    /// SmolLM2's GGUF (`scripts/fetch-smollm2.sh`; CI fetches it), or `QUANTLAB_LLM`.
    fn model_spec() -> String {
        let p = std::env::var("QUANTLAB_LLM")
            .unwrap_or_else(|_| format!("{}/models/smollm2-135m", env!("CARGO_MANIFEST_DIR")));
        assert!(
            PathBuf::from(&p).exists(),
            "SmolLM2 GGUF not found at {p}: run scripts/fetch-smollm2.sh (or set QUANTLAB_LLM)"
        );
        p
    }

    /// SmolLM2 dequantized to f32 with `plan` applied, and its source GGUF.
    fn planned(plan: &str) -> (LoadedLlm, Gguf) {
        let spec = model_spec();
        let mut llm = load_llm(&spec, LoadAs::F32, &Device::Cpu).unwrap();
        let plan: Plan = plan.parse().unwrap();
        apply_plan(&mut llm.model, &plan, |_| Ok(())).unwrap();
        let src = Gguf::open(&gguf_path(&spec).unwrap().unwrap()).unwrap();
        (llm, src)
    }

    /// The logits of a short passage, as bit patterns.
    fn logit_bits(llm: &LoadedLlm, text: &str) -> Vec<u32> {
        let ids = llm.tokenizer.encode(text).unwrap();
        assert!(ids.len() > 4, "{ids:?}");
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut cache = llm.model.new_cache();
        llm.model
            .forward(&ids, &mut cache, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    /// Writes `plan` applied to SmolLM2, reloads the file keeping its GGML types and checks
    /// the logits are bit-identical, every layer kept its type, and the metadata was copied.
    /// Returns the written file, opened.
    fn round_trip(plan: &str) -> Gguf {
        let (llm, src) = planned(plan);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("smollm2.gguf");
        let bytes = write_gguf(&llm.model, &src, &out).unwrap();
        assert_eq!(bytes, std::fs::metadata(&out).unwrap().len());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["smollm2.gguf"], "temporary file left behind");

        let back = load_llm(out.to_str().unwrap(), LoadAs::Ggml, &Device::Cpu).unwrap();
        for (a, b) in llm.model.linears().iter().zip(back.model.linears()) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.weight.label(), b.weight.label(), "{}", a.name);
        }
        let text = "The quick brown fox jumps over the lazy dog. Meanwhile, in 1912, the";
        assert!(
            logit_bits(&llm, text) == logit_bits(&back, text),
            "{plan}: logits of the reloaded GGUF differ from the in-memory model"
        );

        let g = Gguf::open(&out).unwrap();
        for (k, v) in &src.content.metadata {
            if DROPPED_KEYS.contains(&k.as_str()) || ADDED_KEYS.contains(&k.as_str()) {
                continue;
            }
            let w = g
                .content
                .metadata
                .get(k)
                .unwrap_or_else(|| panic!("{k} lost"));
            assert_eq!(format!("{v:?}"), format!("{w:?}"), "{k}");
        }
        assert_eq!(g.string("general.quantized_by").unwrap(), "quantlab");
        let stored: Plan = g.string(PLAN_KEY).unwrap().parse().unwrap();
        for l in llm.model.linears() {
            assert_eq!(stored.method_for(&l.name), l.method, "{}", l.name);
        }
        assert_eq!(
            g.content.tensor_infos["token_embd.weight"].ggml_dtype,
            GgmlDType::F32
        );
        assert!(g.has_tensor("output.weight"));
        assert_eq!(g.content.tensor_infos.len(), 2 + 30 * 9 + 1);
        g
    }

    #[test]
    fn q8_0_plan_round_trips_bit_exact() {
        let g = round_trip("*=q8_0");
        let t = &g.content.tensor_infos;
        for name in [
            "blk.0.attn_q.weight",
            "blk.29.ffn_down.weight",
            "output.weight",
        ] {
            assert_eq!(t[name].ggml_dtype, GgmlDType::Q8_0, "{name}");
        }
        assert_eq!(t["blk.3.attn_norm.weight"].ggml_dtype, GgmlDType::F32);
        assert_eq!(g.usize("general.file_type").unwrap(), 7); // MOSTLY_Q8_0
    }

    #[test]
    fn mixed_plan_round_trips_bit_exact() {
        let g = round_trip("model.layers.0.self_attn.q_proj=f32;*.mlp.*=q4_0;*=q8_0");
        let t = &g.content.tensor_infos;
        let types = [
            ("blk.0.attn_q.weight", GgmlDType::F32),
            ("blk.1.attn_q.weight", GgmlDType::Q8_0),
            ("blk.0.attn_k.weight", GgmlDType::Q8_0),
            ("blk.7.ffn_gate.weight", GgmlDType::Q4_0),
            ("blk.29.ffn_down.weight", GgmlDType::Q4_0),
            ("output.weight", GgmlDType::Q8_0),
        ];
        for (name, ty) in types {
            assert_eq!(t[name].ggml_dtype, ty, "{name}");
        }
        // The MLPs hold most linear weights: "mostly Q4_0".
        assert_eq!(g.usize("general.file_type").unwrap(), 2);
    }

    #[test]
    fn refuses_other_formats_activation_types_and_half_split_rope() {
        let (mut llm, src) = planned("model.layers.0.mlp.down_proj=w:i4:sym:g64");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.gguf");
        let e = format!("{:#}", write_gguf(&llm.model, &src, &out).unwrap_err());
        for part in [
            "model.layers.0.mlp.down_proj",
            "int4",
            "only GGML block types and f32 can be written to GGUF",
            "--out DIR",
        ] {
            assert!(e.contains(part), "{part:?} not in: {e}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let q8k: Plan = "model.layers.0.mlp.down_proj=q8_k".parse().unwrap();
        apply_plan(&mut llm.model, &q8k, |_| Ok(())).unwrap();
        let e = format!("{:#}", write_gguf(&llm.model, &src, &out).unwrap_err());
        assert!(
            e.contains("model.layers.0.mlp.down_proj") && e.contains("q8_k"),
            "{e}"
        );

        llm.model.rope_layout = RopeLayout::HalfSplit;
        let e = format!("{:#}", write_gguf(&llm.model, &src, &out).unwrap_err());
        assert!(e.contains("half-split") && e.contains("GGUF"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
