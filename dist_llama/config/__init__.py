"""The one configuration path: nested frozen dataclasses, loaded from YAML, overridden by --section.key=value.

Unknown sections or keys, wrong types and invalid combinations raise ConfigError, whose message names
the key, the value and what is allowed. `python -m dist_llama.config --config FILE [overrides]` prints
the resolved config.

Which module holds what:

    sections.py   the sections (DataConfig, OptimConfig, ...) and Config: each key declared once beside its
                  field (`setting`: default, choices, bounds, whether a resume may change it), and the rules
                  that involve several keys
    loading.py    YAML and --section.key=value overrides -> Config, with messages that name the key
                  (load_config, from_dict, to_dict, save_config); the command line every entry point
                  shares (parse_cli) and `python -m dist_llama.config`
    recipe.py     what a resume may change (RESUMABLE) and the recipe changes it refuses (recipe_changes)

Import the names from here (`from dist_llama.config import Config, load_config`).
"""

from dist_llama.config.loading import (
    config_argument_parser,
    from_dict,
    load_config,
    main,
    parse_cli,
    parse_override,
    save_config,
    to_dict,
)
from dist_llama.config.recipe import RESUMABLE, flatten, is_resumable, recipe_changes
from dist_llama.config.sections import (
    SECTIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    Section,
    TrainConfig,
    setting,
)

__all__ = [
    "RESUMABLE",
    "SECTIONS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "OptimConfig",
    "ParallelConfig",
    "Section",
    "TrainConfig",
    "config_argument_parser",
    "flatten",
    "from_dict",
    "is_resumable",
    "load_config",
    "main",
    "parse_cli",
    "parse_override",
    "recipe_changes",
    "save_config",
    "setting",
    "to_dict",
]
