#!/usr/bin/env bash
# One device call: set up the package on the GPU machine, then the steps of benchmarks/gpu_suite.py.
#   bash scripts/gpu_run.sh [gpu_suite args...]      (results under $OUT, default ./gpu-out)
# The GPU machine has torch/transformers/sentence-transformers/accelerate but not this package, zarr or gguf:
# those travel as wheels in .whl/ (carry it).
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/pkg/coreinfer
touch /tmp/pkg/coreinfer/__init__.py
ln -sfn "$PWD/runtime" /tmp/pkg/coreinfer/runtime
ln -sfn "$PWD/pipeline" /tmp/pkg/coreinfer/pipeline
export PYTHONPATH=$PWD:/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# the e2e step's tokenizer and small embedder (.carry/e2e.tar.gz); the SmolLM2 GGUF (98 MB, over one call's
# 64 MiB) in two halves .carryA/ and .carryB/ (split -n 2), a half carried by an earlier call on a warm
# machine staying in /tmp/smol
ARGS=(--carry /tmp/e2e-carry)
if [ -f .carry/e2e.tar.gz ]; then mkdir -p /tmp/e2e-carry && tar -C /tmp/e2e-carry -xzf .carry/e2e.tar.gz; fi
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/smol
for part in .carryA/smol.part00 .carryB/smol.part01; do
  [ -f "$part" ] && cp "$part" /tmp/smol/
done
if [ -f /tmp/smol/smol.part00 ] && [ -f /tmp/smol/smol.part01 ]; then
  cat /tmp/smol/smol.part00 /tmp/smol/smol.part01 > "$GGUF"
fi
if [ -f "$GGUF" ] && [ "$(md5sum < "$GGUF" | cut -d' ' -f1)" = a1231443440b107ff29f02bdb38c9d0a ]; then
  ARGS+=(--smollm2 "$GGUF")
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c "import zarr, gguf" 2>/dev/null || echo "zarr/gguf missing: carry .whl (the e2e and greedy steps need them)"
python3 -m benchmarks.gpu_suite --out "$OUT" "${ARGS[@]}" "$@" 2>&1 | tee "$OUT/run.log"
