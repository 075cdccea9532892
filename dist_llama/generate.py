"""Continue a prompt with a released model, through transformers as a user of the release would.

`python -m dist_llama.generate --model DIR_OR_HUB_ID --prompt "..." [--max-new-tokens N]
[--greedy | --temperature T] [--device auto|cpu|cuda]` prints the prompt and its continuation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dist_llama.cli import CommandParser, fail, user_errors
from dist_llama.consolidate import ReleaseError, check_release_folder, local_path_or_hub_id
from dist_llama.devices import default_device


def load_release(model: str | Path, device: str = "auto"):
    """(tokenizer, model) of a release folder or Hub repo, in eval mode on the chosen device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = local_path_or_hub_id(model, "--model")
    if Path(model).exists():
        check_release_folder(model)
    if device == "auto":
        device = default_device()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=True)
        lm = AutoModelForCausalLM.from_pretrained(str(model), trust_remote_code=True, dtype="auto")
    except OSError as error:  # not found on the Hub, no network, gated repository
        raise ReleaseError(f"cannot load {model}: {str(error).splitlines()[0]}") from None
    return tokenizer, lm.to(device).eval()


@torch.no_grad()
def generate(
    tokenizer,
    model,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float | None = None,
    top_p: float = 0.95,
) -> str:
    """The prompt followed by its continuation; greedy when temperature is None, else nucleus sampling."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    sampling = (
        {"do_sample": False}
        if temperature is None
        else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(
        command="generate", description="Continue a prompt with a released dist_llama model."
    )
    parser.add_argument(
        "--model", required=True, help="release folder (from dist_llama.consolidate) or Hub repo id"
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument(
        "--temperature", type=float, default=None, help="sample at this temperature (top-p 0.95)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    if args.temperature is not None and args.temperature <= 0:
        parser.error("--temperature must be positive (use --greedy for deterministic decoding)")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("generate", "--device cuda but no CUDA device is visible")
    torch.manual_seed(args.seed)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout/stderr carry the text only
    with user_errors("generate", ReleaseError):
        tokenizer, model = load_release(args.model, args.device)
        print(generate(tokenizer, model, args.prompt, args.max_new_tokens, args.temperature))


if __name__ == "__main__":
    sys.exit(main())
