#!/usr/bin/env bash
# A sharded `quantlab sweep` as a Slurm job array: task I of N runs `--shard I/N` on one GPU
# and writes runs/sweep.shard-I-of-N.jsonl (plus its manifest); a merge job that depends on
# the whole array then joins the shards into runs/sweep.jsonl and runs/sweep.svg.
#
#   N=8 sbatch --array=1-8 scripts/sweep-slurm.sh        # the shards
#   (the script submits the merge itself from task 1, with --dependency=afterok)
#
# Every task must see the same model, data and output folder (a shared filesystem) and
# get the same SWEEP_ARGS: merge refuses shards of different sweeps.
#SBATCH --job-name=quantlab-sweep
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=runs/slurm-%A_%a.log
set -euo pipefail

QUANTLAB=${QUANTLAB:-quantlab}
N=${N:-${SLURM_ARRAY_TASK_COUNT:?run with sbatch --array=1-N (or set N)}}
OUT=${OUT:-runs/sweep.jsonl}
SWEEP_ARGS=${SWEEP_ARGS:---methods rtn,rtn-clip,hqq,gptq,awq --bits 8,4,3,2 --groups ch,128,64 --kl}
I=${SLURM_ARRAY_TASK_ID:?not a Slurm array task}

if [[ "${1:-}" == merge ]]; then
  shards=()
  for k in $(seq 1 "$N"); do shards+=("${OUT%.*}.shard-$k-of-$N.${OUT##*.}"); done
  exec "$QUANTLAB" sweep merge "${shards[@]}" --out "$OUT" --plot "${OUT%.*}.svg"
fi

if [[ "$I" == 1 && -z "${QUANTLAB_MERGE_SUBMITTED:-}" ]]; then
  # One merge job, after every task of this array has succeeded.
  QUANTLAB_MERGE_SUBMITTED=1 sbatch --dependency="afterok:${SLURM_ARRAY_JOB_ID}" \
    --array=1 --gres=gpu:0 --export=ALL,N="$N",OUT="$OUT" "$0" merge
fi

# Slurm restricts the task to its GPU (CUDA_VISIBLE_DEVICES), which is then cuda:0.
# shellcheck disable=SC2086 # SWEEP_ARGS is a list of flags
"$QUANTLAB" --device cuda:0 --quiet sweep $SWEEP_ARGS --shard "$I/$N" --out "$OUT"
