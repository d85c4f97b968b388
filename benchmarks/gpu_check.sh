#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA device:
#   1. tests/test_cuda.py: mixed-precision training resumes (bfloat16 and float16), `kits-seg train`
#      and `kits-seg predict` run on CUDA, the shipped model segments alike on CUDA and the CPU;
#   2. benchmarks/bench_gpu.py for the `paper` preset (as published) and the `cpu` preset (the
#      shipped model's): training and inference images/s, CUDA against CPU predictions.
#
#   bash benchmarks/gpu_check.sh [REPORT_DIR]      # default: gpu_check/
#
# Each part's output is also written to REPORT_DIR; a part that fails does not stop the others
# (the exit status says whether all passed). PYTHON picks the interpreter (default: .venv/bin/python
# where it exists, else python3); the engine is taken from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-gpu_check}
mkdir -p "$REPORT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

part() {  # part NAME COMMAND...: run, keep its output, remember a failure
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$REPORT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$REPORT/gpu.txt"
part test_cuda "$PYTHON" -m pytest tests/test_cuda.py -v -p no:cacheprovider
part bench_gpu_paper "$PYTHON" benchmarks/bench_gpu.py --preset paper
part bench_gpu_cpu "$PYTHON" benchmarks/bench_gpu.py --preset cpu
exit $status
