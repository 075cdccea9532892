"""The bundle's wheels: install those the machine lacks, and check that what the session needs imports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from dist_llama.session import REPO
from dist_llama.session.bundle import unpack_bundle

# What `python -m dist_llama.session install` checks after installing (modules that need torch cannot be
# checked without torch).
INSTALL_CHECK_MODULES = (
    "lm_eval",
    "lm_eval.tasks",
    "lm_eval.api.task",
    "datasets",
    "evaluate",
    "sqlitedict",
    "word2number",
    "rouge_score",
    "pytablewriter",
    "multiprocess",
    "dill",
)


def _distribution_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def install_wheels(
    bundle: Path, manifest: dict, target: Path, timeout: float = 300
) -> tuple[list[str], list[str]]:
    """Install the bundle's wheels whose distributions are not installed yet into target (pip --no-index
    --no-deps --target; the bundle holds the whole dependency set), within timeout seconds. Returns
    (installed, already present); raises RuntimeError with pip's error line."""
    import importlib.metadata

    present, wanted = [], []
    for name in manifest["wheels"]:
        wheel = bundle / name
        try:
            importlib.metadata.distribution(_distribution_name(wheel))
            present.append(
                wheel.name
            )  # the machine's own copy wins over ours: its other packages were built with it
        except importlib.metadata.PackageNotFoundError:
            wanted.append(wheel)
    target.mkdir(parents=True, exist_ok=True)
    if wanted:
        try:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--no-index",
                    "--no-deps",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                    str(target),
                    *map(str, wanted),
                ],
                capture_output=True,
                text=True,
                timeout=max(1.0, timeout),
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"pip did not install the {len(wanted)} wheel(s) within {timeout:.0f} s"
            ) from None
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()] or [
                "no output"
            ]
            raise RuntimeError(f"{len(wanted)} wheel(s) failed to install: {lines[-1].strip()}")
    return [w.name for w in wanted], present


def unmet_requirements(wheels: list[str]) -> dict[str, list[str]]:
    """What the installed copies of the bundle's distributions declare they need (extras aside) and the
    installed packages do not meet: {"datasets 5.2.0": ["pyarrow>=24.0.0 (found 21.0.0)"]}. The wheels go in
    with --no-deps, so pip never checks this; a package may still work against an older one, which the
    stage that imports it shows."""
    import importlib.metadata

    from packaging.requirements import Requirement

    unmet = {}
    for wheel in wheels:
        try:
            distribution = importlib.metadata.distribution(_distribution_name(Path(wheel)))
        except importlib.metadata.PackageNotFoundError:
            continue
        wants = []
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                wants.append(f"{requirement} (not installed)")
                continue
            if requirement.specifier and not requirement.specifier.contains(found, prereleases=True):
                wants.append(f"{requirement} (found {found})")
        if wants:
            unmet[f"{distribution.metadata['Name']} {distribution.version}"] = wants
    return unmet


def import_errors(modules, env: dict | None = None) -> dict[str, str]:
    """{module: error} for the modules that do not import: here, or with `env` in a fresh interpreter."""
    if env is None:
        import importlib

        errors = {}
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as error:  # noqa: BLE001 - any failure to import is what is asked about
                errors[name] = f"{type(error).__name__}: {error}".splitlines()[0]
        return errors
    script = (
        "import importlib, json, sys\nerrors = {}\nfor name in sys.argv[1:]:\n    try:\n"
        "        importlib.import_module(name)\n    except Exception as error:\n"
        "        errors[name] = f'{type(error).__name__}: {error}'.splitlines()[0]\nprint(json.dumps(errors))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *modules], capture_output=True, text=True, env=env, timeout=300
    )
    if result.returncode != 0:
        return {name: f"import check crashed: {last_line(result.stderr)}" for name in modules}
    return json.loads(result.stdout.strip().splitlines()[-1])


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def check_install(bundle: Path, manifest: dict, target: Path, modules: list[str]) -> int:
    """After install_wheels into target: the modules import in a fresh interpreter, and lm-eval builds the
    evaluation's tasks from the bundle's items (the evaluation's own path short of the model). Exit status."""
    scratch = Path(tempfile.mkdtemp(prefix="dist_llama_install_check_"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), str(REPO)]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(scratch / "hf"),
    }
    errors = import_errors(modules, env)
    for name, error in errors.items():
        print(f"error: {name} does not import: {error}", file=sys.stderr)
    if errors:
        return 1
    print(f"all {len(modules)} modules import: {', '.join(modules)}")
    unpack_bundle(bundle, manifest, scratch / "inputs")
    for name, relative in manifest["items"].items():
        items = scratch / "inputs" / relative
        result = subprocess.run(
            [sys.executable, "-c", TASK_CHECK_SCRIPT, str(scratch / name), str(items)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        expected = sum(1 for line in items.read_text().splitlines() if line.strip())
        found = last_line(result.stdout) if result.returncode == 0 else None
        if found != str(expected):
            print(
                f"error: lm-eval did not build the {name} task from {items}: "
                f"{found or last_line(result.stderr)}",
                file=sys.stderr,
            )
            return 1
        print(f"lm-eval builds the {name} task from the bundle: {expected} items")
    return 0


TASK_CHECK_SCRIPT = r"""
import sys
from pathlib import Path
from lm_eval.tasks import TaskManager, get_task_dict
from dist_llama.evaluation.tasks import write_task
name, path = write_task(Path(sys.argv[1]), Path(sys.argv[2]))
task = get_task_dict([name], TaskManager(include_path=str(path.parent), include_defaults=False))[name]
print(len(list(task.test_docs())))
"""
