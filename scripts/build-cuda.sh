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
mkdir -p .cuda/bin
strip -o .cuda/bin/quantlab "$CARGO_TARGET_DIR/release/quantlab"
xz -T2 -6 -f -k .cuda/bin/quantlab
(cd .cuda/bin && sha256sum quantlab > quantlab.sha256 && rm quantlab)
ls -la .cuda/bin
