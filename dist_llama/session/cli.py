"""The command lines of `python -m dist_llama.session`: the session itself (`run`, the default subcommand),
and `bundle`, `install`, `preflight` and `plan`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from dist_llama.session import REPO, BadInput, read_json
from dist_llama.session.bundle import (
    BUNDLE_LIMIT_MIB,
    DEFAULT_BUNDLE,
    MANIFEST,
    MIB,
    build_bundle,
    load_manifest,
    unpack_bundle,
)
from dist_llama.session.context import Context, resolve_config_path
from dist_llama.session.deadline import GPU, REHEARSAL, STAGES, stage_times
from dist_llama.session.preflight import preflight_report
from dist_llama.session.runner import Runner
from dist_llama.session.wheels import INSTALL_CHECK_MODULES, check_install, install_wheels
from dist_llama.stages import raise_interrupted, stage_list

PROG = "python -m dist_llama.session"
# Every subcommand in one line, as the session's --help lists them; main() dispatches to the same names.
SUBCOMMANDS = {
    "run": "the session inside one deadline (the default subcommand)",
    "bundle": "write the data half of the offline bundle and its manifest",
    "install": "install the bundle's wheels as the session does, then import them",
    "preflight": "report this machine, the bundle and the resolved config as JSON",
    "plan": "print the planned seconds of every stage as JSON",
}


def _subcommand_list() -> str:
    lines = [f"  {name:<10} {about}" for name, about in SUBCOMMANDS.items()]
    return f"subcommands ({PROG} SUBCOMMAND --help):\n" + "\n".join(lines)


def _stages_list(text: str) -> set[str]:
    try:
        return stage_list(text, STAGES)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_main(argv: list[str]) -> int:
    parser = _run_parser()
    args, overrides = parser.parse_known_args(argv)
    strays = [item for item in overrides if not re.fullmatch(r"--\w+\.\w+=.*", item)]
    if strays:
        parser.exit(
            2, f"error: unrecognized argument {strays[0]!r}; overrides look like --section.key=value\n"
        )
    if args.nproc < 1:
        parser.exit(2, "error: --nproc must be at least 1\n")
    mode = REHEARSAL if args.rehearse else GPU
    if args.compile_limit_s is not None:
        mode = dataclasses.replace(mode, compile_limit_s=args.compile_limit_s)
    try:
        context = Context.from_command_line(mode, args, overrides)
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.exit(2, f"error: cannot create --out/--work folders: {error}\n")
    signal.signal(signal.SIGTERM, raise_interrupted)
    return Runner(context).execute()


RUN_DESCRIPTION = """\
One command on a GPU without network: install, preflight, train, release, evaluate, bench and report inside
one deadline. Everything the run needs comes from one bundle folder (launch/prepare_gpu_bundle.sh builds it).
What must come back is at most five small files in OUT: summary.md, summary.json, session.tar.gz (the run's
metrics, tensorboard events, config, environment, evaluation summaries and samples, plots, generations and
every stage's log), loss.png and loss_by_position.png. Weights and checkpoints stay in the work folder."""

RUN_STAGES = """\
stages, in this order, each in its own processes with its own time limit; every stage but training has a
planned time and training gets the rest (the plan subcommand prints them):
  install    the bundle's wheels that are not installed already, into WORK/site, put on the import path
  preflight  the GPU, package versions (and what the bundle's packages need but do not find), free memory,
             the bundle's data and tokenizer, the resolved training config
  train      the config with train.time_budget_s set to what the deadline leaves after the later stages'
             plan; on a GPU the run builds its token cache first, with every core. A compiled run that
             fails, or misses its first step or then its time-budget plan (each within --compile-limit-s
             of the one before), is run again eager with the time left, resuming its latest checkpoint
  release    consolidate once; then, where dist_llama is not importable, load it with trust_remote_code,
             compare its logits with stock LlamaForCausalLM on the same files, generate from fixed prompts
  evaluate   tinyMMLU (IRT with --eval.irt_params=FILE), held-out loss by position, MMLU spread over all
             subjects
  bench      only on time left after the evaluation: ours vs transformers' Llama step (and ours
             compiled), and the training loader's tokens/s
  report     the run's plots and results; then the summary and the pack
A stage runs when its inputs exist, whatever an unrelated stage did; each outcome (ok, failed and why,
skipped and why) goes into summary.md and summary.json beside its planned time.

--rehearse runs the same stages on this CPU with configs/debug.yaml, in under five minutes.
Exit status: 0 when every stage that ran succeeded, 1 when one failed, 2 for bad input (no bundle, no GPU,
a deadline too short for the preflight, a config error), said in one line.
Any --section.key=value after the options overrides the training config."""


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} [run]",
        description=RUN_DESCRIPTION,
        epilog=f"{RUN_STAGES}\n\n{_subcommand_list()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder for the few files that must come back")
    parser.add_argument(
        "--bundle", default=str(DEFAULT_BUNDLE), help="the offline bundle (default: gpu_bundle/)"
    )
    parser.add_argument(
        "--work", default=None, help="working folder for runs and weights (default: a new temp folder)"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help=f"seconds for everything (default {GPU.deadline_s:g}; rehearsal {REHEARSAL.deadline_s:g})",
    )
    parser.add_argument(
        "--rehearse", action="store_true", help="the same stages on the CPU with configs/debug.yaml"
    )
    parser.add_argument(
        "--config", default=None, help=f"training config (default {GPU.config}; rehearsal {REHEARSAL.config})"
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="training processes (GPUs); >1 launches torchrun"
    )
    parser.add_argument(
        "--compile-limit-s",
        type=float,
        default=None,
        help="a compiled training run must reach its first step, then its time-budget plan, "
        "each within this many seconds of the one before, or it runs eager "
        f"(default {GPU.compile_limit_s:g}; rehearsal {REHEARSAL.compile_limit_s:g})",
    )
    parser.add_argument(
        "--skip",
        type=_stages_list,
        default=[],
        help=f"comma-separated stages to leave out: {', '.join(STAGES)}",
    )
    return parser


def bundle_main(argv: list[str]) -> int:
    shared = REPO.parent / "shared" / "data"
    parser = argparse.ArgumentParser(
        prog=f"{PROG} bundle", description="Write the data half of the offline bundle and its manifest."
    )
    parser.add_argument("--out", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--train-data", nargs="+", default=[str(shared / "owt/train/*.jsonl.zst")])
    parser.add_argument("--held-out", default=str(shared / "owt/tiny.jsonl"))
    parser.add_argument("--tinymmlu", default=str(shared / "tinymmlu/tinymmlu.jsonl"))
    parser.add_argument("--mmlu", default=str(shared / "tinymmlu/mmlu_test.jsonl"))
    parser.add_argument(
        "--mmlu-items",
        type=int,
        default=1400,
        help="MMLU items spread over every subject (1,400 gives about +-2.6 points at 95%%)",
    )
    parser.add_argument(
        "--limit-mib",
        type=float,
        default=BUNDLE_LIMIT_MIB,
        help="refuse above this many MiB for the bundle plus the checkout's files",
    )
    parser.add_argument("--compression-level", type=int, default=19, help="zstd level of the parquet files")
    args = parser.parse_args(argv)
    try:
        manifest = build_bundle(
            Path(args.out),
            args.train_data,
            args.held_out,
            args.tinymmlu,
            args.mmlu,
            args.mmlu_items,
            args.limit_mib,
            args.compression_level,
        )
    except BadInput as error:
        # A refusal for size names what takes the room that git does not show: untracked files.
        room = _untracked_room() if f"{args.limit_mib:g} MiB limit" in str(error) else ""
        print(f"error: {error}{room}", file=sys.stderr)
        return 2
    for name in manifest["dropped_training_shards"]:
        print(f"left out training shard {name}: the bundle would exceed {args.limit_mib:g} MiB")
    print(_bundle_sizes(args.out, manifest, args.limit_mib))
    return 0


def _bundle_sizes(out: str, manifest: dict, limit_mib: float) -> str:
    """One line: the bundle's MiB by part, then with the checkout's files that travel with it, against
    the limit."""
    wheels = sum(manifest["files"][w] for w in manifest["wheels"])
    shards = sum(manifest["files"][t] for t in manifest["train"])
    total = manifest["bundle_bytes"] + manifest["checkout_bytes"]
    return (
        f"bundle {out}: {manifest['bundle_bytes'] / MIB:.2f} MiB ({len(manifest['wheels'])} wheels "
        f"{wheels / MIB:.2f} MiB, {len(manifest['train'])} training shards {shards / MIB:.2f} MiB, "
        f"{manifest['mmlu_spread_items']} MMLU items over {manifest['mmlu_spread_subjects']} subjects) "
        f"+ checkout {manifest['checkout_bytes'] / MIB:.2f} MiB = {total / MIB:.2f} MiB "
        f"of {limit_mib:g} MiB"
    )


def _untracked_room(shown: int = 3) -> str:
    """The largest entries of the checkout that git neither tracks nor ignores, each an untracked folder as a
    whole (git's shallowest one) or a file: they travel with the checkout and count against the bundle's
    limit. A clause for the refusal's line, naming those of 0.1 MiB or more; empty when there are none."""

    def listed(*options: str) -> list[str]:
        command = ["git", "ls-files", "-z", "--others", "--exclude-standard", *options]
        out = subprocess.run(command, cwd=REPO, capture_output=True, check=True, timeout=60).stdout
        return [name for name in out.decode().split("\0") if name]

    try:
        entries, files = listed("--directory"), listed()
    except (OSError, subprocess.SubprocessError):
        return ""
    sizes = dict.fromkeys(entries, 0)
    for name in files:
        path = REPO / name
        if not path.is_file():
            continue
        # The entry that holds the file: the file itself, or the untracked folder above it.
        holder = next((e for e in (name, *(f"{p}/" for p in Path(name).parents)) if e in sizes), name)
        sizes[holder] = sizes.get(holder, 0) + path.stat().st_size
    largest = sorted((item for item in sizes.items() if item[1] >= MIB / 10), key=lambda item: -item[1])[
        :shown
    ]
    if not largest:
        return ""
    named = ", ".join(f"{name} {size / MIB:.1f} MiB" for name, size in largest)
    return (
        f"; of the checkout, files that git neither tracks nor ignores count too, the largest: {named} "
        "(move them out of the checkout or add them to .gitignore)"
    )


def install_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} install",
        description="Install the bundle's wheels as the session does, then import them.",
    )
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--target", required=True)
    parser.add_argument(
        "--modules",
        nargs="*",
        default=list(INSTALL_CHECK_MODULES),
        help="modules that must import afterwards (those needing torch cannot be checked without it)",
    )
    args = parser.parse_args(argv)
    bundle, target = Path(args.bundle).resolve(), Path(args.target).resolve()
    try:
        manifest = load_manifest(bundle)
        installed, present = install_wheels(bundle, manifest, target)
    except (BadInput, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"installed {len(installed)} wheels into {target}; {len(present)} already present: "
        f"{', '.join(present)}"
    )
    return check_install(bundle, manifest, target, args.modules)


def preflight_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} preflight",
        description="Report this machine, the bundle and the resolved config as JSON.",
    )
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument(
        "--inputs", default=None, help="folder with the bundle unpacked (default: unpack to a temp folder)"
    )
    parser.add_argument("--config", default=GPU.config)
    parser.add_argument("--report", required=True, help="JSON file to write")
    parser.add_argument("--require-gpu", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    bundle = Path(args.bundle).resolve()
    inputs = Path(args.inputs) if args.inputs else Path(tempfile.mkdtemp(prefix="dist_llama_inputs_"))
    if args.inputs is None and (manifest := read_json(bundle / MANIFEST)) is not None:
        unpack_bundle(bundle, manifest, inputs)
    report, problems = preflight_report(
        bundle, inputs, resolve_config_path(args.config), overrides, args.require_gpu
    )
    report["problems"] = problems
    Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    versions = ", ".join(f"{name} {version}" for name, version in report.get("packages", {}).items())
    print("found: Python " + report["python"] + ", " + versions)
    for package, wants in report.get("unmet", {}).items():
        print(f"warning: {package} declares {', '.join(wants)}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def plan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} plan",
        description="Print the planned seconds of every stage as JSON: each stage at its planned time, "
        "training gets the rest.",
    )
    parser.add_argument("--rehearse", action="store_true", help="the CPU rehearsal's plan")
    parser.add_argument("--deadline-s", type=float, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(stage_times(REHEARSAL if args.rehearse else GPU, args.deadline_s), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "run": run_main,
        "bundle": bundle_main,
        "install": install_main,
        "preflight": preflight_main,
        "plan": plan_main,
    }
    assert commands.keys() == SUBCOMMANDS.keys()
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return run_main(argv)
