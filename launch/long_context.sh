#!/usr/bin/env bash
# launch/long_context.sh [STAGE1_CONFIG] [STAGE2_CONFIG] [--section.key=value ...]
# The Position Interpolation route: train at 256 tokens, then fine-tune at 1024 with RoPE positions
# scaled by 4. Overrides apply to both stages (e.g. --data.source=local --data.paths=[...]).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
stage1=configs/main_256.yaml
stage2=configs/pi_1024.yaml
if [[ $# -ge 1 && $1 != --* ]]; then stage1=$1; shift; fi
if [[ $# -ge 1 && $1 != --* ]]; then stage2=$1; shift; fi
stage1_name=$(python -m dist_llama.config --config "${stage1}" "$@" | python -c "import sys, yaml; c = yaml.safe_load(sys.stdin)['train']; print(c['run_root'] + '/' + c['name'])")
"${here}/train.sh" "${stage1}" "$@"
"${here}/train.sh" "${stage2}" --train.init_from="${stage1_name}" "$@"
