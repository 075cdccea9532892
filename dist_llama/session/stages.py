"""The stages, one function each, in the order they run: install, preflight, train, release, evaluate, bench,
report. Each takes the Session and the seconds plan.py allows it, runs its child processes and returns its
Outcome; train and evaluate share their time step by step (Deadline.training_budget, evaluation_step_allowance).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dist_llama.session import read_json
from dist_llama.session.plan import Outcome
from dist_llama.session.wheels import install_wheels

if TYPE_CHECKING:
    from dist_llama.session.runner import Session

# Fixed prompts of the release check: a fact, a story opening, a date (the project's usual three).
PROMPTS = ("The capital of France is", "Once upon a time, there was a", "In 1905, Albert Einstein published")
GENERATION = {"max_new_tokens": 40, "temperature": 0.8, "top_p": 0.95, "seed": 0}
# Logits of our code and of stock Llama on the same fp32 weights differ only by kernel rounding.
PARITY_RELATIVE_TOLERANCE = 1e-4
RELEASE_CHECK_SCRIPT = Path(__file__).with_name("release_check.py")


def install(session: Session, allowance: float) -> Outcome:
    if not session.manifest["wheels"]:
        if not session.mode.require_gpu:
            return Outcome("install", "skipped", detail="the bundle holds no wheels: this machine's packages are used "
                           "(launch/prepare_gpu_bundle.sh puts them in)")
        return Outcome("install", "failed", detail=f"the bundle {session.bundle} holds no wheels; lm-eval will be "
                       "missing (build the bundle with launch/prepare_gpu_bundle.sh)")
    try:
        installed, present = install_wheels(session.bundle, session.manifest, session.site, timeout=allowance)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        return Outcome("install", "failed", detail=str(error).splitlines()[0])
    session.site_installed = True
    return Outcome("install", "ok", detail=f"{len(installed)} wheels installed into {session.site}, "
                   f"{len(present)} already present")


def preflight(session: Session, allowance: float) -> Outcome:
    """The environment report in its own process: the machine, the packages, the bundle, the resolved config.
    No smoke run: the training run itself falls back to eager when its compile fails or hangs (train)."""
    report = session.work / "preflight.json"
    check = session.run("preflight", session.python("-m", "dist_llama.session", "preflight", "--bundle",
                                                    str(session.bundle), "--inputs", str(session.inputs), "--config",
                                                    session.config, "--report", str(report),
                                                    *(["--require-gpu"] if session.mode.require_gpu else []),
                                                    *session.session_overrides()),
                        allowance)
    session.preflight = read_json(report) or {}
    problems = session.preflight.get("problems", [])
    if not check.ok or problems:
        reason = problems[0] if problems else check.why()
        if any(p.startswith(("no GPU visible", "config error")) for p in problems):
            session.bad_input = reason
        return Outcome("preflight", "failed", detail=reason)
    gpu = session.preflight.get("gpu") or {}
    facts = (f"{gpu['name']}, {gpu['free_gib']:.0f}/{gpu['total_gib']:.0f} GiB free" if gpu else "CPU")
    packages = session.preflight.get("packages", {})
    facts += f", torch {packages.get('torch')} (CUDA {session.preflight.get('cuda')}), transformers " \
             f"{packages.get('transformers')}, pyarrow {packages.get('pyarrow')}"
    notes = [f"{name} does not import" for name in session.preflight.get("import_errors", {})]
    notes += [f"{package} wants {', '.join(wants)}" for package, wants in session.preflight.get("unmet", {}).items()]
    return Outcome("preflight", "ok", detail="; ".join([facts, *notes]))


def bench(session: Session, allowance: float) -> Outcome:
    result = session.work / "bench.json"
    child = session.run("bench", session.python("benchmarks/bench_model_step.py", *session.mode.bench_args, "--json",
                                                str(result)), allowance)
    measured = read_json(result)
    if measured is None:
        return Outcome("bench", "failed", detail=child.why())
    detail = ", ".join(f"{name} {m['tokens_per_s']:,.0f} tok/s" + (f" (MFU {100 * m['mfu']:.1f}%)" if m.get("mfu")
                       else "") for name, m in measured["models"].items())
    if not child.ok:
        return Outcome("bench", "failed", detail=f"{child.why()}; kept: {detail}")
    loader = _bench_loader(session, allowance - child.seconds)
    return Outcome("bench", "ok" if loader.get("tokens_per_s") else "failed", detail=f"{detail}; {loader['detail']}")


def _bench_loader(session: Session, seconds: float) -> dict:
    """The training loader's tokens/s (from the token cache when the session builds one), beside the
    model's: a lent GPU then shows which of the two limits training."""
    result = session.work / "bench_loader.json"
    child = session.run("bench_loader", session.python("benchmarks/bench_loader.py", "--config", session.config,
                                                       *session.base_overrides(), "--seconds", "3", "--json",
                                                       str(result)), seconds)
    measured = read_json(result)
    if measured is None:
        return {"detail": f"loader failed: {child.why()}"}
    return {**measured, "detail": f"loader {measured['tokens_per_s']:,.0f} tok/s ({measured['source']})"}


def train(session: Session, allowance: float) -> Outcome:
    """The config with the time budget the deadline leaves. A compiled run that fails, or has not planned its
    budget within the mode's compile_limit_s (its first steps and first evaluation compile graphs before the
    plan), is run again eager, as a new run, with the time left."""
    from dist_llama.checkpoint import complete_checkpoints

    name = session.resolved("train", "name", "run")
    compiled = bool(session.resolved("parallel", "compile"))
    attempts = [(name, [])]
    notes = []
    for attempt, (run_name, extra) in enumerate(attempts):
        budget = session.deadline.training_budget()
        if budget < session.deadline.least("train"):
            notes.append(f"{budget:.0f} s left for training, less than the {session.deadline.least('train'):.0f} s "
                         "worth starting")
            break
        run_dir = session.work / "runs" / run_name
        session.runs.append(run_dir)
        overrides = [*extra, f"--train.run_root={session.work / 'runs'}", f"--train.name={run_name}",
                     f"--train.time_budget_s={budget:.0f}"]
        watch = compiled and not extra
        child = session.run(f"train_{run_name}", session.trainer(overrides), session.deadline.training_timeout(budget),
                            started=(lambda: has_planned(run_dir)) if watch else None,
                            start_within=session.mode.compile_limit_s)
        checkpoints = complete_checkpoints(run_dir / "checkpoints")
        if child.ok:
            return Outcome("train", "ok", detail="; ".join([*notes, f"{run_name}: budget {budget:.0f} s, "
                                                            f"final checkpoint {checkpoints[-1].name}"]))
        notes.append(f"{run_name}: {child.why()}" + (f" (latest checkpoint {checkpoints[-1].name})"
                                                       if checkpoints else ""))
        if attempt == 0 and compiled and not child.timed_out:
            attempts.append((f"{name}_eager", ["--parallel.compile=false"]))
    return Outcome("train", "failed", detail="; ".join(notes))


def has_planned(run_dir: Path) -> bool:
    """Whether the trainer planned its time budget (its metrics.jsonl holds the "plan" record): its first
    steps and its first evaluation are done, with whatever they compiled."""
    try:
        return '"kind": "plan"' in (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return False


def release(session: Session, allowance: float) -> Outcome:
    """Consolidate once, then load and compare where dist_llama is not importable (against stock Llama on the
    same files, with a LlamaConfig of the release's config)."""
    run_dir = session.trained_run()
    if run_dir is None:
        return Outcome("release", "skipped", detail="no training checkpoint to release")
    deadline = time.monotonic() + allowance
    folder = run_dir / "release"
    child = session.run("consolidate", session.python("-m", "dist_llama.consolidate", "--checkpoint", str(run_dir),
                                                      "--out", str(folder)), allowance)
    if not child.ok:
        return Outcome("release", "failed", detail=f"consolidate: {child.why()}")
    session.release = folder
    check = session.work / "release_check.json"
    isolated = _isolated_folder(session)
    child = session.run("release_check", _isolated_check_command(session, isolated, check), deadline - time.monotonic(),
                        env=_isolated_env(session), cwd=isolated)
    result = read_json(check)
    if result is None or not child.ok:
        reason = (result or {}).get("problem") or child.why()
        return Outcome("release", "failed", detail=f"isolated load: {reason}")
    return Outcome("release", "ok", detail=f"{result['class']} loads without dist_llama; logits vs stock Llama "
                   f"max |diff| {result['max_abs_logit_diff']:.2e}; {len(result['generations'])} prompts generated")


def _isolated_folder(session: Session) -> Path:
    folder = session.work / "isolated"
    folder.mkdir(exist_ok=True)
    return folder


def _isolated_check_command(session: Session, folder: Path, report: Path) -> list[str]:
    # -S: no site-packages .pth files, so an editable install of dist_llama is never set up; the packages
    # come from PYTHONPATH (_isolated_env) instead, without the checkout. The script is copied into the
    # isolated folder, which becomes sys.path[0].
    script = folder / RELEASE_CHECK_SCRIPT.name
    shutil.copyfile(RELEASE_CHECK_SCRIPT, script)
    return [sys.executable, "-S", str(script), str(report), str(session.release), session.device, json.dumps(list(PROMPTS)), json.dumps(GENERATION), str(PARITY_RELATIVE_TOLERANCE)]


def _isolated_env(session: Session) -> dict:
    """This interpreter's import path without any folder that holds dist_llama (the checkout, cwd)."""
    paths = [str(session.site)] if session.site_installed else []
    for entry in sys.path:
        folder = Path(entry or ".").resolve()
        if folder.is_dir() and not (folder / "dist_llama").exists() and str(folder) not in paths:
            paths.append(str(folder))
    env = {key: value for key, value in session.env().items() if key != "PYTHONPATH"}
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def evaluate(session: Session, allowance: float) -> Outcome:
    """tinyMMLU, loss by position and the spread MMLU items, each in its own process while time is left."""
    if session.release is None or not (session.release / "config.json").is_file():
        return Outcome("evaluate", "skipped", detail="no release folder to evaluate")
    missing_eval = [m for m in ("lm_eval", "lm_eval.models.huggingface", "datasets")
                    if m in session.preflight.get("import_errors", {})]
    done, problems = [], []
    for label, arguments, needs_lm_eval in _evaluation_steps(session):
        if needs_lm_eval and missing_eval:
            problems.append(f"{label} skipped: {missing_eval[0]} does not import")
            continue
        step_allowance = session.deadline.evaluation_step_allowance()
        if not session.deadline.evaluation_step_worth_starting(step_allowance):
            problems.append(f"{label} skipped for time ({step_allowance:.0f} s left)")
            continue
        child = session.run(f"evaluate_{label}", session.python("-m", "dist_llama.evaluate", *arguments),
                            step_allowance)
        (done if child.ok else problems).append(label if child.ok else f"{label}: {child.why()}")
    status = "ok" if not problems else "failed"
    return Outcome("evaluate", status, detail="; ".join([*(f"{d} ok" for d in done), *problems]))


def _evaluation_steps(session: Session) -> list[tuple[str, list[str], bool]]:
    """(label, `python -m dist_llama.evaluate` arguments, needs lm-eval) of each evaluation, in order."""
    run_dir = session.release.parent
    items = {name: session.inputs / relative for name, relative in session.manifest["items"].items()}
    limit = session.resolved("eval", "limit")
    spread_limit = limit or session.mode.mmlu_spread_limit
    irt = session.resolved("eval", "irt_params")
    common = ["--model", str(session.release), "--batch-size", str(session.resolved("eval", "batch_size", 8)),
              "--device", session.device]
    return [
        ("tinymmlu", ["mmlu", "--data", str(items["tinymmlu"]), "--output", str(run_dir / "eval"), *common,
                      *(["--limit", str(limit)] if limit else []), *(["--irt-params", str(irt)] if irt else [])],
         True),
        ("ppl", ["ppl", "--data", str(session.bundle / session.manifest["held_out"]), "--output", str(run_dir / "eval"),
                 "--seq-len", str(session.resolved("data", "seq_len", 1024)),
                 "--docs", str(session.resolved("eval", "ppl_docs", 32)), "--label", run_dir.name, *common], False),
        ("mmlu_spread", ["mmlu", "--data", str(items["mmlu_spread"]), "--output", str(run_dir / "eval" / "mmlu_spread"),
                         *common, *(["--limit", str(spread_limit)] if spread_limit else [])], True),
    ]


def report(session: Session, allowance: float) -> Outcome:
    run_dir = session.reported_run()
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return Outcome("report", "skipped", detail="no training metrics to report")
    child = session.run("report", session.python("-m", "dist_llama.report", "--run", str(run_dir)), allowance)
    if not child.ok:
        return Outcome("report", "failed", detail=child.why())
    return Outcome("report", "ok", detail=f"{run_dir.name}/report/results.md and plots")


RUNNERS = {"install": install, "preflight": preflight, "bench": bench, "train": train, "release": release,
           "evaluate": evaluate, "report": report}
