# Sourced by the launch scripts and slurm/train.sbatch: sets ${python} to the project's Python.
# PYTHON when set; else the python on PATH when an environment is active (`. .venv/bin/activate`, or any
# other virtual environment); else the checkout's .venv (made by `make run` or `make setup`) when there
# is one; else the python on PATH.
_checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  python=${PYTHON}
elif [ -z "${VIRTUAL_ENV:-}" ] && [ -x "${_checkout}/.venv/bin/python" ] \
  && ! python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
  python=${_checkout}/.venv/bin/python
else
  python=$(command -v python || command -v python3 || echo python)
fi
unset _checkout
