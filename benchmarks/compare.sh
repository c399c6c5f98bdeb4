#!/usr/bin/env bash
# distbp against its peers in one sitting, on the same workloads, rows and initial weights:
# `distbp bench` (1 process and 1..2 workers of 1 thread), then PyTorch eager (1 and 2 threads),
# PyTorch DDP 2x1 and Ray Train 2x1. One JSON line per run goes to $OUT (default
# bench-results.jsonl), and the last lines printed are the comparison table of the README.
#
#   pip install -e '.[peers]'                      # torch and Ray Train, once
#   bash benchmarks/compare.sh [WORKLOAD ...]      # default: tiny batch512 teacher wide
#
# Env: PY (python with distbp and the peers extra; default .venv/bin/python), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench-results.jsonl}
WORKLOADS=${*:-tiny batch512 teacher wide}
: > "$OUT"
for W in $WORKLOADS; do
  echo "== $W: distbp bench ($(date +%T))" >&2
  "$PY" -m distbp bench --workload "$W" --max-workers 2 --json >> "$OUT" || echo "   failed: distbp bench $W" >&2
  for T in 1 2; do
    echo "== $W: torch, $T thread(s)" >&2
    "$PY" benchmarks/peers.py "$W" torch --threads "$T" >> "$OUT" || echo "   failed: torch $W" >&2
  done
  for S in ddp ray-train; do
    echo "== $W: $S 2x1" >&2
    "$PY" benchmarks/peers.py "$W" "$S" --workers 2 >> "$OUT" || echo "   failed: $S $W" >&2
  done
done
"$PY" benchmarks/table.py "$OUT"
