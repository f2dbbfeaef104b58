//! The lab's MNIST table: an MLP trained on MNIST, then fp32, dynamic fp16, dynamic int8,
//! static int8 and weight-only rows with size, accuracy and latency.

use crate::arch::mlp::{Mlp, MlpConfig};
use crate::arch::train::{accuracy, train, TrainConfig};
use crate::data::{mnist, DataDir};
use crate::eval::latency::{measure_interleaved, LatencyStats};
use crate::nn::{apply_plan, Method, Plan};
use crate::quant::ObserverKind;
use crate::report::{Cell, Report, Table};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MnistLabConfig {
    pub checkpoint: PathBuf,
    pub retrain: bool,
    pub train: TrainConfig,
    pub observer: ObserverKind,
    /// Training batches of 64 used to calibrate static int8.
    pub calibration_batches: usize,
    /// Timed runs per latency figure (warm-up runs are a fifth of this, at least 3).
    pub latency_runs: usize,
    /// Evaluate on the first N test images only (None: all 10,000).
    pub test_limit: Option<usize>,
    pub device: Device,
}

impl Default for MnistLabConfig {
    fn default() -> Self {
        MnistLabConfig {
            checkpoint: PathBuf::from("models/mnist-mlp"),
            retrain: false,
            train: TrainConfig {
                epochs: 10,
                ..TrainConfig::default()
            },
            observer: ObserverKind::MinMax,
            calibration_batches: 32,
            latency_runs: 200,
            test_limit: None,
            device: Device::Cpu,
        }
    }
}

#[derive(Debug, Clone)]
pub struct MnistRow {
    pub q: &'static str,
    pub method: Method,
    pub size_bytes: u64,
    pub params: usize,
    pub accuracy: f64,
    pub b1: LatencyStats,
    pub b64: LatencyStats,
}

pub struct MnistLab {
    pub rows: Vec<MnistRow>,
    pub trained_now: bool,
    pub final_train_loss: Option<f32>,
}

/// What a trained checkpoint was trained with, stored next to it (`training.json`) so a
/// cached model trained under other settings is not reused as if it were this run's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Training {
    epochs: usize,
    seed: u64,
    train_images: usize,
}

const TRAINING_FILE: &str = "training.json";

/// Loads the cached checkpoint, or trains and caches one. A checkpoint whose
/// `training.json` records other settings (epochs, seed, training images) is refused;
/// one without it (made elsewhere) is used, and said so.
pub fn checkpoint(data: &mnist::Mnist, cfg: &MnistLabConfig) -> Result<(Mlp, bool, Option<f32>)> {
    let dir = &cfg.checkpoint;
    let now = Training {
        epochs: cfg.train.epochs,
        seed: cfg.train.seed,
        train_images: data.train.len(),
    };
    let record = dir.join(TRAINING_FILE);
    if !cfg.retrain && dir.join("model.safetensors").exists() {
        match std::fs::read_to_string(&record) {
            Ok(text) => {
                let was: Training = serde_json::from_str(&text).with_context(|| {
                    format!("{} is not a training record (use --retrain to replace the checkpoint)", record.display())
                })?;
                if was != now {
                    bail!(
                        "the cached checkpoint {} was trained with {} epochs, seed {} on {} images, not {} epochs, seed {} on {}: pass --retrain to replace it, or another --model folder",
                        dir.display(),
                        was.epochs,
                        was.seed,
                        was.train_images,
                        now.epochs,
                        now.seed,
                        now.train_images
                    );
                }
            }
            Err(_) => eprintln!(
                "{}: no {TRAINING_FILE}, so its training settings are unknown; using it as it is (--retrain trains one with this run's)",
                dir.display()
            ),
        }
        let m = Mlp::load(dir, &cfg.device).with_context(|| {
            format!(
                "loading cached checkpoint {} (use --retrain to replace it)",
                dir.display()
            )
        })?;
        return Ok((m, false, None));
    }
    if cfg.train.epochs == 0 {
        bail!("--epochs 0 trains nothing: give at least 1");
    }
    let (model, log) = train(&MlpConfig::default(), &data.train, &cfg.train)?;
    model.save(dir)?;
    crate::quant::io::write_atomically(&record, serde_json::to_string_pretty(&now)?.as_bytes())?;
    Ok((model, true, log.losses.last().copied()))
}

/// The table's rows: (PyTorch's quantization letter, method); static int8 takes the
/// configured observer.
fn rows_plan(observer: ObserverKind) -> Result<Vec<(&'static str, Method)>> {
    let rows = [
        ("-", "f32".to_string()),
        ("D", "f16".to_string()),
        ("D", "dynamic-int8".to_string()),
        ("S", format!("static-int8:{observer}")),
        ("W", "w:i4:sym:g64".to_string()),
        ("W", "nf4".to_string()),
    ];
    rows.into_iter().map(|(q, m)| Ok((q, m.parse()?))).collect()
}

pub fn run(data_dir: &DataDir, cfg: &MnistLabConfig) -> Result<MnistLab> {
    if cfg.test_limit == Some(0) {
        bail!("--test-limit 0 evaluates nothing: give at least 1 (or drop it for all 10,000)");
    }
    if cfg.calibration_batches == 0 {
        bail!("--calibration-batches must be at least 1 (static int8 calibrates on them)");
    }
    let data = mnist::load(data_dir, &cfg.device)?;
    let (base, trained_now, final_loss) = checkpoint(&data, cfg)?;
    let test = match cfg.test_limit {
        Some(n) if n < data.test.len() => mnist::MnistSplit {
            images: data.test.images.narrow(0, 0, n)?,
            labels: data.test.labels.narrow(0, 0, n)?,
        },
        _ => data.test.clone(),
    };
    let calib_n = (cfg.calibration_batches * 64).min(data.train.len());
    let calib = data.train.images.narrow(0, 0, calib_n)?;
    let one = test.images.narrow(0, 0, 1)?;
    let batch64 = test.images.narrow(0, 0, 64.min(test.len()))?;
    let tmp = tempfile::tempdir()?;
    let plan_rows = rows_plan(cfg.observer)?;
    let bar = crate::progress::bar(plan_rows.len() as u64 + 1, "rows", cfg.train.progress);
    let mut built = Vec::new();
    for (q, method) in plan_rows {
        bar.set_message(method.to_string());
        let mut model = base.clone();
        apply_plan(&mut model, &Plan::uniform(method.clone()), |m| {
            m.calibrate(&calib)
        })?;
        let dir = tmp.path().join(method.to_string().replace(':', "_"));
        let size_bytes = model.save(&dir)?;
        let acc = accuracy(&model, &test, 1000)?;
        built.push((q, method, size_bytes, acc, model));
        bar.inc(1);
    }
    // Every row's latency is timed in turns with the others' (see `measure_interleaved`).
    bar.set_message("latency");
    let runs = cfg.latency_runs.max(2);
    let warm = (runs / 5).max(3);
    let time = |x: &candle_core::Tensor| -> Result<Vec<LatencyStats>> {
        let mut fs: Vec<_> = built
            .iter()
            .map(|b| move || b.4.forward(x).map(|_| ()))
            .collect();
        let mut refs: Vec<&mut dyn FnMut() -> Result<()>> =
            fs.iter_mut().map(|f| f as &mut _).collect();
        measure_interleaved(warm, runs, &mut refs)
    };
    let b1 = time(&one)?;
    let b64 = time(&batch64)?;
    bar.inc(1);
    let rows = built
        .into_iter()
        .zip(b1.into_iter().zip(b64))
        .map(
            |((q, method, size_bytes, accuracy, model), (b1, b64))| MnistRow {
                q,
                method,
                size_bytes,
                params: model.num_params(),
                accuracy,
                b1,
                b64,
            },
        )
        .collect();
    bar.finish_and_clear();
    Ok(MnistLab {
        rows,
        trained_now,
        final_train_loss: final_loss,
    })
}

pub fn report(lab: &MnistLab, cfg: &MnistLabConfig, test_n: usize) -> Report {
    let mut t = Table::new(
        "mnist",
        "MNIST MLP (784-256-256-10): quantization results",
        &[
            "Task",
            "Q",
            "dtype",
            "method",
            "Size (MB)",
            "Params",
            "Accuracy (%)",
            "B1 (ms)",
            "B1 std",
            "B64 (ms)",
            "B64 std",
            "B1 p50",
            "B1 p95",
            "B64 p50",
            "B64 p95",
        ],
    );
    for r in &lab.rows {
        t.push(vec![
            "MNIST".into(),
            r.q.into(),
            r.method.dtype_label().into(),
            r.method.to_string().into(),
            Cell::f(r.size_bytes as f64 / 1e6, 3),
            r.params.into(),
            Cell::f(r.accuracy * 100.0, 2),
            Cell::f(r.b1.mean_ms, 4),
            Cell::f(r.b1.std_ms, 4),
            Cell::f(r.b64.mean_ms, 4),
            Cell::f(r.b64.std_ms, 4),
            Cell::f(r.b1.p50_ms, 4),
            Cell::f(r.b1.p95_ms, 4),
            Cell::f(r.b64.p50_ms, 4),
            Cell::f(r.b64.p95_ms, 4),
        ]);
    }
    t.note(format!("Accuracy on {test_n} MNIST test images; model trained on the 5k training sample (Adam, lr {}, batch {}, {} epochs, seed {}).", cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.seed));
    t.note("Q: - none, D dynamic, S static (calibrated), W weight-only. qint8 rows compute in integers: u8 activations × i8 per-channel weights, i32 accumulation (kernel path chosen at run time: AVX-512 VNNI, AVX2 or portable; QUANTLAB_KERNEL forces a lower one).");
    t.note(format!("Static int8: input ranges of every layer calibrated with the {} observer on {} training batches of 64; the logits are not re-quantized.", cfg.observer, cfg.calibration_batches));
    t.note("fp16 rows dequantize their weights to f32 for each forward (their latency includes that cost); int4 / nf4 rows decode their codes in registers inside the matrix product (no f32 weight matrix is made).");
    t.note(format!(
        "CPU kernels: {}.",
        crate::nn::kernels::isa::describe()
    ));
    t.note(format!("Latency: {} timed runs after warm-up, every row timed in turns with the others (one forward of each row per round), on this machine's CPU, single process. Size: model.safetensors as written (payload + header).", cfg.latency_runs));
    t.note("Lab reference (PyTorch 1.13, i9 laptop): fp32 97.34% 5.88 MB B1 0.323 ms B64 1.30 ms; D fp16 97.34% 5.89 MB 0.512/1.72; D qint8 97.34% 1.48 MB 0.503/1.11; S qint8 96.67% 1.52 MB 0.593/0.955.");
    Report {
        tables: vec![t],
        notes: vec![],
    }
}

/// Default checkpoint folder, under the project's `models/`.
pub fn default_checkpoint(root: &Path) -> PathBuf {
    root.join("models").join("mnist-mlp")
}
