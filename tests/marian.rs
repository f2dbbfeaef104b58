//! MarianMT against independent references recorded by `scripts/marian_reference.py`
//! (transformers 5.17 + sentencepiece + sacrebleu on the GPU machine, float32, TF32 off):
//! MarianTokenizer ids on the real opus-mt vocabularies, the shared model's logits and
//! translations (greedy, beam 4), and sacrebleu scores.
//!
//! Needs `../shared/data` (or `QUANTLAB_DATA`) and the shared model
//! `../shared/models/marian-multi30k-en-de` (or `QUANTLAB_MARIAN`).

use quantlab::load::marian_tokenizer::{MarianTokenizer, Side};
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

fn reference() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        let p = format!(
            "{}/tests/fixtures/marian_reference.json.gz",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn data_dir() -> PathBuf {
    quantlab::data::DataDir::resolve(None)
        .expect("needs ../shared/data (or QUANTLAB_DATA)")
        .root
}

fn model_dir() -> PathBuf {
    quantlab::load::default_marian_dir().expect("the shared Marian model")
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// Compares our ids with MarianTokenizer's for every recorded text on one side.
fn check_side(tok: &MarianTokenizer, rec: &Value, side: Side, label: &str) -> usize {
    let texts = strings(&rec["text"]);
    let expected = rec["ids"].as_array().unwrap();
    let mut mismatches = Vec::new();
    for (t, e) in texts.iter().zip(expected) {
        let got = tok.encode(t, side);
        if got != ids_of(e) {
            mismatches.push(format!(
                "{t:?}\n  ours {:?}\n  hf   {:?}",
                tok.pieces(&got),
                tok.pieces(&ids_of(e))
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{label}: {} of {} differ:\n{}",
        mismatches.len(),
        texts.len(),
        mismatches.join("\n")
    );
    texts.len()
}

#[test]
fn tokenizer_ids_equal_marian_tokenizer_on_real_opus_mt_vocabularies() {
    let data = data_dir();
    for rec in reference()["tokenizers"].as_array().unwrap() {
        let name = rec["dir"].as_str().unwrap();
        let dir = if name == "model" {
            model_dir()
        } else {
            data.join("marian-vocab").join(name)
        };
        let tok = MarianTokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.eos_id as u64, rec["special"]["eos"].as_u64().unwrap());
        assert_eq!(tok.unk_id as u64, rec["special"]["unk"].as_u64().unwrap());
        assert_eq!(tok.pad_id as u64, rec["special"]["pad"].as_u64().unwrap());
        let n = check_side(&tok, &rec["source"], Side::Source, name);
        assert!(n >= 300, "{name}: only {n} source sentences recorded");
        check_side(&tok, &rec["target"], Side::Target, name);
        // Decoding the target ids gives MarianTokenizer's text back.
        let target = &rec["target"];
        for (ids, text) in target["ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(strings(&target["decoded"]))
        {
            assert_eq!(tok.decode(&ids_of(ids)), text, "{name}: decode");
        }
    }
}
