//! The `--device` flag: `cpu` or `cuda[:N]`, turned into a candle device with errors that
//! say what to do when this build or machine cannot provide it.

use anyhow::{bail, Context, Result};
use candle_core::Device;

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
