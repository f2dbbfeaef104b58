//! Bad inputs as a new user meets them, run through the binary: stale results, stray
//! files, silent nonsense and unclear errors (issue 13, results-and-files half). The
//! corpus is generated here (texts, broken sweep files, wrong-shaped inputs); the model
//! is the tiny Llama fixture, so nothing outside the repository is needed.
//!
//! Every case asserts: exit code 1 or 2 (never a panic's 101 or a signal), an error that
//! names the file, flag or key, and no file left behind (the folder listed before/after).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn model() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama-tiny").to_string()
}

/// Runs quantlab in `cwd` with `args` (and `stdin`); returns (exit code, stdout, stderr).
fn quantlab(cwd: &Path, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .current_dir(cwd)
        .args(args)
        .env_remove("QUANTLAB_LLM")
        .env_remove("QUANTLAB_DEVICE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            let _ = input.write_all(b);
        }
    }
    let out = child.wait_with_output().unwrap();
    // None: killed by a signal.
    let code = out.status.code().unwrap_or(-1);
    (
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every path under `dir` (hidden files included), relative, sorted.
fn listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if p.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Asserts a clean refusal: exit 1 or 2, stderr naming each of `names`, no panic.
#[track_caller]
fn refused(r: &(i32, String, String), names: &[&str]) {
    let (code, _, err) = r;
    assert!(
        *code == 1 || *code == 2,
        "exit code {code} (want 1 or 2): {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    for n in names {
        assert!(err.contains(n), "stderr does not name '{n}': {err}");
    }
}

fn text(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

const TEXT_A: &str =
    "The quick brown fox jumps over the lazy dog. A small model reads a short text. ";
const TEXT_B: &str = "Every layer keeps only its own statistics, and nothing else is kept. ";

/// A sweep of the tiny model: baseline and one RTN row, two 32-token chunks.
fn sweep_args<'a>(m: &'a str, text: &'a str, out: &'a str, plot: &'a str) -> Vec<&'a str> {
    vec![
        "--quiet",
        "sweep",
        "--model",
        m,
        "--text",
        text,
        "--ctx",
        "32",
        "--max-chunks",
        "2",
        "--methods",
        "rtn",
        "--bits",
        "8",
        "--groups",
        "32",
        "--out",
        out,
        "--plot",
        plot,
    ]
}

#[test]
fn sweeps_refuse_stale_rows_and_repair_torn_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model();
    let a = text(d, "a.txt", &TEXT_A.repeat(20));
    let b = text(d, "b.txt", &TEXT_B.repeat(20));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let r = quantlab(d, &sweep_args(&m, a, "s.jsonl", "s.svg"), None);
    assert_eq!(r.0, 0, "{}", r.2);
    let rows = std::fs::read_to_string(d.join("s.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 2);
    assert!(rows.contains("\"provenance\"") && rows.contains("text_sha256"));
    assert!(r.1.contains("provenance: quantlab"), "{}", r.1);

    // Another text into the same file: refused, the file untouched.
    let before = listing(d);
    let r = quantlab(d, &sweep_args(&m, b, "s.jsonl", "s.svg"), None);
    refused(&r, &["s.jsonl", "text sha256", "--fresh"]);
    assert_eq!(std::fs::read_to_string(d.join("s.jsonl")).unwrap(), rows);
    assert_eq!(listing(d), before);
    // Another context length: also refused.
    let mut args = sweep_args(&m, a, "s.jsonl", "s.svg");
    args[7] = "16";
    refused(&quantlab(d, &args, None), &["protocol", "--fresh"]);

    // A torn last line is cut off on resume (and said), then the sweep finishes.
    std::fs::write(
        d.join("s.jsonl"),
        format!("{rows}{{\"model\": \"x\", \"prot"),
    )
    .unwrap();
    let r = quantlab(d, &sweep_args(&m, a, "s.jsonl", "s.svg"), None);
    assert_eq!(r.0, 0, "{}", r.2);
    assert!(r.2.contains("torn"), "{}", r.2);
    assert_eq!(std::fs::read_to_string(d.join("s.jsonl")).unwrap(), rows);
    // A corrupt line in the middle: refused with file:line and the fix.
    let lines: Vec<&str> = rows.lines().collect();
    std::fs::write(
        d.join("s.jsonl"),
        format!("{}\n{{\"half\": 1\n{}\n", lines[0], lines[1]),
    )
    .unwrap();
    let r = quantlab(d, &sweep_args(&m, a, "s.jsonl", "s.svg"), None);
    refused(&r, &["s.jsonl:2", "--fresh"]);
    // --fresh starts over.
    let mut args = sweep_args(&m, b, "s.jsonl", "s.svg");
    args.push("--fresh");
    let r = quantlab(d, &args, None);
    assert_eq!(r.0, 0, "{}", r.2);
    assert_eq!(
        std::fs::read_to_string(d.join("s.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
}

#[test]
fn failed_writes_name_the_path_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model();
    let a = text(d, "a.txt", &TEXT_A.repeat(20));
    let a = a.to_str().unwrap();
    std::fs::create_dir(d.join("a_dir")).unwrap();
    text(d, "a_file", "not a folder");
    let ppl = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--quiet",
            "perplexity",
            "--model",
            &m,
            "--text",
            a,
            "--ctx",
            "32",
            "--max-chunks",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: &[String]| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        quantlab(d, &refs, None)
    };
    let before = listing(d);
    // The target is a directory.
    refused(
        &run(&ppl(&["--save-logprobs", "a_dir"])),
        &["a_dir", "directory"],
    );
    // A parent that is a file.
    refused(
        &run(&ppl(&["--save-logprobs", "a_file/base.kld"])),
        &["a_file", "not a folder"],
    );
    assert_eq!(listing(d), before);
    // A plot that cannot be written: the sweep rows stay, no temporary file.
    let r = quantlab(d, &sweep_args(&m, a, "s.jsonl", "a_dir"), None);
    refused(&r, &["a_dir"]);
    let mut after = listing(d);
    after.retain(|f| f != "s.jsonl" && f != "s.base.kld");
    assert_eq!(after, before);
    // Disk full: the error carries the path. (A plot needs a .svg/.png name, so the
    // device is given as the KL base file.)
    if Path::new("/dev/full").exists() {
        refused(
            &run(&ppl(&["--save-logprobs", "/dev/full"])),
            &["/dev/full", "No space left on device"],
        );
    }
    // The rows file itself under a file, or a directory: nothing measured or written.
    let before = listing(d);
    let r = quantlab(d, &sweep_args(&m, a, "a_file/s.jsonl", "s2.svg"), None);
    refused(&r, &["a_file"]);
    let r = quantlab(d, &sweep_args(&m, a, "a_dir", "s2.svg"), None);
    refused(&r, &["a_dir", "directory"]);
    // Checkpoints: into an existing folder, or below a file.
    for (out, why) in [("a_dir", "already exists"), ("a_file/q", "a_file")] {
        let r = quantlab(
            d,
            &[
                "quantize",
                "--model",
                &m,
                "--plan",
                "*=w:i8:sym:ch0",
                "--out",
                out,
            ],
            None,
        );
        refused(&r, &[out, why]);
    }
    assert_eq!(listing(d), before);
}

#[test]
fn degenerate_inputs_are_refused_with_the_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model();
    let a = text(d, "a.txt", &TEXT_A.repeat(20));
    let a = a.to_str().unwrap();
    let empty = text(d, "empty.txt", "\n  \n");
    let ppl = |extra: &[&str]| -> (i32, String, String) {
        let mut v = vec!["--quiet", "perplexity", "--model", &m, "--ctx", "32"];
        v.extend(extra);
        quantlab(d, &v, None)
    };
    let before = listing(d);
    refused(
        &ppl(&["--text", a, "--max-chunks", "0"]),
        &["--max-chunks", "at least 1"],
    );
    refused(
        &ppl(&["--text", empty.to_str().unwrap()]),
        &["empty.txt", "empty"],
    );
    // Plan rules: one matching nothing is a warning; none matching anything an error.
    refused(
        &ppl(&[
            "--text",
            a,
            "--max-chunks",
            "1",
            "--plan",
            "*.ffn.*=w:i8:sym:ch0",
        ]),
        &["no rule", "layers"],
    );
    let r = ppl(&[
        "--text",
        a,
        "--max-chunks",
        "1",
        "--plan",
        "*.ffn.*=f16;*.mlp.*=w:i8:sym:ch0",
    ]);
    assert_eq!(r.0, 0, "{}", r.2);
    assert!(
        r.2.contains("warning: plan rule '*.ffn.*=f16' matches no layer"),
        "{}",
        r.2
    );
    // Calibration with no samples.
    refused(
        &ppl(&[
            "--text",
            a,
            "--plan",
            "*=static-int8",
            "--calibration",
            a,
            "--calib-samples",
            "0",
        ]),
        &["--calib-samples", "at least 1"],
    );
    // quantize: --tensor without --input, or no tensor at all, never random data.
    refused(
        &quantlab(
            d,
            &["quantize", "--scheme", "i8:sym:ch0", "--tensor", "w"],
            None,
        ),
        &["--input"],
    );
    refused(
        &quantlab(d, &["quantize", "--scheme", "i8:sym:ch0"], None),
        &["--input", "--randn"],
    );
    // eval --limit 0 on existing hypotheses.
    let h = text(d, "h.txt", "ein Hund\n");
    let r = quantlab(
        d,
        &[
            "eval",
            "--task",
            "bleu",
            "--hyps",
            h.to_str().unwrap(),
            "--ref",
            h.to_str().unwrap(),
            "--limit",
            "0",
        ],
        None,
    );
    refused(&r, &["--limit", "at least 1"]);
    // lab ex1 with a 3-row "4×4".
    std::fs::create_dir_all(d.join("data/lab")).unwrap();
    let row4 = "[0.1, 0.2, 0.3, 0.4]";
    let row8 = "[1, 2, 3, 4, 5, 6, 7, 8]";
    std::fs::write(
        d.join("data/lab/ex1_inputs.json"),
        format!(
            "{{\"randn_4x4\": [{row4}, {row4}, {row4}], \"randn_8x8\": [{}]}}",
            [row8; 8].join(", ")
        ),
    )
    .unwrap();
    let r = quantlab(d, &["lab", "ex1", "--data-dir", "data"], None);
    refused(&r, &["ex1_inputs.json", "randn_4x4", "4×4", "3 rows"]);
    let mut after = listing(d);
    after.retain(|f| !f.starts_with("data") && f != "h.txt");
    assert_eq!(after, before);
}

#[test]
fn unclear_inputs_get_errors_that_name_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model();
    let a = text(d, "a.txt", &TEXT_A.repeat(5));
    // --groups ch5: what was typed, and the valid forms.
    let mut args = sweep_args(&m, a.to_str().unwrap(), "s.jsonl", "s.svg");
    args[15] = "ch5";
    let r = quantlab(d, &args, None);
    refused(&r, &["'ch5'", "ch"]);
    assert!(!r.2.contains("gch5"), "{}", r.2);
    // --scheme NF4: did you mean nf4?
    let r = quantlab(d, &["quantize", "--scheme", "NF4", "--randn", "8x8"], None);
    refused(&r, &["NF4", "did you mean 'nf4'"]);
    // Invalid UTF-8 on stdin: the line is named.
    let r = quantlab(
        d,
        &["generate", "--model", &m],
        Some(b"hello\nbad \xff byte\n"),
    );
    refused(&r, &["stdin line 2", "UTF-8"]);
    assert!(!listing(d).iter().any(|f| f.contains(".tmp")));
}
