//! `sweep` with a calibrated method on the tiny Llama fixture: the row records its
//! calibration data, and a resume with other calibration data is refused (a sweep file
//! holds one sweep) until `--fresh` or another `--out`.

use candle_core::Device;
use quantlab::arch::llama::LoadAs;
use quantlab::eval::perplexity::Protocol;
use quantlab::lab::sweep;
use std::path::PathBuf;

#[test]
fn calibrated_rows_record_their_data_and_are_not_mixed_with_other_data() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. A small model reads a short text. "
            .repeat(20),
    )
    .unwrap();
    let calib = dir.path().join("calib.txt");
    std::fs::write(
        &calib,
        "Every layer keeps only its own statistics. ".repeat(30),
    )
    .unwrap();
    let out = dir.path().join("s.jsonl");
    let spec = |seed: u64| sweep::SweepSpec {
        model: model.to_str().unwrap().into(),
        device: Device::Cpu,
        load_as: LoadAs::F32,
        configs: sweep::expand(
            &["static-int8".into(), "rtn-signed-max".into()],
            &[4],
            &["32".into()],
            "sym",
        )
        .unwrap(),
        layers: sweep::Layers::All,
        text: text.clone(),
        protocol: Protocol::LlamaCpp {
            ctx: 32,
            bos: false,
        },
        max_chunks: Some(2),
        out: out.clone(),
        kl: true,
        calibration: quantlab::eval::prepare::Calibration {
            file: Some(calib.clone()),
            samples: 3,
            seqlen: 16,
            seed,
            data_dir: None,
        },
        progress: false,
    };
    let rows = sweep::run(&spec(0)).unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["keep", "static-int8", "rtn-signed-max:i4:g32"]);
    let c = rows[1].calibration.as_ref().expect("calibration recorded");
    assert_eq!((c.samples, c.seqlen, c.seed), (3, 16, 0));
    assert_eq!(c.text_hash.len(), 64, "sha256");
    assert!(rows[0].calibration.is_none() && rows[2].calibration.is_none());
    assert!(rows[2].mean_kl.unwrap() > 0.0);
    let p = rows[1].provenance.as_ref().expect("provenance recorded");
    assert_eq!(p.calibration.as_ref(), Some(c));
    assert!(p.tokenizer.as_ref().unwrap().contains("ids sha256"));
    // Same data: nothing new. Another seed: refused, naming what differs.
    assert_eq!(sweep::run(&spec(0)).unwrap(), rows);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
    let e = format!("{:#}", sweep::run(&spec(1)).unwrap_err());
    assert!(
        e.contains("calibrated on other data") && e.contains("seed 1") && e.contains("--fresh"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
    sweep::start_fresh(&out).unwrap();
    let again = sweep::run(&spec(1)).unwrap();
    assert_eq!(again[1].calibration.as_ref().unwrap().seed, 1);
    assert_eq!(again[2].perplexity, rows[2].perplexity);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
}
