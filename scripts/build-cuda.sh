#!/usr/bin/env bash
# Builds quantlab with CUDA (candle's cuda feature, sm_90 by default) on a machine without
# a GPU, and packs the stripped binary for the GPU machine.
#
#   scripts/build-cuda.sh            # -> .cuda/bin/quantlab.xz (+ sha256)
#
# The toolchain comes from PyPI wheels (../shared/tools/cuda-toolchain.sh, CUDA 13.0: the
# GPU machine's driver). A cold build compiles candle's CUDA kernels with nvcc: ~20-40
# minutes on 2 cores; keep the target folder (default target/cuda, or CARGO_TARGET_DIR).
# CUDA_COMPUTE_CAP=90 targets the H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLCHAIN=${CUDA_TOOLCHAIN:-$HOME/.cache/cuda-13.0}
if [ ! -f "$TOOLCHAIN/env.sh" ]; then
  tool=../shared/tools/cuda-toolchain.sh
  [ -x "$tool" ] || { echo "no CUDA toolchain at $TOOLCHAIN and no $tool to make one" >&2; exit 1; }
  "$tool" "$TOOLCHAIN"
fi
# shellcheck disable=SC1091
source "$TOOLCHAIN/env.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release --features cuda
# The CPU/CUDA agreement tests (tests/cuda.rs) as one executable to run there.
tests=$(cargo test --release --features cuda --test cuda --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable") and m.get("target", {}).get("name") == "cuda": print(m["executable"])')
mkdir -p .cuda/bin
strip -o .cuda/bin/quantlab "$CARGO_TARGET_DIR/release/quantlab"
strip -o .cuda/bin/cuda-tests "$tests"
xz -T2 -6 -f .cuda/bin/quantlab .cuda/bin/cuda-tests
(cd .cuda/bin && xz -dc quantlab.xz | sha256sum | sed 's/-$/quantlab/' > quantlab.sha256)
ls -la .cuda/bin
