#!/usr/bin/env bash
# GPU check for issue 15, on one CUDA device, in under 8 minutes:
#   1. the `gpu` tests (CUDA staging, pinned buffer reuse, reads into device memory);
#   2. GPU save / restore / save_async figures (benchmarks/bench_gpu.py, 1 GiB of state).
# Prints one table. Usage (repository root):  bash benchmarks/gpu_check.sh [python]
set -uo pipefail
PY=${1:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY; nothing measured" >&2
  exit 2
fi
start=$(date +%s)
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/unit/test_async_gpu.py tests/unit/test_rng.py \
  --junitxml="$OUT/gpu.xml" > "$OUT/pytest.log" 2>&1
tests_rc=$?
timeout 200 "$PY" benchmarks/bench_gpu.py --state-gib 1 --reps 2 --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
bench_rc=$?
summary=$(tail -1 "$OUT/pytest.log")
echo "## gpu_check ($(( $(date +%s) - start )) s; logs in $OUT)"
echo
echo "| part | result |"
echo "|---|---|"
echo "| gpu tests (rc $tests_rc) | $summary |"
echo "| GPU benchmark (rc $bench_rc) | see below |"
echo
cat "$OUT/bench.md" 2>/dev/null || tail -20 "$OUT/bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
