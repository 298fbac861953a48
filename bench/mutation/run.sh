#!/usr/bin/env bash
# Mutation run of one module, in a scratch copy of the committed tree (never part of the gate).
#
#   bench/mutation/run.sh MODULE SCRATCH [extra pytest args...] -- CASE_FILE...
#
# MODULE is a path such as engine/scheduler.py; SCRATCH a directory to create (it must not exist:
# mutmut keeps its state in SCRATCH/mutants, and a rerun in the same directory reuses it). The case
# files after `--` are the ones run against each mutant (mutmut also narrows them per mutant to the
# cases that reached the mutated function). Runs mutmut 3.8.1 under `nice -n 10` with MUTMUT_CHILDREN
# workers (default 1: the machine is shared); MUTMUT_ONLY, if set, is a space-separated list of
# mutant-name patterns (fnmatch, e.g. 'engine.hf_config.x__rope__mutmut_*') to run instead of all.
# Prints `mutmut results` at the end.
set -euo pipefail
module=$1 scratch=$2
shift 2
extra=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do extra+=("$1"); shift; done
[ $# -gt 0 ] || { echo "usage: $0 MODULE SCRATCH [pytest args] -- CASE_FILE..." >&2; exit 2; }
shift
[ ! -e "$scratch" ] || { echo "$scratch exists; remove it or pick another" >&2; exit 2; }
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
top=${module%%/*}/
mkdir -p "$scratch"
git -C "$repo" archive HEAD | tar -x -C "$scratch"
# Uncommitted case files (new mutant-killing cases being written) are copied too.
for f in "$@"; do cp "$repo/$f" "$scratch/$f"; done
{
  echo "[mutmut]"
  echo "source_paths=$top"
  echo "only_mutate=$module"
  echo "also_copy="
  for d in engine/ verifier/ cases/ fixtures/ conftest.py; do
    [ "$d" = "$top" ] || echo "    $d"
  done
  echo "pytest_add_cli_args_test_selection="
  for f in "$@"; do echo "    $f"; done
  if [ ${#extra[@]} -gt 0 ]; then
    echo "pytest_add_cli_args="
    for a in "${extra[@]}"; do echo "    $a"; done
  fi
} > "$scratch/setup.cfg"
cd "$scratch"
# shellcheck disable=SC2086
nice -n 10 mutmut run --max-children "${MUTMUT_CHILDREN:-1}" ${MUTMUT_ONLY:-}
mutmut results --all true > results.txt || true
grep -c ": killed" results.txt || true
grep -v ": killed" results.txt || true
