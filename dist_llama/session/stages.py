"""The session's stages, one function each: install, preflight, train, release, evaluate, bench, report.
Each is given the Context, what it needs of the earlier stages' products, and the seconds the Deadline
allows it; it runs its child processes and returns its Outcome, with its own product where a later stage
uses one (the preflight's facts, the runs trained, the release folder). Training sets its own time budget
and the evaluation shares its time step by step (Deadline.training_budget, evaluation_step_allowance).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dist_llama.checkpoint_folders import complete_checkpoints
from dist_llama.session import read_json
from dist_llama.session.context import (
    Context,
    PreflightFacts,
    TrainingInterrupted,
    python,
    reported_run,
    trained_run,
)
from dist_llama.session.wheels import install_wheels
from dist_llama.stages import Child, Interrupted, Outcome, ProgressMarks

# Fixed prompts of the release check: a fact, a story opening, a date (the project's usual three).
PROMPTS = ("The capital of France is", "Once upon a time, there was a", "In 1905, Albert Einstein published")
GENERATION = {"max_new_tokens": 40, "temperature": 0.8, "top_p": 0.95, "seed": 0}
# Logits of our code and of stock Llama on the same fp32 weights differ only by kernel rounding.
PARITY_RELATIVE_TOLERANCE = 1e-4
RELEASE_CHECK_SCRIPT = Path(__file__).with_name("release_check.py")
# What the evaluation's lm-eval steps need to import; the loss by position needs none of them.
LM_EVAL_MODULES = ("lm_eval", "lm_eval.models.huggingface", "datasets")


def install(context: Context, allowance: float) -> Outcome:
    """The bundle's wheels that are not installed already, into context.site. When this is ok, the runner
    puts that folder on every later child's import path (Context.site_installed)."""
    if not context.manifest["wheels"]:
        if not context.mode.require_gpu:
            detail = (
                "the bundle holds no wheels: this machine's packages are used "
                "(launch/prepare_gpu_bundle.sh puts them in)"
            )
            return Outcome("install", "skipped", detail=detail)
        detail = (
            f"the bundle {context.bundle} holds no wheels, so lm-eval will be missing "
            "(build the bundle with launch/prepare_gpu_bundle.sh)"
        )
        return Outcome("install", "failed", detail=detail)
    try:
        installed, present = install_wheels(context.bundle, context.manifest, context.site, timeout=allowance)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        return Outcome("install", "failed", detail=str(error).splitlines()[0])
    return Outcome(
        "install",
        "ok",
        detail=f"{len(installed)} wheels installed into {context.site}, {len(present)} already present",
    )


def preflight(context: Context, allowance: float) -> tuple[Outcome, PreflightFacts]:
    """The environment report in its own process: the machine, the packages, the bundle, the resolved config.
    No smoke run: the training run itself falls back to eager when its compile fails or hangs (train)."""
    report_path = context.work / "preflight.json"
    command = python(
        "-m",
        "dist_llama.session",
        "preflight",
        "--bundle",
        str(context.bundle),
        "--inputs",
        str(context.inputs),
        "--config",
        context.config,
        "--report",
        str(report_path),
        *(["--require-gpu"] if context.mode.require_gpu else []),
        *context.session_overrides(),
    )
    check = context.run("preflight", command, allowance)
    report = read_json(report_path) or {}
    problems = report.get("problems", [])
    if not check.ok or problems:
        reason = problems[0] if problems else check.why()
        stops_session = any(p.startswith(("no GPU visible", "config error")) for p in problems)
        return (
            Outcome("preflight", "failed", detail=reason),
            PreflightFacts(report, bad_input=reason if stops_session else None),
        )
    return Outcome("preflight", "ok", detail=_preflight_detail(report)), PreflightFacts(report)


def _preflight_detail(report: dict) -> str:
    """The GPU and the versions that matter, then what does not import and what packages want but lack."""
    gpu = report.get("gpu") or {}
    facts = f"{gpu['name']}, {gpu['free_gib']:.0f}/{gpu['total_gib']:.0f} GiB free" if gpu else "CPU"
    packages = report.get("packages", {})
    facts += (
        f", torch {packages.get('torch')} (CUDA {report.get('cuda')}), transformers "
        f"{packages.get('transformers')}, pyarrow {packages.get('pyarrow')}"
    )
    notes = [f"{name} does not import" for name in report.get("import_errors", {})]
    notes += [f"{package} wants {', '.join(wants)}" for package, wants in report.get("unmet", {}).items()]
    return "; ".join([facts, *notes])


def train(context: Context, preflight: PreflightFacts) -> tuple[Outcome, tuple[Path, ...]]:
    """The config with the time budget the deadline leaves. A compiled run that fails, or misses a progress
    mark (its first step, then its time-budget plan, each within the mode's compile_limit_s of the one before:
    the training graphs, then the evaluation graphs compile before them), is run again eager with the time
    left; one that stopped on a user error (exit 2, said in one line) is not. The compiled run saves after its
    first step too, and the eager run resumes its latest checkpoint (a new run only where it left none), so a
    late failure keeps the steps done. Returns the runs made, in order."""
    name = preflight.resolved("train", "name", "run")
    compiled = bool(preflight.resolved("parallel", "compile"))
    attempts = [(name, ["--checkpoint.first_step=true"] if compiled else [])]
    runs, notes = [], []
    try:
        for attempt, (run_name, extra) in enumerate(attempts):
            budget = context.deadline.training_budget()
            if budget < context.deadline.least("train"):
                least = context.deadline.least("train")
                notes.append(f"{budget:.0f} s left for training, less than the {least:.0f} s worth starting")
                break
            run_dir = context.work / "runs" / run_name
            if run_dir not in runs:  # an eager rerun may resume the compiled run's folder
                runs.append(run_dir)
            label = f"train_{run_name}" + ("_eager" if attempt else "")
            child = _training_run(context, run_dir, label, budget, extra, watch=compiled and attempt == 0)
            checkpoints = complete_checkpoints(run_dir / "checkpoints")
            if child.ok:
                notes.append(f"{run_name}: budget {budget:.0f} s, final checkpoint {checkpoints[-1].name}")
                return Outcome("train", "ok", detail="; ".join(notes)), tuple(runs)
            notes.append(
                f"{run_name}: {child.why()}"
                + (f" (latest checkpoint {checkpoints[-1].name})" if checkpoints else "")
            )
            if attempt == 0 and compiled and not child.timed_out and child.returncode != USER_ERROR_EXIT:
                eager = run_name if checkpoints else f"{name}_eager"  # resume the steps done, if any
                attempts.append((eager, ["--parallel.compile=false", "--train.budget_on_resume=replan"]))
    except Interrupted:
        raise TrainingInterrupted(tuple(runs)) from None
    return Outcome("train", "failed", detail="; ".join(notes)), tuple(runs)


USER_ERROR_EXIT = 2  # dist_llama.cli: a one-line user error, which an eager run would repeat
# What a compiled run reaches, in order, and the record in metrics.jsonl that shows it.
TRAINING_MARKS = {"first step": "started", "time-budget plan": "plan"}
# Stopping a child takes up to this long (dist_llama.stages.stop_process_group: SIGTERM, then SIGKILL).
STOP_S = 15


def _training_run(
    context: Context, run_dir: Path, label: str, budget: float, extra: list[str], watch: bool
) -> Child:
    """One training attempt in run_dir (a new run, or a resume of the checkpoints there), given `budget`
    seconds; when `watch`, it is stopped as soon as it misses a progress mark (TRAINING_MARKS), and at the
    latest when what is left would give an eager rerun less than its least time."""
    overrides = [
        *extra,
        f"--train.run_root={context.work / 'runs'}",
        f"--train.name={run_dir.name}",
        f"--train.time_budget_s={budget:.0f}",
    ]
    rerun_needs = context.deadline.least("train") + STOP_S
    progress = ProgressMarks(
        tuple(TRAINING_MARKS),
        context.mode.compile_limit_s,
        lambda mark: TRAINING_MARKS[mark] in logged_kinds(run_dir),
        all_by=time.monotonic() + budget - rerun_needs if budget > rerun_needs else None,
    )
    return context.run(
        label,
        context.trainer(overrides),
        context.deadline.training_timeout(budget),
        progress=progress if watch else None,
    )


def logged_kinds(run_dir: Path) -> set[str]:
    """The kinds of record in the trainer's metrics.jsonl so far (a line being written is passed over)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return set()
    kinds = set()
    for line in lines:
        try:
            kinds.add(json.loads(line).get("kind"))
        except json.JSONDecodeError:
            continue
    return kinds


def release(context: Context, runs: tuple[Path, ...], allowance: float) -> tuple[Outcome, Path | None]:
    """Consolidate once, then load and compare where dist_llama is not importable (against stock Llama on the
    same files, with a LlamaConfig of the release's config). Returns the release folder once consolidated,
    whatever the check says: the evaluation still measures it."""
    run_dir = trained_run(runs)
    if run_dir is None:
        return Outcome("release", "skipped", detail="no training checkpoint to release"), None
    deadline = time.monotonic() + allowance
    folder = run_dir / "release"
    child = context.run(
        "consolidate",
        python("-m", "dist_llama.consolidate", "--checkpoint", str(run_dir), "--out", str(folder)),
        allowance,
    )
    if not child.ok:
        return Outcome("release", "failed", detail=f"consolidate: {child.why()}"), None
    report_path = context.work / "release_check.json"
    isolated = context.work / "isolated"
    isolated.mkdir(exist_ok=True)
    command = _isolated_check_command(isolated, folder, report_path, context.device)
    child = context.run(
        "release_check", command, deadline - time.monotonic(), env=_isolated_env(context), cwd=isolated
    )
    result = read_json(report_path)
    if result is None or not child.ok:
        reason = (result or {}).get("problem") or child.why()
        return Outcome("release", "failed", detail=f"isolated load: {reason}"), folder
    return Outcome(
        "release",
        "ok",
        detail=f"{result['class']} loads without dist_llama; "
        f"logits vs stock Llama max |diff| {result['max_abs_logit_diff']:.2e}; "
        f"{len(result['generations'])} prompts generated",
    ), folder


def _isolated_check_command(folder: Path, release_folder: Path, report: Path, device: str) -> list[str]:
    # -S: no site-packages .pth files, so an editable install of dist_llama is never set up; the packages
    # come from PYTHONPATH (_isolated_env) instead, without the checkout. The script is copied into the
    # isolated folder, which becomes sys.path[0].
    script = folder / RELEASE_CHECK_SCRIPT.name
    shutil.copyfile(RELEASE_CHECK_SCRIPT, script)
    return [
        sys.executable,
        "-S",
        str(script),
        str(report),
        str(release_folder),
        device,
        json.dumps(list(PROMPTS)),
        json.dumps(GENERATION),
        str(PARITY_RELATIVE_TOLERANCE),
    ]


def _isolated_env(context: Context) -> dict:
    """This interpreter's import path without any folder that holds dist_llama (the checkout, cwd)."""
    paths = [str(context.site)] if context.site_installed else []
    for entry in sys.path:
        folder = Path(entry or ".").resolve()
        if folder.is_dir() and not (folder / "dist_llama").exists() and str(folder) not in paths:
            paths.append(str(folder))
    env = {key: value for key, value in context.env().items() if key != "PYTHONPATH"}
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def evaluate(
    context: Context, preflight: PreflightFacts, release_folder: Path | None, allowance: float
) -> Outcome:
    """tinyMMLU, loss by position and the spread MMLU items, each in its own process while time is left."""
    if release_folder is None or not (release_folder / "config.json").is_file():
        return Outcome("evaluate", "skipped", detail="no release folder to evaluate")
    missing = [m for m in LM_EVAL_MODULES if m in preflight.report.get("import_errors", {})]
    done, problems, ends = [], [], time.monotonic() + allowance
    for label, arguments, needs_lm_eval in _evaluation_steps(context, preflight, release_folder):
        if needs_lm_eval and missing:
            problems.append(f"{label} skipped: {missing[0]} does not import")
            continue
        step_allowance = min(context.deadline.evaluation_step_allowance(), ends - time.monotonic())
        if not context.deadline.evaluation_step_worth_starting(step_allowance):
            problems.append(f"{label} skipped for time ({step_allowance:.0f} s left)")
            continue
        command = python("-m", "dist_llama.evaluate", *arguments)
        child = context.run(f"evaluate_{label}", command, step_allowance)
        (done if child.ok else problems).append(label if child.ok else f"{label}: {child.why()}")
    status = "ok" if not problems else "failed"
    return Outcome("evaluate", status, detail="; ".join([*(f"{d} ok" for d in done), *problems]))


def _evaluation_steps(
    context: Context, preflight: PreflightFacts, release_folder: Path
) -> list[tuple[str, list[str], bool]]:
    """(label, `python -m dist_llama.evaluate` arguments, needs lm-eval) of each evaluation, in order."""
    run_dir = release_folder.parent
    items = {name: context.inputs / relative for name, relative in context.manifest["items"].items()}
    limit = preflight.resolved("eval", "limit")
    spread_limit = limit or context.mode.mmlu_spread_limit
    irt = preflight.resolved("eval", "irt_params")
    batch_size = preflight.resolved("eval", "batch_size", 8)
    common = ["--model", str(release_folder), "--batch-size", str(batch_size), "--device", context.device]
    tinymmlu = [
        "mmlu",
        "--data",
        str(items["tinymmlu"]),
        "--output",
        str(run_dir / "eval"),
        *common,
        *(["--limit", str(limit)] if limit else []),
        *(["--irt-params", str(irt)] if irt else []),
    ]
    held_out = context.bundle / context.manifest["held_out"]
    ppl = [
        "ppl",
        "--data",
        str(held_out),
        "--output",
        str(run_dir / "eval"),
        "--seq-len",
        str(preflight.resolved("data", "seq_len", 1024)),
        "--docs",
        str(preflight.resolved("eval", "ppl_docs", 32)),
        "--label",
        run_dir.name,
        *common,
    ]
    mmlu_spread = [
        "mmlu",
        "--data",
        str(items["mmlu_spread"]),
        "--output",
        str(run_dir / "eval" / "mmlu_spread"),
        *common,
        *(["--limit", str(spread_limit)] if spread_limit else []),
    ]
    return [("tinymmlu", tinymmlu, True), ("ppl", ppl, False), ("mmlu_spread", mmlu_spread, True)]


def bench(context: Context, allowance: float) -> Outcome:
    """The model's step (ours vs transformers' Llama, and ours compiled), then the training loader's
    tokens/s with what is left of the allowance."""
    result = context.work / "bench.json"
    child = context.run(
        "bench",
        python("benchmarks/bench_model_step.py", *context.mode.bench_args, "--json", str(result)),
        allowance,
    )
    measured = read_json(result)
    if measured is None:
        return Outcome("bench", "failed", detail=child.why())
    detail = ", ".join(
        f"{name} {m['tokens_per_s']:,.0f} tok/s" + (f" (MFU {100 * m['mfu']:.1f}%)" if m.get("mfu") else "")
        for name, m in measured["models"].items()
    )
    if not child.ok:
        return Outcome("bench", "failed", detail=f"{child.why()}; kept: {detail}")
    loader = _bench_loader(context, allowance - child.seconds)
    status = "ok" if loader.get("tokens_per_s") else "failed"
    return Outcome("bench", status, detail=f"{detail}; {loader['detail']}")


def _bench_loader(context: Context, seconds: float) -> dict:
    """The training loader's tokens/s (from the token cache when the session builds one), beside the
    model's: a lent GPU then shows which of the two limits training."""
    result = context.work / "bench_loader.json"
    command = python(
        "benchmarks/bench_loader.py",
        "--config",
        context.config,
        *context.base_overrides(),
        "--seconds",
        "3",
        "--json",
        str(result),
    )
    child = context.run("bench_loader", command, seconds)
    measured = read_json(result)
    if measured is None:
        return {"detail": f"loader failed: {child.why()}"}
    return {**measured, "detail": f"loader {measured['tokens_per_s']:,.0f} tok/s ({measured['source']})"}


def report(context: Context, runs: tuple[Path, ...], allowance: float) -> Outcome:
    """python -m dist_llama.report on the run the summary shows: its results table and plots."""
    run_dir = reported_run(runs)
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return Outcome("report", "skipped", detail="no training metrics to report")
    child = context.run("report", python("-m", "dist_llama.report", "--run", str(run_dir)), allowance)
    if not child.ok:
        return Outcome("report", "failed", detail=child.why())
    return Outcome("report", "ok", detail=f"{run_dir.name}/report/results.md and plots")
