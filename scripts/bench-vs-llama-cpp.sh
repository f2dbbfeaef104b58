#!/usr/bin/env bash
# quantlab against llama.cpp on the same machine, in one run: llama-bench (the CPU speed
# anchor, built from the llama-cpp-python sdist by scripts/build-llama-cpp.sh; never a
# dependency) on F32 / Q8_0 / Q4_0 conversions of SmolLM2-135M made with llama-quantize,
# then `quantlab bench` on the same model with the matching plans and quantlab's own
# formats, then one side-by-side table of t/s and quantlab / llama.cpp ratios.
#
# Usage: scripts/bench-vs-llama-cpp.sh [REPS] [PLAN...]
#   REPS  timed repetitions per test (default 5, llama-bench's default)
#   PLAN  quantlab plans to add to the defaults (each compared with the llama.cpp type of
#         the same bit width: 8-bit plans with Q8_0, 2-5-bit plans with Q4_0)
# Env: QUANTLAB_LLM (default models/smollm2-135m/*.gguf), THREADS (default: all cores).
# Output: target/bench-vs-llama-cpp/{llama.jsonl,quantlab.jsonl,side-by-side.md}
# Run it on an idle machine: both tools are measured back to back, and the table states the
# CPU flags they ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${1:-5}"
shift || true
threads="${THREADS:-$(nproc)}"
out=target/bench-vs-llama-cpp
mkdir -p "$out"

bin=vendor/llama.cpp/build/bin
if [[ ! -x $bin/llama-bench || ! -x $bin/llama-quantize ]]; then
    scripts/build-llama-cpp.sh
fi
model="${QUANTLAB_LLM:-}"
if [[ -z $model ]]; then
    scripts/fetch-smollm2.sh >/dev/null
    model=$(ls models/smollm2-135m/*.gguf | head -1)
fi
[[ -f $model ]] || { echo "error: model $model is not a GGUF file (set QUANTLAB_LLM)" >&2; exit 1; }
cargo build --release --quiet
ql=target/release/quantlab

# Uniform conversions (--pure: no tensor gets a different type, as quantlab's `*=TYPE` plans).
for t in F32 Q8_0 Q4_0; do
    dst="$out/model-$t.gguf"
    if [[ ! -f $dst || $dst -ot $model ]]; then
        "$bin/llama-quantize" --allow-requantize --pure "$model" "$dst.tmp" "$t" >"$out/quantize-$t.log" 2>&1 \
            || { echo "error: llama-quantize $t failed, see $out/quantize-$t.log" >&2; exit 1; }
        mv "$dst.tmp" "$dst"
    fi
done

flags=$(grep -o -w 'avx2\|fma\|avx512f\|avx512bw\|avx512vl\|avx512_vnni\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, flags: $flags" >&2

: >"$out/llama.jsonl"
for t in F32 Q8_0 Q4_0; do
    echo "llama-bench $t ..." >&2
    "$bin/llama-bench" -m "$out/model-$t.gguf" -t "$threads" -p 512 -n 128 -r "$reps" -o jsonl \
        2>"$out/llama-bench-$t.log" | sed "s/^{/{\"quantlab_type\":\"$t\",/" >>"$out/llama.jsonl"
done

plans=('*=q8_0' '*=q4_0' '*=dynamic-int8' '*=w:i8:sym:ch0' '*=w:i4:sym:g64' '*=w:i4:sym:g32' '*=nf4' "$@")
args=()
for p in "${plans[@]}"; do args+=(--plan "$p"); done
RAYON_NUM_THREADS="$threads" "$ql" --format json bench --model "$model" -r "$reps" "${args[@]}" >"$out/quantlab.jsonl"
# The weight-only plans again with q8 activations (`--activations q8`: llama.cpp's approach,
# activations quantized to 8 bits per 32 values, the 16-row VNNI panel kernels for decode and
# prefill): pp512 and tg128. Rows say "a:q8" in their backend; the table marks them.
q8plans=('*=w:i4:sym:g64' '*=w:i4:sym:g32' '*=w:i8:sym:ch0' '*=nf4' '*=w:i4:asym:g64')
args=()
for p in "${q8plans[@]}"; do args+=(--plan "$p"); done
RAYON_NUM_THREADS="$threads" "$ql" --format json --activations q8 bench --model "$model" -r "$reps" "${args[@]}" \
    | grep -v '"f32 (baseline)"' >>"$out/quantlab.jsonl" || true

python3 - "$out" "$flags" <<'PY'
import json, sys
out, flags = sys.argv[1], sys.argv[2]
llama = {}
for line in open(f"{out}/llama.jsonl"):
    r = json.loads(line)
    test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    llama[(r["quantlab_type"], test)] = (r["avg_ts"], r["stddev_ts"])
rows = [json.loads(l) for l in open(f"{out}/quantlab.jsonl")]
def anchor(plan, weights):
    if plan.startswith("f32"): return "F32"
    w = weights.lower()
    if any(k in w for k in ("q8_0", "int8", "qint8")) or "i8:" in plan: return "Q8_0"
    return "Q4_0"
lines = [
    f"CPU flags: {flags.strip()}; same machine, one run; llama.cpp files converted with llama-quantize --pure.",
    "",
    "| quantlab plan | weights | test | quantlab t/s | llama.cpp type | llama.cpp t/s | quantlab / llama.cpp |",
    "|---|---|---|---|---|---|---|",
]
for r in rows:
    a = anchor(r["plan"], r["weights"])
    ref = llama.get((a, r["test"]))
    ratio = f"{r['t_s'] / ref[0]:.2f}" if ref else "-"
    lt = f"{ref[0]:.1f} ± {ref[1]:.1f}" if ref else "-"
    plan = r["plan"] + (" (a:q8)" if "a:q8" in r.get("backend", "") else "")
    lines.append(f"| {plan} | {r['weights']} | {r['test']} | {r['t_s']:.1f} ± {r['std']:.1f} | {a} | {lt} | {ratio} |")
text = "\n".join(lines) + "\n"
open(f"{out}/side-by-side.md", "w").write(text)
print(text)
PY
