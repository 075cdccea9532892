"""Upload a release folder to the Hugging Face Hub, after checking that it loads on its own.

`python -m dist_llama.push --repo-id USER/NAME --run-name RUN [--private] [--dry-run]` uploads
hub_release/RUN, the release that consolidate wrote for that run (consolidate.release_dir; `--release-root`
names another folder of releases). `--config YAML` takes RUN from the config's train.name; `--dir DIR` names
any release folder instead.
Validation loads config, model and tokenizer in a fresh Python process where dist_llama cannot be
imported, as a user's machine would, and runs one forward pass. `--dry-run` stops there and lists
the files that would be uploaded. The token comes from `hf auth login` or HF_TOKEN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dist_llama.cli import CommandParser, fail
from dist_llama.config import ConfigError, load_config
from dist_llama.consolidate import RELEASE_ROOT_HELP, ReleaseError, check_release_folder, release_dir

# Run in a child process with `python -I`: dist_llama is blocked, so the folder's own code must suffice.
_VALIDATE = r"""
import json, sys
sys.modules["dist_llama"] = None  # an installed (even editable) dist_llama must not be what loads
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
assert logits.shape == (1, ids.shape[1], config.vocab_size), logits.shape
assert bool(torch.isfinite(logits).all()), "non-finite logits"
print(json.dumps({"model_class": type(model).__name__,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "dtype": str(model.dtype), "vocab_size": config.vocab_size,
                  "tokenizer_size": len(tokenizer)}))
"""


def release_files(folder: str | Path) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of every file that an upload of folder sends."""
    folder = Path(folder)
    return [
        (str(p.relative_to(folder)), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def validate_release(folder: str | Path, timeout: float = 600) -> dict:
    """Load the folder in a fresh process without dist_llama; returns what it loaded. Raises ReleaseError."""
    check_release_folder(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", _VALIDATE, str(Path(folder).resolve())],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise ReleaseError(
            f"{folder} does not load without dist_llama: {lines[-1] if lines else 'unknown error'}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def push(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False) -> str:
    """Validate, then (unless dry_run) create the model repo and upload the folder; returns a summary line."""
    folder = Path(folder)
    loaded = validate_release(folder)
    files = release_files(folder)
    width = max(len(name) for name, _ in files)
    for name, size in files:
        print(f"  {name:<{width}}  {size / 1e6:10.2f} MB")
    total = sum(size for _, size in files) / 1e6
    checked = (
        f"loads as {loaded['model_class']} ({loaded['parameters']:,} parameters, {loaded['dtype']}) "
        "without dist_llama"
    )
    if dry_run:
        return f"dry run: {len(files)} files, {total:.1f} MB would go to {repo_id}; {checked}"

    from huggingface_hub import create_repo, upload_folder
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=f"Upload {folder.name} ({len(files)} files)",
        )
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise ReleaseError(f"upload to {repo_id} failed: {str(error).splitlines()[0]}") from None
    return f"uploaded {len(files)} files, {total:.1f} MB to {url}"


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(command="push", description="Upload a release folder to the Hugging Face Hub.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-name", help="push RELEASE_ROOT/RUN_NAME, the run's release from consolidate")
    which.add_argument("--config", help="push RELEASE_ROOT/<train.name of this YAML config>")
    which.add_argument("--dir", help="push this release folder (written by python -m dist_llama.consolidate)")
    parser.add_argument("--release-root", default=None, help=RELEASE_ROOT_HELP)
    parser.add_argument("--repo-id", required=True, help="USER/NAME of the model repository")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the files, upload nothing")
    args = parser.parse_args(argv)
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        parser.error(f"--repo-id {args.repo_id!r} must look like USER/NAME")
    if args.dir is not None and args.release_root is not None:
        parser.error("--release-root goes with --run-name or --config; --dir names the folder itself")
    folder = args.dir
    try:
        if folder is None:
            name = args.run_name or load_config(args.config, []).train.name
            folder = release_dir(name, args.release_root)
        print(push(folder, args.repo_id, args.private, args.dry_run))
    except (ReleaseError, ConfigError) as error:
        fail("push", str(error))
    except subprocess.TimeoutExpired:
        fail("push", f"loading {folder} took too long")


if __name__ == "__main__":
    sys.exit(main())
