"""Where releases go without --out: hub_release/<train.name> at the top of the checkout (./hub_release
outside one), how a new release of a run replaces the old, and push's default folder. The tests write
into folders of their own, never into this checkout's hub_release/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dist_llama import consolidate, push
from dist_llama.consolidate import ReleaseError, default_release_root, release_dir

REPO = Path(__file__).resolve().parents[1]


def test_the_default_release_root_is_the_checkouts_hub_release(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checkout's, wherever the command runs from
    assert default_release_root() == REPO / "hub_release"
    assert release_dir("tiny") == REPO / "hub_release" / "tiny"
    assert release_dir("tiny", "releases") == tmp_path / "releases" / "tiny"


def test_consolidate_without_out_outside_a_checkout_writes_to_the_working_directory(
    make_checkpoint, tmp_path
):
    """dist_llama from a folder with no checkout around it (as a wheel installs it): the release goes to
    ./hub_release/<train.name> of the working directory."""
    installed = tmp_path / "installed"
    shutil.copytree(
        REPO / "dist_llama", installed / "dist_llama", ignore=shutil.ignore_patterns("__pycache__")
    )
    work = tmp_path / "work"
    work.mkdir()
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    # -S: no site-packages .pth files, so the editable install of this checkout is invisible.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(installed), *site])),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-S", "-m", "dist_llama.consolidate", "--checkpoint", str(make_checkpoint())]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    release = work / "hub_release" / "debug"  # configs/debug.yaml's train.name
    assert result.stdout.startswith(f"wrote {release} ")
    assert consolidate.check_release_folder(release)
    assert (release / "modeling_dist_llama.py").read_text() == (
        REPO / "dist_llama/hub_release/modeling_dist_llama.py"
    ).read_text()


def test_a_new_release_of_a_run_replaces_the_old_one_whole(make_checkpoint, tmp_path, monkeypatch):
    run = make_checkpoint()
    root = tmp_path / "hub_release"
    first = consolidate.consolidate(run, release_root=root)
    assert first == root / "debug"
    (first / "stale.txt").write_text("from an earlier release")
    again = consolidate.consolidate(run, release_root=root)
    assert again == first and not (again / "stale.txt").exists()
    assert sorted(os.listdir(root)) == ["debug"], "nothing left beside the release"

    # A release that fails half-way leaves the previous one as it was, and no staging folder.
    before = sorted(p.name for p in first.iterdir())

    def broken(folder):
        raise ReleaseError("broken on purpose")

    monkeypatch.setattr(consolidate, "check_release_folder", broken)
    with pytest.raises(ReleaseError, match="on purpose"):
        consolidate.consolidate(run, release_root=root)
    assert sorted(p.name for p in first.iterdir()) == before
    assert sorted(os.listdir(root)) == ["debug"]
    monkeypatch.undo()

    # A folder that is not a release is never overwritten.
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ReleaseError, match="is not a release folder; refusing to overwrite it"):
        consolidate.consolidate(run, root / "notes")
    assert (root / "notes" / "todo.txt").read_text() == "mine"


def test_out_and_release_root_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        consolidate.main(["--checkpoint", "x", "--out", str(tmp_path / "a"), "--release-root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err.strip().splitlines()[-1]


def test_push_defaults_to_the_runs_release(make_checkpoint, tmp_path, capsys):
    root = tmp_path / "hub_release"
    consolidate.consolidate(make_checkpoint(), release_root=root)
    push.main(["--run-name", "debug", "--release-root", str(root), "--repo-id", "someone/tiny", "--dry-run"])
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "dry run: " in out and "would go to someone/tiny" in out

    # --config names the run by its train.name; a run without a release says which folder it looked for.
    with pytest.raises(SystemExit) as exit_info:
        push.main(
            ["--config", str(REPO / "configs/debug.yaml"), "--release-root", str(tmp_path / "none")]
            + ["--repo-id", "someone/tiny", "--dry-run"]
        )
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"push: error: release folder {tmp_path}/none/debug not found"

    for argv, message in [
        (["--repo-id", "someone/tiny"], "one of the arguments --run-name --config --dir is required"),
        (["--dir", str(root / "debug"), "--release-root", str(root), "--repo-id", "someone/tiny"], "--dir"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            push.main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and last.startswith("push: error: ") and message in last, last
