#!/usr/bin/env bash
# On the GPU machine: copies the carried parcels (.cuda/p*) into /tmp/ql/in and assembles
# every piece whose parts are all there (checksums verified): the binary, the data, the
# SmolLM2 model, the Marian model, Python wheels. Prints what is ready.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=/tmp/ql
mkdir -p $Q/in $Q/bin $Q/data $Q/models
for p in .cuda/p*; do [ -d "$p" ] && cp -n "$p"/* $Q/in/ 2>/dev/null || true; done
cd $Q/in
if [ ! -x $Q/bin/quantlab ] && [ -f quantlab.xz ] && [ -f quantlab.sha256 ]; then
  xz -dc quantlab.xz > $Q/bin/quantlab
  (cd $Q/bin && sha256sum -c $Q/in/quantlab.sha256) && chmod +x $Q/bin/quantlab || rm -f $Q/bin/quantlab
fi
if [ ! -x $Q/bin/cuda-tests ] && [ -f cuda-tests.xz ]; then
  xz -dc cuda-tests.xz > $Q/bin/cuda-tests && chmod +x $Q/bin/cuda-tests
fi
if [ ! -d $Q/data/wikitext-2 ] && [ -f data.tar.xz ]; then tar -C $Q/data -xJf data.tar.xz; fi
if [ ! -d $Q/models/marian-multi30k-en-de ] && [ -f marian.tar ]; then tar -C $Q/models -xf marian.tar; fi
if [ -f model.sha256 ]; then
  name=$(awk '{print $2}' model.sha256)
  if [ ! -f "$Q/models/$name" ] && [ -f model.parts ] && [ "$(ls model.gguf.part-* 2>/dev/null | wc -l)" -ge "$(cat model.parts)" ]; then
    cat model.gguf.part-* > "$Q/models/$name.tmp" && mv "$Q/models/$name.tmp" "$Q/models/$name"
    (cd $Q/models && sha256sum -c $Q/in/model.sha256) || rm -f "$Q/models/$name"
  fi
fi
if ls ./*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site ./*.whl
fi
echo "ready: binary $([ -x $Q/bin/quantlab ] && echo yes || echo no), data $([ -d $Q/data/wikitext-2 ] && echo yes || echo no), smollm $(ls $Q/models/*.gguf >/dev/null 2>&1 && echo yes || echo no), marian $([ -d $Q/models/marian-multi30k-en-de ] && echo yes || echo no), wheels $([ -d /tmp/site ] && echo yes || echo no)"
