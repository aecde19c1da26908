#!/usr/bin/env bash
# bench/accelerator.py on a GPU machine in one command; planned for under 8 minutes on one GPU (bench/README.md).
#
#   bash bench/gpu_check.sh [--no-install] [bench/accelerator.py options]
#
# Installs requirements-gpu.txt (CUDA JAX) and the torch + transformers pinned in requirements-test.txt (PyPI's
# Linux torch wheels are CUDA builds), unless --no-install: then it runs with what is installed, e.g. on the
# device tool's machine, whose image has JAX, torch and transformers and no network. Prints the versions, the
# GPU and the table; the table, the JSON and the log also go to $OUT (the device tool's folder) or /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--no-install" ]]; then
  shift
else
  python3 -m pip install -q -r requirements-gpu.txt $(grep -E '^(torch|transformers)==' requirements-test.txt)
fi
out="${OUT:-/tmp}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: none"
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda:", torch.cuda.is_available(), "transformers", transformers.__version__)' || true
status=0
python3 -m bench.accelerator --json "$@" >"$out/accelerator.json" 2> >(tee "$out/accelerator.log" >&2) || status=$?
if [[ -s "$out/accelerator.json" ]]; then
  python3 -c 'import json, sys; from bench.accelerator import table; print(table(json.load(open(sys.argv[1]))))' \
    "$out/accelerator.json" | tee "$out/accelerator.txt"
fi
exit "$status"
