"""From files and overrides to a Config: YAML sections built into the dataclasses of sections.py, with
messages that name the key; `--section.key=value` overrides; the command line every entry point shares
(parse_cli), and `python -m dist_llama.config`, which prints the resolved config.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path

import yaml

from dist_llama.cli import CommandParser, user_errors
from dist_llama.config.sections import Config, ConfigError
from dist_llama.model import PRESETS

# --- Building dataclasses from plain dicts, with messages that name the key -------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check (and where lossless, convert) a YAML value to the annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} may not be null")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key} must be a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}"
            )
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; anyone typing a learning rate means the number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}={value!r} must be of type {_type_name(tp)}")
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        if prefix:
            raise ConfigError(
                f"unknown key {prefix}.{unknown[0]}; valid keys of {prefix}: {', '.join(names)}"
            )
        raise ConfigError(f"unknown section {unknown[0]}; valid sections: {', '.join(names)}")
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in values.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        message = _keys_in_full(str(error), prefix, names)
        raise ConfigError(message if f"{prefix}." in message else f"{prefix}: {message}") from None


def _keys_in_full(message: str, prefix: str, names: list[str]) -> str:
    """The message of a class's own check, which knows only its field names ("attention='x'; choose one of
    ...", "rope_scaling.factor=0.5 must be >= 1"), with the keys it is about named in full
    ("model.attention", "model.rope_scaling.factor"). The keys it is about are those before its first
    "must" or ";"; a field name counts there when followed by "=", ",", "/", " and ", " or " or nothing
    ("head dim dim/n_heads=3" qualifies the second dim and n_heads, not the words "head dim")."""
    end = min((i for i in (message.find(" must "), message.find(";")) if i >= 0), default=len(message))
    subject, rest = message[:end], message[end:]
    section = prefix.rsplit(".", 1)[-1]
    # A nested section's checks name their keys under its own name: rope_scaling.factor, which is
    # model.rope_scaling.factor in full.
    subject = re.sub(rf"(?<![\w.]){re.escape(section)}\.(?=\w)", f"{prefix}.", subject)
    field_names = "|".join(re.escape(name) for name in names)
    subject = re.sub(rf"(?<![\w.])({field_names})(?=[=,/]| and | or |$)", rf"{prefix}.\1", subject)
    return subject + rest


def _model_section(values: dict) -> dict:
    """A model section may name a preset (default: debug); its other keys override the preset's fields.
    `model: main` is short for `model: {preset: main}`."""
    values = {"preset": values} if isinstance(values, str) else dict(values)
    preset = values.pop("preset", "debug")
    if preset not in PRESETS:
        raise ConfigError(f"model.preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    return {**to_dict(PRESETS[preset]), **values}


# --- Files and overrides ----------------------------------------------------------------------------


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def from_dict(values: dict) -> Config:
    values = dict(values or {})
    if "model" in values and isinstance(values["model"], (str, dict, type(None))):
        values["model"] = _model_section(values["model"] or {})
    for name, section in values.items():
        if not isinstance(section, (dict, type(None))):
            raise ConfigError(f"section {name} must be a mapping of keys, got {section!r}")
    return _build(Config, {name: dict(section or {}) for name, section in values.items()}, "")


def parse_override(text: str) -> tuple[list[str], object]:
    """'--train.steps=10' -> (['train', 'steps'], 10); values are parsed as YAML (ints, floats, bools, lists
    and null)."""
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    key, raw = text[2:].split("=", 1)
    parts = key.split(".")
    if len(parts) < 2:
        raise ConfigError(f"override {text!r} must name a section and a key, e.g. --train.steps=100")
    return parts, yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found; the presets are in configs/ (e.g. configs/debug.yaml)"
            )
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(
                f"{where}: not valid YAML ({problem}); fix the file at that line and column"
            ) from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
    for text in overrides:
        parts, value = parse_override(text)
        target = values
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"cannot override {text!r}: {part} is not a section")
        target[parts[-1]] = value
    return from_dict(values)


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# --- The command line every entry point shares ------------------------------------------------------


def config_argument_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = CommandParser(
        command=command,
        description=description,
        epilog="Any --section.key=value after the options overrides the config file.",
    )
    parser.add_argument(
        "--config", default=None, help="YAML file in configs/ (default: the built-in debug config)"
    )
    return parser


def parse_cli(
    command: str, description: str, argv: list[str] | None = None
) -> tuple[argparse.Namespace, Config]:
    """Parse --config and --section.key=value overrides; exit with a one-line message on a user mistake."""
    parser = config_argument_parser(command, description)
    args, overrides = parser.parse_known_args(argv)
    with user_errors(command, ConfigError):
        return args, load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> None:
    parser = config_argument_parser("config", "Print the resolved configuration.")
    parser.add_argument(
        "--run-dir", action="store_true", help="print only the run directory (train.run_root/train.name)"
    )
    args, overrides = parser.parse_known_args(argv)
    with user_errors("config", ConfigError):
        config = load_config(args.config, overrides)
    sys.stdout.write(
        f"{config.run_dir}\n" if args.run_dir else yaml.safe_dump(to_dict(config), sort_keys=False)
    )
