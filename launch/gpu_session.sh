#!/usr/bin/env bash
# launch/gpu_session.sh --out DIR [--rehearse] [--deadline-s 540] [--bundle gpu_bundle] [--section.key=value ...]
# One command on a GPU: install the bundle, preflight, train, release, evaluate, bench, report (see
# dist_llama/session/). --rehearse runs the same stages on this machine's CPU.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [ -z "${python}" ]; then
  # The checkout's virtual environment where `make setup` made one; the machine's Python elsewhere.
  if [ -x "${repo}/.venv/bin/python" ]; then python=${repo}/.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${python}" -m dist_llama.session "$@"
