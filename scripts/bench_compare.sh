#!/bin/bash
# Every benchmark of BENCHMARKS.md on an earlier commit and on this checkout, alternating
# (each benchmark's "before" run, then its "after" run), so that both see the same machine.
#
#   bash scripts/bench_compare.sh BEFORE_COMMIT [OUT_DIR]
#
# The earlier commit is checked out in a temporary git worktree and run with its own
# scripts and PYTHONPATH pointing at it (the installed dependencies are the same lock).
# Each run's whole output goes to OUT_DIR/<benchmark>-<before|after>.log; OUT_DIR/index.log
# says when each started and how it ended. Takes about 30 minutes on 2 cores; keep the
# machine otherwise idle while it runs.
set -u
before_ref=${1:?usage: bench_compare.sh BEFORE_COMMIT [OUT_DIR]}
out=${2:-/tmp/ubc-bench-compare}
after=$(cd "$(dirname "$0")/.." && pwd)
before=$(mktemp -d /tmp/ubc-before-XXXXXX)
git -C "$after" worktree add --detach "$before" "$before_ref" >/dev/null
trap 'git -C "$after" worktree remove --force "$before"' EXIT
mkdir -p "$out"

run() {  # benchmark before|after args...
  local name=$1 which=$2 dir=$after
  shift 2
  [ "$which" = before ] && dir=$before
  echo "=== $(date -u +%H:%M:%S) $name $which ($(git -C "$dir" rev-parse --short HEAD)): $*" | tee -a "$out/index.log"
  (cd "$dir" && PYTHONPATH=$dir timeout 1800 python "scripts/bench_$name.py" "$@") >"$out/$name-$which.log" 2>&1
  echo "    exit $? at $(date -u +%H:%M:%S)" | tee -a "$out/index.log"
}

for which in before after; do run ledger $which --engines sqlite,postgresql --runs 3 --seconds 2; done
for which in before after; do run envelopes $which --engines sqlite,postgresql --runs 3 --seconds 4 --workers 2; done
for which in before after; do run market $which --runs 3 --seconds 5; done
for which in before after; do run gateway $which --engines postgresql,sqlite --runs 2 --seconds 3; done
for which in before after; do run epoch $which --engines postgresql,sqlite --runs 1; done
echo "=== $(date -u +%H:%M:%S) done" | tee -a "$out/index.log"
