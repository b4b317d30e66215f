#!/usr/bin/env bash
# GPU check (`make gpu-check`): the `cuda`-marked tests, then the core benchmark with our merges
# on the GPU, on the ~1 GB set, one run each. Needs a CUDA build of torch and a GPU; about 3
# minutes on an H200 machine (most of it building the synthetic checkpoints).
#   bash benchmarks/gpu_check.sh [python]      # default: .venv/bin/python, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA device; run this on a GPU machine")
print(f"gpu-check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PYEOF
start=$(date +%s)
"$PY" -m pytest -m cuda -p no:randomly tests
"$PY" benchmarks/bench_core.py --sizes 1 --repeat 1 --device cuda --data "${BENCH_DATA:-bench-data-gpu}"
echo "gpu-check: done in $(( $(date +%s) - start )) s"
