//! `quantize --model M --plan P --out DIR` (a quantized checkpoint of any model kind) and
//! `inspect PATH` (layers, formats and sizes of a GGUF, safetensors or quantized folder).

use super::llm::{CalibrationArgs, LoadAsArg};
use crate::arch::llama::ROPE_LAYOUT_KEY;
use crate::eval::prepare::{prepare, Prepared};
use crate::model::save::{side_files, write_dir, Checkpoint};
use crate::model::{self, Kind};
use crate::nn::{HasLinears, LayerSummary, QLinear};
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ModelQuantizeArgs {
    /// GGUF weights: dequantized to f32 first (the reference) or kept in their GGML types.
    #[arg(long, value_enum, default_value_t = LoadAsArg::F32)]
    pub load_as: LoadAsArg,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
}

const LLM_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
const MARIAN_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "source.spm",
    "target.spm",
    "vocab.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Quantizes a whole model by a plan and writes it as a checkpoint directory (or, for
/// `FILE.gguf`, a GGUF file).
pub fn quantize_model(
    spec: &str,
    plan: &str,
    out: &Path,
    a: &ModelQuantizeArgs,
    data: Option<&Path>,
    device: &Device,
) -> Result<Report> {
    // write_dir refuses too; asking here saves quantizing a model only to be refused.
    if out.exists() {
        bail!(
            "{} already exists: remove it or choose another --out",
            out.display()
        );
    }
    crate::quant::io::check_target(out)?;
    let to_gguf = out.extension().is_some_and(|e| e == "gguf");
    if to_gguf && (model::kind_of(spec)? != Kind::Llm || model::gguf_path(spec)?.is_none()) {
        bail!(
            "--out {}: only a Llama-family model read from a GGUF file can be written as GGUF; give a folder name to write a quantlab checkpoint",
            out.display()
        );
    }
    let calibration = a.calibration.source(data);
    let prepared = prepare(spec, plan, a.load_as.into(), &calibration, device)?;
    let (ck, layers) = match &prepared {
        Prepared::Llm(p) => {
            let m = &p.llm.model;
            if to_gguf {
                let source = crate::load::gguf::Gguf::open(&p.llm.source)?;
                let bytes = crate::arch::llama_gguf::write_gguf(m, &source, out)?;
                return gguf_report(out, plan, &p.layers, bytes);
            }
            let (copy, write) = if p.llm.source.is_dir() {
                (side_files(&p.llm.source, &LLM_FILES), Vec::new())
            } else {
                // From a GGUF file: its config and tokenizer, rebuilt as Hugging Face files;
                // q/k stay in the GGUF's interleaved rope layout, which config.json records.
                let mut cfg = m.cfg.to_hf_json();
                cfg[ROPE_LAYOUT_KEY] = "interleaved".into();
                let mut w = p.llm.tokenizer.hf_files()?;
                w.push((
                    "config.json".into(),
                    serde_json::to_string_pretty(&cfg)?.into_bytes(),
                ));
                (Vec::new(), w)
            };
            let ck = Checkpoint {
                linears: m.linears(),
                dense: m.dense_tensors(),
                copy,
                write,
                plan: plan.into(),
                source: p.llm.source.display().to_string(),
            };
            (ck, &p.layers)
        }
        Prepared::Marian(p) => {
            let m = &p.mt.model;
            let tied = m.lm_head_is_tied();
            let ck = Checkpoint {
                // A still-tied f32 head is the decoder embedding table, already stored.
                linears: m
                    .linears()
                    .into_iter()
                    .filter(|l| !(tied && l.name == "lm_head"))
                    .collect(),
                dense: m.dense_tensors()?,
                copy: side_files(&p.mt.source, &MARIAN_FILES),
                write: Vec::new(),
                plan: plan.into(),
                source: p.mt.source.display().to_string(),
            };
            (ck, &p.layers)
        }
        Prepared::Mlp(p) => {
            let ck = Checkpoint {
                linears: p.model.linears(),
                dense: Vec::new(),
                copy: Vec::new(),
                write: vec![(
                    "config.json".into(),
                    serde_json::to_string_pretty(&p.model.config)?.into_bytes(),
                )],
                plan: plan.into(),
                source: p.source.display().to_string(),
            };
            (ck, &p.layers)
        }
    };
    let bytes = write_dir(out, &ck)?;
    let mut r = layers_report(&format!("Quantized checkpoint {}", out.display()), layers);
    r.tables[0].note(format!(
        "plan '{plan}'; model.safetensors {bytes} bytes; load it with --model {}",
        out.display()
    ));
    Ok(r)
}

fn gguf_report(out: &Path, plan: &str, layers: &[LayerSummary], bytes: u64) -> Result<Report> {
    let mut r = layers_report(&format!("GGUF file {}", out.display()), layers);
    r.tables[0].note(format!(
        "plan '{plan}'; {bytes} bytes; llama.cpp's tools load it (llama-perplexity -m {}), and so does quantlab (--model {} --load-as ggml)",
        out.display(),
        out.display()
    ));
    Ok(r)
}

fn layers_report(title: &str, layers: &[LayerSummary]) -> Report {
    let mut t = Table::new(
        "layers",
        title,
        &[
            "layer",
            "method",
            "format",
            "params",
            "bits per weight",
            "bytes",
            "rounding ties",
        ],
    );
    for l in layers {
        t.push(vec![
            l.name.clone().into(),
            l.method.to_string().into(),
            l.describe.clone().into(),
            l.params.into(),
            Cell::f(l.bits_per_weight(), 3),
            l.bytes.into(),
            l.ties.map_or(Cell::Missing, Cell::from),
        ]);
    }
    let params: usize = layers.iter().map(|l| l.params).sum();
    let bytes: usize = layers.iter().map(|l| l.bytes).sum();
    t.push(vec![
        "total (linear layers)".into(),
        Cell::Missing,
        Cell::Missing,
        params.into(),
        Cell::f(bytes as f64 * 8.0 / params.max(1) as f64, 3),
        bytes.into(),
        match layers.iter().filter_map(|l| l.ties).collect::<Vec<_>>() {
            v if v.is_empty() => Cell::Missing,
            v => v.iter().sum::<usize>().into(),
        },
    ]);
    if layers.iter().any(|l| l.ties.is_some()) {
        t.note("rounding ties: weights whose x / scale (+ zero point) was exactly a half integer when quantized, so their code hung on the rounding rule and the last bit of the quotient (PyTorch's symmetric scale max|x| / (2^(b-1) - 0.5) puts each group's largest weight there).");
    }
    Report {
        tables: vec![t],
        notes: vec![],
    }
}

/// `quantlab inspect PATH`.
pub fn inspect(path: &Path) -> Result<Report> {
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    if path.extension().is_some_and(|e| e == "gguf") {
        return inspect_gguf(path);
    }
    let file: PathBuf = if path.is_dir() {
        let files = crate::load::safetensors_files(path)?;
        if files.len() != 1 {
            return inspect_tensors(&files);
        }
        files[0].clone()
    } else {
        path.to_path_buf()
    };
    let mut src = crate::load::SafetensorsSource::open(std::slice::from_ref(&file))?;
    let Some(stored) = crate::nn::checkpoint::stored_layers(&src)? else {
        return inspect_tensors(&[file]);
    };
    let mut layers = Vec::new();
    for name in stored.keys() {
        let l = QLinear::load(name, &mut src, false, &Device::Cpu)?;
        layers.push(LayerSummary::of(&l));
    }
    let mut r = layers_report(&format!("Layers of {}", file.display()), &layers);
    if let Some(plan) =
        crate::load::TensorSource::metadata(&src).and_then(|m| m.get(crate::model::save::PLAN_KEY))
    {
        r.tables[0].note(format!("plan: {plan}"));
    }
    Ok(r)
}

fn inspect_tensors(files: &[PathBuf]) -> Result<Report> {
    let mut t = Table::new(
        "tensors",
        &format!("Tensors of {}", files[0].display()),
        &["tensor", "shape", "dtype", "bits per weight", "bytes"],
    );
    let mut total = 0usize;
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a valid safetensors file", f.display()))?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        for n in names {
            let v = st.tensor(&n)?;
            let numel: usize = v.shape().iter().product();
            total += v.data().len();
            t.push(vec![
                n.into(),
                format!("{:?}", v.shape()).into(),
                format!("{:?}", v.dtype()).to_lowercase().into(),
                Cell::f(v.data().len() as f64 * 8.0 / numel.max(1) as f64, 3),
                v.data().len().into(),
            ]);
        }
    }
    t.note(format!(
        "{total} bytes of tensor data; no quantlab layer records in the metadata"
    ));
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}

fn inspect_gguf(path: &Path) -> Result<Report> {
    let g = crate::load::gguf::Gguf::open(path)?;
    let mut t = Table::new(
        "tensors",
        &format!("Tensors of {}", path.display()),
        &["tensor", "shape", "type", "bits per weight", "bytes"],
    );
    let mut infos: Vec<_> = g.content.tensor_infos.iter().collect();
    infos.sort_by(|a, b| a.0.cmp(b.0));
    for (name, info) in infos {
        let numel = info.shape.elem_count();
        let bytes = numel / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        t.push(vec![
            name.clone().into(),
            format!("{:?}", info.shape.dims()).into(),
            crate::nn::format::ggml::ggml_name(info.ggml_dtype).into(),
            Cell::f(bytes as f64 * 8.0 / numel.max(1) as f64, 3),
            bytes.into(),
        ]);
    }
    t.note(format!("{} bytes of tensor data", g.tensor_bytes()));
    Ok(Report {
        tables: vec![t],
        notes: vec![],
    })
}
