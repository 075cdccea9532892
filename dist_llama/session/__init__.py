"""One command on a GPU: install, preflight, train, release, evaluate, bench and report inside one deadline.

    python -m dist_llama.session --out OUT [--bundle gpu_bundle] [--deadline-s 540] [--rehearse]
        [--config FILE] [--work DIR] [--nproc N] [--skip STAGE,...] [--compile-limit-s S]
        [--section.key=value ...]

`launch/gpu_session.sh` is the same command (so is the older `python -m dist_llama.gpu_session`). It is made
for a short, hard-limited GPU slot with no network and little room to bring results back: everything the run
needs comes from one bundle folder (built by `launch/prepare_gpu_bundle.sh`), and what must come back is
packed into at most five small files in OUT: summary.md, summary.json, session.tar.gz (the run's metrics,
tensorboard events, config, environment, evaluation summaries and samples, plots, generations and every
stage's log), loss.png and loss_by_position.png. Weights and checkpoints stay in the work folder (WORK,
default a new temporary one).

Stages, each in its own process(es) with its own time limit, against one deadline counted from the start.
Every stage but training has a planned time and training gets the rest (`python -m dist_llama.session plan`):
  install    the bundle's wheels that are not installed already, into WORK/site, put on PYTHONPATH
  preflight  GPU name, package versions (and what the bundle's packages declare they need but do not find),
             free memory, the bundle's data and tokenizer, and the resolved training config (no smoke run:
             the training run falls back to eager by itself)
  train      the config with train.time_budget_s = what the deadline leaves after the later stages' plan.
             The run builds the token cache first (every core), then trains. A compiled run that fails,
             or misses its first step or then its time-budget plan, each within --compile-limit-s of the
             one before (a compile that hangs), is run again eager, as a new run, with the time left
  release    consolidate once; then, in a process where dist_llama is not importable: load with
             trust_remote_code, compare logits with stock LlamaForCausalLM on the same files, and generate
             from fixed prompts (greedy, and sampled with a seed)
  evaluate   lm-eval on the 100 tinyMMLU items (IRT when eval.irt_params names a parameter file), held-out
             loss by position at the training length, lm-eval on the MMLU items spread over all subjects
  bench      only on time left after the evaluation: benchmarks/bench_model_step.py (ours vs transformers'
             Llama on the same weights, and ours compiled) and the training loader's tokens/s
  report     python -m dist_llama.report; then the summary and the pack
A stage runs when its inputs exist, whatever an unrelated stage did. Each outcome (ok, failed with the last
error line, skipped and why) goes into summary.json and summary.md, beside its planned time; the last thing
printed is a short table. `--rehearse` runs the same stages on the CPU with configs/debug.yaml and a deadline
under five minutes. Exit status: 0 when every stage that ran succeeded, 1 when one failed, 2 for bad input
(missing bundle, no GPU, a deadline too short for the preflight, a config error), each told in one line.

Other subcommands (`python -m dist_llama.session --help` lists them all, each with its own --help):
    python -m dist_llama.session bundle --out gpu_bundle [...]          the data half of the bundle
    python -m dist_llama.session install --bundle B --target DIR        install its wheels and import them
    python -m dist_llama.session preflight --bundle B --report F.json   the environment check alone
    python -m dist_llama.session plan [--rehearse] [--deadline-s S]      the planned seconds per stage (JSON)

Which module holds what, in the order a session uses them:

    bundle.py         the offline bundle: build it (tokenizer, training shards as parquet, held-out
                      documents, MMLU items, manifest.json), check it against its manifest, unpack it
    wheels.py         install the bundle's wheels, check which modules import and what they declare
                      they need
    deadline.py       the stages, the two modes (GPU, CPU rehearsal) with their planned times and
                      limits, stage_times() (what `plan` prints), and Deadline: what each stage may
                      take of the time left
    preflight.py      the environment check (its own process: it imports torch)
    processes.py      one stage's child process: its log, its time limit (and a first-step limit),
                      stopping its process group
    context.py        what the stages are given and give back: Context (what is fixed for the whole
                      session, and its child processes' commands and environment), Outcome, the
                      preflight's facts, which of the runs made is trained and which is reported
    stages.py         one function per stage, in the order they run: each returns its Outcome, and
                      its product where a later stage uses one
    runner.py         the loop that runs the stages in order, passing each what it needs of the
                      earlier stages' products, then writes the summary and the pack
    release_check.py  the script that loads the release where dist_llama cannot be imported
    summary.py        summary.json, summary.md and the closing table
    pack.py           session.tar.gz: every small file of the session
    cli.py            the command lines (run, bundle, install, preflight, plan)

Imports go one way, cli -> runner -> stages, summary -> context -> deadline, bundle, processes (a test
checks that no module imports another in a circle).

Every module the session process imports before the install stage imports only the standard library at
the top: they run before the packages that stage installs. torch, pyarrow and dist_llama's own training
modules are imported inside the functions that need them, most of them in child processes.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class BadInput(Exception):
    """A problem with what the session was given; told in one line, exit status 2."""


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
