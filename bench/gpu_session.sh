#!/usr/bin/env bash
# One device call: kernel tests, the multi-GPU check and (parts of) `tqpatch bench`; logs and JSON under $OUT.
#   bash bench/gpu_session.sh tests,multi,bench   PARTS=store,attention  SHAPES=8x32768   (see cli/bench.py --parts, --shapes)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-results/gpu}; mkdir -p "$OUT"
what=${1:-tests,multi,bench}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
rc=0
if [[ $what == *tests* ]]; then
  python3 -m pytest -q tests/test_kernels.py ${TESTS:+-k "$TESTS"} 2>&1 | tee "$OUT/test_kernels.log" || rc=1
fi
if [[ $what == *ncu* ]]; then
  ncu --clock-control none --profile-from-start off -k regex:_tq_ --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
      python3 bench/profile_kernels.py 2>&1 | tee "$OUT/ncu.txt" || rc=1
fi
if [[ $what == *multi* ]]; then
  python3 bench/multi_gpu.py --out "$OUT/multi_gpu.json" 2>&1 | tee "$OUT/multi_gpu.log" || rc=1
fi
if [[ $what == *bench* ]]; then
  python3 -m cli.bench --out "$OUT/bench_${PARTS//,/_}.json" --parts "${PARTS:-store,attention,e2e,fit}" ${SHAPES:+--shapes $SHAPES} ${METHODS:+--methods $METHODS} 2>&1 | tee "$OUT/bench_${PARTS//,/_}.log" || rc=1
fi
exit $rc
