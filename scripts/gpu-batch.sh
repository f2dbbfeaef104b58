#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu-unpack.sh printed READY: one measurement batch.
# Every table goes to $OUT (JSON lines) with the log; the device and dtype are in each
# table's notes.
#
#   scripts/gpu-batch.sh check      # CPU vs CUDA agreement (f32), quick
#   scripts/gpu-batch.sh ppl        # full WikiText-2 test perplexity per format, tokens/s
#   scripts/gpu-batch.sh decode     # greedy decode tokens/s at batch 1 per format
#   scripts/gpu-batch.sh labs       # MNIST and Marian lab tables on the GPU
#   scripts/gpu-batch.sh hf         # transformers bf16/f32 on the same text
#   scripts/gpu-batch.sh agree      # CPU/CUDA agreement tests, Marian translations, MNIST on CPU
#   scripts/gpu-batch.sh profile    # time per forward section (QUANTLAB_PROFILE=1)
#   scripts/gpu-batch.sh bnb        # bitsandbytes' own LLM.int8()/NF4/FP4 on the whole model
#   scripts/gpu-batch.sh fused      # fused kernels: tests, perplexity and decode on/off, profile
#   scripts/gpu-batch.sh calib      # GPTQ/AWQ calibrated on the GPU; dynamic int8 on the device
#   scripts/gpu-batch.sh gemv       # packed decode GEMV: its tests, kernel bench vs bf16 cuBLAS,
#                                   # decode tokens/s with it on and off (QUANTLAB_PACKED_GEMV)
#   scripts/gpu-batch.sh sweep      # the weight-only method sweep (8/4/3/2 bits, g64/g128, KL);
#                                   # resumable: call again until it prints "sweep done"
#   scripts/gpu-batch.sh bw         # the v1 and v2 packed GEMVs: tests, kernel bench, SmolLM2
#                                   # decode per kernel, the big model with and without the
#                                   # packed size limit (QUANTLAB_PACKED_MAX_WEIGHTS): bw, bwbig
#   scripts/gpu-batch.sh q8         # --activations q8 on CUDA (dp4a GEMV): tests, bench-gemv
#                                   # rows beside exact/cuBLAS, SmolLM2 and big-model decode
#   scripts/gpu-batch.sh gv3        # the v3 GEMV (activations in shared memory, denormal decode):
#                                   # all cuda-tests, bench-gemv v1/v2/v3 vs cuBLAS at m = 1, 2,
#                                   # ncu sections of v3 at 28672x8192 (ncu where present), the
#                                   # SASS of the cubins carried beside this script (sel-*.cubin)
#   scripts/gpu-batch.sh fuse       # the fused q8 GEMV: all cuda-tests, bench-gemv m = 1, 2 (fused
#                                   # and 2-launch a:q8 beside v1/v2/v3 and cuBLAS), its grid,
#                                   # SmolLM2 decode --activations q8 fused vs two launches
#   scripts/gpu-batch.sh fusebig    # the 4.23 B synthetic Llama decode with fused q8 activations
#   scripts/gpu-batch.sh big        # decode where weights are the traffic: a random-weight Llama
#                                   # with 70B-sized layers (scripts/synthetic_llama.py), quantlab
#                                   # per format and transformers bf16 on the same folder
set -uo pipefail
Q=${QL_DIR:-/tmp/ql}  # where gpu-unpack.sh put the binaries (QL_DIR: another copy)
QL=$Q/bin/quantlab
M=$(ls $Q/models/*.gguf | head -1)
export QUANTLAB_DATA=$Q/data
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG=$OUT/log-$1.txt
run() {
  echo "+ $*" | tee -a "$LOG"
  local t=$SECONDS rc
  "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "  ($((SECONDS - t)) s, exit $rc)" | tee -a "$LOG"
  return "$rc"
}
ppl() { run $QL --quiet --format json --device "$1" --dtype "$2" perplexity --model "$M" "${@:3}"; }
FORMATS=("keep" "lm_head=keep;*=w:i8:sym" "lm_head=keep;*=w:i4:sym:g64" "lm_head=keep;*=nf4" \
  "lm_head=keep;*=fp4" "lm_head=keep;*=dynamic-int8" "lm_head=keep;*=q8_0" "lm_head=keep;*=q4_0" \
  "lm_head=keep;*=f16" "lm_head=keep;*=bf16" "lm_head=keep;*=fp8" "lm_head=keep;*=fp8:dyn" \
  "lm_head=keep;*=w8a8:token")
case "$1" in
  check)
    nvidia-smi -L | tee -a "$LOG"
    ppl cpu f32 --max-chunks 8 > "$OUT/check-cpu.jsonl"
    ppl cuda f32 --max-chunks 8 --batch 8 > "$OUT/check-cuda.jsonl"
    ppl cuda bf16 --max-chunks 8 --batch 8 >> "$OUT/check-cuda.jsonl"
    for p in "lm_head=keep;*=w:i4:sym:g64" "lm_head=keep;*=dynamic-int8" "lm_head=keep;*=q4_0"; do
      ppl cpu f32 --max-chunks 4 --plan "$p" >> "$OUT/check-cpu.jsonl"
      ppl cuda f32 --max-chunks 4 --batch 4 --plan "$p" >> "$OUT/check-cuda.jsonl"
    done
    ;;
  ppl)
    for d in f32 bf16; do ppl cuda $d --batch 32 > "$OUT/ppl-full-$d.jsonl"; done
    for p in "${FORMATS[@]:1}"; do ppl cuda bf16 --batch 32 --plan "$p" >> "$OUT/ppl-full-formats.jsonl"; done
    ;;
  decode)
    # llama-bench protocol: pp512 and tg128, 3 repetitions, every format on one model load each.
    args=()
    for p in "${FORMATS[@]:1}"; do args+=(--plan "$p"); done
    for d in bf16 f32; do
      run $QL --quiet --format json --device cuda --dtype $d bench --model "$M" -p 512 -n 128 -r 3 \
        "${args[@]}" > "$OUT/bench-$d.jsonl"
    done
    ;;
  labs)
    run $QL --format json --device cuda lab mnist --model $Q/data/mnist-mlp > "$OUT/lab-mnist.jsonl"
    run $QL --format json --device cuda lab marian --model $Q/models/marian-multi30k-en-de > "$OUT/lab-marian.jsonl"
    ;;
  hf)
    export PYTHONPATH=/tmp/site
    for d in bf16 f32; do
      run python3 scripts/transformers_gpu_reference.py --gguf "$M" \
        --text $Q/data/wikitext-2/test.txt --dtype $d --batch 32 --out "$OUT/transformers.jsonl"
    done
    ;;
  agree)
    # CPU/CUDA agreement: the format-by-format tests, Marian greedy translations, MNIST.
    run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1
    src=$Q/data/multi30k/test_2016_flickr.en.gz
    for d in cpu cuda; do
      zcat $src | $QL --quiet --device $d translate --model $Q/models/marian-multi30k-en-de \
        --num-beams 1 > "$OUT/translations-$d.txt" 2>> "$LOG"
    done
    echo "identical translations: $(paste -d '\t' "$OUT/translations-cpu.txt" "$OUT/translations-cuda.txt" \
      | awk -F '\t' '$1 == $2' | wc -l) of $(wc -l < "$OUT/translations-cpu.txt")" | tee -a "$LOG"
    run $QL --format json --device cpu lab mnist --model $Q/data/mnist-mlp > "$OUT/lab-mnist-cpu.jsonl"
    ;;
  profile)
    for d in bf16 f32; do
      run env QUANTLAB_PROFILE=1 $QL --quiet --device cuda --dtype $d perplexity --model "$M" --batch 32 --max-chunks 128
    done
    ;;
  bnb)
    export PYTHONPATH=/tmp/site:$PWD/scripts
    run python3 scripts/bnb_gpu_perplexity.py --gguf "$M" --text $Q/data/wikitext-2/test.txt \
      --out "$OUT/bnb.jsonl"
    ;;
  sweep)
    mkdir -p $Q/runs
    # Sequential calibration (GPTQ, AWQ) runs on the CPU: SWEEP_DEVICE=cpu uses the 16 cores.
    d=${SWEEP_DEVICE:-cuda}
    run timeout "${SWEEP_SECONDS:-540}" $QL --quiet --format json --device $d --dtype f32 sweep \
      --model "$M" --methods "${SWEEP_METHODS:-rtn,rtn-signed-max,rtn-clip,gptq,awq,hqq}" \
      --bits 8,4,3,2 --groups 64,128 --max-chunks 8 --kl --batch 8 --out $Q/runs/sweep-$d.jsonl \
      --plot $Q/runs/sweep-$d.svg > "$OUT/sweep-table-$d.jsonl" && echo "sweep done" | tee -a "$LOG"
    cp $Q/runs/sweep-$d.* "$OUT/" 2>/dev/null || true
    ;;
  tc)
    # W8A8 on tensor cores (cuBLASLt int8 / FP8) before and after: the emulation
    # (dequantized weight, fake-quantized activations) with QUANTLAB_TENSOR_CORES=0.
    for tc in 0 1; do
      run env QUANTLAB_TENSOR_CORES=$tc $QL --quiet --format json --device cuda --dtype bf16 bench \
        --model "$M" -p 512 -n 128 -r 3 --plan "lm_head=keep;*=w8a8:token" \
        --plan "lm_head=keep;*=fp8:dyn" --plan "lm_head=keep;*=bf16" > "$OUT/bench-tc$tc.jsonl"
      for p in "lm_head=keep;*=w8a8:token" "lm_head=keep;*=fp8:dyn"; do
        run env QUANTLAB_TENSOR_CORES=$tc $QL --quiet --format json --device cuda --dtype bf16 \
          perplexity --model "$M" --batch 32 --plan "$p" >> "$OUT/ppl-tc$tc.jsonl"
      done
    done
    # CPU/CUDA agreement at batch 1-style windows, 8 chunks (compare with the CPU run here).
    for d in cpu cuda; do
      for p in "lm_head=keep;*=w8a8:token" "lm_head=keep;*=fp8:dyn"; do
        ppl $d f32 --max-chunks 8 --plan "$p" >> "$OUT/tc-agree-$d.jsonl"
      done
    done
    ;;
  fused)
    # The fused kernels (kernels/cuda/fused.cu): their tests, then full-test perplexity and
    # decode with them on and off (QUANTLAB_FUSED=0) in the same run, a profile, and
    # transformers bf16 on the same text.
    run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1 --nocapture
    for f in 1 0; do
      for d in bf16 f32; do
        QUANTLAB_FUSED=$f ppl cuda $d --batch 64 >> "$OUT/fused-ppl.jsonl"
      done
    done
    QUANTLAB_FUSED=1 ppl cuda bf16 --batch 64 >> "$OUT/fused-ppl.jsonl"
    run env QUANTLAB_PROFILE=1 $QL --quiet --device cuda --dtype bf16 perplexity --model "$M" --batch 64 --max-chunks 128
    args=()
    for p in "lm_head=keep;*=w:i8:sym" "lm_head=keep;*=w:i4:sym:g64"; do args+=(--plan "$p"); done
    for f in 1 0; do
      QUANTLAB_FUSED=$f run $QL --quiet --format json --device cuda --dtype bf16 bench --model "$M" \
        -p 512 -n 128 -r 3 "${args[@]}" >> "$OUT/fused-bench.jsonl"
    done
    # Where decode time goes (sections synchronised, so slower than unprofiled).
    run env QUANTLAB_PROFILE=1 $QL --quiet --device cuda --dtype bf16 bench --model "$M" -p 0 -n 128 -r 1
    if [ -z "${SKIP_HF:-}" ]; then
      export PYTHONPATH=/tmp/site
      run python3 scripts/transformers_gpu_reference.py --gguf "$M" \
        --text $Q/data/wikitext-2/test.txt --dtype bf16 --batch 64 --out "$OUT/transformers.jsonl"
    fi
    ;;
  calib)
    # Sequential calibration on the GPU: GPTQ calibrated on the CPU and on CUDA (16
    # samples, agreement), then a GPTQ + AWQ sweep on CUDA at the default 128 × 512
    # (time); dynamic int8 with its range kept on the device (full test) and, for the
    # same-run comparison, the host round trip (QUANTLAB_FUSED=0, 64 chunks).
    mkdir -p $Q/runs
    for d in cpu cuda; do
      ppl $d f32 --max-chunks 8 --batch 8 --plan "lm_head=keep;*=gptq:i4:sym:g64" --calib-samples 16 >> "$OUT/calib-agree.jsonl"
    done
    run timeout 300 $QL --quiet --format json --device cuda --dtype f32 sweep --model "$M" --methods gptq,awq \
      --bits 4 --groups 64 --max-chunks 8 --batch 8 --out $Q/runs/sweep-calib.jsonl > "$OUT/calib-sweep.jsonl"
    # GPTQ's sensitivity to float-level differences: the composed attention on the GPU.
    QUANTLAB_FUSED=0 ppl cuda f32 --max-chunks 8 --batch 8 --plan "lm_head=keep;*=gptq:i4:sym:g64" --calib-samples 16 >> "$OUT/calib-agree.jsonl"
    # dynamic int8 at batch 1 (the per-tensor range is per forward pass): CPU vs CUDA.
    for d in cpu cuda; do
      ppl $d f32 --max-chunks 4 --plan "lm_head=keep;*=dynamic-int8" >> "$OUT/dyn-int8.jsonl"
    done
    ppl cuda bf16 --batch 32 --plan "lm_head=keep;*=dynamic-int8" >> "$OUT/dyn-int8.jsonl"
    QUANTLAB_FUSED=0 ppl cuda bf16 --batch 32 --max-chunks 64 --plan "lm_head=keep;*=dynamic-int8" >> "$OUT/dyn-int8.jsonl"
    ;;
  big)
    # SmolLM2-135M cannot show what 4-bit weights do to decode speed on this card: its bf16
    # weights take ~75 µs a token to read, its launches milliseconds. This model's weights
    # are the traffic: BIG_LAYERS (default 4) layers of hidden 8192 / intermediate 28672 /
    # 64 heads / 8 KV heads, SmolLM2's tokenizer and vocabulary, random N(0, 0.02²) weights.
    tok=$Q/tok
    big=$Q/big-${BIG_LAYERS:-4}
    [ -d $tok ] || run $QL --quiet quantize --model "$M" --plan '*=bf16' --out $tok
    [ -d $big ] || run python3 scripts/synthetic_llama.py --out $big --tokenizer-dir $tok \
      --layers "${BIG_LAYERS:-4}" --hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8 \
      --bench-decode --bench-out "$OUT/big-transformers.jsonl"
    args=()
    IFS='|' read -ra plans <<< "${BIG_PLANS:-lm_head=keep;*=w:i8:sym|lm_head=keep;*=w:i4:sym:g64|lm_head=keep;*=nf4}"
    for p in "${plans[@]}"; do args+=(--plan "$p"); done
    run $QL --quiet --format json --device cuda --dtype bf16 bench --model $big -p 0 -n 128 -r 3 \
      "${args[@]}" >> "$OUT/big-bench.jsonl"
    ;;
  gemv)
    # The packed decode GEMV (kernels/cuda/gemv.cuh): its tests against the CPU reference and
    # the CPU model, the kernel benchmark against the dense product (cuBLAS) on SmolLM2's and
    # large shapes, then decode tokens/s with it on and off in the same run, and a profile.
    run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1 packed
    run $QL --device cuda --dtype bf16 bench-gemv -r 200 > "$OUT/gemv-bf16-m1.md"
    for m in 2 4 8; do
      run $QL --device cuda --dtype bf16 bench-gemv -m $m -r 100 > "$OUT/gemv-bf16-m$m.md"
    done
    run $QL --device cuda --dtype f32 bench-gemv -r 100 --shapes 576x576,1536x576,4096x4096,14336x4096 \
      > "$OUT/gemv-f32-m1.md"
    args=()
    for p in "lm_head=keep;*=w:i8:sym" "lm_head=keep;*=w:i4:sym:g64" "lm_head=keep;*=nf4"; do
      args+=(--plan "$p")
    done
    for f in 1 0 1; do
      QUANTLAB_PACKED_GEMV=$f run $QL --quiet --device cuda --dtype bf16 bench --model "$M" \
        -p 0 -n 128 -r 3 "${args[@]}" >> "$OUT/decode-packed$f.md"
    done
    run env QUANTLAB_PROFILE=1 $QL --quiet --device cuda --dtype bf16 bench --model "$M" -p 0 -n 64 \
      -r 1 --plan "lm_head=keep;*=w:i4:sym:g64"
    [ -n "${SKIP_ALL_TESTS:-}" ] || run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1
    ;;
  bw)
    # The bandwidth-bound GEMVs (gemv2_*, gemv3_* in kernels/cuda/gemv.cuh) against v1 and
    # cuBLAS, each kernel's rows in the same run; then
    # SmolLM2 decode with the automatic kernel choice and with v1 forced.
    nvidia-smi -L | tee -a "$LOG"
    run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1 packed
    run $QL --device cuda --dtype bf16 bench-gemv -r 200 > "$OUT/gemv-bf16-m1.md"
    run $QL --device cuda --dtype bf16 bench-gemv -m 2 -r 100 > "$OUT/gemv-bf16-m2.md"
    args=()
    for p in "lm_head=keep;*=w:i8:sym" "lm_head=keep;*=w:i4:sym:g64" "lm_head=keep;*=nf4"; do
      args+=(--plan "$p")
    done
    if [ -f "$M" ]; then
      for kn in auto v1 auto v1; do
        echo "## QUANTLAB_GEMV_KERNEL=$kn" >> "$OUT/decode.md"
        QUANTLAB_GEMV_KERNEL=$kn run $QL --quiet --device cuda --dtype bf16 bench --model "$M" \
          -p 0 -n 128 -r 3 "${args[@]}" >> "$OUT/decode.md"
      done
    fi
    ;;
  bwbig)
    # bw's large model (weights are the traffic), with the packed size limit and without.
    args=()
    for p in "lm_head=keep;*=w:i8:sym" "lm_head=keep;*=w:i4:sym:g64" "lm_head=keep;*=nf4"; do
      args+=(--plan "$p")
    done
    tok=$Q/tok
    big=$Q/big-${BIG_LAYERS:-4}
    [ -d $tok ] || run $QL --quiet quantize --model "$M" --plan '*=bf16' --out $tok
    [ -d $big ] || run python3 scripts/synthetic_llama.py --out $big --tokenizer-dir $tok \
      --layers "${BIG_LAYERS:-4}" --hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8
    for lim in ${BIG_LIMITS:-none}; do
      # none: every weight packed (the default); a number: only weights up to it.
      if [ $lim = none ]; then e=(); else e=(QUANTLAB_PACKED_MAX_WEIGHTS=$lim); fi
      echo "{\"packed_max_weights\": \"$lim\"}" >> "$OUT/big-bench.jsonl"
      run env "${e[@]}" $QL --quiet --format json --device cuda --dtype bf16 bench --model $big \
        -p 0 -n 128 -r 3 "${args[@]}" >> "$OUT/big-bench.jsonl"
    done
    ;;
  q8)
    # --activations q8 on CUDA (kernels/cuda/gemv_q8.cuh): its tests and the exact packed
    # ones, bench-gemv (exact v1/v2, a:q8 and cuBLAS rows in one run, m = 1 and 2),
    # SmolLM2 decode with and without q8 activations, then the big model (bf16 + q8 plans;
    # BIG_Q8=0 skips it).
    nvidia-smi -L | tee -a "$LOG"
    run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1 q8
    run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1 packed
    for m in 1 2; do
      run $QL --device cuda --dtype bf16 bench-gemv -m $m -r 100 --formats q8,q4g32,q4g64,nf4 \
        > "$OUT/q8-gemv-m$m.md"
    done
    args=()
    for p in "lm_head=keep;*=w:i8:sym" "lm_head=keep;*=w:i4:sym:g32" "lm_head=keep;*=w:i4:sym:g64" \
      "lm_head=keep;*=nf4"; do
      args+=(--plan "$p")
    done
    for a in q8 f32 q8; do
      run $QL --quiet --activations $a --device cuda --dtype bf16 bench --model "$M" \
        -p 0 -n 128 -r 3 "${args[@]}" >> "$OUT/q8-decode.md"
    done
    if [ "${BIG_Q8:-1}" != 0 ]; then
      tok=$Q/tok
      big=$Q/big-4
      [ -d $tok ] || run $QL --quiet quantize --model "$M" --plan '*=bf16' --out $tok
      [ -d $big ] || run python3 scripts/synthetic_llama.py --out $big --tokenizer-dir $tok \
        --layers 4 --hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8
      # q8, then the exact kernels (BIG_Q8_EXACT=0 skips them), each against bf16 in its run.
      for a in q8 $([ "${BIG_Q8_EXACT:-1}" != 0 ] && echo f32); do
        run $QL --quiet --activations $a --format json --device cuda --dtype bf16 bench \
          --model $big -p 0 -n 128 -r 3 --plan "lm_head=keep;*=w:i8:sym" \
          --plan "lm_head=keep;*=w:i4:sym:g64" >> "$OUT/q8-big.jsonl"
      done
    fi
    ;;
  gv3)
    nvidia-smi -L | tee -a "$LOG"
    run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1 packed_gemv
    run $QL --device cuda --dtype bf16 bench-gemv -r 200 > "$OUT/gemv-bf16-m1.md"
    run $QL --device cuda --dtype bf16 bench-gemv -m 2 -r 100 --kernels v2,v3 > "$OUT/gemv-bf16-m2.md"
    if command -v ncu >/dev/null; then
      for kf in "v3 q4g64" "v3 q8"; do
        set -- $kf
        timeout 75 ncu --clock-control none --kernel-name "regex:gemv${1#v}_" --launch-skip 3 \
          --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section WarpStateStats --section InstructionStats --section Occupancy \
          $QL --device cuda --dtype bf16 bench-gemv --shapes 28672x8192 --formats $2 \
          --kernels $1 -r 5 > "$OUT/ncu-$1-$2.txt" 2>&1
        echo "ncu $kf: exit $?" | tee -a "$LOG"
      done
    fi
    if command -v cuobjdump >/dev/null; then
      for c in "$(dirname "$0")"/sel-*.cubin; do
        [ -f "$c" ] && { echo "### $(basename "$c")"; cuobjdump -sass "$c"; }
      done > "$OUT/sel.sass"
    fi
    [ -n "${SKIP_ALL_TESTS:-}" ] ||
      run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1 --skip packed_gemv
    ;;
  fuse)
    # The fused q8 GEMV (gemv_q8f_* in kernels/cuda/gemv_q8.cuh: the activations quantized in
    # each block's prologue, one launch): all cuda-tests, bench-gemv m = 1, 2 (a:q8 fused and
    # 2-launch, v1/v2/v3 exact, cuBLAS bf16: one run each), the fused kernel's grid at 2, 4
    # and 8 blocks per SM (FUSE_GRID=0 skips it), SmolLM2 decode with --activations q8
    # fused / two launches / fused (QUANTLAB_Q8_FUSED), each against bf16 in its run.
    # SKIP_ALL_TESTS=1 skips the tests. The big model: fusebig.
    nvidia-smi -L | tee -a "$LOG"
    [ -n "${SKIP_ALL_TESTS:-}" ] || run env CARGO_MANIFEST_DIR="$PWD" $Q/bin/cuda-tests --test-threads 1
    for m in 1 2; do
      run $QL --device cuda --dtype bf16 bench-gemv -m $m -r 100 --formats q8,q4g64,nf4 \
        > "$OUT/fuse-gemv-m$m.md"
    done
    for b in $([ "${FUSE_GRID:-1}" != 0 ] && echo 2 4 8); do
      echo "## QUANTLAB_Q8_BLOCKS_PER_SM=$b" >> "$OUT/fuse-grid.md"
      QUANTLAB_Q8_BLOCKS_PER_SM=$b run $QL --device cuda --dtype bf16 bench-gemv -r 100 \
        --shapes 4096x4096,14336x4096,28672x8192 --formats q8,q4g64 --kernels v2 >> "$OUT/fuse-grid.md"
    done
    if [ -f "$M" ]; then
      args=()
      for p in "lm_head=keep;*=w:i8:sym" "lm_head=keep;*=w:i4:sym:g64" "lm_head=keep;*=nf4"; do
        args+=(--plan "$p")
      done
      for f in 1 0 1; do
        echo "## QUANTLAB_Q8_FUSED=$f" >> "$OUT/fuse-decode.md"
        QUANTLAB_Q8_FUSED=$f run $QL --quiet --activations q8 --device cuda --dtype bf16 bench \
          --model "$M" -p 0 -n 128 -r 3 "${args[@]}" >> "$OUT/fuse-decode.md"
      done
    fi
    ;;
  fusebig)
    # The 4.23 B synthetic Llama (as bwbig) with --activations q8: bf16, w:i8, w:i4 g64, nf4
    # in one run with the automatic route (fused up to 2^24 weights: none of this model's
    # layers); FUSE_BIG_AB=1 adds a run forced fused and one forced to two launches.
    tok=$Q/tok
    big=$Q/big-4
    [ -d $tok ] || run $QL --quiet quantize --model "$M" --plan '*=bf16' --out $tok
    [ -d $big ] || run python3 scripts/synthetic_llama.py --out $big --tokenizer-dir $tok \
      --layers 4 --hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8
    for f in auto ${FUSE_BIG_AB:+1 0}; do
      if [ $f = auto ]; then e=(); else e=(QUANTLAB_Q8_FUSED=$f); fi
      echo "{\"q8_fused\": \"$f\"}" >> "$OUT/fuse-big.jsonl"
      run env "${e[@]}" $QL --quiet --activations q8 --format json --device cuda --dtype bf16 \
        bench --model $big -p 0 -n 128 -r 3 --plan "lm_head=keep;*=w:i8:sym" \
        --plan "lm_head=keep;*=w:i4:sym:g64" --plan "lm_head=keep;*=nf4" >> "$OUT/fuse-big.jsonl"
    done
    ;;
  *) echo "unknown batch '$1'" >&2; exit 2 ;;
esac
