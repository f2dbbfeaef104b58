//! The binary as a user runs it: formats, and clear errors for bad input.

use std::process::Command;

fn quantlab(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ex0_json_is_one_object_per_row() {
    let (ok, out, err) = quantlab(&["lab", "ex0", "--format", "json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let params = rows.iter().find(|r| r["table"] == "ex0_params").unwrap();
    assert_eq!(params["zero_point"], 0);
    let codes: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r["table"] == "ex0_codes").collect();
    assert_eq!(codes.len(), 4);
    assert_eq!(codes[1]["c1"], 3.0);
}

#[test]
fn ex1_csv_has_the_handout_error() {
    let (ok, out, err) = quantlab(&["lab", "ex1", "--format", "csv"]);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("randn_4x4,handout"))
        .unwrap();
    assert!(line.contains("0.00631236"), "{line}");
}

#[test]
fn quantize_compares_schemes() {
    let (ok, out, err) = quantlab(&[
        "quantize",
        "--randn",
        "64x64",
        "--scheme",
        "i8:sym:ch0",
        "nf4:dq",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 3);
}

#[test]
fn bad_input_gives_clear_errors_not_panics() {
    let (ok, _, err) = quantlab(&["quantize", "--scheme", "i9"]);
    assert!(
        !ok && err.contains("bit width") && !err.contains("panicked"),
        "{err}"
    );
    let (ok, _, err) = quantlab(&["lab", "ex1", "--data-dir", "/nonexistent/data"]);
    assert!(!ok && err.contains("/nonexistent/data"), "{err}");
    let (ok, _, err) = quantlab(&[
        "quantize",
        "--scheme",
        "i8",
        "--input",
        "/nonexistent.safetensors",
        "--tensor",
        "w",
    ]);
    assert!(
        !ok && err.contains("/nonexistent.safetensors") && !err.contains("panicked"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = quantlab(&["lab", "ex1", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!ok && err.contains("ex1_inputs.json"), "{err}");
    let (ok, _, err) = quantlab(&["lab", "mnist", "--observer", "nope", "--quiet"]);
    assert!(!ok && err.contains("observer"), "{err}");
}

#[test]
fn llm_commands_explain_bad_models_and_plans() {
    let (ok, _, err) = quantlab(&["perplexity", "--model", "/nonexistent/m.gguf"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/m.gguf"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let (ok, _, err) = quantlab(&["perplexity", "--model", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("bad.gguf") && err.contains("GGUF"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (ok, _, err) = quantlab(&["sweep", "--methods", "rtn", "--bits", "9"]);
    assert!(!ok);
    assert!(err.contains("9"), "{err}");
    let (ok, _, err) = quantlab(&["perplexity", "--strided", "1024"]);
    assert!(!ok);
    assert!(err.contains("MAX_LEN:STRIDE"), "{err}");
}
