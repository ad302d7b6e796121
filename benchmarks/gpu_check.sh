#!/usr/bin/env bash
# The device checks in one script: the CUDA tests of every method (they skip where
# CUDA is missing), then every method timed on the CPU and on CUDA with the
# agreement of the two (benchmarks/results/gpu.md). Run from the repository root on
# a machine with a GPU after the README's test install:  bash benchmarks/gpu_check.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; print('CUDA available:', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PY" -m pytest -q -rs tests/test_contract.py tests/test_adapters.py -k "cuda" -p no:randomly
cd benchmarks && "../$PY" bench_gpu.py --repeats 1 "$@"
