#!/usr/bin/env bash
# Rerun a finished mutation run's survivors with new case files added (after run.sh).
#
#   bench/mutation/recheck.sh SCRATCH CASE_FILE...
#
# Copies the case files (from this checkout) into SCRATCH and its mutants/ copy, adds them to the
# run's case selection and reruns only the mutants that survived (or had no case), listed in
# SCRATCH/survivors-before.txt. mutmut forgets the other mutants' results on such a rerun, so the
# score after is the first run's kills plus the kills printed here (new cases cannot revive a mutant).
set -euo pipefail
scratch=$1
shift
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
for f in "$@"; do
  cp "$repo/$f" "$scratch/$f"
  cp "$repo/$f" "$scratch/mutants/$f"
  grep -qx "    $f" "$scratch/setup.cfg" ||
    sed -i "/^pytest_add_cli_args_test_selection=/a\\    $f" "$scratch/setup.cfg"
done
cd "$scratch"
[ -e survivors-before.txt ] ||
  mutmut results 2>/dev/null | grep -E ": (survived|no tests)$" | sed -E 's/^ *//; s/: [a-z ]+$//' > survivors-before.txt
survivors=$(cat survivors-before.txt)
[ -n "$survivors" ] || { echo "no survivors"; exit 0; }
# shellcheck disable=SC2086
nice -n 10 mutmut run --max-children "${MUTMUT_CHILDREN:-1}" $survivors
mutmut results --all true > results-after.txt || true
echo "of $(wc -l < survivors-before.txt) survivors, killed now:"
sed -E 's/^ +//' results-after.txt | awk -F': ' 'NR==FNR {s[$1]; next} $1 in s' survivors-before.txt - > survivors-after.txt
grep -c ": killed$" survivors-after.txt || true
grep -v ": killed$" survivors-after.txt || true
