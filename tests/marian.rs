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
    quantlab::model::default_marian_dir().expect("the shared Marian model")
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

fn model() -> &'static quantlab::arch::marian::Marian {
    static M: OnceLock<quantlab::arch::marian::Marian> = OnceLock::new();
    M.get_or_init(|| {
        quantlab::arch::marian::load_dir(&model_dir(), &candle_core::Device::Cpu).unwrap()
    })
}

fn tokenizer() -> &'static MarianTokenizer {
    static T: OnceLock<MarianTokenizer> = OnceLock::new();
    T.get_or_init(|| MarianTokenizer::from_dir(&model_dir()).unwrap())
}

fn multi30k(name: &str) -> Vec<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(data_dir().join("multi30k").join(name)).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    text.lines().map(str::to_string).collect()
}

#[test]
fn teacher_forced_log_probs_equal_transformers() {
    use candle_core::{Tensor, D};
    let m = model();
    for rec in reference()["forward"].as_array().unwrap() {
        let src = ids_of(&rec["src_ids"]);
        let idx = rec["index"].as_u64().unwrap() as usize;
        assert_eq!(
            tokenizer().encode(&multi30k("test_2016_flickr.en.gz")[idx], Side::Source),
            src
        );
        let dec = ids_of(&rec["decoder_ids"]);
        let dev = m.device();
        let ids = Tensor::from_vec(src.clone(), (1, src.len()), dev).unwrap();
        let mask = Tensor::ones((1, src.len()), candle_core::DType::U32, dev).unwrap();
        let (enc, src_mask) = m.encode(&ids, &mask).unwrap();
        let mut state = m.start_decoding(&enc, &src_mask).unwrap();
        let d = Tensor::from_vec(dec.clone(), (1, dec.len()), dev).unwrap();
        let logits = m.decode(&mut state, &d).unwrap().squeeze(0).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let expected: Vec<f64> = rec["chosen_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        // Beam search's log-softmax (polynomial exp into a flat buffer) as well as candle's.
        let vocab = logits.dim(1).unwrap();
        let flat = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut ours = vec![0f32; flat.len()];
        quantlab::nn::kernels::llm_f32::log_softmax_into(&flat, &mut ours, vocab);
        for (t, e) in expected.iter().enumerate() {
            let got = logp[t][dec[t + 1] as usize] as f64;
            assert!(
                (got - e).abs() < 2e-4,
                "sentence {idx} step {t}: {got} vs {e}"
            );
            let fast = ours[t * vocab + dec[t + 1] as usize] as f64;
            assert!(
                (fast - e).abs() < 2e-4 && (fast - got).abs() < 1e-5 * got.abs().max(1.0),
                "sentence {idx} step {t}: log_softmax_into {fast}, candle {got}, transformers {e}"
            );
        }
        let top = &rec["first_step_top10"];
        let first = logits.get(0).unwrap().to_vec1::<f32>().unwrap();
        for (id, l) in ids_of(&top["ids"])
            .iter()
            .zip(top["logits"].as_array().unwrap())
        {
            let l = l.as_f64().unwrap();
            assert!((first[*id as usize] as f64 - l).abs() < 1e-3 * l.abs().max(1.0));
        }
    }
}

/// Our translations of test_2016_flickr against transformers' for one decoding setting.
fn check_translations(run: &str, cfg: quantlab::eval::seq2seq::GenerateConfig) {
    let rec = &reference()["translations"][run];
    let expected = strings(&rec["text"]);
    let src: Vec<String> = multi30k("test_2016_flickr.en.gz")[..expected.len()].to_vec();
    let got =
        quantlab::eval::seq2seq::translate(model(), tokenizer(), &src, &cfg, 32, false).unwrap();
    let same = got
        .iter()
        .zip(&expected)
        .filter(|(g, e)| g.text == **e)
        .count();
    let differ: Vec<String> = got
        .iter()
        .zip(&expected)
        .filter(|(g, e)| g.text != **e)
        .take(5)
        .map(|(g, e)| format!("ours {:?}\n  hf {:?}", g.text, e))
        .collect();
    eprintln!("{run}: {same}/{} identical", expected.len());
    assert!(
        same * 100 >= expected.len() * 99,
        "{run}: only {same} of {} translations equal transformers':\n{}",
        expected.len(),
        differ.join("\n")
    );
    if let Some(scores) = rec["sequences_scores"].as_array().filter(|s| !s.is_empty()) {
        for ((g, e), s) in got.iter().zip(&expected).zip(scores) {
            if g.text == *e {
                let s = s.as_f64().unwrap();
                assert!(
                    (g.score as f64 - s).abs() < 1e-3,
                    "{run}: score {} vs {s}",
                    g.score
                );
            }
        }
    }
}

fn generation_defaults() -> quantlab::eval::seq2seq::GenerateConfig {
    quantlab::eval::seq2seq::GenerateConfig::for_model(&model_dir(), &model().cfg)
        .unwrap()
        .with_max_new_tokens(128)
}

#[test]
fn greedy_translations_equal_transformers() {
    let mut cfg = generation_defaults();
    cfg.num_beams = 1;
    check_translations("greedy", cfg);
}

#[test]
fn beam4_translations_equal_transformers() {
    let cfg = generation_defaults();
    assert_eq!(cfg.num_beams, 4, "generation_config.json sets num_beams 4");
    check_translations("beam4", cfg);
}

#[test]
fn beam4_early_stopping_and_length_penalty_equal_transformers() {
    use quantlab::eval::seq2seq::EarlyStopping;
    let mut cfg = generation_defaults();
    cfg.early_stopping = EarlyStopping::True;
    check_translations("beam4_early", cfg);
    let mut cfg = generation_defaults();
    cfg.length_penalty = 0.6;
    check_translations("beam4_lp06", cfg);
}

#[test]
fn bleu_and_chrf_equal_sacrebleu() {
    use quantlab::eval::bleu::{
        corpus_bleu, corpus_chrf, tokenize_13a, BLEU_SIGNATURE, CHRF_SIGNATURE,
    };
    let sb = &reference()["sacrebleu"];
    for p in sb["tok13a"].as_array().unwrap() {
        assert_eq!(
            tokenize_13a(p["text"].as_str().unwrap()),
            p["tokens"].as_str().unwrap(),
            "13a of {:?}",
            p["text"]
        );
    }
    let close = |a: f64, b: &Value, what: &str| {
        let b = b.as_f64().unwrap();
        assert!((a - b).abs() < 1e-9, "{what}: {a} vs sacrebleu {b}");
    };
    for case in sb["single"]
        .as_array()
        .unwrap()
        .iter()
        .chain(sb["edge"].as_array().unwrap())
    {
        let h = vec![case["hyp"].as_str().unwrap().to_string()];
        let r = vec![case["ref"].as_str().unwrap().to_string()];
        close(
            corpus_bleu(&h, &r).unwrap().score,
            &case["bleu"],
            &format!("BLEU {h:?}"),
        );
        close(
            corpus_chrf(&h, &r).unwrap(),
            &case["chrf"],
            &format!("chrF {h:?}"),
        );
    }
    let refs = multi30k("test_2016_flickr.de.gz");
    for (name, run) in reference()["translations"].as_object().unwrap() {
        let hyps = strings(&run["text"]);
        let s = &run["scores"];
        let b = corpus_bleu(&hyps, &refs[..hyps.len()]).unwrap();
        close(b.score, &s["bleu"], name);
        assert_eq!(b.to_string(), s["formatted"].as_str().unwrap());
        assert_eq!(b.sys_len as u64, s["sys_len"].as_u64().unwrap());
        assert_eq!(
            b.counts.to_vec(),
            ids_of(&s["counts"])
                .iter()
                .map(|&c| c as usize)
                .collect::<Vec<_>>()
        );
        close(
            corpus_chrf(&hyps, &refs[..hyps.len()]).unwrap(),
            &s["chrf"],
            name,
        );
        assert_eq!(s["signature"].as_str().unwrap(), BLEU_SIGNATURE);
        assert_eq!(s["chrf_signature"].as_str().unwrap(), CHRF_SIGNATURE);
    }
}

fn quantlab(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails early closes its stdin: a broken pipe here is expected then.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn translate_command_reads_stdin_and_matches_transformers() {
    let src = multi30k("test_2016_flickr.en.gz");
    let beam = strings(&reference()["translations"]["beam4"]["text"]);
    let greedy = strings(&reference()["translations"]["greedy"]["text"]);
    let input = src[..3].join("\n") + "\n";
    let m = model_dir();
    let (ok, out, err) = quantlab(&["translate", "--model", m.to_str().unwrap()], &input);
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), beam[..3].to_vec());
    let (ok, out, err) = quantlab(
        &[
            "translate",
            "--num-beams",
            "1",
            "--batch-size",
            "2",
            "--model",
            m.to_str().unwrap(),
        ],
        &input,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), greedy[..3].to_vec());
}

#[test]
fn eval_bleu_command_scores_and_writes_hypotheses() {
    let data = data_dir().join("multi30k");
    let out_dir = tempfile::tempdir().unwrap();
    let hyps = out_dir.path().join("hyps.txt");
    let (ok, out, err) = quantlab(
        &[
            "eval",
            "--task",
            "bleu",
            "--src",
            data.join("test_2016_flickr.en.gz").to_str().unwrap(),
            "--ref",
            data.join("test_2016_flickr.de.gz").to_str().unwrap(),
            "--limit",
            "40",
            "--num-beams",
            "1",
            "--hyps-out",
            hyps.to_str().unwrap(),
            "--format",
            "json",
        ],
        "",
    );
    assert!(ok, "{err}");
    let row: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    // transformers' greedy translations of the same 40 sentences, scored by our BLEU
    // (itself checked against sacrebleu above).
    let hf = strings(&reference()["translations"]["greedy"]["text"])[..40].to_vec();
    let refs = multi30k("test_2016_flickr.de.gz")[..40].to_vec();
    let expected = quantlab::eval::bleu::corpus_bleu(&hf, &refs).unwrap().score;
    assert!(
        (row["bleu"].as_f64().unwrap() - expected).abs() < 0.005,
        "{row}"
    );
    let written = std::fs::read_to_string(&hyps).unwrap();
    assert_eq!(written.lines().collect::<Vec<_>>(), hf);
}

#[test]
fn bad_translation_input_gives_clear_errors() {
    let data = data_dir().join("multi30k");
    let en = data.join("test_2016_flickr.en.gz");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let check = |args: &[&str], needle: &str| {
        let (ok, _, err) = quantlab(args, "");
        assert!(!ok, "{args:?} should fail");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    };
    let en_s = en.to_str().unwrap();
    let val_de = data.join("val.de.gz");
    check(
        &[
            "eval",
            "--task",
            "bleu",
            "--src",
            en_s,
            "--ref",
            val_de.to_str().unwrap(),
        ],
        "aligned",
    );
    check(
        &[
            "eval",
            "--task",
            "bleu",
            "--src",
            empty.to_str().unwrap(),
            "--ref",
            en_s,
        ],
        "empty",
    );
    check(
        &["translate", "--model", "/nonexistent/marian"],
        "/nonexistent/marian",
    );
    check(&["translate", "--plan", "*=w:i9"], "plan");
    check(&["translate", "--num-beams", "0"], "num-beams");

    // A model folder with a truncated shard, and one with a NaN weight.
    let m = model_dir();
    for (name, corrupt) in [("truncated", true), ("nan", false)] {
        let bad = dir.path().join(name);
        std::fs::create_dir(&bad).unwrap();
        for e in std::fs::read_dir(&m).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, bad.join(p.file_name().unwrap())).unwrap();
        }
        let shard = bad.join("model-00001-of-00003.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        let new = if corrupt {
            bytes[..bytes.len() / 2].to_vec()
        } else {
            nan_first_value(&bytes)
        };
        std::fs::write(&shard, new).unwrap();
        let (ok, _, err) = quantlab(&["translate", "--model", bad.to_str().unwrap()], "Hi.\n");
        assert!(!ok, "{name}: should fail");
        let needle = if corrupt { "safetensors" } else { "NaN" };
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{name}: {err}"
        );
    }
}

/// The same safetensors file with the first value of its first f32 tensor set to NaN.
fn nan_first_value(bytes: &[u8]) -> Vec<u8> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let (_, info) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, v)| *k != "__metadata__" && v["dtype"] == "F32")
        .unwrap();
    let start = 8 + header_len + info["data_offsets"][0].as_u64().unwrap() as usize;
    let mut out = bytes.to_vec();
    out[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    out
}

#[test]
fn real_opus_mt_configs_are_read_in_full() {
    use quantlab::arch::marian::{Activation, MarianConfig};
    use quantlab::eval::seq2seq::GenerateConfig;
    let vocab = data_dir().join("marian-vocab");
    let read = |name: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(vocab.join(name).join("config.json")).unwrap(),
        )
        .unwrap()
    };
    let big = MarianConfig::from_hf_json(&read("opus-mt-tc-big-fr-en")).unwrap();
    assert_eq!(
        (
            big.d_model,
            big.encoder_layers,
            big.decoder_heads,
            big.decoder_ffn_dim
        ),
        (1024, 6, 16, 4096)
    );
    assert_eq!(big.activation, Activation::Relu);
    assert_eq!((big.vocab_size, big.max_position_embeddings), (53017, 1024));
    assert_eq!(
        (big.eos_token_id, big.forced_eos_token_id),
        (43311, Some(43311))
    );
    let gen = GenerateConfig::for_model(&vocab.join("opus-mt-tc-big-fr-en"), &big).unwrap();
    assert_eq!((gen.num_beams, gen.max_length), (4, 512));
    assert_eq!(gen.bad_words_ids, vec![vec![53016]]);
    assert_eq!(
        (gen.decoder_start_token_id, gen.pad_token_id),
        (53016, 53016)
    );
    let mg = MarianConfig::from_hf_json(&read("opus-mt-en-mg")).unwrap();
    assert_eq!(
        (mg.d_model, mg.decoder_layers, mg.vocab_size),
        (512, 6, 54688)
    );
    assert_eq!(mg.activation, Activation::Swish);
    // No forced_eos_token_id in this older config: transformers' MarianConfig default (0).
    assert_eq!(mg.forced_eos_token_id, Some(0));
    let mut bad = read("opus-mt-en-mg");
    bad["d_model"] = 500.into();
    bad["encoder_attention_heads"] = 7.into();
    let err = MarianConfig::from_hf_json(&bad).unwrap_err().to_string();
    assert!(err.contains("divisible"), "{err}");
}

/// A tiny random model saved by `scripts/marian_tiny_reference.py` as `pytorch_model.bin`
/// (relu, separate encoder/decoder embeddings, stored lm_head, non-zero final_logits_bias).
#[test]
fn pytorch_checkpoint_with_separate_embeddings_matches_transformers() {
    use candle_core::{Device, Tensor};
    use quantlab::eval::seq2seq::{generate, GenerateConfig};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/marian-tiny");
    let rec: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let m = quantlab::arch::marian::load_dir(&dir, &Device::Cpu).unwrap();
    let rows = |v: &Value| -> Vec<Vec<u32>> { v.as_array().unwrap().iter().map(ids_of).collect() };
    let (src, mask, dec) = (rows(&rec["src"]), rows(&rec["mask"]), rows(&rec["dec"]));
    let t =
        |v: &[Vec<u32>]| Tensor::from_vec(v.concat(), (v.len(), v[0].len()), &Device::Cpu).unwrap();
    let (enc, src_mask) = m.encode(&t(&src), &t(&mask)).unwrap();
    let mut state = m.start_decoding(&enc, &src_mask).unwrap();
    let logits = m
        .decode(&mut state, &t(&dec))
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let expected = rec["logits"].as_array().unwrap();
    for (b, eb) in expected.iter().enumerate() {
        for (s, es) in eb.as_array().unwrap().iter().enumerate() {
            for (v, e) in es.as_array().unwrap().iter().enumerate() {
                let e = e.as_f64().unwrap();
                let got = logits[b][s][v] as f64;
                assert!(
                    (got - e).abs() < 1e-4,
                    "logit [{b}][{s}][{v}]: {got} vs {e}"
                );
            }
        }
    }
    // Generation (max 8 new tokens, forced EOS at the end), greedy and beam 3, on the
    // unpadded sources; transformers' sequences start with the decoder start token.
    let cfg = GenerateConfig::for_model(&dir, &m.cfg)
        .unwrap()
        .with_max_new_tokens(8);
    assert!(cfg.bad_words_ids.is_empty());
    let unpadded: Vec<Vec<u32>> = src
        .iter()
        .zip(&mask)
        .map(|(s, k)| {
            s.iter()
                .zip(k)
                .filter(|(_, &k)| k == 1)
                .map(|(&s, _)| s)
                .collect()
        })
        .collect();
    for (key, beams) in [("greedy", 1), ("beam3", 3)] {
        let mut c = cfg.clone();
        c.num_beams = beams;
        let got = generate(&m, &unpadded, &c).unwrap();
        for (g, e) in got.iter().zip(rows(&rec[key])) {
            assert_eq!(g.ids, e[1..].to_vec(), "{key}");
        }
    }
}

#[test]
fn static_int8_calibrates_on_source_sentences() {
    use quantlab::eval::mt::prepare;
    let spec = model_dir().display().to_string();
    let dev = candle_core::Device::Cpu;
    let err = prepare(&spec, Some("*=static-int8"), None, &dev)
        .err()
        .expect("static int8 without calibration must fail")
        .to_string();
    assert!(err.contains("calibration"), "{err}");
    let calib = multi30k("val.en.gz")[..16].to_vec();
    let p = prepare(&spec, Some("*.fc*=static-int8"), Some(&calib), &dev).unwrap();
    let quantized = p
        .layers
        .iter()
        .filter(|l| l.method.to_string().starts_with("static-int8"))
        .count();
    assert_eq!(quantized, 12, "fc1/fc2 of 3 encoder and 3 decoder layers");
    let mut cfg = p.generation.clone().with_max_new_tokens(128);
    cfg.num_beams = 1;
    let src = multi30k("test_2016_flickr.en.gz")[..20].to_vec();
    let ours =
        quantlab::eval::seq2seq::translate(&p.mt.model, &p.mt.tokenizer, &src, &cfg, 20, false)
            .unwrap();
    let hf = strings(&reference()["translations"]["greedy"]["text"]);
    let changed: Vec<usize> = (0..src.len()).filter(|&i| ours[i].text != hf[i]).collect();
    eprintln!(
        "static int8 on fc layers: {}/20 greedy translations unchanged; changed: {changed:?}",
        20 - changed.len()
    );
    // int8 activations on the feed-forward layers move a few words, not most sentences.
    // Measured: 18/20 unchanged; sentence 3 ("Personen" -> "Menschen") and sentence 11
    // (the tail of a degenerate output) differ. The result is deterministic: the same 18
    // (same texts) at RAYON_NUM_THREADS 1, 2, 4 and 7 and at translate batch sizes 1, 3,
    // 7, 16 and 20 (padding changes the f32 matmul shapes). The smallest top-1/top-2
    // log-prob gap along the 20 greedy paths is 0.0055 (sentence 17), far above f32
    // rounding differences, so the exact set is pinned: a change here is a real change
    // in the int8 path (kernels, activation rounding, calibration) and should be looked at.
    assert_eq!(
        changed,
        [3, 11],
        "greedy translations changed by static int8 (expected exactly sentences 3 and 11):\n{}",
        changed
            .iter()
            .map(|&i| format!("[{i}] ours {:?}\n     hf   {:?}", ours[i].text, hf[i]))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn beam4_with_the_configs_max_length_equals_transformers() {
    // generation_config.json's max_length 256: a few beams degenerate into repetitions and
    // run on past 128 tokens, exactly as in transformers.
    let cfg =
        quantlab::eval::seq2seq::GenerateConfig::for_model(&model_dir(), &model().cfg).unwrap();
    assert_eq!(cfg.max_length, 256);
    check_translations("beam4_maxlen256", cfg);
}

#[test]
fn eval_bleu_scores_existing_hypotheses_like_sacrebleu() {
    let run = &reference()["translations"]["beam4"];
    let dir = tempfile::tempdir().unwrap();
    let hyps = dir.path().join("hf_beam4.txt");
    std::fs::write(&hyps, strings(&run["text"]).join("\n") + "\n").unwrap();
    let refs = data_dir().join("multi30k/test_2016_flickr.de.gz");
    let args = [
        "eval",
        "--task",
        "bleu",
        "--hyps",
        hyps.to_str().unwrap(),
        "--ref",
        refs.to_str().unwrap(),
        "--format",
        "json",
    ];
    let (ok, out, err) = quantlab(&args, "");
    assert!(ok, "{err}");
    let row: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let sb = &run["scores"];
    assert!((row["bleu"].as_f64().unwrap() - sb["bleu"].as_f64().unwrap()).abs() < 1e-9);
    assert!((row["chrf"].as_f64().unwrap() - sb["chrf"].as_f64().unwrap()).abs() < 1e-9);
    let (ok, _, err) = quantlab(
        &[&args[..], &["--src", hyps.to_str().unwrap()]].concat(),
        "",
    );
    assert!(!ok && err.contains("--src"), "{err}");
}
