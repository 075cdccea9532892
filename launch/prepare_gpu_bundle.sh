#!/usr/bin/env bash
# launch/prepare_gpu_bundle.sh [OUT_DIR] [--train-data FILES... and other options of `python -m
#   dist_llama.session bundle`]
# Builds the offline bundle that launch/gpu_session.sh needs on a GPU machine without network (default
# OUT_DIR: gpu_bundle/, git-ignored; name it in the machine's carry):
#   wheels/   cp312 manylinux x86-64 wheels of what that machine lacks: lm-eval, datasets, evaluate and
#             their needs (sdist-only packages are built into wheels here with pip wheel --no-deps)
#   the data  python -m dist_llama.session bundle: tokenizer, training shards as parquet, held-out
#             documents, tinyMMLU and spread MMLU items, manifest.json; it prints the total with the
#             checkout's files and refuses above 60 MiB (training shards that do not fit are left out).
#             The checkout's files are those git tracks and those it neither tracks nor ignores: a refusal
#             names the largest of the latter (a data or cache folder to move out or git-ignore).
# `make test-gpu-stack` then installs the wheels as the session does in an environment with the GPU machine's
# versions (launch/gpu_machine.txt) and runs the release tests and the whole session rehearsal there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${repo}/gpu_bundle
bundle_args=()
if [[ $# -ge 1 && $1 != --* ]]; then out=$1; shift; fi
bundle_args=("$@")
source "${repo}/launch/find_python.sh"
for arg in "$@"; do
  if [[ ${arg} == -h || ${arg} == --help ]]; then
    echo "usage: launch/prepare_gpu_bundle.sh [OUT_DIR] [options of the bundle command below]"
    echo "  downloads the wheels into OUT_DIR/wheels (default gpu_bundle/), then runs:"
    PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}" exec "${python}" -m dist_llama.session bundle --help
  fi
done

# What lm-eval 0.4.13 (hf backend) and datasets need beyond the GPU machine's packages: the install set
# `pip install --dry-run --report` gave on top of that machine's list in a clean 3.12 venv. Wheels of
# packages the machine already has are skipped at install time, so those listed only for safety (requests,
# jinja2, click, psutil, ...) cost room, not risk. datasets 4.6.1, not the newest: the machine's pyarrow
# version is unrecorded, and datasets >= 4.7 fails to import below pyarrow 19 (its Json feature calls
# pa.json_() at import), while 4.6.1 loads lm-eval's JSON tasks with every pyarrow that imports beside
# numpy 2.5 (16.0 to 26.0, tried 2026-12-03); dill and multiprocess at the versions 4.6.1 declares.
# `make test-gpu-stack` runs with pyarrow 16.0.0, the oldest of those.
WHEELS=(
  lm_eval==0.4.13 datasets==4.6.1 evaluate==0.4.6 dill==0.4.0 multiprocess==0.70.18
  requests==2.34.2 charset-normalizer==3.5.3 urllib3==2.8.0 six==1.17.0 Jinja2==3.1.6
  more-itertools==11.2.1 nltk==3.10.4 click==8.5.1 defusedxml==0.7.1 pytablewriter==1.2.1
  DataProperty==1.1.1 mbstrdecoder==1.1.5 chardet==6.0.0.post1 pathvalidate==3.3.1 tabledata==1.3.5
  tcolorpy==0.1.7 typepy==1.3.5 python-dateutil==2.9.0.post0 pytz==2026.6 psutil==7.2.2
)
SDIST_ONLY=(rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1)
rm -rf "${out}/wheels"  # exactly the wheels listed here (pip's cache makes the download cheap)
mkdir -p "${out}/wheels"
"${python}" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --dest "${out}/wheels" "${WHEELS[@]}"
for spec in "${SDIST_ONLY[@]}"; do
  name=${spec%%==*}
  if ! ls "${out}/wheels/${name}-"*.whl >/dev/null 2>&1; then
    "${python}" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "${out}/wheels" "${spec}"
  fi
done
ls "${out}/wheels"/*.whl | while read -r wheel; do
  case "$(basename "${wheel}")" in
    *-none-any.whl|*-cp312-*manylinux*x86_64*.whl|*-abi3-*manylinux*x86_64*.whl) ;;
    *) echo "error: ${wheel} is not for CPython 3.12 on manylinux x86-64; delete it and rerun" >&2; exit 2 ;;
  esac
done

PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}" "${python}" -m dist_llama.session bundle --out "${out}" \
  ${bundle_args[@]+"${bundle_args[@]}"}
