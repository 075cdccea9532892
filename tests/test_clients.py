"""The release folder (the one with the model code) as its other clients use it.

llama.cpp (and Ollama and LM Studio, which run its GGUF files): llama.cpp's own converter reads the folder
that transformers loads with trust_remote_code; llama.cpp tokenizes held-out text into the ids of the
tokenizer the model trained with, and its perplexity equals transformers' on the same text: within 1e-3
relative in f32, within a few percent in q8_0. llama.cpp is pinned and built by tools/llama_cpp.py, once, in
a cache outside the checkout: the first run downloads its sources from PyPI and builds (8 min of CPU time).
Where it cannot be had (no cmake or compiler, no PyPI) those tests are skipped with the reason, never in CI.

peft: a LoRA fine-tune with activation checkpointing, saved, loaded back and merged.

Both transformers releases CI tests run these (`make test`, `make test-gpu-stack`).
"""

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from dist_llama import consolidate as release
from dist_llama.cards import LLAMA_CPP_TOLERANCE, TESTED_LLAMA_CPP, TESTED_PEFT

REPO = Path(__file__).resolve().parents[1]
CTX = 128  # llama-perplexity's chunk length here: the second half of each chunk is scored


# --- llama.cpp ----------------------------------------------------------------------------------------


def _load_tool():
    spec = importlib.util.spec_from_file_location("llama_cpp_tool", REPO / "tools" / "llama_cpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llama_cpp = _load_tool()


@pytest.fixture(scope="module")
def built():
    try:
        return llama_cpp.build()
    except llama_cpp.LlamaCppUnavailable as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def held_out_text(shared_data, tmp_path_factory) -> Path:
    """The documents the tests hold out of training (conftest's corpus), as one file with no final newline
    (llama.cpp's -f drops one, llama-tokenize does not)."""
    lines = (shared_data / "owt" / "tiny.jsonl").read_text().splitlines()[-20:]
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text("\n\n".join(json.loads(line)["text"] for line in lines).rstrip("\n"))
    return path


@pytest.fixture(scope="module")
def folder(make_checkpoint, tmp_path_factory) -> Path:
    """The default release (the one with the model code), of a tiny model with clear logit margins."""
    return release.consolidate(
        make_checkpoint("--model.init_std=0.2", seed=3), tmp_path_factory.mktemp("rel") / "r"
    )


@pytest.fixture(scope="module")
def reference(folder, held_out_text):
    """transformers on the release with trust_remote_code (this project's model code): the text's ids and
    its perplexity, computed as llama-perplexity computes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tok(held_out_text.read_text()).input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return ids, chunked_perplexity(model, ids, CTX, tok.bos_token_id)


def chunked_perplexity(model, ids: list[int], ctx: int, bos: int, rows: int = 16) -> float:
    """llama-perplexity's method: the ids cut into whole ctx-token chunks, each chunk's first id replaced by
    bos, and the model's log-likelihood of each chunk's second half but its first token (positions
    ctx/2 + 1 .. ctx - 1, each predicted from what precedes it in the chunk)."""
    chunks = torch.tensor(ids[: len(ids) // ctx * ctx]).view(-1, ctx).clone()
    chunks[:, 0] = bos
    first = ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in chunks.split(rows):
            logits = model(input_ids=batch, logits_to_keep=ctx - first).logits[:, :-1].double()
            targets = batch[:, first + 1 :]
            nll -= logits.log_softmax(-1).gather(-1, targets[..., None]).sum().item()
            count += targets.numel()
    return math.exp(nll / count)


def test_the_build_is_the_pinned_llama_cpp(built):
    assert built["llama-cpp-python"] == TESTED_LLAMA_CPP["llama-cpp-python"] == llama_cpp.VERSION
    assert built["commit"] == TESTED_LLAMA_CPP["commit"]
    assert "-DGGML_CUDA=OFF" in built["cmake_flags"] and "-DLLAMA_OPENSSL=OFF" in built["cmake_flags"]


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_tokenizes_and_scores_the_release_as_transformers_does(
    built, folder, held_out_text, reference, tmp_path, outtype
):
    ids, expected = reference
    gguf = llama_cpp.convert(folder, tmp_path / f"model-{outtype}.gguf", outtype)
    assert llama_cpp.tokenize(gguf, held_out_text) == ids
    assert len(ids) // CTX >= 40, "enough chunks for a perplexity worth comparing"
    got = llama_cpp.perplexity(gguf, held_out_text, CTX)
    assert abs(got - expected) / expected < LLAMA_CPP_TOLERANCE[outtype], (outtype, got, expected)


def test_without_tokenizer_model_llama_cpp_tokenizes_otherwise(
    built, folder, held_out_text, reference, tmp_path
):
    """Why the release carries tokenizer.model: without it llama.cpp's converter builds the vocabulary from
    tokenizer.json, and llama.cpp's ids then differ from the tokenizer's on real text. If this starts to pass
    with the same ids, a newer llama.cpp no longer needs the file."""
    copy = shutil.copytree(folder, tmp_path / "no_sentencepiece")
    (copy / "tokenizer.model").unlink()
    gguf = tmp_path / "vocab.gguf"
    llama_cpp.run_converter(copy, gguf, "--vocab-only")
    assert llama_cpp.tokenize(gguf, held_out_text) != reference[0]


# --- peft's LoRA, as a user fine-tunes the release ----------------------------------------------------


def _mean_loss(model, rows: list[list[int]]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([row]), labels=torch.tensor([row])).loss for row in rows]
    return torch.stack(losses).mean().item()


def test_lora_fine_tune_saves_loads_back_and_merges(folder, shared_data, tmp_path):
    """peft's LoRA on the release loaded with trust_remote_code: peft picks the attention projections by
    model_type llama; a few Trainer steps with activation checkpointing on local text lower the loss; the
    adapter saves, loads back onto a fresh copy of the release with the same outputs and merges into its
    weights; the merged model saved again is still one folder for every client (architectures
    LlamaForCausalLM, auto_map to its own code)."""
    import peft
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    assert peft.__version__ == TESTED_PEFT, "the version the model card names"
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    lines = (shared_data / "owt" / "tiny.jsonl").read_text().splitlines()[:8]
    rows = [tok(json.loads(line)["text"]).input_ids[:48] for line in lines]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True),
        LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"),
    )
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in trainable)
    before = _mean_loss(model, rows)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows]).train()
    assert model.get_base_model().recomputes_activations
    after = _mean_loss(model, rows)
    assert after < before - 0.1, (before, after)

    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), tmp_path / "adapter"
    ).eval()
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        tuned = model.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned, atol=1e-5, rtol=0)
        merged = reloaded.merge_and_unload()
        assert type(merged).__name__ == "DistLlamaForCausalLM"
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned, atol=1e-4, rtol=0)

    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["auto_map"] == release.AUTO_MAP
    for trust_remote_code, name in ((True, "DistLlamaForCausalLM"), (False, "LlamaForCausalLM")):
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=trust_remote_code)
        assert type(again).__name__ == name
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(input_ids=ids).logits, tuned, atol=1e-4, rtol=0)
