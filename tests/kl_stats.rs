//! KL statistics, run files, the paired bootstrap and base-file integrity, against the
//! float64 NumPy reference in `scripts/kl_stats_reference.py`.

use quantlab::eval::compare::{self, CompareOptions};
use quantlab::eval::kl::{self, BaseWriter};
use quantlab::eval::perplexity::Window;
use quantlab::eval::runfile::{self, RunHeader};
use quantlab::eval::stats::{self, ChunkTokens, Est};
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kl_stats_reference.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn chunks(v: &Value) -> Vec<ChunkTokens> {
    let f = |c: &Value, k: &str| -> Vec<f64> {
        c[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let (nll, nb, kl) = (f(c, "nll"), f(c, "nll_base"), f(c, "kl"));
            let top: Vec<bool> = c["same_top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_bool().unwrap())
                .collect();
            let mut t = ChunkTokens::default();
            for i in 0..nll.len() {
                t.push(nll[i], Some((nb[i], kl[i], top[i])));
            }
            t
        })
        .collect()
}

fn close(got: f64, want: f64, what: &str) {
    // Both sides are float64 over a few hundred values: only summation order differs.
    let tol = 1e-10 * want.abs().max(1e-3);
    assert!(
        (got - want).abs() <= tol,
        "{what}: {got} vs NumPy {want} (diff {})",
        (got - want).abs()
    );
}

fn pair(e: Est, want: &Value, what: &str) {
    close(e.value, want[0].as_f64().unwrap(), what);
    close(e.err, want[1].as_f64().unwrap(), &format!("{what} error"));
}

fn dist(d: &stats::Distribution, want: &Value, what: &str) {
    close(d.max, want["max"].as_f64().unwrap(), &format!("{what} max"));
    close(d.min, want["min"].as_f64().unwrap(), &format!("{what} min"));
    close(
        d.median,
        want["median"].as_f64().unwrap(),
        &format!("{what} median"),
    );
    let ps = want["percentiles"].as_array().unwrap();
    assert_eq!(d.percentiles.len(), ps.len());
    for ((f, v), w) in d.percentiles.iter().zip(ps) {
        assert_eq!(*f, w[0].as_f64().unwrap());
        close(*v, w[1].as_f64().unwrap(), &format!("{what} {f}"));
    }
}

#[test]
fn kl_statistics_match_numpy() {
    let fx = fixture();
    for run in ["a", "b"] {
        let c = chunks(&fx[format!("run_{run}")]);
        let s = stats::kl_summary(&c).unwrap().unwrap();
        let w = &fx[format!("summary_{run}")];
        assert_eq!(s.tokens as u64, w["tokens"].as_u64().unwrap());
        pair(s.ppl_q, &w["ppl_q"], "PPL(Q)");
        pair(s.ppl_base, &w["ppl_base"], "PPL(base)");
        close(s.cor, w["cor"].as_f64().unwrap(), "Cor");
        pair(s.ln_ratio, &w["ln_ratio"], "ln ratio");
        pair(s.ratio, &w["ratio"], "ratio");
        pair(s.diff, &w["diff"], "PPL diff");
        pair(s.kl, &w["kl"], "mean KL");
        dist(&s.kl_dist, &w["kl_dist"], "KL");
        close(
            s.kl_chunk_se,
            w["kl_chunk_se"].as_f64().unwrap(),
            "KL chunk SE",
        );
        pair(s.dp, &w["dp"], "mean dp");
        dist(&s.dp_dist, &w["dp_dist"], "dp");
        pair(s.dp_rms, &w["dp_rms"], "RMS dp");
        pair(s.same_top, &w["same_top"], "same top");
        let p = stats::ppl_summary(&c);
        close(
            p.mean_nll_chunk_se,
            w["nll_chunk_se"].as_f64().unwrap(),
            "NLL chunk SE",
        );
    }
}

#[test]
fn paired_bootstrap_matches_numpy_on_fixed_indices() {
    let fx = fixture();
    let (a, b) = (chunks(&fx["run_a"]), chunks(&fx["run_b"]));
    let bs = &fx["bootstrap"];
    let indices: Vec<Vec<usize>> = bs["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    let conf = bs["confidence"].as_f64().unwrap();
    let counts: Vec<usize> = a.iter().map(|c| c.len()).collect();
    let sum = |c: &[ChunkTokens], kl: bool| -> Vec<f64> {
        c.iter()
            .map(|x| {
                if kl {
                    x.kl.iter().sum()
                } else {
                    x.nll.iter().sum()
                }
            })
            .collect()
    };
    let cases: [(&str, compare::Stat, bool); 3] = [
        ("ppl", compare::exp_mean_stat, false),
        ("nll", compare::mean_stat, false),
        ("kl", compare::mean_stat, true),
    ];
    for (name, stat, kl) in cases {
        let d =
            compare::paired_bootstrap(&sum(&a, kl), &sum(&b, kl), &counts, stat, &indices, conf)
                .unwrap();
        let w = &bs[name];
        close(d.a, w["a"].as_f64().unwrap(), name);
        close(d.b, w["b"].as_f64().unwrap(), name);
        close(
            d.ci.0,
            w["ci"][0].as_f64().unwrap(),
            &format!("{name} CI low"),
        );
        close(
            d.ci.1,
            w["ci"][1].as_f64().unwrap(),
            &format!("{name} CI high"),
        );
        close(
            d.share_negative,
            w["share_negative"].as_f64().unwrap(),
            &format!("{name} share"),
        );
    }
}

/// Over many simulated experiments with a known true difference, the 90% chunk bootstrap
/// interval should contain it roughly 90% of the time (seeded, so deterministic).
#[test]
fn chunk_bootstrap_covers_the_true_difference() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (experiments, chunks, per_chunk) = (200, 30, 20);
    let mut covered = 0;
    for e in 0..experiments {
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        for _ in 0..chunks {
            // A chunk effect shared by the tokens of a chunk (correlation within chunks)
            // and per run; the true mean difference is 0.1.
            let shared: f64 = rng.gen_range(-1.0..1.0);
            let own: f64 = rng.gen_range(-0.3..0.3);
            let (mut a, mut b) = (0.0, 0.0);
            for _ in 0..per_chunk {
                a += 3.0 + shared + rng.gen_range(-0.5..0.5);
                b += 3.1 + shared + own + rng.gen_range(-0.5..0.5);
            }
            sa.push(a);
            sb.push(b);
        }
        let counts = vec![per_chunk; chunks];
        let idx = compare::bootstrap_indices(chunks, 400, e as u64);
        let d =
            compare::paired_bootstrap(&sa, &sb, &counts, compare::mean_stat, &idx, 0.9).unwrap();
        covered += (d.ci.0 <= 0.1 && 0.1 <= d.ci.1) as usize;
    }
    let rate = covered as f64 / experiments as f64;
    // Percentile intervals from 30 chunks undercover a little; 0.80..0.97 holds with
    // margin (binomial sd at 200 experiments is ~0.02).
    assert!((0.80..=0.97).contains(&rate), "coverage {rate}");
}

fn header(chunks: usize, tokens: usize) -> RunHeader {
    RunHeader {
        format: runfile::FORMAT.into(),
        quantlab_version: "test".into(),
        model: "m".into(),
        plan: "keep".into(),
        text: "t.txt".into(),
        text_hash: "abc".into(),
        tokens_hash: 1,
        protocol: "llama.cpp chunks of 8".into(),
        ctx: 8,
        bos: false,
        tokenizer: "smollm".into(),
        kl_base: Some("base".into()),
        kl_base_id: Some("id".into()),
        chunks,
        tokens,
        stopped_early: None,
    }
}

#[test]
fn compare_refuses_runs_on_other_tokens_and_reports_differences() {
    let fx = fixture();
    let (a, b) = (chunks(&fx["run_a"]), chunks(&fx["run_b"]));
    let n: usize = a.iter().map(|c| c.len()).sum();
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    runfile::write(&pa, &header(a.len(), n), &a).unwrap();
    let mut hb = header(b.len(), n);
    hb.plan = "*=q4_0".into();
    runfile::write(&pb, &hb, &b).unwrap();
    let opts = CompareOptions {
        resamples: 200,
        confidence: 0.95,
        seed: 1,
    };
    let report = quantlab::eval::measure::compare_files(&pa, &pb, &opts).unwrap();
    let md = report.render(quantlab::report::Format::Table);
    assert!(md.contains("mean KL to base"), "{md}");
    assert!(md.contains("perplexity"), "{md}");
    // Another protocol and another text: refused, naming both.
    hb.protocol = "HF strided".into();
    hb.text_hash = "def".into();
    runfile::write(&pb, &hb, &b).unwrap();
    let e = quantlab::eval::measure::compare_files(&pa, &pb, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("protocol") && e.contains("text hash"), "{e}");
}

fn log_softmax(x: &[f64]) -> Vec<f32> {
    let m = x.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = x.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|v| (v - z) as f32).collect()
}

#[test]
fn base_files_store_the_target_and_refuse_damage_and_old_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let mut w = BaseWriter::new(2);
    let rows = [
        log_softmax(&[1.0, 2.0, 3.0, 0.5]),
        log_softmax(&[0.0, 4.0, 1.0, 0.0]),
    ];
    let lp =
        candle_core::Tensor::from_vec(rows.concat(), (2, 4), &candle_core::Device::Cpu).unwrap();
    // Positions 0 and 1 predict tokens 3 and 0 (targets outside the top 2).
    let win = Window {
        tokens: vec![1, 3, 0],
        first_scored: 0,
    };
    w.add_window(&win, &lp).unwrap();
    w.write(&path, "m", "p", 4).unwrap();
    let (_, read) = kl::read_base(&path).unwrap();
    assert_eq!(read[0].target_lp, rows[0][3]);
    assert_eq!(read[1].target_lp, rows[1][0]);
    // One flipped payload byte: refused, naming the file and the fix.
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() - 20;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let e = kl::read_base(&path).unwrap_err().to_string();
    assert!(
        e.contains("base.kld") && e.contains("checksum") && e.contains("re-save"),
        "{e}"
    );
    // A format-1 file: refused with the same advice.
    let mut old = b"QLKLD001".to_vec();
    old.extend_from_slice(&[0; 16]);
    std::fs::write(&path, &old).unwrap();
    let e = kl::read_base(&path).unwrap_err().to_string();
    assert!(e.contains("format 1") && e.contains("re-save"), "{e}");
}

#[test]
fn until_ci_stops_only_after_enough_chunks_and_before_the_end() {
    use quantlab::eval::lm::{until_ci_reached, UNTIL_CI_MIN_CHUNKS};
    let chunk = |kl: f64| {
        let mut c = ChunkTokens::default();
        for _ in 0..4 {
            c.push(2.0, Some((2.0, kl, true)));
        }
        c
    };
    // Chunk means 0.1, 0.3, 0.1, 0.3, ...: chunk-level SE = sd/sqrt(C).
    let cs: Vec<ChunkTokens> = (0..20).map(|i| chunk(0.1 + 0.2 * (i % 2) as f64)).collect();
    let m = UNTIL_CI_MIN_CHUNKS;
    assert!(
        until_ci_reached(&cs[..m - 1], 10.0, 20).is_none(),
        "too few chunks"
    );
    assert!(
        until_ci_reached(&cs, 10.0, 20).is_none(),
        "the run is over anyway"
    );
    let why = until_ci_reached(&cs[..m], 10.0, 20).unwrap();
    assert!(
        why.contains("mean KL") && why.contains(&format!("{m} of 20")),
        "{why}"
    );
    // 8 chunks: sd of the means = 0.2·sqrt(8/7)/2, SE = sd/sqrt(8); half-width = 1.96 SE.
    let se = 0.1 * (8.0f64 / 7.0).sqrt() / 8.0f64.sqrt();
    let half = 1.959963984540054 * se;
    assert!(until_ci_reached(&cs[..m], half * 1.001, 20).is_some());
    assert!(until_ci_reached(&cs[..m], half * 0.999, 20).is_none());
}

fn quantlab(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_rows(out: &str, table: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["table"] == table)
        .collect()
}

/// The whole path on the tiny Llama: base, runs with KL statistics, compare, refusals,
/// protocols.
#[test]
fn cli_runs_compare_and_protocols_on_the_tiny_llama() {
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama-tiny");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let text = p("t.txt");
    let mut body = String::new();
    for i in 0..6 {
        body += &format!(
            " = Title {i} = \n the quick brown fox jumps over the lazy dog {i} times . \n"
        );
    }
    std::fs::write(&text, body.repeat(3)).unwrap();
    let common = ["--model", tiny, "--text", &text, "--ctx", "16", "--quiet"];
    let run = |extra: &[&str]| {
        let mut a = vec!["--format", "json", "perplexity"];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        quantlab(&a)
    };
    let (ok, _, err) = run(&["--save-logprobs", &p("base.kld"), "--kl-top-k", "0"]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["--kl-base", &p("base.kld"), "--save-run", &p("f32.jsonl")]);
    assert!(ok, "{err}");
    let kl = json_rows(&out, "kl_stats");
    assert_eq!(kl[0]["statistic"], "Mean KLD");
    assert!(kl[0]["value"].as_f64().unwrap().abs() < 1e-6, "{out}");
    let (ok, out, err) = run(&[
        "--plan",
        "*=q4_0",
        "--kl-base",
        &p("base.kld"),
        "--save-run",
        &p("q4.jsonl"),
    ]);
    assert!(ok, "{err}");
    let stats = json_rows(&out, "ppl_stats");
    assert!(stats.len() == 6, "{out}");
    assert!(json_rows(&out, "kl_stats")[0]["value"].as_f64().unwrap() > 1e-4);
    // Same tokens: compare works and finds the int4 model's KL larger.
    let (ok, out, err) = quantlab(&[
        "--format",
        "json",
        "compare",
        &p("f32.jsonl"),
        &p("q4.jsonl"),
        "--resamples",
        "200",
    ]);
    assert!(ok, "{err}");
    let rows = json_rows(&out, "compare");
    let klrow = rows
        .iter()
        .find(|r| r["quantity"] == "mean KL to base")
        .unwrap();
    assert!(klrow["b_a"].as_f64().unwrap() > 0.0, "{klrow}");
    // Another ctx: refused, naming it.
    let (ok, _, err) = quantlab(&[
        "perplexity",
        "--model",
        tiny,
        "--text",
        &text,
        "--ctx",
        "32",
        "--quiet",
        "--save-run",
        &p("ctx32.jsonl"),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = quantlab(&["compare", &p("f32.jsonl"), &p("ctx32.jsonl")]);
    assert!(
        !ok && err.contains("ctx") && err.contains("protocol"),
        "{err}"
    );
    // A damaged base is refused before the model runs.
    let mut bytes = std::fs::read(p("base.kld")).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(p("base.kld"), &bytes).unwrap();
    let (ok, _, err) = run(&["--kl-base", &p("base.kld")]);
    assert!(
        !ok && err.contains("checksum") && err.contains("re-save"),
        "{err}"
    );
    // Protocols: one table, word and byte perplexity on the lm-eval row only.
    let (ok, out, err) = run(&[
        "--protocols",
        "llama-bos,llama,hf-strided,lm-eval",
        "--strided",
        "16:8",
        "--lm-eval-max-len",
        "12",
    ]);
    assert!(ok, "{err}");
    let rows = json_rows(&out, "protocols");
    assert_eq!(rows.len(), 4, "{out}");
    assert!(rows[3]["word_perplexity"].as_f64().unwrap() > 1.0, "{out}");
    assert!(rows[0]["word_perplexity"].is_null());
    assert!(rows
        .iter()
        .all(|r| r["token_perplexity"].as_f64().unwrap() > 1.0));
    let (ok, _, err) = run(&["--protocols", "gptq"]);
    assert!(!ok && err.contains("2048"), "{err}");
}
