#!/usr/bin/env bash
# Packs what a GPU measurement batch needs into parcels the device tool can carry (each
# call carries at most 64 MiB with the working tree): .cuda/p1, .cuda/p2, ... Each parcel
# is carried by one call and unpacked there into /tmp/ql by scripts/gpu-unpack.sh (files
# stay while the machine is held; calls must follow each other within its idle time).
#
#   scripts/build-cuda.sh && scripts/gpu-stage.sh [DATA_DIR] [SMOLLM_GGUF] [MARIAN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
GGUF=${2:-$(ls models/smollm2-135m/*.gguf | head -1)}
MARIAN=${3:-../shared/models/marian-multi30k-en-de}
LIMIT=$((56 * 1024 * 1024))   # bytes per parcel, leaving room for the working tree
[ -f .cuda/bin/quantlab.xz ] || { echo "run scripts/build-cuda.sh first" >&2; exit 1; }
rm -rf .cuda/p* .cuda/stage && mkdir -p .cuda/stage
# Pieces to distribute: the binary, the data, the models (split where large).
cp .cuda/bin/quantlab.xz .cuda/bin/quantlab.sha256 .cuda/bin/cuda-tests.xz .cuda/stage/
tar -C "$DATA" -cf .cuda/stage/data.tar wikitext-2 mnist multi30k && tar -C models -rf .cuda/stage/data.tar mnist-mlp && xz -f .cuda/stage/data.tar
tar -C "$(dirname "$MARIAN")" -cf .cuda/stage/marian.tar "$(basename "$MARIAN")"
(cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") | sed 's# .*/# #' > .cuda/stage/model.sha256
split -b 40M -d "$GGUF" .cuda/stage/model.gguf.part-
ls .cuda/stage/model.gguf.part-* | wc -l > .cuda/stage/model.parts
[ -d .whl ] && cp .whl/*.whl .cuda/stage/ 2>/dev/null || true
# First-fit into parcels, largest pieces first.
n=0
declare -A used
for f in $(ls -S .cuda/stage); do
  size=$(stat -c %s ".cuda/stage/$f")
  placed=
  for ((i = 1; i <= n; i++)); do
    if (( used[$i] + size <= LIMIT )); then placed=$i; break; fi
  done
  if [ -z "$placed" ]; then n=$((n + 1)); placed=$n; used[$n]=0; mkdir -p ".cuda/p$n"; fi
  mv ".cuda/stage/$f" ".cuda/p$placed/"
  used[$placed]=$(( used[$placed] + size ))
done
rmdir .cuda/stage
for ((i = 1; i <= n; i++)); do echo ".cuda/p$i: $(du -sh .cuda/p$i | cut -f1) $(ls .cuda/p$i | tr '\n' ' ')"; done
