//! Sharded sweeps on the tiny Llama fixture: two shards merged give the rows of one
//! unsharded run (same numbers, same order), and merge refuses sets of shards that are not
//! one whole sweep.

use candle_core::Device;
use quantlab::arch::llama::LoadAs;
use quantlab::eval::perplexity::Protocol;
use quantlab::lab::{sweep, sweep_shard};
use std::path::{Path, PathBuf};
use std::process::Command;

fn spec(dir: &Path, out: &str, methods: &[&str], seed: u64) -> sweep::SweepSpec {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny");
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. A small model reads a short text. "
            .repeat(20),
    )
    .unwrap();
    let calib = dir.join("calib.txt");
    std::fs::write(
        &calib,
        "Every layer keeps only its own statistics. ".repeat(30),
    )
    .unwrap();
    sweep::SweepSpec {
        model: model.to_str().unwrap().into(),
        device: Device::Cpu,
        load_as: LoadAs::F32,
        configs: sweep::expand(
            &methods.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            &[8, 4, 3],
            &["32".into()],
            "sym",
        )
        .unwrap(),
        layers: sweep::Layers::All,
        text,
        protocol: Protocol::LlamaCpp {
            ctx: 32,
            bos: false,
        },
        max_chunks: Some(2),
        out: dir.join(out),
        kl: true,
        calibration: quantlab::eval::prepare::Calibration {
            file: Some(calib),
            samples: 3,
            seqlen: 16,
            seed,
            data_dir: None,
        },
        progress: false,
    }
}

/// Rows with the wall-clock time cleared (the only field two runs may not share).
fn untimed(rows: &[sweep::Row]) -> Vec<sweep::Row> {
    rows.iter()
        .map(|r| sweep::Row {
            seconds: 0.0,
            ..r.clone()
        })
        .collect()
}

fn err(files: &[PathBuf]) -> String {
    format!("{:#}", sweep_shard::merge(files).unwrap_err())
}

#[test]
fn two_shards_merged_equal_one_run_and_bad_sets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let methods = ["rtn", "static-int8", "q8_0"];
    let whole = sweep::run(&spec(d, "whole.jsonl", &methods, 0)).unwrap();
    assert_eq!(whole.len(), 6, "keep, rtn 8/4/3, static-int8, q8_0");

    let s = spec(d, "sweep.jsonl", &methods, 0);
    let (r1, f1) = sweep_shard::run(&s, "1/2".parse().unwrap()).unwrap();
    let (r2, f2) = sweep_shard::run(&s, "2/2".parse().unwrap()).unwrap();
    assert_eq!(f1, d.join("sweep.shard-1-of-2.jsonl"));
    assert_eq!(f2, d.join("sweep.shard-2-of-2.jsonl"));
    assert_eq!((r1.len(), r2.len()), (4, 3), "each with its own baseline");
    assert!(d.join("sweep.shard-2-of-2.base.kld").exists());
    assert!(d.join("sweep.shard-2-of-2.manifest.json").exists());

    // Either order of the files: the rows of the unsharded run, in its order.
    for files in [vec![f1.clone(), f2.clone()], vec![f2.clone(), f1.clone()]] {
        let (m, merged) = sweep_shard::merge(&files).unwrap();
        assert_eq!(m.shard.count, 2);
        assert_eq!(untimed(&merged), untimed(&whole));
    }
    assert!(whole[1..].iter().all(|r| r.mean_kl.unwrap() > 0.0));

    // The CLI writes the merged rows and the table of a normal run.
    let out = d.join("merged.jsonl");
    let cli = Command::new(env!("CARGO_BIN_EXE_quantlab"))
        .args(["--format", "csv", "sweep", "merge"])
        .arg(&f1)
        .arg(&f2)
        .arg("--out")
        .arg(&out)
        .arg("--plot")
        .arg(d.join("merged.svg"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(untimed(&sweep::read_rows(&out).unwrap()), untimed(&whole));
    assert!(stdout.contains("static-int8"), "{stdout}");
    assert!(d.join("merged.svg").exists());

    // Missing and duplicate shards are named.
    let e = err(std::slice::from_ref(&f1));
    assert!(e.contains("missing shard(s) 2/2"), "{e}");
    let copy = d.join("copy.jsonl");
    std::fs::copy(&f1, &copy).unwrap();
    std::fs::copy(
        sweep_shard::manifest_path(&f1),
        sweep_shard::manifest_path(&copy),
    )
    .unwrap();
    let e = err(&[f1.clone(), copy.clone(), f2.clone()]);
    assert!(
        e.contains("shard 1/2 given twice") && e.contains("copy.jsonl"),
        "{e}"
    );

    // A row in two shards.
    let twice = d.join("twice.shard-2-of-2.jsonl");
    std::fs::copy(&f2, &twice).unwrap();
    std::fs::copy(
        sweep_shard::manifest_path(&f2),
        sweep_shard::manifest_path(&twice),
    )
    .unwrap();
    sweep::append_row(&twice, &r1[1]).unwrap();
    let e = err(&[f1.clone(), twice.clone()]);
    assert!(
        e.contains("appears twice") && e.contains(&r1[1].plan),
        "{e}"
    );
    // ... or twice in one file.
    let dup = d.join("dup.shard-2-of-2.jsonl");
    std::fs::copy(&f2, &dup).unwrap();
    std::fs::copy(
        sweep_shard::manifest_path(&f2),
        sweep_shard::manifest_path(&dup),
    )
    .unwrap();
    sweep::append_row(&dup, &r2[1]).unwrap();
    let e = err(&[dup.clone(), f1.clone()]);
    assert!(e.contains("appears 2 times"), "{e}");

    // A shard that did not finish.
    let short = d.join("short.jsonl");
    std::fs::write(
        &short,
        std::fs::read_to_string(&f2)
            .unwrap()
            .lines()
            .take(2)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    std::fs::copy(
        sweep_shard::manifest_path(&f2),
        sweep_shard::manifest_path(&short),
    )
    .unwrap();
    let e = err(&[f1.clone(), short.clone()]);
    assert!(e.contains("shard 2/2") && e.contains("has no row"), "{e}");

    // Shards of other sweeps: N, the configuration list, the calibration.
    let (_, g3) = sweep_shard::run(&s, "2/3".parse().unwrap()).unwrap();
    let e = err(&[f1.clone(), g3]);
    assert!(
        e.contains("different sweeps") && e.contains("shard count"),
        "{e}"
    );
    let other = spec(d, "other.jsonl", &["rtn", "q8_0"], 0);
    let (_, o2) = sweep_shard::run(&other, "2/2".parse().unwrap()).unwrap();
    let e = err(&[f1.clone(), o2]);
    assert!(e.contains("configuration list"), "{e}");
    let seed1 = spec(d, "seed1.jsonl", &methods, 1);
    let (_, c2) = sweep_shard::run(&seed1, "2/2".parse().unwrap()).unwrap();
    let e = err(&[f1.clone(), c2]);
    assert!(e.contains("calibration"), "{e}");
    // ... and the evaluation text (same path, other bytes).
    let mut edited: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sweep_shard::manifest_path(&f2)).unwrap())
            .unwrap();
    edited["key"]["text_sha256"] = "0000000000000000".into();
    std::fs::write(
        sweep_shard::manifest_path(&f2),
        serde_json::to_string(&edited).unwrap(),
    )
    .unwrap();
    let e = err(&[f1.clone(), f2.clone()]);
    assert!(e.contains("text sha256"), "{e}");
    // A file without a manifest.
    let e = err(&[d.join("whole.jsonl")]);
    assert!(e.contains("manifest"), "{e}");
}
