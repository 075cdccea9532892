#!/usr/bin/env bash
# launch/train.sh CONFIG [--section.key=value ...]
# torchrun over every local GPU, or the single-process mode when there is at most one device.
set -euo pipefail
config=${1:?usage: launch/train.sh CONFIG [--section.key=value ...]}
shift
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${gpus}" -gt 1 ]; then
  exec torchrun --standalone --nproc_per_node="${gpus}" -m dist_llama.train --config "${config}" "$@"
fi
exec python -m dist_llama.train --config "${config}" "$@"
