"""Turn a sharded training checkpoint into a Hugging Face release folder, on one CPU process.

`python -m dist_llama.consolidate --checkpoint CKPT_OR_RUN_DIR [--out DIR] [--dtype bf16|fp32]
[--stock-llama]` writes one folder for every client: `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` runs this project's model code, and whatever decides by config.json's declared
architecture (transformers without trust_remote_code, llama.cpp's convert_hf_to_gguf.py, vLLM, TGI) sees a
stock Llama. The folder holds:

- model.safetensors (or shards + model.safetensors.index.json), with transformers' Llama parameter names;
- config.json: model_type "llama" and architectures ["LlamaForCausalLM"], which the other clients read,
  and auto_map naming the code files, which only transformers with trust_remote_code follows; and
  generation_config.json;
- the tokenizer the run trained with (`data.tokenizer`), saved with save_pretrained, and beside it
  tokenizer.model, the SentencePiece model it is built from (tokenizer.release_sentencepiece_model), from
  which llama.cpp's converter builds the GGUF vocabulary;
- the model code: dist_llama/model.py and interop.py plus dist_llama/hub_release/*.py (package data, so
  a plain `pip install` carries them), copied at release time so the release runs the very code that
  trained (one source of truth), and loads without dist_llama;
- README.md (model card filled from the run) and training_config.yaml (the resolved run config).

With --stock-llama, the folder is the same without the code files and auto_map: for a Hub repository that
should hold no code. The weights need no conversion, since model.py uses Llama's names and layouts.
No weights are ever unpickled: the checkpoint is read through DCP, the release holds safetensors only.

Without --out the folder is hub_release/<the run's train.name> (release_dir): the hub_release/ at the top of
the checkout dist_llama runs from, or ./hub_release in the working directory when dist_llama is an installed
wheel with no checkout around it. A new release of the same run replaces the folder whole: it is written
beside it and renamed into place once complete, and a folder that is not a release is never overwritten
(release_folder.py: that, and what a complete release holds).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import torch

from dist_llama.cards import model_card
from dist_llama.checkpoint import CheckpointError, load_full_model_state, read_meta, resolve_checkpoint
from dist_llama.cli import CommandParser, user_errors
from dist_llama.config import ConfigError, from_dict, save_config
from dist_llama.devices import DTYPES, dtype_name
from dist_llama.interop import llama_config_dict
from dist_llama.model import ModelArgs, Transformer
from dist_llama.release_folder import (
    SENTENCEPIECE_FILE,
    ReleaseError,
    check_release_folder,
    move_into_place,
    prepare_output,
)

log = logging.getLogger(__name__)

RELEASE_DTYPES = ("fp32", "bf16")
PACKAGE = Path(__file__).resolve().parent
MODEL_SOURCE = PACKAGE / "model.py"
INTEROP_SOURCE = PACKAGE / "interop.py"
RELEASE_CODE = PACKAGE / "hub_release"  # package data, not the checkout's hub_release/ of releases
AUTO_MAP = {
    "AutoConfig": "configuration_dist_llama.DistLlamaConfig",
    "AutoModelForCausalLM": "modeling_dist_llama.DistLlamaForCausalLM",
}
# What config.json declares to clients that decide by it (configuration_dist_llama.py says which reads what).
DECLARED_ARCHITECTURES = ["LlamaForCausalLM"]
# `name` or `namespace/name`, as the Hub spells repository ids.
HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")


def local_path_or_hub_id(name: str | Path, option: str) -> str:
    """`name` as transformers should get it: a Hub id unchanged, a local path with `~` expanded.

    Anything that exists on disk is local, and so is a name no Hub id can be: one that starts with
    / . or ~, or has more than one separator. Such a name that does not exist raises ReleaseError
    "no such folder" (transformers would say "Repo id must be in the form ...", which misleads).
    """
    name = str(name)
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(name):
        raise ReleaseError(
            f"{option} {name}: no such folder (a local path that does not exist; "
            "Hub ids look like NAMESPACE/NAME)"
        )
    return name


def default_release_root() -> Path:
    """The folder that holds one release folder per run name: hub_release/ at the top of the checkout that
    dist_llama runs from (a source tree or an editable install: pyproject.toml beside the package), else
    ./hub_release in the working directory (an installed wheel has no checkout to put it in)."""
    checkout = PACKAGE.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "hub_release"
    return Path.cwd() / "hub_release"


RELEASE_ROOT_HELP = (
    "folder of releases, one per run: RELEASE_ROOT/<train.name> (default: hub_release/ at the top of this "
    "checkout; with dist_llama installed from a wheel, ./hub_release in the working directory)"
)


def release_dir(name: str, release_root: str | Path | None = None) -> Path:
    """The release folder of the run `name`, absolute: release_root/name, release_root defaulting to
    default_release_root()."""
    return (Path(release_root if release_root is not None else default_release_root()) / name).resolve()


# --- Weights ----------------------------------------------------------------------------------------


def release_state_dict(
    state: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights checked against args, cast to dtype, tied head dropped."""
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ReleaseError(
            f"checkpoint weights do not match the run's model config: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    embed = state["model.embed_tokens.weight"]
    if embed.shape[0] != args.vocab_size:
        raise ReleaseError(
            f"vocab mismatch: the checkpoint's embeddings have {embed.shape[0]} rows but "
            f"model.vocab_size={args.vocab_size} in its config"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ReleaseError(
                f"{name} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(expected[name].shape)} from its config"
            )
        if not tensor.is_floating_point():
            raise ReleaseError(
                f"dtype mismatch: {name} is {tensor.dtype} in the checkpoint, expected a float tensor"
            )
    if args.tie_embeddings:
        # One matrix; transformers re-ties lm_head.weight from config.tie_word_embeddings on load.
        state = {name: tensor for name, tensor in state.items() if name != "lm_head.weight"}
    return {name: tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    from huggingface_hub import save_torch_state_dict

    # Same layout as transformers' save_pretrained: one model.safetensors, or shards and an index.
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})


# --- Config files -----------------------------------------------------------------------------------


def _release_config_class():
    """DistLlamaConfig from dist_llama/hub_release/ (it imports only transformers, so it loads from its
    path)."""
    import importlib.util

    path = RELEASE_CODE / "configuration_dist_llama.py"
    if not path.is_file():
        raise ReleaseError(f"{path} not found: this dist_llama install lacks its package data; reinstall it")
    spec = importlib.util.spec_from_file_location("dist_llama_release_configuration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DistLlamaConfig


def model_config(args: ModelArgs, dtype: str, stock_llama: bool, bos_id: int, eos_id: int):
    """The transformers config object of a release: DistLlamaConfig with auto_map naming the code files, or
    with stock_llama LlamaConfig. Both declare model_type "llama" and architectures LlamaForCausalLM."""
    fields = {
        **llama_config_dict(args),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": dtype_name(DTYPES[dtype]),
    }
    if stock_llama:
        from transformers import LlamaConfig

        config = LlamaConfig(**fields)
    else:
        # The training backend may be xformers (training-only, no masks); inference uses SDPA, same weights.
        config = _release_config_class()(**fields, attention="eager" if args.attention == "eager" else "sdpa")
        config.auto_map = dict(AUTO_MAP)
    config.architectures = list(DECLARED_ARCHITECTURES)
    return config


# --- Code files -------------------------------------------------------------------------------------


def _absolute_dist_llama_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "dist_llama"
        ):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "dist_llama"]
    return found


def release_code_files() -> dict[str, str]:
    """File name -> source of the code a release folder carries.

    model.py and interop.py are copied verbatim (interop.py imports `.model` relatively, so it resolves
    both inside the package and inside the folder). Any dist_llama import is an error: the folder must
    be self-contained.
    """
    if not RELEASE_CODE.is_dir():
        raise ReleaseError(
            f"{RELEASE_CODE} not found: this dist_llama install lacks its package data; reinstall it"
        )
    files = {path.name: path.read_text() for path in sorted(RELEASE_CODE.glob("*.py"))}
    files["model.py"] = MODEL_SOURCE.read_text()
    files["interop.py"] = INTEROP_SOURCE.read_text()
    for name, source in files.items():
        if leftover := _absolute_dist_llama_imports(source):
            raise ReleaseError(
                f"{name} imports {', '.join(leftover)}; a release folder cannot follow that import"
            )
    return files


# --- The evaluation quoted in the model card --------------------------------------------------------


def _find_eval_summary(checkpoint_dir: Path, eval_summary) -> dict | None:
    if isinstance(eval_summary, dict):
        return eval_summary
    if eval_summary is not None:
        path = Path(eval_summary)
        if not path.is_file():
            raise ReleaseError(f"evaluation summary {path} not found")
    else:
        # run_dir/checkpoints/step_N -> run_dir/eval/summary.json, when the run was evaluated
        path = checkpoint_dir.parent.parent / "eval" / "summary.json"
        if checkpoint_dir.parent.name != "checkpoints" or not path.is_file():
            return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReleaseError(f"evaluation summary {path} is not valid JSON: {error}") from None
    if not isinstance(summary, dict):
        raise ReleaseError(f"evaluation summary {path} must hold a JSON object")
    return summary


# --- The tokenizer ----------------------------------------------------------------------------------


def release_tokenizer(source: str, args: ModelArgs):
    """(the tokenizer `source` gives, checked against the model; the SentencePiece model it is built from,
    the release's tokenizer.model, or None where there is none: see tokenizer.release_sentencepiece_model)."""
    from dist_llama.tokenizer import check_tokenizer, load_tokenizer, release_sentencepiece_model

    try:
        tok = load_tokenizer(source, model_max_length=args.max_seq_len)
        check_tokenizer(tok, args.vocab_size)
        sentencepiece, found = release_sentencepiece_model(tok)
    except (ValueError, OSError) as error:
        raise ReleaseError(f"tokenizer {source!r} does not fit the model: {error}") from None
    if sentencepiece is None:
        log.warning(
            "the release has no tokenizer.model (%s): llama.cpp's converter will build its vocabulary from "
            "tokenizer.json, and that gave other ids than the tokenizer's on real text",
            found,
        )
    return tok, sentencepiece


# --- The release ------------------------------------------------------------------------------------


def consolidate(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    dtype: str = "fp32",
    stock_llama: bool = False,
    eval_summary: str | Path | dict | None = None,
    *,
    tokenizer: str | None = None,
    max_shard_size: int | str = "5GB",
    repo_name: str | None = None,
    release_root: str | Path | None = None,
) -> Path:
    """Write a release folder for `checkpoint` (a step_N folder, or a run directory for its latest).

    out_dir: the folder to write (default: release_dir of the run's train.name under release_root).
    eval_summary: a JSON file or dict for the model card (default: run_dir/eval/summary.json if present).
    tokenizer: a load_tokenizer source overriding the run config's data.tokenizer.
    Raises CheckpointError, ConfigError or ReleaseError with a one-line message.
    """
    from transformers import GenerationConfig

    if dtype not in RELEASE_DTYPES:
        raise ReleaseError(f"dtype {dtype!r} is not supported; choose one of {', '.join(RELEASE_DTYPES)}")
    checkpoint_dir = resolve_checkpoint(checkpoint)
    state, meta = load_full_model_state(checkpoint_dir)
    config = from_dict(meta.config)
    args = config.model
    weights = release_state_dict(state, args, DTYPES[dtype])
    summary = _find_eval_summary(checkpoint_dir, eval_summary)
    tok, sentencepiece = release_tokenizer(tokenizer or config.data.tokenizer, args)

    out = Path(out_dir if out_dir is not None else release_dir(config.train.name, release_root)).resolve()
    staging = prepare_output(out)
    try:
        save_weights(weights, staging, max_shard_size)
        model_config(args, dtype, stock_llama, tok.bos_token_id, tok.eos_token_id).save_pretrained(staging)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad_id
        ).save_pretrained(staging)
        tok.save_pretrained(staging)
        if sentencepiece is not None:
            (staging / SENTENCEPIECE_FILE).write_bytes(sentencepiece)
        if not stock_llama:
            for name, source in release_code_files().items():
                (staging / name).write_text(source)
        save_config(config, staging / "training_config.yaml")
        card = model_card(
            config, meta, summary, repo_name or out.name, stock_llama, dtype, sentencepiece is not None
        )
        (staging / "README.md").write_text(card)
        check_release_folder(staging)
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def write_model_card(
    release: str | Path,
    checkpoint: str | Path,
    eval_summary: str | Path | dict | None = None,
    repo_name: str | None = None,
) -> Path:
    """Rewrite only the README.md model card of an existing release, e.g. once evaluation results exist;
    the weights, which may be gigabytes, are left as they are."""
    release = Path(release)
    config_path = release / "config.json"
    if not config_path.is_file():
        raise ReleaseError(f"{release} is not a release folder: config.json is missing")
    released = json.loads(config_path.read_text())
    checkpoint_dir = resolve_checkpoint(checkpoint)
    meta = read_meta(checkpoint_dir)
    dtype = {dtype_name(DTYPES[name]): name for name in RELEASE_DTYPES}.get(released.get("dtype"), "fp32")
    card = model_card(
        from_dict(meta.config),
        meta,
        _find_eval_summary(checkpoint_dir, eval_summary),
        repo_name or release.resolve().name,
        "auto_map" not in released,
        dtype,
        (release / SENTENCEPIECE_FILE).is_file(),
    )
    (release / "README.md").write_text(card)
    return release / "README.md"


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(
        command="consolidate",
        description="Consolidate a sharded checkpoint into a Hugging Face release folder.",
        epilog="Without --out the release goes to RELEASE_ROOT/<the run's train.name>; a folder that "
        "holds an earlier release is replaced once the new one is complete, any other is left alone.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a step_N checkpoint folder, or a run directory (its latest)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out", default=None, help="release folder to write (default: RELEASE_ROOT/<the run's train.name>)"
    )
    where.add_argument("--release-root", default=None, help=RELEASE_ROOT_HELP)
    parser.add_argument("--dtype", choices=RELEASE_DTYPES, default="fp32", help="weight dtype in the release")
    parser.add_argument(
        "--stock-llama",
        action="store_true",
        help="leave out the model code and config.json's auto_map: a folder stock Llama loads, without "
        "trust_remote_code",
    )
    parser.add_argument(
        "--eval-summary",
        default=None,
        help="evaluation summary JSON for the model card (default: RUN_DIR/eval/summary.json when present)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer source overriding the run's data.tokenizer (hub | offline | auto | folder)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file before sharding")
    parser.add_argument(
        "--repo-name", default=None, help="model name for the model card (default: the folder name)"
    )
    args = parser.parse_args(argv)
    with user_errors("consolidate", CheckpointError, ConfigError, ReleaseError):
        out = consolidate(
            args.checkpoint,
            args.out,
            args.dtype,
            args.stock_llama,
            args.eval_summary,
            tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size,
            repo_name=args.repo_name,
            release_root=args.release_root,
        )
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
