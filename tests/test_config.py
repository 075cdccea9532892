"""Config loading: presets, overrides, and the errors a user sees for each kind of mistake."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_llama.config import ConfigError, load_config, parse_override, recipe_changes, save_config, to_dict
from dist_llama.model import PRESETS, RopeScaling

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.data.seq_len <= config.model.max_seq_len, path


def test_overrides_parse_yaml_values():
    config = load_config(
        REPO / "configs/debug.yaml",
        [
            "--train.steps=7",
            "--optim.lr=1e-4",
            "--logging.tensorboard=false",
            "--data.paths=[a.jsonl, b.jsonl]",
            "--train.init_from=null",
            "--model.rope_scaling={type: linear, factor: 4}",
            "--optim.warmup_steps=3",
        ],
    )
    assert config.train.steps == 7 and config.optim.lr == 1e-4 and config.logging.tensorboard is False
    assert config.data.paths == ["a.jsonl", "b.jsonl"] and config.train.init_from is None
    assert config.model.rope_scaling == RopeScaling("linear", 4.0)
    assert parse_override("--optim.betas=[0.9, 0.99]") == (["optim", "betas"], [0.9, 0.99])


def test_preset_with_field_overrides():
    config = load_config(REPO / "configs/main_256.yaml")
    assert config.model.dim == PRESETS["main"].dim and config.model.max_seq_len == 256
    assert load_config(None).model == PRESETS["debug"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.stepz=3", "unknown key train.stepz; valid keys of train: name,"),
        ("--trian.steps=3", "unknown section trian; valid sections: model, data"),
        ("--train.steps=abc", "train.steps='abc' must be of type int"),
        ("--train.steps=2.5", "train.steps=2.5 must be of type int"),
        ("--logging.tensorboard=maybe", "logging.tensorboard='maybe' must be of type bool"),
        ("--model.n_heads=5", "n_heads=5 must divide dim=64"),
        ("--model.n_kv_heads=3", "n_heads=4 must be a multiple of n_kv_heads=3"),
        ("--data.seq_len=4096", "data.seq_len=4096 exceeds model.max_seq_len=256"),
        ("--train.tokens_per_step=1000", "must be a multiple of data.seq_len=128"),
        ("--model.attention=flash", "attention='flash'; choose one of"),
        ("--parallel.activation_checkpointing=some", "choose one of none, full, selective"),
        ("--model.preset=huge", "model.preset='huge' is unknown; choose one of debug, main"),
        ("--model.rope_scaling={type: yarn, factor: 2}", "rope_scaling.type='yarn' is not supported"),
        ("--model.rope_scaling={type: linear, factor: 0.5}", "factor=0.5 must be >= 1"),
        ("--train.steps=0", "train.steps=0 must be positive"),
        ("--optim.betas=[0.9]", "optim.betas=[0.9] must have two values"),
        ("train.steps=3", "must look like --section.key=value"),
        ("--steps=3", "must name a section and a key"),
    ],
)
def test_mistakes_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/debug.yaml", [override])
    assert message in str(error.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad_section.yaml").write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section train must be a mapping"):
        load_config(tmp_path / "bad_section.yaml")


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(REPO / "configs/pi_1024.yaml", ["--train.steps=5"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(config)


def test_cli_prints_resolved_config_or_one_line_error():
    ok = subprocess.run(
        [sys.executable, "-m", "dist_llama.config", "--config", "configs/main.yaml", "--train.steps=9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["train"]["steps"] == 9
    bad = subprocess.run(
        [sys.executable, "-m", "dist_llama.config", "--train.stepz=9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown key train.stepz" in bad.stderr and "Traceback" not in bad.stderr


def test_broken_yaml_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 5\n lr: [1,\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3:2: not valid YAML") and "\n" not in message


def test_resume_check_lists_recipe_changes_and_allows_cadence():
    old = load_config(None)
    new = load_config(
        None,
        [
            "--optim.lr=0.1",
            "--train.steps=999",
            "--train.eval_every=7",
            "--data.paths=[x.jsonl]",
            "--train.micro_batch_size=4",
            "--model.n_layers=3",
        ],
    )
    changes = {c["key"]: (c["old"], c["new"]) for c in recipe_changes(old, new)}
    assert changes == {
        "optim.lr": (old.optim.lr, 0.1),
        "data.paths": ([], ["x.jsonl"]),
        "model.n_layers": (old.model.n_layers, 3),
    }


def test_each_key_declares_its_rules_beside_its_field():
    """Choices, bounds and resumability live in the field's declaration (config.setting), nowhere else: a key
    added without a declaration fails here, and is not resumable until declared so."""
    import dataclasses

    from dist_llama.config import RESUMABLE, SECTIONS, Config

    sections = {item.name for item in dataclasses.fields(Config)} - {"model"}
    assert {section.NAME for section in SECTIONS} == sections
    for section in SECTIONS:
        for item in dataclasses.fields(section):
            assert "resumable" in item.metadata, f"{section.NAME}.{item.name} is not declared with setting()"
    assert "optim.lr" not in RESUMABLE and "train.steps" in RESUMABLE and "eval.limit" in RESUMABLE
    assert not any(key.startswith("model.") for key in RESUMABLE)
    with pytest.raises(
        ConfigError, match=r"^parallel.backend='mpi' is not valid; choose one of auto, nccl, gloo$"
    ):
        load_config(None, ["--parallel.backend=mpi"])
    with pytest.raises(ConfigError, match=r"^train.budget_safety=1.0 must be in \[0, 1\)$"):
        load_config(None, ["--train.budget_safety=1"])
