//! Bad input to the model and data readers, as a user meets it through the binary: corrupt
//! or hostile GGUF, safetensors, SentencePiece, vocab.json, config.json, generation config
//! and IDX files, and absurd size flags. Every case asserts an exit code of 1 or 2 (never a
//! panic's 101 or a signal), an error naming the file, flag or key, and no file left behind.
//!
//! Every input is generated here (tests/synth): a working tiny llama GGUF, a MarianMT folder
//! from tests/fixtures/marian-tiny with a synthetic tokenizer, safetensors and IDX files, so
//! the corpus runs where no model is present. Cases on the real SmolLM2 GGUF are extra and
//! say when they are skipped.

#[path = "synth/mod.rs"]
mod synth;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use synth::Meta;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(dir: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quantlab"));
    cmd.args(args)
        .arg("--quiet")
        .current_dir(dir)
        .env("QUANTLAB_DATA", dir)
        .env_remove("QUANTLAB_MARIAN")
        .env_remove("QUANTLAB_LLM")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        use std::io::Write;
        // The command may exit before reading its input: a broken pipe is fine.
        let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every path under `dir`, sorted.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Runs a command that must fail cleanly: exit code 1 or 2, every needle in stderr, and
/// the folder exactly as it was.
fn expect_error(dir: &Path, args: &[&str], stdin: Option<&str>, needles: &[&str]) {
    let before = listing(dir);
    let r = run(dir, args, stdin);
    assert!(
        matches!(r.code, Some(1) | Some(2)),
        "{args:?}: exit code {:?} (1 or 2 expected)\nstderr: {}",
        r.code,
        r.stderr
    );
    assert!(
        !r.stderr.contains("panicked"),
        "{args:?} panicked: {}",
        r.stderr
    );
    for n in needles {
        assert!(
            r.stderr.contains(n),
            "{args:?}: {n:?} not in the error:\n{}",
            r.stderr
        );
    }
    assert_eq!(listing(dir), before, "{args:?} left files behind");
}

fn expect_ok(dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let r = run(dir, args, stdin);
    assert_eq!(r.code, Some(0), "{args:?} failed: {}", r.stderr);
    r.stdout
}

fn generate_args(model: &str) -> Vec<&str> {
    vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "ab a",
        "--max-new-tokens",
        "2",
    ]
}

#[test]
fn the_synthetic_models_work() {
    // Without this the error cases below could pass for the wrong reason.
    let dir = tempfile::tempdir().unwrap();
    synth::tiny_llama().write(&dir.path().join("m.gguf"));
    expect_ok(dir.path(), &generate_args("m.gguf"), None);
    synth::marian_dir(&dir.path().join("mt"));
    let out = expect_ok(
        dir.path(),
        &["translate", "--model", "mt"],
        Some("a b\nc\n"),
    );
    assert_eq!(out.lines().count(), 2, "{out}");
}

/// A tiny GGUF edited by `f`, run through `generate`.
fn gguf_case(f: impl FnOnce(&mut synth::Gguf), needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = synth::tiny_llama();
    f(&mut g);
    g.write(&dir.path().join("m.gguf"));
    let mut all = vec!["m.gguf"];
    all.extend_from_slice(needles);
    expect_error(dir.path(), &generate_args("m.gguf"), None, &all);
}

#[test]
fn gguf_versions_and_magic_are_named() {
    gguf_case(
        |g| g.version = 1,
        &["GGUF version 1 is not supported (2 and 3 are)"],
    );
    gguf_case(|g| g.version = 9, &["GGUF version 9 is not supported"]);
    gguf_case(|g| g.version = 3u32.swap_bytes(), &["big-endian"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.gguf"), b"PK\x03\x04 a zip, not a gguf").unwrap();
    expect_error(
        dir.path(),
        &generate_args("m.gguf"),
        None,
        &["m.gguf", "GGUF magic", "zip"],
    );
}

#[test]
fn gguf_tensor_offsets_and_sizes_are_checked_at_load() {
    gguf_case(
        |g| g.tensor_mut("blk.0.attn_q.weight").offset_override = Some(4),
        &["blk.0.attn_q.weight", "alignment"],
    );
    gguf_case(
        |g| g.tensor_mut("blk.0.ffn_up.weight").offset_override = Some(1 << 40),
        &["blk.0.ffn_up.weight", "past the end"],
    );
    gguf_case(
        |g| g.tensor_mut("blk.0.ffn_up.weight").offset_override = Some(0),
        &["overlap"],
    );
    gguf_case(
        |g| g.tensor_mut("token_embd.weight").dims = vec![1 << 40, 1 << 40],
        &["token_embd.weight", "2^40"],
    );
    gguf_case(
        |g| g.tensor_mut("output_norm.weight").ty = 26,
        &["output_norm.weight", "GGML type 26"],
    );
    gguf_case(
        |g| g.tensor_mut("output_norm.weight").dims = vec![8, 1, 1, 1, 1],
        &["output_norm.weight", "5 dimensions"],
    );
    gguf_case(
        |g| g.tensors.push(g.tensors[0].clone()),
        &["token_embd.weight", "twice"],
    );
    gguf_case(
        |g| {
            g.set("general.alignment", Meta::U32(0));
        },
        &["general.alignment"],
    );
}

#[test]
fn gguf_lengths_and_counts_beyond_the_file_are_refused_before_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let good = synth::tiny_llama().bytes();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // Tensor count, then metadata count, inflated.
        (splice(&good, 8, &u64::MAX.to_le_bytes()), "tensors"),
        (splice(&good, 16, &(1u64 << 40).to_le_bytes()), "metadata"),
        // The first key's length.
        (
            splice(&good, 24, &(1u64 << 62).to_le_bytes()),
            "metadata key #0",
        ),
        (good[..good.len() / 2].to_vec(), "m.gguf"),
        (good[..20].to_vec(), "truncated"),
    ];
    for (bytes, needle) in cases {
        std::fs::write(dir.path().join("m.gguf"), &bytes).unwrap();
        expect_error(
            dir.path(),
            &generate_args("m.gguf"),
            None,
            &["m.gguf", needle],
        );
    }
}

fn splice(b: &[u8], at: usize, with: &[u8]) -> Vec<u8> {
    let mut out = b.to_vec();
    out[at..at + with.len()].copy_from_slice(with);
    out
}

#[test]
fn gguf_metadata_that_cannot_describe_a_model_is_refused_with_its_key() {
    for key in [
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
    ] {
        gguf_case(
            |g| {
                g.set(key, Meta::U32(0));
            },
            &[key, "is 0"],
        );
    }
    gguf_case(
        |g| {
            g.set("llama.embedding_length", Meta::U64(1 << 40));
        },
        &["llama.embedding_length", "1099511627776"],
    );
    gguf_case(
        |g| {
            g.set("llama.context_length", Meta::U64(1 << 40));
        },
        &["llama.context_length"],
    );
    gguf_case(
        |g| {
            g.set("llama.attention.head_count", Meta::U32(3));
            g.set("llama.attention.head_count_kv", Meta::U32(3));
        },
        &["not divisible", "llama.attention.head_count"],
    );
    gguf_case(
        |g| {
            g.set(
                "llama.attention.layer_norm_rms_epsilon",
                Meta::F32(f32::NAN),
            );
        },
        &["llama.attention.layer_norm_rms_epsilon"],
    );
    gguf_case(
        |g| {
            g.set("llama.block_count", Meta::I32(-1));
        },
        &["llama.block_count", "non-negative"],
    );
    gguf_case(
        |g| {
            g.set("llama.vocab_size", Meta::U32(9));
        },
        &["embedding"],
    );
    gguf_case(
        |g| {
            g.set("tokenizer.ggml.tokens", Meta::Strs(vec![]));
        },
        &["tokenizer.ggml.tokens"],
    );
}

#[test]
fn gguf_special_ids_and_vocabulary_are_checked_at_load() {
    gguf_case(
        |g| {
            g.set("tokenizer.ggml.bos_token_id", Meta::U32(8));
        },
        &["tokenizer.ggml.bos_token_id", "is 8", "8 tokens"],
    );
    gguf_case(
        |g| {
            g.set("tokenizer.ggml.eos_token_id", Meta::U32(u32::MAX));
        },
        &["tokenizer.ggml.eos_token_id", "4294967295"],
    );
    gguf_case(
        |g| {
            g.set("tokenizer.ggml.padding_token_id", Meta::U32(100));
        },
        &["tokenizer.ggml.padding_token_id"],
    );
    gguf_case(
        |g| {
            let mut m: Vec<String> = synth::MERGES.iter().map(|s| s.to_string()).collect();
            m[1] = "a ndu".into();
            g.set("tokenizer.ggml.merges", Meta::Strs(m));
        },
        &["tokenizer.ggml.merges", "entry #1", "ndu"],
    );
    gguf_case(
        |g| {
            g.set("tokenizer.ggml.token_type", Meta::I32s(vec![1, 1]));
        },
        &["tokenizer.ggml.token_type"],
    );
}

#[test]
fn generation_past_the_context_is_refused_early() {
    let dir = tempfile::tempdir().unwrap();
    synth::tiny_llama().write(&dir.path().join("m.gguf"));
    let mut args = generate_args("m.gguf");
    args[6] = "1000";
    expect_error(
        dir.path(),
        &args,
        None,
        &["--max-new-tokens 1000", "context of 16"],
    );
}

#[cfg(unix)]
#[test]
fn broken_symlinks_are_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone.gguf"), dir.path().join("m.gguf")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone-dir"), dir.path().join("mt")).unwrap();
    expect_error(
        dir.path(),
        &generate_args("m.gguf"),
        None,
        &["m.gguf", "broken symbolic link", "gone.gguf"],
    );
    expect_error(
        dir.path(),
        &["translate", "--model", "mt"],
        Some("a\n"),
        &["broken symbolic link", "gone-dir"],
    );
}

#[test]
fn a_gguf_where_another_format_belongs_is_named() {
    let dir = tempfile::tempdir().unwrap();
    synth::tiny_llama().write(&dir.path().join("m.gguf"));
    expect_error(
        dir.path(),
        &["translate", "--model", "m.gguf"],
        Some("a\n"),
        &["m.gguf is a GGUF file", "MarianMT folder", "config.json"],
    );
    expect_error(
        dir.path(),
        &[
            "quantize",
            "--input",
            "m.gguf",
            "--tensor",
            "token_embd.weight",
            "--scheme",
            "i8:sym:ch0",
        ],
        None,
        &["m.gguf is a GGUF file", "--model"],
    );
}

#[test]
fn safetensors_dtypes_and_headers_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let four: Vec<u8> = synth::f32_bytes(4, 3);
    std::fs::write(
        p.join("t.safetensors"),
        synth::safetensors(&[("w", "I32", vec![2, 2], four.clone())]),
    )
    .unwrap();
    let q = |file: &str, tensor: &str| {
        vec![
            "quantize".to_string(),
            "--input".into(),
            file.into(),
            "--tensor".into(),
            tensor.into(),
            "--scheme".into(),
            "i8:sym:ch0".into(),
        ]
    };
    let args = q("t.safetensors", "w");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_error(p, &args, None, &["'w'", "I32", "not a float"]);
    let args = q("t.safetensors", "nope");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_error(p, &args, None, &["'nope'", "it has: w"]);

    let mut bad = synth::safetensors(&[("w", "F32", vec![2, 2], four)]);
    bad[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(p.join("h.safetensors"), bad).unwrap();
    let args = q("h.safetensors", "w");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_error(p, &args, None, &["h.safetensors"]);

    // A real checkpoint whose first F32 tensor is relabelled I32 (same size): refused by
    // name, never cast by value.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny");
    let model = p.join("llama");
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let st = std::fs::read(model.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(st[8..8 + n].to_vec()).unwrap();
    assert!(header.contains("\"F32\""), "{header}");
    let mut out = st[..8].to_vec();
    out.extend(header.replacen("\"F32\"", "\"I32\"", 1).into_bytes());
    out.extend(&st[8 + n..]);
    std::fs::write(model.join("model.safetensors"), out).unwrap();
    expect_error(
        p,
        &generate_args("llama"),
        None,
        &["I32", "not a float", "model.safetensors"],
    );
}

#[test]
fn sizes_from_flags_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let q = |shape: &str| {
        vec![
            "quantize".to_string(),
            "--randn".into(),
            shape.into(),
            "--scheme".into(),
            "i8:sym:ch0".into(),
        ]
    };
    for shape in [
        "18446744073709551615x2",
        "100000x100000x100000",
        "0x4",
        "4x",
    ] {
        let args = q(shape);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(p, &args, None, &["--randn"]);
    }
    // A group far larger than a row is the row (no padding to the group).
    let out = expect_ok(
        p,
        &[
            "quantize",
            "--randn",
            "4x6",
            "--scheme",
            "u4:affine:g4000000000",
            "--format",
            "csv",
        ],
        None,
    );
    assert!(out.contains("u4:affine:g4000000000"), "{out}");

    let mt = p.join("mt");
    synth::marian_dir(&mt);
    for (flag, value, needle) in [
        ("--num-beams", "100000", "100000 beams"),
        ("--num-beams", "0", "0 beams"),
        ("--max-new-tokens", "1000", "max_position_embeddings"),
        ("--batch-size", "18446744073709551615", "--batch-size"),
    ] {
        expect_error(
            p,
            &["translate", "--model", "mt", flag, value],
            Some("a\n"),
            &[flag, needle],
        );
    }
}

/// The synthetic Marian folder with `f` applied to it, run through `translate`.
fn marian_case(f: impl FnOnce(&Path), needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mt = dir.path().join("mt");
    synth::marian_dir(&mt);
    f(&mt);
    expect_error(
        dir.path(),
        &["translate", "--model", "mt"],
        Some("a b\n"),
        needles,
    );
}

#[test]
fn marian_configs_that_cannot_work_are_refused_with_key_and_file() {
    let cfg =
        |f: fn(&mut serde_json::Value)| move |d: &Path| synth::edit_json(&d.join("config.json"), f);
    marian_case(
        cfg(|v| v["encoder_layers"] = 0.into()),
        &["encoder_layers", "config.json", "is 0"],
    );
    marian_case(
        cfg(|v| {
            v.as_object_mut().unwrap().remove("d_model");
        }),
        &["d_model", "missing", "config.json"],
    );
    marian_case(
        cfg(|v| v["forced_eos_token_id"] = 40.into()),
        &[
            "forced_eos_token_id",
            "40",
            "config.json",
            "decoder_vocab_size 40",
        ],
    );
    marian_case(
        cfg(|v| v["decoder_start_token_id"] = 4_000_000_000u64.into()),
        &["decoder_start_token_id", "config.json"],
    );
    marian_case(
        cfg(|v| v["max_position_embeddings"] = (1u64 << 40).into()),
        &["max_position_embeddings", "config.json"],
    );
    marian_case(
        cfg(|v| v["d_model"] = "sixteen".into()),
        &["d_model", "config.json"],
    );
    let gen = |f: fn(&mut serde_json::Value)| {
        move |d: &Path| synth::edit_json(&d.join("generation_config.json"), f)
    };
    marian_case(
        gen(|v| v["num_beams"] = 0.into()),
        &["num_beams", "generation_config.json", "0 beams"],
    );
    marian_case(
        gen(|v| v["bad_words_ids"] = serde_json::json!([[40]])),
        &["bad_words_ids", "40", "generation_config.json"],
    );
    marian_case(
        gen(|v| v["max_length"] = 100000.into()),
        &["max_length", "generation_config.json"],
    );
    marian_case(
        gen(|v| v["eos_token_id"] = 99.into()),
        &["eos_token_id", "99", "generation_config.json"],
    );
}

#[test]
fn marian_tokenizer_files_that_are_corrupt_are_named() {
    marian_case(
        |d| {
            synth::edit_json(&d.join("vocab.json"), |v| v["▁a"] = 500.into());
        },
        &["vocab.json", "'▁a'", "500"],
    );
    marian_case(
        |d| std::fs::write(d.join("source.spm"), &synth::spm()[..7]).unwrap(),
        &["source.spm"],
    );
    marian_case(
        |d| std::fs::write(d.join("vocab.json"), b"[1, 2").unwrap(),
        &["vocab.json"],
    );
    marian_case(
        |d| std::fs::write(d.join("vocab.json"), b"{\"a\": -1}").unwrap(),
        &["vocab.json"],
    );
}

#[test]
fn idx_files_are_bounded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = dir.path().join("mnist");
    std::fs::create_dir(&mnist).unwrap();
    let labels = synth::idx(&[2], &[1, 2]);
    for f in ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"] {
        std::fs::write(mnist.join(f), &labels).unwrap();
    }
    let test_images = synth::idx(&[2, 28, 28], &[0; 2 * 784]);
    std::fs::write(mnist.join("t10k-images-idx3-ubyte"), &test_images).unwrap();
    for (bytes, needle) in [
        (
            synth::idx(&[u32::MAX, u32::MAX, u32::MAX], &[0; 16]),
            "declares shape",
        ),
        (synth::idx(&[2, 28, 28], &[0; 100]), "truncated"),
        (synth::idx(&[2, 28], &[0; 56]), "[n, 28, 28]"),
        (vec![0, 0, 8, 3, 0], "header"),
        (b"\x1f\x8b\x08\x00broken gzip".to_vec(), "gzip"),
    ] {
        std::fs::write(mnist.join("train-images-idx3-ubyte"), &bytes).unwrap();
        expect_error(
            dir.path(),
            &["lab", "mnist", "--data-dir", dir.path().to_str().unwrap()],
            None,
            &["train-images-idx3-ubyte", needle],
        );
    }
}

/// The real SmolLM2 GGUF with its block count zeroed and BOS id out of range (extra cases:
/// they need /work/main/models or QUANTLAB_LLM; the synthetic ones above always run).
#[test]
fn real_smollm2_gguf_with_edited_metadata() {
    let spec = std::env::var("QUANTLAB_LLM")
        .unwrap_or_else(|_| format!("{}/models/smollm2-135m", env!("CARGO_MANIFEST_DIR")));
    let file = std::fs::read_dir(&spec).ok().and_then(|d| {
        d.filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "gguf"))
    });
    let Some(file) = file else {
        eprintln!(
            "skipped: no SmolLM2 GGUF at {spec} (the synthetic GGUF cases cover every class)"
        );
        return;
    };
    let bytes = std::fs::read(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (key, needle) in [
        ("llama.block_count", "is 0"),
        ("tokenizer.ggml.bos_token_id", "outside the vocabulary"),
    ] {
        // The u32 value right after the key (type 4 = u32) is overwritten in place.
        let at = find(&bytes, key.as_bytes()).unwrap() + key.len();
        assert_eq!(
            &bytes[at..at + 4],
            &4u32.to_le_bytes(),
            "{key} is not a u32"
        );
        let value = if key == "llama.block_count" {
            0
        } else {
            u32::MAX
        };
        let edited = splice(&bytes, at + 4, &value.to_le_bytes());
        std::fs::write(dir.path().join("m.gguf"), edited).unwrap();
        expect_error(
            dir.path(),
            &generate_args("m.gguf"),
            None,
            &["m.gguf", key, needle],
        );
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
