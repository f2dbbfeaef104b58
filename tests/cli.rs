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

/// `--format json` output: one object per line.
fn json_rows(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn ex0_json_is_one_object_per_row() {
    let (ok, out, err) = quantlab(&["lab", "ex0", "--format", "json"]);
    assert!(ok, "{err}");
    let rows = json_rows(&out);
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
    // the bad width, where it came from, and the range to pick from
    let (ok, _, err) = quantlab(&["sweep", "--methods", "rtn", "--bits", "9"]);
    assert!(!ok);
    assert!(
        err.contains("sweep configuration w:i9:sym:ch0")
            && err.contains("bit width 9 is out of range: use 1 to 8 bits"),
        "{err}"
    );
    // --shard I/N: clear errors before anything is read.
    for bad in ["0/4", "5/4", "a/b", "1/0"] {
        let (ok, _, err) = quantlab(&["sweep", "--shard", bad]);
        assert!(!ok);
        assert!(
            err.contains("--shard takes I/N") && err.contains(bad),
            "{err}"
        );
    }
    let (ok, _, err) = quantlab(&["sweep", "merge"]);
    assert!(!ok && err.contains("FILES"), "{err}");
    let (ok, _, err) = quantlab(&["perplexity", "--strided", "1024"]);
    assert!(!ok);
    assert!(err.contains("MAX_LEN:STRIDE"), "{err}");

    // Plans are parsed before any model is read; each error names the plan, the rule at
    // fault and what would be accepted instead.
    let tiny = tiny_llama();
    let plan_error = |plan: &str| {
        let (ok, out, err) = quantlab(&[
            "generate", "--model", &tiny, "--prompt", "hi", "--plan", plan,
        ]);
        assert!(!ok, "plan '{plan}' was accepted: {out}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(&format!("in --plan '{plan}'")), "{err}");
        err
    };
    // a rule with an unknown method
    let err = plan_error("lm_head=f32;*=int9");
    assert!(
        err.contains("in plan rule '*=int9'")
            && err.contains("unknown quantization method 'int9'")
            && err.contains("w:<scheme> (e.g. w:i4:sym:g64)"),
        "{err}"
    );
    // an empty plan, also when it is only separators
    for plan in ["", " ; ;"] {
        let err = plan_error(plan);
        assert!(
            err.contains("empty plan: give rules like '*.mlp.*=w:i8:sym:ch0;*=f32'"),
            "{err}"
        );
    }
    // a pattern with no method: alone it reads as a method, and fails as one
    let err = plan_error("*.mlp.*");
    assert!(
        err.contains("in plan rule '*.mlp.*'")
            && err.contains("unknown quantization method '*.mlp.*'"),
        "{err}"
    );
    let err = plan_error("*.mlp.*=");
    assert!(
        err.contains("in plan rule '*.mlp.*='") && err.contains("unknown quantization method ''"),
        "{err}"
    );
    // a method with no pattern
    let err = plan_error("=f32");
    assert!(
        err.contains("empty layer pattern in plan rule '=f32'"),
        "{err}"
    );
}

/// The tiny random Llama in tests/fixtures (loads in milliseconds).
fn tiny_llama() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama-tiny").to_string()
}

#[test]
fn plans_quantize_exactly_the_layers_they_name() {
    // tests/fixtures/llama-tiny: hidden 64, intermediate 128, 2 layers, 4 query heads and
    // 2 KV heads of 16, vocabulary 384, untied lm_head; 123 200 f32 parameters (492 800 B).
    // Per layer: q, o 64x64 and k, v 32x64 (12 288 weights, 192 rows); gate, up 128x64
    // and down 64x128 (24 576 weights, 320 rows). lm_head: 384x64 (24 576 weights).
    // w:i8:sym:ch0 stores 1 byte per weight plus an f32 scale per row, so bits per
    // weight over the quantized layers = 8 + 32 · rows / weights.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. the quick brown fox.",
    )
    .unwrap();
    let tiny = tiny_llama();
    let run = |plan: &str| -> serde_json::Value {
        let (ok, out, err) = quantlab(&[
            "perplexity",
            "--model",
            &tiny,
            "--text",
            text.to_str().unwrap(),
            "--ctx",
            "8",
            "--plan",
            plan,
            "--quiet",
            "--format",
            "json",
        ]);
        assert!(ok, "plan '{plan}': {err}");
        let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(row["plan"], plan);
        row
    };
    let check = |plan: &str, bpw: f64, mb: f64| {
        let row = run(plan);
        let (got_bpw, got_mb) = (
            row["bits_per_weight"].as_f64().unwrap(),
            row["weights_mb"].as_f64().unwrap(),
        );
        assert!(
            (got_bpw - bpw).abs() < 1e-9 && (got_mb - mb).abs() < 1e-9,
            "plan '{plan}': {got_bpw} bits/weight, {got_mb} MB; want {bpw}, {mb}"
        );
    };
    // a pattern-only rule: the two MLPs (49 152 weights, 640 rows) and nothing else
    check(
        "*.mlp.*=w:i8:sym:ch0",
        8.0 + 32.0 * 640.0 / 49152.0,
        (492_800.0 - 4.0 * 49152.0 + 49152.0 + 4.0 * 640.0) / 1e6,
    );
    // first match wins: the MLPs stay f32, attention and lm_head (49 152 weights, 768 rows)
    // take the catch-all
    check(
        "*.mlp.*=f32;*=w:i8:sym:ch0",
        8.0 + 32.0 * 768.0 / 49152.0,
        (492_800.0 - 4.0 * 49152.0 + 49152.0 + 4.0 * 768.0) / 1e6,
    );
    // no plan: every layer stays f32
    check("keep", 32.0, 0.4928);
}

/// The SmolLM2 GGUF fetched by scripts/fetch-smollm2.sh (CI fetches it first).
fn smollm2() -> String {
    std::env::var("QUANTLAB_LLM")
        .unwrap_or_else(|_| format!("{}/models/smollm2-135m", env!("CARGO_MANIFEST_DIR")))
}

fn perplexity_of(rows: &str) -> f64 {
    let row: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    row["perplexity"].as_f64().unwrap()
}

/// `quantize --out` as a GGUF file and as a folder: both load back through `--model` and
/// score exactly the perplexity of quantizing in memory; `inspect` reads both.
#[test]
fn quantized_files_score_as_the_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = smollm2();
    let text = dir.path().join("t.txt");
    let data = quantlab::data::DataDir::resolve(None).expect("../shared/data or QUANTLAB_DATA");
    let wiki = std::fs::read_to_string(data.root.join("wikitext-2/test.txt")).unwrap();
    std::fs::write(&text, &wiki[..20_000]).unwrap();
    let text = text.to_str().unwrap();
    let ppl = |extra: &[&str]| {
        let mut args = vec!["perplexity", "--text", text, "--max-chunks", "1", "--quiet"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--format", "json"]);
        let (ok, out, err) = quantlab(&args);
        assert!(ok, "{args:?}: {err}");
        perplexity_of(&out)
    };
    let plan = "*.mlp.*=q4_0;*=q8_0";
    let gguf = dir.path().join("q.gguf");
    let folder = dir.path().join("q");
    for out in [&gguf, &folder] {
        let (ok, _, err) = quantlab(&[
            "quantize",
            "--model",
            &model,
            "--plan",
            plan,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let (ok, listing, err) = quantlab(&["inspect", out.to_str().unwrap(), "--format", "json"]);
        assert!(ok, "{err}");
        assert!(
            listing.contains("q4_0") && listing.contains("q8_0"),
            "{listing}"
        );
    }
    let in_memory = ppl(&["--model", &model, "--plan", plan]);
    assert_eq!(
        ppl(&["--model", gguf.to_str().unwrap(), "--load-as", "ggml"]),
        in_memory
    );
    assert_eq!(ppl(&["--model", folder.to_str().unwrap()]), in_memory);
    // A GGUF needs GGML block types (or f32) throughout, and a GGUF source.
    let (ok, _, err) = quantlab(&[
        "quantize",
        "--model",
        &model,
        "--plan",
        "*=nf4",
        "--out",
        dir.path().join("bad.gguf").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("only GGML block types"), "{err}");
    assert!(!dir.path().join("bad.gguf").exists());
    let (ok, _, err) = quantlab(&[
        "quantize",
        "--model",
        folder.to_str().unwrap(),
        "--plan",
        "*=q8_0",
        "--out",
        dir.path().join("from-folder.gguf").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("read from a GGUF file"), "{err}");
}

/// One spelling per idea: `--quiet` anywhere, `--format` refused where no table is printed,
/// a missing value is `null` in JSON.
#[test]
fn flags_mean_the_same_everywhere() {
    let tiny = format!("{}/tests/fixtures/llama-tiny", env!("CARGO_MANIFEST_DIR"));
    let (ok, _, err) = quantlab(&[
        "generate",
        "--model",
        &tiny,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--format",
        "json",
    ]);
    assert!(!ok && err.contains("drop --format"), "{err}");
    let (ok, _, err) = quantlab(&["translate", "--format", "csv"]);
    assert!(!ok && err.contains("drop --format"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "a short text to score, twice over. ".repeat(40)).unwrap();
    let (ok, out, err) = quantlab(&[
        "--quiet",
        "perplexity",
        "--model",
        &tiny,
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "64",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(row["mean_kl"].is_null(), "{row}");
    assert!(row["perplexity"].as_f64().unwrap() > 1.0, "{row}");
}

#[test]
fn bench_measures_every_plan_beside_f32_and_refuses_what_it_cannot_measure() {
    let tiny = tiny_llama();
    let (ok, out, err) = quantlab(&[
        "--format",
        "json",
        "--quiet",
        "bench",
        "--model",
        &tiny,
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "2",
        "--plan",
        "*=q8_0",
        "--plan",
        "*=w:i4:sym:g32",
    ]);
    assert!(ok, "{err}");
    let rows = json_rows(&out);
    // baseline + 2 plans, pp16 and tg4 each, in that order
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["plan"].as_str().unwrap().to_string(),
                r["test"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = ["f32 (baseline)", "*=q8_0", "*=w:i4:sym:g32"]
        .iter()
        .flat_map(|p| ["pp16", "tg4"].map(|t| (p.to_string(), t.to_string())))
        .collect();
    assert_eq!(got, want);
    for r in &rows {
        let ts = r["t_s"].as_f64().unwrap();
        assert!(ts.is_finite() && ts > 0.0, "{r}");
        assert!(r["std"].as_f64().unwrap() >= 0.0);
        // the best repetition is at least the mean
        assert!(r["best_t_s"].as_f64().unwrap() >= ts * (1.0 - 1e-9), "{r}");
        assert!(r["threads"].as_i64().unwrap() >= 1);
        assert!(r["backend"].as_str().unwrap().starts_with("cpu "));
        // the ratio is this row's t/s over the baseline row of the same test
        let base = rows
            .iter()
            .find(|b| b["plan"] == "f32 (baseline)" && b["test"] == r["test"])
            .unwrap();
        let want = ts / base["t_s"].as_f64().unwrap();
        assert!((r["ratio_vs_f32"].as_f64().unwrap() - want).abs() < 1e-9 * want);
    }
    assert_eq!(rows[2]["weights"], "q8_0 (8.50 bpw)");
    assert!(rows[4]["size_mib"].as_f64().unwrap() < rows[0]["size_mib"].as_f64().unwrap());

    // --no-baseline: the plans alone, no ratio.
    let (ok, out, err) = quantlab(&[
        "--format",
        "json",
        "--quiet",
        "bench",
        "--model",
        &tiny,
        "-p",
        "0",
        "-n",
        "2",
        "-r",
        "1",
        "--no-baseline",
        "--plan",
        "*=q8_0",
    ]);
    assert!(ok, "{err}");
    let rows = json_rows(&out);
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["plan"], "*=q8_0");
    assert!(rows[0]["ratio_vs_f32"].is_null(), "{out}");

    for (args, needle) in [
        (vec!["--no-baseline"], "--no-baseline with no --plan"),
        (vec!["-p", "0", "-n", "0"], "nothing to measure"),
        (vec!["-p", "300"], "exceed the model's context of 256"),
        (vec!["-r", "0"], "--reps must be at least 1"),
        (vec!["--plan", "*=w:i9"], "in --plan '*=w:i9'"),
    ] {
        let mut all = vec!["bench", "--model", &tiny];
        all.extend(args);
        let (ok, _, err) = quantlab(&all);
        assert!(!ok && err.contains(needle), "{all:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `lab bnb` end to end on the tiny Llama: every row of the study, each with its plan, and
/// LLM.int8's outlier table with one row per block.
#[test]
fn lab_bnb_runs_every_row_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog, and the dog sleeps on. ".repeat(20),
    )
    .unwrap();
    let tiny = tiny_llama();
    let t = text.to_str().unwrap();
    let (ok, out, err) = quantlab(&[
        "--quiet",
        "--format",
        "json",
        "lab",
        "bnb",
        "--model",
        &tiny,
        "--text",
        t,
        "--ctx",
        "16",
        "--max-chunks",
        "3",
        "--calibration",
        t,
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "8",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "3",
        "--reps",
        "1",
    ]);
    assert!(ok, "{err}");
    let rows = json_rows(&out);
    let main: Vec<&serde_json::Value> = rows.iter().filter(|r| r["table"] == "bnb").collect();
    let plans: Vec<&str> = main.iter().map(|r| r["plan"].as_str().unwrap()).collect();
    assert_eq!(
        plans,
        quantlab::lab::bnb::ROWS.map(|(_, p)| p).to_vec(),
        "{out}"
    );
    assert_eq!(main[0]["ppl_vs_f32"].as_f64(), Some(0.0));
    for r in &main {
        let ppl = r["perplexity"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{r}");
    }
    // 4-bit rows are smaller than 8-bit ones, which are smaller than f32.
    let mb = |i: usize| main[i]["weights_mb"].as_f64().unwrap();
    assert!(mb(3) < mb(1) && mb(1) < mb(0), "{out}");
    let outliers: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["table"] == "bnb_outliers")
        .collect();
    assert_eq!(outliers.len(), 2, "{out}");
    assert_eq!(outliers[0]["layer"], "model.layers.0");
}

#[test]
fn lab_gptq_runs_on_the_tiny_model_and_draws_its_plots() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    let line = "the quick brown fox jumps over the lazy dog and the cat sat on the mat while the bird sang in the tree by the river where the old man fished every day of the long warm summer";
    std::fs::write(&text, format!("{line} {line}\n{line} and {line} again\n")).unwrap();
    let plots = dir.path().join("plots");
    let (ok, out, err) = quantlab(&[
        "lab",
        "gptq",
        "--model",
        &tiny_llama(),
        "--text",
        text.to_str().unwrap(),
        "--calibration",
        text.to_str().unwrap(),
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "8",
        "--bits",
        "8,4",
        "--group",
        "32",
        "--last-word-examples",
        "2",
        "--decode-tokens",
        "2",
        "--plot-dir",
        plots.to_str().unwrap(),
        "--quiet",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let rows = json_rows(&out);
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        [
            "f32",
            "rtn int8 g32",
            "gptq int8 g32",
            "rtn int4 g32",
            "gptq int4 g32"
        ]
    );
    assert_eq!(rows[4]["plan"], "lm_head=keep;*=gptq:i4:sym:g32");
    for name in ["gptq_accuracy.svg", "gptq_speed.svg"] {
        let svg = std::fs::read_to_string(plots.join(name)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("gptq"), "{name}");
    }
}
