"""Model cards, and how numbers read in the markdown this project writes (model cards, run reports).

model_card builds a release's README.md from the run's config, its checkpoint's meta.json and the
evaluation summary; consolidate writes it into the release folder, and report quotes values the same way.
"""

from __future__ import annotations

import math

from dist_llama.checkpoint import CheckpointMeta
from dist_llama.config import Config, flatten
from dist_llama.data import expand_paths
from dist_llama.model import count_parameters

# The transformers releases the release code was run on (pyproject.toml's range; README: "Tested versions").
TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")
# The other clients the release tests run (tests/test_clients.py, tests/test_release.py): llama.cpp as the
# llama-cpp-python sdist of that version vendors it (tools/llama_cpp.py pins and builds it), and peft (the
# test extra; launch/gpu_machine.txt pins the same version for the 5.17.0 run).
TESTED_LLAMA_CPP = {"llama-cpp-python": "0.3.36", "commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"}
TESTED_PEFT = "0.21.2"
# What tests/test_clients.py holds llama.cpp's perplexity to, against transformers' on the same text.
LLAMA_CPP_TOLERANCE = {"f32": 1e-3, "q8_0": 0.03}


def format_value(value, digits: int = 4) -> str:
    """n/a for missing, fixed decimals for floats, thousands separators for counts, text as is."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(rows) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {format_value(value)} |" for key, value in rows)])


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M ({n:,})"


# The Hub reads this YAML header for the model page's license, library and task.
_FRONT_MATTER = (
    "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n"
    "tags:\n- llama\n- dist_llama\n- pretrained-from-scratch\n---\n"
)


def model_card(
    config: Config,
    meta: CheckpointMeta,
    eval_summary: dict | None,
    repo_name: str,
    stock_llama: bool,
    dtype: str,
    sentencepiece: bool,
) -> str:
    """A release's README.md: architecture, parameters, training, the evaluation's scalars, usage, and the
    clients tested. sentencepiece: whether the folder carries tokenizer.model (llama.cpp needs it)."""
    counts = count_parameters(config.model)
    sections = [
        _FRONT_MATTER,
        _title_section(repo_name, counts),
        _architecture_section(config.model),
        _parameters_section(counts),
        _training_section(config, meta),
        _evaluation_section(eval_summary),
        _usage_section(repo_name, stock_llama, dtype),
        _clients_section(stock_llama, sentencepiece),
    ]
    return "\n".join(sections)


def _title_section(repo_name: str, counts: dict) -> str:
    return (
        f"# {repo_name}\n\nA {_millions(counts['total'])}-parameter LLaMA-architecture language model "
        "pretrained from scratch with dist_llama (PyTorch FSDP2). A base model: it continues text, "
        "it does not follow instructions.\n"
    )


def _architecture_section(args) -> str:
    rope = (
        f"linear Position Interpolation, factor {args.rope_scaling.factor}" if args.rope_scaling else "none"
    )
    architecture = [
        ("layers", args.n_layers),
        ("hidden size", args.dim),
        ("attention heads", args.n_heads),
        ("key/value heads", args.kv_heads),
        ("SwiGLU hidden size", args.hidden_dim),
        ("vocabulary", args.vocab_size),
        ("context length", args.max_seq_len),
        ("RoPE theta", f"{args.rope_theta:g}"),
        ("RoPE scaling", rope),
        ("tied embeddings", args.tie_embeddings),
        ("RMSNorm eps", f"{args.norm_eps:g}"),
    ]
    return (
        f"## Architecture\n\nPre-norm decoder (RMSNorm), rotary position embeddings (half rotation, as in "
        f"transformers' Llama), grouped-query attention, SwiGLU feed-forward, no biases.\n\n"
        f"{_table(architecture)}\n"
    )


def _parameters_section(counts: dict) -> str:
    parameters = [
        ("total", _millions(counts["total"])),
        ("non-embedding", _millions(counts["non_embedding"])),
        ("embedding", _millions(counts["embedding"])),
        ("output head", _millions(counts["lm_head"]) if counts["lm_head"] else "tied"),
    ]
    return f"## Parameters\n\n{_table(parameters)}\n"


def _training_section(config: Config, meta: CheckpointMeta) -> str:
    data = config.data
    # As the packer decides: `auto` trained on the local files when the globs matched any.
    local = data.source == "local" or (data.source == "auto" and expand_paths(data.paths))
    training = [
        ("data", ", ".join(data.paths) if local else data.hub_dataset),
        ("tokenizer", f"Mistral-7B-v0.1 ({data.tokenizer})"),
        ("sequence length", data.seq_len),
        ("steps", meta.step),
        ("tokens seen", meta.tokens_seen),
        ("tokens per step", config.train.tokens_per_step),
        ("peak learning rate", f"{config.optim.lr:g}"),
        ("final train loss", meta.final_loss),
        ("validation loss", meta.val_loss),
    ]
    return (
        f"## Training\n\n{_table(training)}\n\nThe resolved run configuration is in `training_config.yaml`.\n"
    )


def _evaluation_section(eval_summary: dict | None) -> str:
    if not eval_summary:
        return "## Evaluation\n\nNo evaluation results were recorded for this checkpoint.\n"
    # Scalars only: a list (e.g. a confidence interval) has no one-cell reading.
    rows = [
        (key, value)
        for key, value in flatten(eval_summary).items()
        if isinstance(value, (int, float, str, bool)) or value is None
    ]
    return f"## Evaluation\n\n{_table(rows)}\n"


def _usage_section(repo_name: str, stock_llama: bool, dtype: str) -> str:
    if stock_llama:
        weights_note = "."
        requirements = ""
    else:
        weights_note = ", and without `trust_remote_code` the same folder loads as stock `LlamaForCausalLM`."
        requirements = (
            f"\nThe model code needs transformers {TESTED_TRANSFORMERS[0]} to "
            f"{TESTED_TRANSFORMERS[1]} (the versions it was tested with) and PyTorch >= 2.11.\n"
        )
    return (
        f"## Usage\n\n```python\n{_loading_code(repo_name, stock_llama)}\n```\n\n"
        f"Weights: safetensors, {dtype}; parameter names are transformers' Llama names"
        f"{weights_note}\n{requirements}"
    )


def _loading_code(repo_name: str, stock_llama: bool) -> str:
    """The snippet that loads the release and greedily continues a prompt."""
    if stock_llama:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_name}")\n'
            f'model = AutoModelForCausalLM.from_pretrained("{repo_name}")  # stock LlamaForCausalLM'
        )
    else:
        # The custom model class lives in the release folder, so transformers must be allowed to run it.
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_name}", trust_remote_code=True)\n'
            f'model = AutoModelForCausalLM.from_pretrained("{repo_name}", trust_remote_code=True)'
        )
    return load + (
        '\n\ninputs = tokenizer("The capital of France is", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20, do_sample=False)[0]))"
    )


def _clients_section(stock_llama: bool, sentencepiece: bool) -> str:
    """Which client reads what in the folder, and the versions the release tests ran each with."""
    low, high = TESTED_TRANSFORMERS
    rows = []
    if not stock_llama:
        rows.append(
            ("transformers, `trust_remote_code=True`", "`auto_map`: this model's own code", f"{low}, {high}")
        )
    transformers = "transformers" if stock_llama else "transformers, without it"
    rows.append((transformers, "`model_type`: stock `LlamaForCausalLM`", f"{low}, {high}"))
    commit, version = TESTED_LLAMA_CPP["commit"][:7], TESTED_LLAMA_CPP["llama-cpp-python"]
    if sentencepiece:
        f32, q8 = LLAMA_CPP_TOLERANCE["f32"], LLAMA_CPP_TOLERANCE["q8_0"]
        llama_cpp = (
            f"{commit} (as llama-cpp-python {version} vendors it): training's token ids; perplexity within "
            f"{f32:.1%} (f32) and {q8:.0%} (q8_0) of transformers' on held-out text"
        )
    else:
        llama_cpp = (
            "not supported: this release has no `tokenizer.model`, and a vocabulary built from "
            "`tokenizer.json` gave other token ids than training's"
        )
    rows.append(("llama.cpp (Ollama, LM Studio)", "`architectures`, `tokenizer.model`", llama_cpp))
    if not stock_llama:  # LoRA on this model's code; on stock Llama it is transformers' own model
        rows.append(
            ("peft (LoRA)", "Llama's module names", f"{TESTED_PEFT}, on transformers {low} and {high}")
        )
    rows.append(("vLLM, TGI", "`architectures`, `model_type`", "not run"))
    table = "\n".join(f"| {client} | {reads} | {tested} |" for client, reads, tested in rows)
    code = "." if stock_llama else ", and its `auto_map` names this model's own code."
    return (
        "## Clients\n\nOne folder for every client: `config.json` declares a stock Llama "
        f"(`model_type: llama`, `architectures: [LlamaForCausalLM]`){code}\n\n"
        f"| client | reads | tested |\n|---|---|---|\n{table}\n" + (_GGUF_USAGE if sentencepiece else "")
    )


# llama-completion continues a prompt; llama-cli is a chat, which needs the chat template a base model lacks.
_GGUF_USAGE = """
A GGUF file for llama.cpp, Ollama or LM Studio, with llama.cpp's own converter (`--outtype` f16, q8_0 or f32):

```bash
python llama.cpp/convert_hf_to_gguf.py THIS_FOLDER --outtype q8_0 --outfile model-q8_0.gguf
llama-completion -m model-q8_0.gguf -no-cnv -p "The capital of France is" -n 20
```
"""
