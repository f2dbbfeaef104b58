//! The MNIST classifier end to end on the real shared data: training, save/load,
//! and every quantized row's accuracy against fp32.

use candle_core::{Device, Tensor};
use quantlab::arch::mlp::{Mlp, MlpConfig};
use quantlab::arch::train::{accuracy, train, TrainConfig};
use quantlab::data::{mnist, DataDir};
use quantlab::nn::format::int8::{ActQuant, Int8};
use quantlab::nn::{apply_plan, HasLinears, Method, Plan};
use std::sync::OnceLock;

fn data() -> &'static mnist::Mnist {
    static D: OnceLock<mnist::Mnist> = OnceLock::new();
    D.get_or_init(|| {
        let dir = DataDir::resolve(None).expect("MNIST tests need ../shared/data or QUANTLAB_DATA");
        mnist::load(&dir, &Device::Cpu).unwrap()
    })
}

fn subset(s: &mnist::MnistSplit, n: usize) -> mnist::MnistSplit {
    mnist::MnistSplit {
        images: s.images.narrow(0, 0, n).unwrap(),
        labels: s.labels.narrow(0, 0, n).unwrap(),
    }
}

fn quiet(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        progress: false,
        ..TrainConfig::default()
    }
}

/// One model trained once for all the accuracy tests (5 epochs on the 5k sample).
fn trained() -> &'static Mlp {
    static M: OnceLock<Mlp> = OnceLock::new();
    M.get_or_init(|| {
        train(&MlpConfig::default(), &data().train, &quiet(5))
            .unwrap()
            .0
    })
}

fn calibrate(m: &Mlp) -> anyhow::Result<()> {
    let x = data().train.images.narrow(0, 0, 640)?;
    for i in 0..10 {
        m.forward(&x.narrow(0, i * 64, 64)?)?;
    }
    Ok(())
}

#[test]
fn training_loss_decreases() {
    let (_, log) = train(&MlpConfig::default(), &data().train, &quiet(1)).unwrap();
    let n = log.losses.len();
    let first: f32 = log.losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = log.losses[n - 10..].iter().sum::<f32>() / 10.0;
    assert!(last < first * 0.5, "loss went from {first} to {last}");
}

#[test]
fn training_is_deterministic() {
    let small = subset(&data().train, 640);
    let a = train(&MlpConfig::default(), &small, &quiet(1)).unwrap().0;
    let b = train(&MlpConfig::default(), &small, &quiet(1)).unwrap().0;
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        let (wa, wb) = (la.weight_f32().unwrap(), lb.weight_f32().unwrap());
        assert_eq!(
            wa.to_vec2::<f32>().unwrap(),
            wb.to_vec2::<f32>().unwrap(),
            "{}",
            la.name
        );
    }
}

#[test]
fn save_load_round_trip_gives_identical_logits() {
    let m = trained();
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path()).unwrap();
    let quantlab::model::AnyModel::Mlp(back) =
        quantlab::model::load_model(dir.path().to_str().unwrap(), &Device::Cpu).unwrap()
    else {
        panic!("an MLP checkpoint loads as an MLP")
    };
    let x = data().test.images.narrow(0, 0, 32).unwrap();
    assert_eq!(
        m.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
        back.forward(&x).unwrap().to_vec2::<f32>().unwrap()
    );
}

#[test]
fn corrupt_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = Mlp::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("config.json"), "{e:#}");
    trained().save(dir.path()).unwrap();
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = Mlp::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("model.safetensors"), "{e:#}");
}

#[test]
fn quantized_rows_stay_close_to_fp32() {
    let test = subset(&data().test, 2000);
    let base_acc = accuracy(trained(), &test, 500).unwrap();
    assert!(base_acc > 0.85, "fp32 accuracy {base_acc}");
    for (method, max_drop) in [
        ("f16", 0.001),
        ("dynamic-int8", 0.005),
        ("static-int8:minmax", 0.015),
        ("static-int8:percentile:99.99", 0.015),
        ("static-int8:mse", 0.015),
        ("static-int8:entropy", 0.015),
        ("w:i4:sym:g64", 0.02),
        ("nf4", 0.02),
    ] {
        let mut m = trained().clone();
        let method: Method = method.parse().unwrap();
        apply_plan(&mut m, &Plan::uniform(method.clone()), calibrate).unwrap();
        let acc = accuracy(&m, &test, 500).unwrap();
        assert!(
            acc >= base_acc - max_drop,
            "{method}: {acc} vs fp32 {base_acc}"
        );
        // Really quantized: sizes shrink for everything but f32.
        let bytes: usize = m.linears().iter().map(|l| l.stored_bytes()).sum();
        assert!(bytes < m.num_params() * 4, "{method}");
    }
}

#[test]
fn static_calibration_is_deterministic_and_plan_selective() {
    let plan: Plan = "fc3=f32;*=static-int8:minmax".parse().unwrap();
    let params = |m: &Mlp| -> Vec<(f32, i32)> {
        m.layers
            .iter()
            .filter_map(|l| match l.weight.as_any().downcast_ref::<Int8>()?.act {
                ActQuant::Static { scale, zero_point } => Some((scale, zero_point)),
                ActQuant::Dynamic | ActQuant::PerToken => None,
            })
            .collect()
    };
    let mut a = trained().clone();
    apply_plan(&mut a, &plan, calibrate).unwrap();
    let mut b = trained().clone();
    apply_plan(&mut b, &plan, calibrate).unwrap();
    assert_eq!(params(&a).len(), 2, "fc1 and fc2 static, fc3 kept f32");
    assert_eq!(params(&a), params(&b));
    assert_eq!(a.layers[2].weight.id(), "f32");
    let x = Tensor::zeros((1, 784), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(a.forward(&x).unwrap().dims(), &[1, 10]);
}

#[test]
fn missing_calibration_is_an_error() {
    let mut m = trained().clone();
    let e = apply_plan(
        &mut m,
        &Plan::uniform("static-int8:minmax".parse::<Method>().unwrap()),
        |_| Ok(()),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("calibration"), "{e:#}");
}
