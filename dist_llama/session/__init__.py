"""The GPU session: one command (`python -m dist_llama.session`, or launch/gpu_session.sh) that runs the chain
of stages inside one deadline on a machine without network. Its --help says what it does, what it needs
and what comes back; `python -m dist_llama.session plan` prints each stage's planned seconds.

Which module holds what:

    cli.py            the command lines: the session (run), bundle, install, preflight, plan
    bundle.py         the offline bundle: build it (tokenizer, training shards as parquet, held-out
                      documents, MMLU items, manifest.json), check it against its manifest, unpack it
    wheels.py         install the bundle's wheels, check which modules import and what they declare
                      they need
    deadline.py       the two modes (GPU, CPU rehearsal) with their planned times and limits, and
                      Deadline: what each stage may take of the time left
    context.py        what the stages are given and give back: Context (fixed for the whole session, with
                      its child processes' commands and environment), the preflight's facts, which of the
                      runs made is released and which is reported
    preflight.py      the environment check (its own process: it imports torch)
    stages.py         one function per stage: each returns its Outcome, and its product where a later
                      stage uses one
    runner.py         the session: its inputs checked, its stages run by dist_llama.stages' runner with
                      the deadline, then the summary and the pack
    release_check.py  the script that loads the release where dist_llama cannot be imported
    summary.py        summary.json, summary.md and the closing table
    pack.py           session.tar.gz: every small file of the session

The stages' order, and how each is skipped, run in its own processes, timed and reported, belong to
dist_llama.stages, which `make run` (dist_llama.pipeline) shares.

Every module the session process imports before the install stage (dist_llama.stages and dist_llama.cli
too) imports only the standard library at the top: they run before the packages that stage installs.
torch, pyarrow and dist_llama's training modules are imported inside the functions that need them, most
of them in child processes.
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
