"""What counts as a run's recipe: every key but the resumable ones (RESUMABLE: declared with
`setting(..., resumable=True)`, or in a section whose keys all are), and the recipe changes between two
configs (recipe_changes), which a resume refuses unless checkpoint.allow_changes names them.
"""

from __future__ import annotations

from dist_llama.config.loading import to_dict
from dist_llama.config.sections import SECTIONS, Config

# What may differ between a checkpoint's config and the config that resumes it: the keys declared resumable.
RESUMABLE = frozenset(f"{section.NAME}.{key}" for section in SECTIONS for key in section.resumable_keys())


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists and other values are leaves."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_resumable(key: str) -> bool:
    return key in RESUMABLE


def recipe_changes(saved: Config, config: Config) -> list[dict]:
    """The keys outside RESUMABLE whose values differ, as [{"key", "old", "new"}]."""
    old, new = flatten(to_dict(saved)), flatten(to_dict(config))
    return [
        {"key": key, "old": old.get(key), "new": new.get(key)}
        for key in sorted(set(old) | set(new))
        if not is_resumable(key) and old.get(key) != new.get(key)
    ]
