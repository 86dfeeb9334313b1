#!/usr/bin/env bash
# The GPU checks of issue 17, as one script for a machine with an NVIDIA GPU whose python3
# has a CUDA build of torch (this workplace's device machine: python 3.12, torch 2.11):
# the tests marked gpu, then the GPU bench rows (cuda_into, cuda_bcast), with logs and
# the bench JSON written under $OUT (default ./gpu-out).
#
# That python lacks a few of kt's needs: `make gpu-wheels` here puts the lock's wheels in
# .whl/, which travels with the tree (the device tool's carry: [".whl"]); they install
# under /tmp/site. kt itself runs from this checkout (PYTHONPATH), as do its pods.
#
#   bash tools/gpu_check.sh              (about 6 minutes on one H200)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 KT_HOME=/tmp/kt-home
{
  nvidia-smi -L
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "devices", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version())'
} 2>&1 | tee "$out/machine.txt"
timeout 330 python3 -m pytest -m gpu -p no:xdist -p no:cacheprovider -v -rA tests/gpu \
  2>&1 | tee "$out/test-gpu.log"
tests=$?
KT_BENCH_ROW_TIMEOUT=150 timeout 330 python3 -m bench --no-ray --reps 1 \
  --rows cuda_into cuda_bcast 2>&1 | tee "$out/bench.log"
cp bench/results/latest.json "$out/bench.json" 2>/dev/null
exit "$tests"
