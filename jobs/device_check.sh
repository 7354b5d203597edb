#!/usr/bin/env bash
# One prepared call on a lent GPU machine (torch, transformers, numpy; no Ray, no network, maybe no
# pytest): the `gpu` tests (tests/gpu) and the GPU benchmark (jobs/bench/gpu.py), logs under $OUT.
# Installs nothing. Run from the repository root:
#
#     bash jobs/device_check.sh                 # OUT defaults to /tmp/device_check
#     TEST_TIMEOUT=240 BENCH_TIMEOUT=240 bash jobs/device_check.sh
#
# Exit status: non-zero when the tests failed (the benchmark's status is in its log).
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
# the root: raysens and jobs; tests/unit: the test helpers (refs), as pyproject's pytest `pythonpath`
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/tests/unit${PYTHONPATH:+:$PYTHONPATH}" RAYSENS_TEST_THREADS=${RAYSENS_TEST_THREADS:-4}
PY=${PYTHON:-python3}
T0=$(date +%s)

nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1
$PY - <<'PYEOF' 2>&1 | tee "$OUT/versions.txt"
import torch, numpy, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "numpy", numpy.__version__, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PYEOF

if $PY -c "import pytest" >/dev/null 2>&1; then
  echo "== tests/gpu with pytest" | tee "$OUT/gpu_tests.log"
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee -a "$OUT/gpu_tests.log"
  rc=${PIPESTATUS[0]}
else
  echo "== tests/gpu without pytest (tests/gpu/run_plain.py)" | tee "$OUT/gpu_tests.log"
  timeout "${TEST_TIMEOUT:-300}" $PY tests/gpu/run_plain.py 2>&1 | tee -a "$OUT/gpu_tests.log"
  rc=${PIPESTATUS[0]}
fi
echo "tests: exit $rc after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/gpu_tests.log"

timeout "${BENCH_TIMEOUT:-240}" $PY -m jobs.bench.benchmark gpu --out "$OUT" 2>&1 | tee "$OUT/benchmark_gpu.log"
echo "benchmark: exit ${PIPESTATUS[0]} after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/benchmark_gpu.log"
exit "$rc"
