//! The `--device` flag: `cpu` or `cuda[:N]`, turned into a candle device with errors that
//! say what to do when this build or machine cannot provide it.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::sync::RwLock;

/// The `--dtype` choice; `None` means each device's default.
static ACTIVATION_DTYPE: RwLock<Option<DType>> = RwLock::new(None);

/// Parses `--dtype`: `f32`, `bf16`, `f16` or `auto` (the device's default).
pub fn parse_dtype(spec: &str) -> Result<Option<DType>> {
    Ok(match spec.trim().to_ascii_lowercase().as_str() {
        "auto" => None,
        "f32" | "fp32" | "float32" => Some(DType::F32),
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "fp16" | "float16" => Some(DType::F16),
        other => bail!("--dtype '{other}' is not an activation dtype: use f32, bf16, f16 or auto"),
    })
}

/// `cpu` or `cuda:N`, as the flag spells it.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `f32`, `bf16`, `f16`... as `--dtype` spells it.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => dtype.as_str(),
    }
}

/// Sets the activation dtype LLMs run in (the `--dtype` flag).
pub fn set_activation_dtype(dtype: Option<DType>) {
    *ACTIVATION_DTYPE.write().unwrap_or_else(|e| e.into_inner()) = dtype;
}

/// The activation dtype for models on `device`: `--dtype` if given, else f32 on the CPU
/// (the reference numbers) and bf16 on a GPU (how transformers usually runs there).
pub fn activation_dtype(device: &Device) -> DType {
    let chosen = *ACTIVATION_DTYPE.read().unwrap_or_else(|e| e.into_inner());
    chosen.unwrap_or(if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    })
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.as_str() {
        "cuda" => 0,
        s => match s.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().with_context(|| {
                format!("--device '{s}': the GPU index must be a number, e.g. cuda:0")
            })?,
            None => bail!("--device '{s}' is not a device: use cpu, cuda or cuda:N"),
        },
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).with_context(|| {
        format!("cannot open CUDA device {ordinal}: is there a GPU with that index and a working driver?")
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    bail!(
        "--device cuda:{ordinal}: this quantlab binary was built without CUDA; rebuild it with `cargo build --release --features cuda` on a machine with the CUDA toolchain (see the README), or use --device cpu"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_parse_and_default_per_device() {
        assert_eq!(parse_dtype("auto").unwrap(), None);
        assert_eq!(parse_dtype("BF16").unwrap(), Some(DType::BF16));
        assert_eq!(parse_dtype("fp16").unwrap(), Some(DType::F16));
        assert!(parse_dtype("int8")
            .unwrap_err()
            .to_string()
            .contains("--dtype"));
        // The process-wide flag is unset in tests: the CPU default is the reference f32.
        assert_eq!(activation_dtype(&Device::Cpu), DType::F32);
    }

    #[test]
    fn parses_cpu_and_refuses_nonsense() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse(" CPU ").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cuda:-1", ""] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = parse("cuda:0").unwrap_err().to_string();
            assert!(
                e.contains("without CUDA") && e.contains("--features cuda"),
                "{e}"
            );
        }
    }
}
