#!/usr/bin/env bash
# Builds llama.cpp as a CPU benchmark baseline for quantlab: the speed and perplexity anchor
# that quantlab's own kernels are compared against, and the checker for GGUF files that quantlab
# writes (run them through llama-perplexity). llama.cpp is NEVER a dependency of the crate;
# nothing in Cargo.toml / build.rs refers to it, and vendor/ is git-ignored.
#
# Source: the llama-cpp-python sdist from PyPI (it vendors llama.cpp under vendor/llama.cpp),
# because only package registries are reachable from these machines (no GitHub).
# llama-cpp-python 0.3.36 vendors llama.cpp commit 0c1e57098bba (read from the sdist's
# .git/modules/vendor/llama.cpp/HEAD).
#
# Output: vendor/llama.cpp/build/bin/{llama-perplexity,llama-bench,llama-quantize}
#         (+ llama-cli with --with-cli). Built with -march=native (GGML_NATIVE=ON), so the
#         binaries are tied to the CPU they were built on.
# Time:   ~9-12+ min on 2 cores (measured 540 s with a cargo build running alongside); the
#         build runs under `nice -n 19` with -j $(nproc), so it yields CPU to other work.
#
# Usage: scripts/build-llama-cpp.sh [--force] [--with-cli]
#   --force    (or LLAMA_FORCE_REBUILD=1): delete vendor/llama.cpp/build and rebuild from scratch
#   --with-cli (or LLAMA_WITH_CLI=1): also build llama-cli. In this llama.cpp version llama-cli
#              links the whole server (tools/server), which adds several minutes on 2 cores,
#              so it is off by default; llama-completion-style generation is not needed here.
# Idempotent: the download, extraction and build are each skipped when already done.
#
# Needs: python3 + pip, a C/C++ toolchain (build-essential is apt-installed if missing),
# cmake (pip-installed into vendor/.tools/ if not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

LCP_VERSION="0.3.36"                # pinned llama-cpp-python sdist
LLAMA_COMMIT="0c1e57098bba"         # llama.cpp commit vendored by that sdist (build-info only)

force="${LLAMA_FORCE_REBUILD:-0}"
with_cli="${LLAMA_WITH_CLI:-0}"
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --with-cli) with_cli=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

vendor="$root/vendor"
cache="$vendor/.cache"
tools="$vendor/.tools"
src="$vendor/llama.cpp"
build="$src/build"
sdist="$cache/llama_cpp_python-$LCP_VERSION.tar.gz"
mkdir -p "$cache" "$tools"

log() { echo "[build-llama-cpp] $*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "need root (or sudo) for: $*" >&2; exit 1
  fi
}
apt_updated=0
apt_install() {
  # apt-get update only when the install fails without it (fresh images have empty lists)
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; then
    if [ "$apt_updated" = 0 ]; then
      as_root apt-get update; apt_updated=1
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
    else
      return 1
    fi
  fi
}

# --- toolchain ------------------------------------------------------------------------------
if ! command -v gcc >/dev/null || ! command -v g++ >/dev/null || ! command -v make >/dev/null; then
  log "installing build-essential"
  apt_install build-essential
fi
if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
  log "installing python3-pip"
  apt_install python3 python3-pip
fi

if command -v cmake >/dev/null; then
  CMAKE="$(command -v cmake)"
else
  CMAKE="$(find "$tools/cmake-py" -path '*/bin/cmake' -type f 2>/dev/null | head -n1 || true)"
  if [ -z "$CMAKE" ]; then
    log "cmake not on PATH: pip-installing it into $tools/cmake-py"
    # --target keeps it out of the system/user Python (and sidesteps PEP 668 'externally managed')
    python3 -m pip install --quiet --target "$tools/cmake-py" cmake
    CMAKE="$(find "$tools/cmake-py" -path '*/bin/cmake' -type f | head -n1)"
  fi
fi
log "cmake: $CMAKE ($("$CMAKE" --version | head -n1))"

# --- download -------------------------------------------------------------------------------
if [ -s "$sdist" ]; then
  log "sdist already downloaded: $sdist"
else
  log "downloading llama-cpp-python==$LCP_VERSION sdist from PyPI"
  tmp="$(mktemp -d)"
  # --no-binary for this package only: ':all:' would also build cmake/ninja (the sdist's
  # build-backend deps, installed to prepare metadata) from source, which takes very long.
  python3 -m pip download --no-deps --no-binary llama-cpp-python \
    --dest "$tmp" "llama-cpp-python==$LCP_VERSION"
  mv "$tmp/llama_cpp_python-$LCP_VERSION.tar.gz" "$sdist"
  rm -rf "$tmp"
fi

# --- extract --------------------------------------------------------------------------------
stamp="$src/.quantlab-sdist"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "llama-cpp-python==$LCP_VERSION" ]; then
  log "already extracted: $src"
else
  log "extracting vendor/llama.cpp from the sdist"
  rm -rf "$src" "$src.part"
  tmp="$(mktemp -d "$vendor/.extract.XXXXXX")"
  # the .git gitfile points at a submodule dir that is not shipped: leave it out
  tar -xzf "$sdist" -C "$tmp" --exclude="llama_cpp_python-$LCP_VERSION/vendor/llama.cpp/.git" \
    "llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
  mv "$tmp/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp" "$src.part"
  rm -rf "$tmp"
  echo "llama-cpp-python==$LCP_VERSION" > "$src.part/.quantlab-sdist"
  mv "$src.part" "$src"
fi

# --- configure + build ----------------------------------------------------------------------
# Option names checked against this llama.cpp: LLAMA_CURL is deprecated and ignored here (no
# libcurl any more; downloads go through the vendored cpp-httplib), so the network-related
# switches are LLAMA_OPENSSL (HTTPS) and LLAMA_USE_PREBUILT_UI (server web UI download from HF).
# vendor/llama.cpp has no .git of its own: stop git (called by the cmake scripts for build info)
# from walking up into the quantlab repository and reporting quantlab's commit as ggml's.
export GIT_CEILING_DIRECTORIES="$vendor"
targets=(llama-perplexity llama-bench llama-quantize)
build_server=OFF
if [ "$with_cli" = 1 ]; then targets+=(llama-cli); build_server=ON; fi
cmake_opts=(
  -DCMAKE_BUILD_TYPE=Release
  -DGGML_NATIVE=ON
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_SERVER=$build_server
  -DGGML_CCACHE=OFF
  -DLLAMA_BUILD_COMMIT=$LLAMA_COMMIT
  -DLLAMA_BUILD_NUMBER=0
)
config_id="${cmake_opts[*]} | ${targets[*]}"

if [ "$force" = 1 ]; then
  log "forced rebuild: removing $build"
  rm -rf "$build"
fi

all_built=1
for t in "${targets[@]}"; do [ -x "$build/bin/$t" ] || all_built=0; done
if [ "$all_built" = 1 ] && [ -f "$build/.quantlab-config" ] && [ "$(cat "$build/.quantlab-config")" = "$config_id" ]; then
  log "already built (use --force to rebuild)"
else
  log "configuring: ${cmake_opts[*]}"
  "$CMAKE" -S "$src" -B "$build" "${cmake_opts[@]}"
  log "building ${targets[*]} with -j $(nproc) under nice -n 19 (~12+ min on 2 cores)"
  start=$(date +%s)
  nice -n 19 "$CMAKE" --build "$build" --config Release -j "$(nproc)" --target "${targets[@]}"
  echo "$config_id" > "$build/.quantlab-config"
  log "build took $(( $(date +%s) - start )) s"
fi

log "binaries in $build/bin/:"
for t in "${targets[@]}"; do ls -l "$build/bin/$t"; done
