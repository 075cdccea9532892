"""Tokenize the config's training documents once, with every core, into data.token_cache (cache_build.py).

    python -m dist_llama.data.prepare --config configs/X.yaml [--workers N] [--force] [--section.key=value]

Training builds a missing cache by itself (once per node); this command builds it beforehand, on one machine,
and says whether an existing one matches the config.
"""

from __future__ import annotations

import logging

from dist_llama.cli import user_errors
from dist_llama.config import ConfigError, config_argument_parser, load_config
from dist_llama.data.cache import load_token_cache
from dist_llama.data.cache_build import build_token_cache
from dist_llama.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = config_argument_parser("data.prepare", __doc__.splitlines()[0].strip())
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tokenizing processes (default: every core this process may use)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild a cache that does not match the config")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with user_errors("data.prepare", ConfigError, FileNotFoundError, ValueError):
        config = load_config(args.config, overrides)
        if args.workers is not None and args.workers <= 0:
            raise ConfigError(f"--workers={args.workers} must be positive")
        tokenizer = load_tokenizer(config.data.tokenizer)
        folder = build_token_cache(config, tokenizer, workers=args.workers, force=args.force)
        cache = load_token_cache(config.data, tokenizer)
    print(f"{folder}: {cache.describe()}")


if __name__ == "__main__":
    main()
