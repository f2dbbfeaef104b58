//! The two registries: plan spellings → algorithms, and checkpoint format ids → loaders.
//! A new algorithm or format is one file plus one line here.

use super::algo::{self, Algorithm};
use super::format::{self, StoredParts, WeightFormat};
use anyhow::{bail, Result};
use candle_core::Device;
use std::sync::Arc;

/// Tries to read a plan method; `None` when the spelling is not this algorithm's.
pub type ParseFn = fn(&str) -> Option<Result<Arc<dyn Algorithm>>>;

/// Plan method syntax (for help and errors) and parser, tried in order.
pub const ALGORITHMS: &[(&str, ParseFn)] = &[
    ("keep", algo::keep::parse),
    ("f32 | f16 | bf16", algo::cast::parse),
    ("dynamic-int8 | static-int8[:observer]", algo::int8::parse),
    ("w8a8:token | w8a8:tensor[:observer]", algo::w8a8::parse),
    ("llm.int8[:threshold]", algo::llm_int8::parse),
    ("w:<scheme> (e.g. w:i4:sym:g64)", algo::rtn::parse),
    (
        "gptq:<scheme>[:act-order][:damp=<f>][:block=<n>] (e.g. gptq:i4:sym:g64)",
        algo::gptq::parse,
    ),
    (
        "sq[:<alpha>]+<method> (SmoothQuant, e.g. sq:0.5+w8a8:token)",
        algo::smoothquant::parse,
    ),
    ("awq:<scheme>[:noscale][:noclip]", algo::awq::parse),
    (
        "rtn-signed-max:i<b>:g<size>|ch0 (llama.cpp's scale)",
        algo::rtn_signed_max::parse,
    ),
    (
        "rtn-clip:<scheme>[:x2] (error-clipped RTN, e.g. rtn-clip:i4:sym:g64)",
        algo::rtn_clip::parse,
    ),
    ("hqq:u<b>:g<size>|ch0 (e.g. hqq:u4:g64)", algo::hqq::parse),
    ("nf4|fp4[:b<block>][:dq]", algo::fourbit::parse),
    ("fp8[:channel|:tensor][:dyn] (E4M3)", algo::fp8::parse),
    (
        "a GGML type (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k)",
        algo::ggml::parse,
    ),
];

/// Reads the stored parts of one layer's weight.
pub type LoadFn = fn(
    (usize, usize),
    &serde_json::Value,
    &mut StoredParts,
    &Device,
) -> Result<Arc<dyn WeightFormat>>;

/// Format id (as written in checkpoint metadata) and loader.
pub const FORMATS: &[(&str, LoadFn)] = &[
    (format::dense::ID, format::dense::Dense::load),
    (format::half::ID, format::half::Half::load),
    (format::int8::ID, format::int8::Int8::load),
    (format::llm_int8::ID, format::llm_int8::LlmInt8::load),
    (format::grouped::ID, format::grouped::Grouped::load),
    (format::fourbit::ID, format::fourbit::FourBitWeight::load),
    (format::fp8::ID, format::fp8::Fp8::load),
    (format::ggml::ID, format::ggml::Ggml::load),
];

/// The algorithm a plan method names.
pub fn parse_algorithm(s: &str) -> Result<Arc<dyn Algorithm>> {
    let s = s.trim();
    for (_, parse) in ALGORITHMS {
        if let Some(r) = parse(s) {
            return r;
        }
    }
    bail!(
        "unknown quantization method '{s}': use {}",
        ALGORITHMS
            .iter()
            .map(|(syntax, _)| *syntax)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The loader of a stored format.
pub fn format_loader(id: &str) -> Result<LoadFn> {
    FORMATS
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown weight format '{id}' (this build reads {}): written by a newer quantlab?",
                FORMATS
                    .iter()
                    .map(|(i, _)| *i)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
