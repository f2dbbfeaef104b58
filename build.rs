//! Embeds the git commit quantlab was built from (`QUANTLAB_GIT`: short hash, with
//! `-dirty` when tracked files differ from it) so every result row can say which code
//! produced it. Builds without git, or outside a clone (a source tarball), get `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_ptx();
    }
    let hash = git(&["rev-parse", "--short", "HEAD"]).filter(|h| !h.is_empty());
    let version = match hash {
        None => "unknown".to_string(),
        Some(h) => {
            // Only tracked files count: scratch files in the checkout do not change the code.
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{h}-dirty")
            } else {
                h
            }
        }
    };
    println!("cargo:rustc-env=QUANTLAB_GIT={version}");
    // Re-run when the commit or the sources change (a worktree's HEAD lives in its git dir).
    // Paths that do not exist would make cargo re-run this script on every build.
    let mut watch: Vec<String> = ["src", "build.rs", "Cargo.toml", "Cargo.lock"]
        .map(String::from)
        .to_vec();
    let head_ref = git(&["symbolic-ref", "-q", "HEAD"]);
    for flag in ["--git-dir", "--git-common-dir"] {
        if let Some(dir) = git(&["rev-parse", flag]) {
            watch.push(format!("{dir}/HEAD"));
            watch.push(format!("{dir}/index"));
            watch.push(format!("{dir}/packed-refs"));
            if let Some(r) = &head_ref {
                watch.push(format!("{dir}/{r}"));
            }
        }
    }
    for p in watch {
        if std::path::Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}

/// Compiles `kernels/cuda/*.cu` to PTX in `OUT_DIR` (the `cuda` feature): quantlab's fused
/// kernels, loaded at run time through candle's CUDA device (`src/nn/cuda.rs`). nvcc is
/// found as `$NVCC`, `$CUDA_TOOLKIT_ROOT/bin/nvcc`, `$CUDA_HOME/bin/nvcc` or on `PATH`;
/// the target is `sm_$CUDA_COMPUTE_CAP` (default 90, the H100/H200), as for candle's own
/// kernels.
fn cuda_ptx() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").ok().or_else(|| {
        ["CUDA_TOOLKIT_ROOT", "CUDA_HOME", "CUDA_PATH"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .map(|root| format!("{root}/bin/nvcc"))
            .find(|p| std::path::Path::new(p).exists())
    });
    let nvcc = nvcc.unwrap_or_else(|| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    for v in [
        "NVCC",
        "CUDA_TOOLKIT_ROOT",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_COMPUTE_CAP",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    // One module: every kernel file is listed here.
    let name = "fused";
    let src = format!("kernels/cuda/{name}.cu");
    println!("cargo:rerun-if-changed={src}");
    // Files it includes (kernels/cuda/*.cuh).
    println!("cargo:rerun-if-changed=kernels/cuda");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=sm_{cap}"), "-o"])
        .arg(out.join(format!("{name}.ptx")))
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on {src} ({s})"),
        Err(e) => panic!(
            "cannot run {nvcc} for {src} ({e}): put nvcc on PATH or set NVCC / CUDA_TOOLKIT_ROOT"
        ),
    }
}
