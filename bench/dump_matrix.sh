#!/usr/bin/env bash
# Dump every bundled fixture in every mode, for "refactors keep behaviour":
#   bash bench/dump_matrix.sh OUTDIR            # here: before (on the old commit) and after
#   bash bench/dump_matrix.sh --compare BEFORE AFTER [TOLERANCE]   # default exact: bitwise
# Modes: eager, piecewise, full_and_piecewise, each also chunked at 7 tokens per step, and TP4 /
# TP4+EP4 eager and piecewise (4 CPU ranks, gloo): 30 dumps, about 5-9 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--compare" ]]; then
  before=$2 after=$3 tol=${4:-exact} bad=0
  for dump in "$before"/*.npz; do
    NO_COLOR=1 python -m verifier compare "$after/$(basename "$dump")" "$dump" --tolerance "$tol" >/dev/null 2>&1 \
      || { echo "differs: $(basename "$dump")"; bad=1; }
  done
  [[ $bad == 0 ]] && echo "every dump agrees ($tol)"
  exit $bad
fi
out=${1:?usage: bench/dump_matrix.sh OUTDIR | --compare BEFORE AFTER [TOLERANCE]}
mkdir -p "$out"
run() {  # name tag args...
  local name=$1 tag=$2; shift 2
  python -m engine run --model "fixtures/checkpoints/$name" --prompts fixtures/prompts/default.json \
    --max-new-tokens 6 --dump "$out/$name.$tag.npz" "$@" >"$out/$name.$tag.log" 2>&1 || echo "FAILED: $name $tag (log $out/$name.$tag.log)"
}
for name in glm4_moe glm4_moe_nobias qwen3_moe; do
  for mode in eager piecewise full_and_piecewise; do
    run "$name" "$mode" --graph "$mode"
    run "$name" "$mode.chunk7" --graph "$mode" --max-num-batched-tokens 7
  done
  for mode in eager piecewise; do
    run "$name" "$mode.tp4" --graph "$mode" --tp 4
    run "$name" "$mode.tp4ep4" --graph "$mode" --tp 4 --ep 4
  done
done
echo "wrote $out"
