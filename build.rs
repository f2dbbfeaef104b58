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
