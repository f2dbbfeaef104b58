//! Which instruction-set path the kernels take, detected once at run time.
//!
//! The binary is built for x86-64-v3 (AVX2 + FMA; see `.cargo/config.toml`), so AVX2 is
//! the floor on x86; AVX-512 (F, BW, VL with VNNI) kernels are picked only where the CPU
//! has them. `QUANTLAB_KERNEL=portable|avx2|avx512` forces a lower path, so tests and
//! benchmarks can compare every path a machine has; asking for one the CPU lacks is an
//! error (from [`check_env`]) rather than an illegal instruction.

use std::sync::OnceLock;

/// The environment variable that forces a kernel path.
pub const ENV: &str = "QUANTLAB_KERNEL";

/// Kernel paths, ordered from the most portable to the most specialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust: any CPU.
    Portable,
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`).
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512vnni" | "vnni" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// The best path this CPU can run.
    pub fn detected() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(detect)
    }

    /// Every path this CPU can run, most portable first (what tests check one by one).
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i <= Isa::detected())
            .collect()
    }

    /// The path kernels take: the best detected, lowered by `QUANTLAB_KERNEL` when set to a
    /// path the CPU has (an unusable value leaves the detected path; [`check_env`] reports it).
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| match requested() {
            Ok(Some(isa)) => isa,
            _ => Isa::detected(),
        })
    }
}

fn requested() -> Result<Option<Isa>, String> {
    let Ok(value) = std::env::var(ENV) else {
        return Ok(None);
    };
    let isa = Isa::parse(&value).ok_or_else(|| {
        format!("{ENV}={value} is not a kernel path: use portable, avx2 or avx512")
    })?;
    if isa > Isa::detected() {
        return Err(format!(
            "{ENV}={value}: this CPU has no {} (its best path is {}); unset it or pick a lower path",
            isa.name(),
            Isa::detected().name()
        ));
    }
    Ok(Some(isa))
}

/// The `QUANTLAB_KERNEL` setting checked: an error naming the value and the choices when it
/// is not a path this CPU can run.
pub fn check_env() -> anyhow::Result<()> {
    requested().map(|_| ()).map_err(anyhow::Error::msg)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
        Isa::Avx512
    } else if has!("avx2") && has!("fma") {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

/// The CPU features this binary was built to require, missing on this machine (empty when
/// it can run): checked first thing in `main`, so an old CPU gets a sentence, not SIGILL.
pub fn missing_build_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut missing = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        macro_rules! need {
            ($($f:tt),*) => {$(
                if cfg!(target_feature = $f) && !has!($f) {
                    missing.push($f);
                }
            )*};
        }
        need!("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt");
    }
    missing
}

/// One line for tables and logs: the path in use and the SIMD features the CPU reports.
pub fn describe() -> String {
    format!(
        "{} (cpu: {})",
        Isa::selected().name(),
        cpu_flags().join(" ")
    )
}

/// The SIMD flags that matter to these kernels, as `/proc/cpuinfo` spells them.
pub fn cpu_flags() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut flags = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        macro_rules! flag {
            ($($f:tt => $name:literal),*) => {$(
                if has!($f) {
                    flags.push($name);
                }
            )*};
        }
        flag!("avx2" => "avx2", "fma" => "fma", "avx512f" => "avx512f",
              "avx512bw" => "avx512bw", "avx512vl" => "avx512vl",
              "avx512vnni" => "avx512_vnni", "avxvnni" => "avx_vnni");
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_order() {
        assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
        assert_eq!(Isa::parse("portable"), Some(Isa::Portable));
        assert_eq!(Isa::parse("avx512"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        let avail = Isa::available();
        assert_eq!(avail[0], Isa::Portable);
        assert_eq!(*avail.last().unwrap(), Isa::detected());
        assert!(Isa::selected() <= Isa::detected());
    }

    #[test]
    fn this_binary_runs_here() {
        assert!(missing_build_features().is_empty());
    }
}
