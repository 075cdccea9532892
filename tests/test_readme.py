"""README.md's command lines, kept true: every line of its bash blocks is listed in docs/readme_commands.txt
under the check it gets here (run as written, parsed by its command, its config resolved, or listed only),
so a README line that fails as written fails here. Also the launchers' search for the project's Python
(launch/find_python.sh), which the README's launch lines rely on."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dist_llama.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LISTED = REPO / "docs" / "readme_commands.txt"
CHECKS = ("run", "args", "config", "not run")
OVERRIDE = re.compile(r"--\w+(\.\w+)+=.*")


def readme_command_lines(text: str) -> list[str]:
    """Every line of the text's bash blocks, without its trailing comment."""
    lines, in_bash = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_bash = not in_bash and line.strip() == "```bash"
            continue
        command = re.sub(r"\s+#(\s.*)?$", "", line).strip()
        if in_bash and command:
            lines.append(command)
    return lines


def listed_lines() -> dict[str, list[str]]:
    """docs/readme_commands.txt: the lines under each [check] heading, comments and blank lines left out."""
    listed: dict[str, list[str]] = {}
    check = None
    for line in LISTED.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if heading := re.fullmatch(r"\[(.+)\]", line.strip()):
            check = heading[1]
            assert check in CHECKS, f"{LISTED.name}: unknown check [{check}]; the checks are {CHECKS}"
            listed[check] = []
        else:
            assert check is not None, f"{LISTED.name}: {line!r} comes before any [check] heading"
            listed[check].append(line.strip())
    return listed


LISTED_LINES = listed_lines()


def test_every_readme_command_line_is_listed_once_under_a_check():
    readme = readme_command_lines(README.read_text())
    listed = [line for lines in LISTED_LINES.values() for line in lines]
    unlisted = [line for line in readme if line not in listed]
    assert not unlisted, f"README lines not in {LISTED.name} (list each under its check): {unlisted}"
    gone = [line for line in listed if line not in readme]
    assert not gone, f"{LISTED.name} lines that README no longer has: {gone}"
    twice = sorted({line for line in listed if listed.count(line) > 1})
    assert not twice, f"listed more than once in {LISTED.name}: {twice}"


def test_readme_lines_are_found_without_their_comments():
    text = "```bash\nmake run    # the pipeline\n\npython -m x --a 1\n```\n```\nnot bash\n```\n"
    assert readme_command_lines(text) == ["make run", "python -m x --a 1"]


def active_environment() -> dict[str, str]:
    """The environment of a shell after `. .venv/bin/activate`, for the Python running these tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("PYTHON", None)
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return env


@pytest.mark.parametrize("line", LISTED_LINES.get("run", []), ids=str)
def test_readme_line_runs_as_written(line):
    result = subprocess.run(
        ["bash", "-c", line], cwd=REPO, env=active_environment(), capture_output=True, text=True, timeout=120
    )
    output = result.stdout[-2000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"{line}\nexit {result.returncode}\n{output}"
    assert result.stdout.strip(), f"{line} printed nothing"


def test_the_session_help_lists_every_subcommand():
    from dist_llama.session.cli import SUBCOMMANDS

    result = subprocess.run(
        [sys.executable, "-m", "dist_llama.session", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for name, about in SUBCOMMANDS.items():
        assert f"  {name:<10} {about}" in result.stdout, name


def test_train_launcher_help_prints_its_usage():
    result = subprocess.run(
        [str(REPO / "launch/train.sh"), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: launch/train.sh CONFIG"), result
    missing = subprocess.run([str(REPO / "launch/train.sh")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("usage:"), missing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.attention=flash"], "model.attention='flash'; choose one of"),
        (["--model.n_layers=0"], "model.dim, model.n_layers and model.n_heads must be positive"),
        (["--model.n_heads=5"], "model.n_heads=5 must divide dim=64"),
        (["--model.rope_scaling={type: linear, factor: 0.5}"], "model.rope_scaling.factor=0.5 must be >= 1"),
    ],
)
def test_config_mistakes_name_the_full_key_as_readme_says(overrides, message):
    """README: "... stop with a one-line message naming the key", also for the model's own checks."""
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/debug.yaml", overrides)
    assert str(error.value).startswith(message), str(error.value)


# --- [args] and [config]: a command's parser, stopped before the command does its work -------------------


class Parsed(Exception):
    """Raised instead of running a command once its outermost parse has accepted the command line."""


def stop_after_parsing(monkeypatch) -> None:
    """parse_args and parse_known_args raise Parsed(result) when the command's own call returns; the parses
    nested in it (parse_args calls parse_known_args, and so does a subcommand) run as usual."""
    depth = 0

    def outermost(parse):
        def stopping(self, args=None, namespace=None):
            nonlocal depth
            depth += 1
            try:
                result = parse(self, args, namespace)
            finally:
                depth -= 1
            if depth == 0:
                raise Parsed(result)
            return result

        return stopping

    for name in ("parse_args", "parse_known_args"):
        monkeypatch.setattr(argparse.ArgumentParser, name, outermost(getattr(argparse.ArgumentParser, name)))


def line_words(line: str) -> list[str]:
    """The line's words: [optional] parts included without their brackets, a [... placeholder] left out."""
    line = re.sub(r"\[[^\]]*\.\.\.[^\]]*\]", "", line)
    return shlex.split(line.replace("[", "").replace("]", ""))


def parse_with_its_command(words: list[str], monkeypatch, capsys) -> None:
    """`python -m dist_llama.X ARGS` (or any launcher's `-m dist_llama.X ARGS`): X's parser must accept ARGS,
    and any arguments it leaves over must be --section.key=value overrides."""
    module = words[words.index("-m") + 1]
    stop_after_parsing(monkeypatch)
    try:
        importlib.import_module(module).main(words[words.index("-m") + 2 :])
    except Parsed as parsed:
        result = parsed.args[0]
    except SystemExit as stopped:
        pytest.fail(f"{module} refused {' '.join(words)} (exit {stopped.code}): {capsys.readouterr().err}")
    else:
        pytest.fail(f"{module}.main never parsed its arguments")
    leftovers = result[1] if isinstance(result, tuple) else []
    assert all(OVERRIDE.fullmatch(word) for word in leftovers), f"{module} left over {leftovers}"


@pytest.mark.parametrize("line", LISTED_LINES.get("args", []), ids=str)
def test_readme_line_is_accepted_by_its_command(line, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    parse_with_its_command(line_words(line), monkeypatch, capsys)


@pytest.mark.parametrize("line", LISTED_LINES.get("config", []), ids=str)
def test_readme_line_resolves_its_config(line, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    words = line_words(line)
    if "-m" in words:
        parse_with_its_command(words, monkeypatch, capsys)
        monkeypatch.undo()
        monkeypatch.chdir(REPO)
    config = words[words.index("--config") + 1] if "--config" in words else None
    config = config or next(word for word in words if word.endswith(".yaml"))
    load_config(Path(config), [word for word in words if OVERRIDE.fullmatch(word)])


def test_a_readme_line_with_an_option_its_command_lacks_fails(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    line = "python -m dist_llama.evaluate --model runs/main/release --output out/ --params tinyBenchmarks.pkl"
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --params"):
        parse_with_its_command(line_words(line), monkeypatch, capsys)


def test_placeholders_are_left_out_and_optional_parts_kept():
    line = "sbatch a.sbatch configs/x.yaml [--section.key=value ...] [--dtype bf16] [--stock-llama]"
    assert line_words(line) == ["sbatch", "a.sbatch", "configs/x.yaml", "--dtype", "bf16", "--stock-llama"]


# --- The launchers' Python (launch/find_python.sh) ---------------------------------------------------------


@pytest.fixture
def checkout(tmp_path):
    """A checkout with the helper and a .venv, and a bin folder whose `python` is not a virtual environment's
    (FAKE_VENV=0 makes it one)."""
    (tmp_path / "checkout/launch").mkdir(parents=True)
    (tmp_path / "checkout/launch/find_python.sh").write_text((REPO / "launch/find_python.sh").read_text())
    for python, body in (
        (tmp_path / "checkout/.venv/bin/python", "exit 0"),
        (tmp_path / "bin/python", "exit ${FAKE_VENV:-1}"),  # the check exits 0 only inside a venv
    ):
        python.parent.mkdir(parents=True)
        python.write_text(f"#!/bin/sh\n{body}\n")
        python.chmod(0o755)
    return tmp_path


def found_python(checkout: Path, **env: str) -> str:
    base = {"PATH": f"{checkout / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(checkout)}
    script = f'source "{checkout}/checkout/launch/find_python.sh"; echo "$python"'
    return subprocess.run(
        ["bash", "-c", script], env={**base, **env}, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_launchers_find_the_checkout_environment_unless_another_is_active(checkout):
    venv, on_path = str(checkout / "checkout/.venv/bin/python"), str(checkout / "bin/python")
    assert found_python(checkout) == venv  # nothing active: the checkout's .venv
    assert found_python(checkout, VIRTUAL_ENV="/elsewhere") == on_path  # an activated environment
    assert found_python(checkout, FAKE_VENV="0") == on_path  # a venv's python first on PATH
    assert found_python(checkout, PYTHON="/opt/py/bin/python") == "/opt/py/bin/python"
    (checkout / "checkout/.venv/bin/python").unlink()
    assert found_python(checkout) == on_path  # no .venv: python on PATH
