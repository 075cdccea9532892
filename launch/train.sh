#!/usr/bin/env bash
# launch/train.sh CONFIG [--section.key=value ...]
# torchrun over every local GPU, or the single-process mode when there is at most one device. The Python is
# the active environment's, else the checkout's .venv (launch/find_python.sh).
set -euo pipefail
usage="usage: launch/train.sh CONFIG [--section.key=value ...]
  torchrun over every local GPU (one process with at most one device) running python -m dist_llama.train.
  CONFIG is a YAML file in configs/; the overrides are the trainer's (python -m dist_llama.train --help)."
case "${1:-}" in
  -h|--help) echo "${usage}"; exit 0 ;;
  ''|-*) echo "${usage}" >&2; exit 2 ;;
esac
source "$(dirname "$0")/find_python.sh"
config=$1
shift
gpus=$("${python}" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${gpus}" -gt 1 ]; then
  exec "${python}" -m torch.distributed.run --standalone --nproc_per_node="${gpus}" -m dist_llama.train \
    --config "${config}" "$@"
fi
exec "${python}" -m dist_llama.train --config "${config}" "$@"
