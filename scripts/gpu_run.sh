#!/usr/bin/env bash
# One device call: set up the package on the GPU machine, then tests + correctness + benchmark.
#   bash scripts/gpu_run.sh [device_check args...]      (results under $OUT, default ./gpu-out)
# The GPU machine has torch/transformers but not this package or gguf: gguf travels as a wheel in .whl/,
# and the SmolLM2 GGUF (98 MB, over one call's 64 MiB) in two halves .carryA/ and .carryB/ (split -n 2).
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/pkg/coreinfer
touch /tmp/pkg/coreinfer/__init__.py
ln -sfn "$PWD/runtime" /tmp/pkg/coreinfer/runtime
ln -sfn "$PWD/pipeline" /tmp/pkg/coreinfer/pipeline
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
ARGS=()
mkdir -p /tmp/smol
for part in .carryA/smol.part00 .carryB/smol.part01; do  # a half carried by an earlier call on this machine stays in /tmp/smol
  [ -f "$part" ] && cp "$part" /tmp/smol/
done
if [ -f /tmp/smol/smol.part00 ] && [ -f /tmp/smol/smol.part01 ]; then
  cat /tmp/smol/smol.part00 /tmp/smol/smol.part01 > "$GGUF"
fi
if [ -f "$GGUF" ] && [ "$(md5sum < "$GGUF" | cut -d' ' -f1)" = a1231443440b107ff29f02bdb38c9d0a ]; then
  ARGS+=(--smollm2 "$GGUF")
else
  echo "SmolLM2 GGUF not available: the suite uses smollm2-135m-shape (random weights), no greedy check"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -m coreinfer.runtime.cuda.device_check --out "$OUT" "${ARGS[@]}" "$@" 2>&1 | tee "$OUT/run.log"
