#!/usr/bin/env bash
# launch/long_context.sh [STAGE1_CONFIG] [STAGE2_CONFIG] [--section.key=value ...]
# The Position Interpolation route: train at 256 tokens, then fine-tune at 1024 with RoPE positions
# scaled by 4. Overrides apply to both stages (e.g. --data.source=local --data.paths=[...]). The Python is
# the active environment's, else the checkout's .venv (launch/find_python.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "${here}/find_python.sh"
stage1=configs/main_256.yaml
stage2=configs/pi_1024.yaml
if [[ $# -ge 1 && ($1 == -h || $1 == --help) ]]; then
  echo "usage: launch/long_context.sh [STAGE1_CONFIG] [STAGE2_CONFIG] [--section.key=value ...]
  launch/train.sh STAGE1_CONFIG (default ${stage1}), then launch/train.sh STAGE2_CONFIG (default
  ${stage2}) initialised from stage 1's run; the overrides apply to both."
  exit 0
fi
if [[ $# -ge 1 && $1 != --* ]]; then stage1=$1; shift; fi
if [[ $# -ge 1 && $1 != --* ]]; then stage2=$1; shift; fi
stage1_name=$("${python}" -m dist_llama.config --config "${stage1}" "$@" --run-dir)
"${here}/train.sh" "${stage1}" "$@"
"${here}/train.sh" "${stage2}" --train.init_from="${stage1_name}" "$@"
