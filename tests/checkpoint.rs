//! Quantized checkpoints (`quantize --model M --plan P --out DIR`): every format, on each
//! model kind, reloads to outputs bit-identical to the model quantized in memory.

use candle_core::{Device, Tensor};
use quantlab::arch::llama::LoadAs;
use quantlab::cli::checkpoint::{quantize_model, ModelQuantizeArgs};
use quantlab::cli::llm::CalibrationArgs;
use std::path::PathBuf;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn args(calibration: Option<PathBuf>) -> ModelQuantizeArgs {
    ModelQuantizeArgs {
        load_as: quantlab::cli::llm::LoadAsArg::F32,
        calibration: CalibrationArgs {
            calibration,
            calib_samples: 4,
            calib_seqlen: 16,
            calib_seed: 0,
        },
    }
}

fn llama_logits(m: &quantlab::arch::llama::Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    m.forward(&t, &mut m.new_cache(), false)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

#[test]
fn llama_checkpoints_of_every_format_reload_bit_identical() {
    let src = fixture("tests/fixtures/llama-tiny");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("calib.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. A small model reads a short text, \
         one window at a time, and every layer keeps only its own statistics. "
            .repeat(8),
    )
    .unwrap();
    let plans = [
        "*=w:i4:sym:g32",
        "*.mlp.*=w:u3:affine:g16;*=fp4:dq",
        "*=nf4:b32",
        "*=q8_0",
        "*=f16",
        "*=bf16",
        "*=dynamic-int8",
        "*=static-int8:percentile:99.9",
        "*=w8a8:token",
        "*=w8a8:tensor",
        "lm_head=keep;*=llm.int8",
        "lm_head=keep;*=w:i8:sym:ch0",
        "*=rtn-signed-max:i4:g32",
        "*.mlp.*=rtn-clip:u3:affine:g16;*=rtn-clip:i4:sym:g64",
        "*=hqq:u4:g32",
        "*=fp8",
        "*.mlp.*=fp8:tensor;*=fp8:dyn",
        // Groups of 16 have no kernel layout: real zero points decode on the fallback path.
        "*.mlp.*=hqq:u2:g16;*=hqq:u3:ch0",
    ];
    let ids: Vec<u32> = (1..40).map(|i| (i * 37 % 300) as u32).collect();
    for (k, plan) in plans.iter().enumerate() {
        let out = dir.path().join(format!("q{k}"));
        quantize_model(
            src.to_str().unwrap(),
            plan,
            &out,
            &args(Some(text.clone())),
            None,
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{plan}: {e:#}"));
        let calib = quantlab::eval::lm::CalibrationSpec::new(text.clone(), 4, 16, 0).unwrap();
        let mem = quantlab::eval::lm::prepare(
            src.to_str().unwrap(),
            LoadAs::F32,
            Some(plan),
            Some(&calib),
            &Device::Cpu,
        )
        .unwrap();
        let back =
            quantlab::model::load_llm(out.to_str().unwrap(), LoadAs::F32, &Device::Cpu).unwrap();
        assert_eq!(
            llama_logits(&back.model, &ids),
            llama_logits(&mem.llm.model, &ids),
            "{plan}"
        );
        // Writing again over an existing folder is refused, and nothing half-written stays.
        let e = quantize_model(
            src.to_str().unwrap(),
            plan,
            &out,
            &args(None),
            None,
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("already exists"), "{e}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn a_plan_needing_calibration_without_data_writes_nothing() {
    let src = fixture("tests/fixtures/llama-tiny");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    let e = quantize_model(
        src.to_str().unwrap(),
        "*=static-int8",
        &out,
        &args(Some(dir.path().join("missing.txt"))),
        None,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("missing.txt"), "{e:#}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn marian_dir() -> PathBuf {
    quantlab::model::default_marian_dir().expect("the shared Marian model")
}

fn marian_logits(m: &quantlab::arch::marian::Marian) -> Vec<Vec<Vec<f32>>> {
    let src = Tensor::new(
        &[[31u32, 480, 9, 1250, 7, 0], [67, 23, 5, 0, 15257, 15257]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let dec = Tensor::new(&[[15257u32, 12, 40], [15257, 7, 7]], &Device::Cpu).unwrap();
    let (enc, m_) = m.encode(&src, &mask).unwrap();
    let mut st = m.start_decoding(&enc, &m_).unwrap();
    m.decode(&mut st, &dec).unwrap().to_vec3::<f32>().unwrap()
}

#[test]
fn marian_checkpoints_reload_bit_identical_tied_head_or_not() {
    let spec = marian_dir();
    let dir = tempfile::tempdir().unwrap();
    for (k, plan) in [
        "*.fc1=nf4;*.fc2=w:i8:sym:ch0;lm_head=q8_0;*=dynamic-int8",
        "*.fc1=w:i4:sym:g64",
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("m{k}"));
        quantize_model(
            spec.to_str().unwrap(),
            plan,
            &out,
            &args(None),
            None,
            &Device::Cpu,
        )
        .unwrap();
        let mem =
            quantlab::eval::mt::prepare(spec.to_str().unwrap(), Some(plan), None, &Device::Cpu)
                .unwrap();
        let back = quantlab::model::load_marian(out.to_str().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(
            marian_logits(&back.model),
            marian_logits(&mem.mt.model),
            "{plan}"
        );
        assert_eq!(
            back.model.lm_head_is_tied(),
            mem.mt.model.lm_head_is_tied(),
            "{plan}"
        );
        let p = quantlab::eval::mt::PreparedMarian {
            generation: mem.generation.clone(),
            mt: back,
            layers: mem.layers.clone(),
            plan: plan.to_string(),
        };
        assert_eq!(p.weight_bytes(), mem.weight_bytes(), "{plan}: sizes agree");
    }
}

#[test]
fn mlp_checkpoint_with_static_int8_reloads_bit_identical() {
    use quantlab::arch::mlp::{Mlp, MlpConfig};
    let cfg = MlpConfig::default();
    let mut tensors = std::collections::HashMap::new();
    for (i, (fan_in, fan_out)) in cfg.layer_shapes().into_iter().enumerate() {
        let n = quantlab::arch::mlp::layer_name(i);
        let w = quantlab::quant::random::randn(&[fan_out, fan_in], i as u64).unwrap();
        tensors.insert(format!("{n}.weight"), (w * 0.05).unwrap());
        tensors.insert(
            format!("{n}.bias"),
            quantlab::quant::random::randn(&[fan_out], 10 + i as u64).unwrap(),
        );
    }
    let m = Mlp::from_tensors(cfg, &tensors).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    m.save(&base).unwrap();
    let out = dir.path().join("q");
    let plan = "fc1=static-int8:entropy;fc2=nf4;fc3=f16";
    quantize_model(
        base.to_str().unwrap(),
        plan,
        &out,
        &args(None),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let back = Mlp::load(&out, &Device::Cpu).unwrap();
    assert_eq!(back.layers[0].method.to_string(), "static-int8:entropy");
    // The in-memory model calibrated on the same images.
    let data = quantlab::data::mnist::load(
        &quantlab::data::DataDir::resolve(None).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let mut mem = m.clone();
    let x = data.train.images.narrow(0, 0, 256).unwrap();
    quantlab::nn::apply_plan(&mut mem, &plan.parse().unwrap(), |mm| mm.calibrate(&x)).unwrap();
    let t = data.test.images.narrow(0, 0, 16).unwrap();
    assert_eq!(
        back.forward(&t).unwrap().to_vec2::<f32>().unwrap(),
        mem.forward(&t).unwrap().to_vec2::<f32>().unwrap()
    );
}
