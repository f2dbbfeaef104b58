#!/usr/bin/env bash
# quantlab against llama.cpp on the same machine, in one run: llama-bench (the CPU speed
# anchor, built from the llama-cpp-python sdist by scripts/build-llama-cpp.sh; never a
# dependency) on F32 / Q8_0 / Q4_0 conversions of SmolLM2-135M made with llama-quantize,
# each followed by `quantlab bench` on the same model with the plans it anchors (the matching
# GGML type and quantlab's own formats), in ROUNDS rounds; then one side-by-side table of t/s
# and quantlab / llama.cpp ratios, one ratio per round.
#
# Usage: scripts/bench-vs-llama-cpp.sh [REPS] [PLAN...]
#   REPS  timed repetitions per test (default 5, llama-bench's default)
#   PLAN  quantlab plans to add to the defaults (each compared with the llama.cpp type of
#         the same bit width: 8-bit plans with Q8_0, 2-5-bit plans with Q4_0)
# Env: QUANTLAB_LLM (default models/smollm2-135m/*.gguf), THREADS (default: all cores),
#      ROUNDS (default 2).
# Output: target/bench-vs-llama-cpp/{llama.jsonl,quantlab.jsonl,side-by-side.md}
# Run it on an idle machine; the table states the CPU flags both tools ran with.
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

# Rounds: each llama.cpp type is measured right before the quantlab plans it anchors, and the
# whole set is repeated ROUNDS times; every ratio pairs numbers of the same round. On a shared VM
# the load drifts over minutes, and two blocks measured minutes apart gave ratios 20% apart.
rounds="${ROUNDS:-2}"
f32_plans=()
q8_plans=('*=q8_0' '*=dynamic-int8' '*=w:i8:sym:ch0')
q4_plans=('*=q4_0' '*=w:i4:sym:g64' '*=w:i4:sym:g32' '*=nf4')
# The weight-only plans again with q8 activations (`--activations q8`: llama.cpp's approach,
# activations quantized to 8 bits per 32 values, the 16-row VNNI panel kernels for decode and
# prefill). Rows say "a:q8" in their backend; the table marks them.
q8_act_plans=('*=w:i8:sym:ch0')
q4_act_plans=('*=w:i4:sym:g64' '*=w:i4:sym:g32' '*=nf4' '*=w:i4:asym:g64')
for p in "$@"; do
    if [[ $p == *i8* || $p == *int8* || $p == *q8* ]]; then q8_plans+=("$p"); else q4_plans+=("$p"); fi
done

# quantlab_bench ROUND TYPE ACT PLAN...: `quantlab bench` rows tagged with round and anchor type
# (no plans and f32 activations: the f32 model alone).
quantlab_bench() {
    local round=$1 type=$2 act=$3
    shift 3
    local args=(--format json --activations "$act" bench --model "$model" -r "$reps")
    if (($# > 0)); then args+=(--no-baseline); fi
    for p in "$@"; do args+=(--plan "$p"); done
    RAYON_NUM_THREADS="$threads" "$ql" "${args[@]}" \
        | sed "s/^{/{\"round\":$round,\"anchor\":\"$type\",/" >>"$out/quantlab.jsonl"
}

: >"$out/llama.jsonl"
: >"$out/quantlab.jsonl"
for round in $(seq 1 "$rounds"); do
    for t in F32 Q8_0 Q4_0; do
        echo "round $round/$rounds: llama-bench $t, then quantlab ..." >&2
        "$bin/llama-bench" -m "$out/model-$t.gguf" -t "$threads" -p 512 -n 128 -r "$reps" -o jsonl \
            2>"$out/llama-bench-$t.log" \
            | sed "s/^{/{\"round\":$round,\"quantlab_type\":\"$t\",/" >>"$out/llama.jsonl"
        case $t in
        F32) quantlab_bench "$round" F32 f32 "${f32_plans[@]}" ;;
        Q8_0)
            quantlab_bench "$round" Q8_0 f32 "${q8_plans[@]}"
            quantlab_bench "$round" Q8_0 q8 "${q8_act_plans[@]}"
            ;;
        Q4_0)
            quantlab_bench "$round" Q4_0 f32 "${q4_plans[@]}"
            quantlab_bench "$round" Q4_0 q8 "${q4_act_plans[@]}"
            ;;
        esac
    done
done

python3 - "$out" "$flags" "$rounds" <<'PY'
import json, statistics, sys
out, flags, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
llama = {}
for line in open(f"{out}/llama.jsonl"):
    r = json.loads(line)
    test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    llama[(r["round"], r["quantlab_type"], test)] = (r["avg_ts"], r["stddev_ts"])
rows = {}
for line in open(f"{out}/quantlab.jsonl"):
    r = json.loads(line)
    if "test" not in r:
        continue
    plan = r["plan"] + (" (a:q8)" if "a:q8" in r.get("backend", "") else "")
    rows.setdefault((plan, r["weights"], r["anchor"], r["test"]), {})[r["round"]] = r
lines = [
    f"CPU flags: {flags.strip()}; same machine, one run of {rounds} round(s); in each round llama-bench"
    " ran on a type right before the quantlab plans it anchors, and each ratio pairs one round's"
    " numbers. llama.cpp files converted with llama-quantize --pure.",
    "",
    "| quantlab plan | weights | test | quantlab t/s per round | llama.cpp type | llama.cpp t/s per round | ratio per round | lowest |",
    "|---|---|---|---|---|---|---|---|",
]
for (plan, weights, anchor, test), by_round in rows.items():
    ql, lc, ratios = [], [], []
    for rnd in sorted(by_round):
        q = by_round[rnd]
        ql.append(f"{q['t_s']:.1f} ± {q['std']:.1f}")
        ref = llama.get((rnd, anchor, test))
        if ref:
            lc.append(f"{ref[0]:.1f} ± {ref[1]:.1f}")
            ratios.append(q["t_s"] / ref[0])
    per = ", ".join(f"{x:.2f}" for x in ratios) or "-"
    low = f"{min(ratios):.2f}" if ratios else "-"
    lines.append(f"| {plan} | {weights} | {test} | {'; '.join(ql)} | {anchor} | {'; '.join(lc) or '-'} | {per} | {low} |")
text = "\n".join(lines) + "\n"
open(f"{out}/side-by-side.md", "w").write(text)
print(text)
PY
