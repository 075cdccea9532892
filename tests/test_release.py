"""The Hub release: consolidate a DCP checkpoint, load it with transformers where dist_llama is absent,
and check it computes what the trained model computes; the same folder as stock Llama, push --dry-run,
errors, dtypes, fine-tuning with Trainer. llama.cpp and peft's LoRA: tests/test_clients.py."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from dist_llama import consolidate as release
from dist_llama import generate, push
from dist_llama.cards import TESTED_LLAMA_CPP, TESTED_PEFT, TESTED_TRANSFORMERS
from dist_llama.checkpoint import CheckpointError, load_full_model_state, resolve_checkpoint
from dist_llama.config import from_dict
from dist_llama.interop import llama_config_dict
from dist_llama.model import Transformer, count_parameters
from dist_llama.release_folder import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from dist_llama.tokenizer import sentencepiece_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARP = "--model.init_std=0.2"  # larger weights: clear argmax margins, so greedy tokens are stable
PROMPTS = ["The quick brown fox jumps over", "Hello", "In 1905, Albert Einstein published"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def runs(make_checkpoint):
    return {
        "plain": make_checkpoint(SHARP, seed=1),
        "linear4_tied": make_checkpoint(
            SHARP, "--model.rope_scaling={type: linear, factor: 4.0}", "--model.tie_embeddings=true", seed=2
        ),
    }


@pytest.fixture(scope="module")
def releases(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("releases")
    return {name: release.consolidate(run, out / name) for name, run in runs.items()}


def trained_model(run: Path) -> Transformer:
    """The training-side model of a checkpoint: Transformer + the consolidated full state dict."""
    state, meta = load_full_model_state(run)
    model = Transformer(from_dict(meta.config).model)
    model.load_state_dict(state)
    return model.eval()


def greedy(model: Transformer, ids: list[int], steps: int) -> list[int]:
    ids = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


def packages_without_dist_llama(*first: Path) -> str:
    """PYTHONPATH for a `python -S` process that must not see this checkout: `first`, then the PYTHONPATH
    folders that do not hold dist_llama (packages installed with --target, as the GPU session installs its
    wheels), then this interpreter's site-packages."""
    inherited = [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and not (Path(p) / "dist_llama").exists()
    ]
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return os.pathsep.join(dict.fromkeys([*map(str, first), *inherited, *site]))


# Runs in a Python where dist_llama is not importable (-S: no site-packages .pth files, so the editable
# install's finder is never set up; the packages come from PYTHONPATH instead).
_LOAD_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import save_file
try:
    import dist_llama
    dist_llama_importable = True
except ImportError:
    dist_llama_importable = False
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

out, prompts, new_tokens, folders = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
tensors, report = {}, {"dist_llama_importable": dist_llama_importable}
for index, folder in enumerate(folders):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                       output_loading_info=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    report[folder] = {"model_type": config.model_type, "class": type(model).__name__,
                      "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
                      "ids": [tok(p).input_ids for p in prompts]}
    ids = torch.tensor([tok(prompts[0]).input_ids])
    with torch.no_grad():
        tensors[f"{index}.logits"] = model(ids).logits
        for cache in (True, False):
            generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=cache,
                                 output_logits=True, return_dict_in_generate=True)
            tensors[f"{index}.greedy.{cache}"] = generated.sequences
            tensors[f"{index}.greedy.{cache}.logits"] = torch.stack(generated.logits, dim=1)
        for row, prompt in enumerate(prompts):
            alone = tok(prompt, return_tensors="pt")
            tensors[f"{index}.alone.{row}.logits"] = model(**alone).logits
            tensors[f"{index}.alone.{row}"] = model.generate(**alone, max_new_tokens=new_tokens,
                                                             do_sample=False)
        tok.pad_token, tok.padding_side = tok.unk_token, "left"
        batch = tok(prompts, return_tensors="pt", padding=True)
        tensors[f"{index}.batch.mask"] = batch.attention_mask
        try:  # reported to its own test, so that one failure does not hide the others' results
            tensors[f"{index}.batch.logits"] = model(**batch).logits
            tensors[f"{index}.batch"] = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        except Exception as error:
            report[folder]["batch_error"] = f"{type(error).__name__}: {error}"
save_file({k: v.contiguous() for k, v in tensors.items()}, out + ".safetensors")
open(out + ".json", "w").write(json.dumps(report))
"""


@pytest.fixture(scope="module")
def loaded_elsewhere(releases, tmp_path_factory):
    """What a fresh Python without dist_llama computes from the release folders (one process for all)."""
    work = tmp_path_factory.mktemp("elsewhere")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": packages_without_dist_llama(),
        "HF_HOME": str(work / "hf"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    folders = [str(releases[name]) for name in sorted(releases)]
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            _LOAD_SCRIPT,
            str(work / "out"),
            json.dumps(PROMPTS),
            str(NEW_TOKENS),
            *folders,
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / "out.json").read_text())
    tensors = load_file(work / "out.safetensors")
    return {
        name: (
            report[str(releases[name])],
            {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{index}.")},
        )
        for index, name in enumerate(sorted(releases))
    }, report


# --- (1) the custom-code release, loaded without dist_llama -----------------------------------------


def test_release_loads_without_dist_llama(loaded_elsewhere, releases):
    per_release, report = loaded_elsewhere
    assert report["dist_llama_importable"] is False
    for name, (info, _) in per_release.items():
        assert info["model_type"] == "llama" and info["class"] == "DistLlamaForCausalLM", name
        assert not any(info["loading_info"].values()), (
            name,
            info["loading_info"],
        )  # no missing/unexpected keys


def test_release_tokenizer_gives_training_ids(loaded_elsewhere):
    from dist_llama.tokenizer import load_tokenizer

    tok = load_tokenizer("offline")
    for info, _ in loaded_elsewhere[0].values():
        assert info["ids"] == [tok(p).input_ids for p in PROMPTS]


@pytest.mark.parametrize("name", ["plain", "linear4_tied"])
def test_release_logits_equal_training_model(loaded_elsewhere, runs, name):
    info, got = loaded_elsewhere[0][name]
    ids = torch.tensor([info["ids"][0]])
    with torch.no_grad():
        expected = trained_model(runs[name])(ids)
    torch.testing.assert_close(got["logits"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["plain", "linear4_tied"])
def test_greedy_generation_same_with_and_without_cache(loaded_elsewhere, runs, name):
    info, got = loaded_elsewhere[0][name]
    with_cache, without_cache = got["greedy.True"][0].tolist(), got["greedy.False"][0].tolist()
    assert with_cache == without_cache
    torch.testing.assert_close(got["greedy.True.logits"], got["greedy.False.logits"], atol=1e-4, rtol=0)
    assert with_cache == greedy(trained_model(runs[name]), info["ids"][0], NEW_TOKENS)
    assert len(set(with_cache[-NEW_TOKENS:])) > 1  # a degenerate model would make this test vacuous


@pytest.mark.parametrize("name", ["plain", "linear4_tied"])
def test_left_padded_batch_equals_each_prompt_alone(loaded_elsewhere, name):
    info, got = loaded_elsewhere[0][name]
    assert "batch_error" not in info, info.get("batch_error")
    mask = got["batch.mask"]
    assert not bool(mask.all())  # the prompts differ in length, so the batch really is padded
    width = mask.shape[1]
    for row in range(len(PROMPTS)):
        n = int(mask[row].sum())
        alone = got[f"alone.{row}"][0]
        assert got["batch"][row, width - n :].tolist() == alone.tolist(), PROMPTS[row]
        torch.testing.assert_close(
            got["batch.logits"][row, width - n :], got[f"alone.{row}.logits"][0], atol=1e-4, rtol=0
        )


def test_release_folder_carries_model_py_verbatim(releases):
    # One source of truth: dist_llama/hub_release/ has no model.py of its own; the release gets dist_llama's.
    assert not (REPO_ROOT / "dist_llama" / "hub_release" / "model.py").exists()
    folder = releases["plain"]
    assert (folder / "model.py").read_bytes() == (REPO_ROOT / "dist_llama" / "model.py").read_bytes()
    for source in (REPO_ROOT / "dist_llama" / "hub_release").glob("*.py"):
        assert (folder / source.name).read_bytes() == source.read_bytes()
    interop = (folder / "interop.py").read_text()
    assert "from .model import" in interop and not release._absolute_dist_llama_imports(interop)
    config = json.loads((folder / "config.json").read_text())
    # One folder for every client: trust_remote_code follows auto_map, the others read a stock Llama.
    assert config["auto_map"] == release.AUTO_MAP and config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    # The SentencePiece model the offline tokenizer is built from, for llama.cpp's converter.
    assert (folder / "tokenizer.model").read_bytes() == sentencepiece_model()
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["max_position_embeddings"] == 256 and config["dtype"] == "float32"
    scaled = json.loads((releases["linear4_tied"] / "config.json").read_text())
    assert scaled["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert scaled["tie_word_embeddings"] is True
    with safe_open(releases["linear4_tied"] / "model.safetensors", "pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # tied: one matrix, re-tied on load


def test_consolidate_from_an_installed_wheel(runs, tmp_path, monkeypatch):
    """A plain (non-editable) install carries the release code: build a wheel from a copy of the sources,
    install it into a folder of its own, and consolidate from another directory with a Python that sees
    that install and the dependencies, not this checkout."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(
        REPO_ROOT / "dist_llama", source / "dist_llama", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "wheel"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("dist_llama-*.whl")
    installed = tmp_path / "installed"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(installed), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    shutil.rmtree(source)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: no site-packages .pth files, so the editable install of this checkout is invisible.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": packages_without_dist_llama(installed),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp_path),
    }
    where = subprocess.run(
        [sys.executable, "-S", "-c", "import dist_llama; print(dist_llama.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed), where
    result = subprocess.run(
        [
            sys.executable,
            "-S",
            "-m",
            "dist_llama.consolidate",
            "--checkpoint",
            str(runs["plain"]),
            "--out",
            str(elsewhere / "release"),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # The same folder, file for file, as this checkout writes from the same working directory.
    monkeypatch.chdir(elsewhere)
    expected = release.consolidate(runs["plain"], tmp_path / "from_checkout" / "release")
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in (elsewhere / "release").iterdir()) == names
    assert "modeling_dist_llama.py" in names and "configuration_dist_llama.py" in names
    for name in names:
        assert (elsewhere / "release" / name).read_bytes() == (expected / name).read_bytes(), name


# --- (2) the same safetensors in stock LlamaForCausalLM ---------------------------------------------


@pytest.mark.parametrize("name", ["plain", "linear4_tied"])
def test_stock_llama_gives_same_logits(runs, releases, tmp_path, name):
    """--stock-llama is the release without code, and the release without trust_remote_code is stock Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    stock = release.consolidate(runs[name], tmp_path / "stock", stock_llama=True)
    config = json.loads((stock / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and not list(stock.glob("*.py"))
    for file in ("model.safetensors", "tokenizer.json", "tokenizer.model"):
        assert (stock / file).read_bytes() == (releases[name] / file).read_bytes()

    trained = trained_model(runs[name])
    ids = torch.randint(0, trained.args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(ids)
    from_stock_folder, info = LlamaForCausalLM.from_pretrained(stock, output_loading_info=True)
    assert not any(info.values()), info
    # The custom release's weights with a config converted by interop.llama_config_dict.
    converted = LlamaForCausalLM.from_pretrained(
        releases[name], config=LlamaConfig(**llama_config_dict(trained.args))
    )
    without_remote_code, info = AutoModelForCausalLM.from_pretrained(releases[name], output_loading_info=True)
    assert type(without_remote_code) is LlamaForCausalLM and not any(info.values()), info
    for llama in (from_stock_folder, converted, without_remote_code):
        with torch.no_grad():
            torch.testing.assert_close(llama.eval()(ids).logits, expected, atol=1e-5, rtol=0)


def test_the_sentencepiece_model_is_the_tokenizers(runs, tmp_path, caplog):
    """tokenizer.model is the SentencePiece model of the tokenizer released: a tokenizer folder's own (as the
    Hub's snapshot has one), else mistral-common's when its pieces are the tokenizer's vocabulary; a folder's
    file of other pieces is refused, and a tokenizer no SentencePiece model fits is released without one."""
    from dist_llama.tokenizer import load_tokenizer

    saved = tmp_path / "tokenizer"
    load_tokenizer("offline").save_pretrained(saved)
    folder = release.consolidate(runs["plain"], tmp_path / "from_mistral_common", tokenizer=str(saved))
    assert (folder / "tokenizer.model").read_bytes() == sentencepiece_model()

    own = sentencepiece_model() + bytes([0xA0, 0x06, 0x01])  # an unknown field 100 = 1: same pieces
    (saved / "tokenizer.model").write_bytes(own)
    folder = release.consolidate(runs["plain"], tmp_path / "from_folder", tokenizer=str(saved))
    assert (folder / "tokenizer.model").read_bytes() == own

    (saved / "tokenizer.model").write_bytes(sentencepiece_model().replace(b"<0x41>", b"<0x4G>"))
    with pytest.raises(release.ReleaseError, match="is not the SentencePiece model of the tokenizer.json"):
        release.consolidate(runs["plain"], tmp_path / "mismatch", tokenizer=str(saved))

    (saved / "tokenizer.model").unlink()
    spec = json.loads((saved / "tokenizer.json").read_text())
    spec["model"]["vocab"]["<0x4G>"] = spec["model"]["vocab"].pop("<0x41>")
    (saved / "tokenizer.json").write_text(json.dumps(spec))
    with caplog.at_level("WARNING", logger="dist_llama.consolidate"):
        folder = release.consolidate(runs["plain"], tmp_path / "none", tokenizer=str(saved))
    assert not (folder / "tokenizer.model").exists()
    assert "has no tokenizer.model" in caplog.text and "other pieces than the tokenizer" in caplog.text
    card = (folder / "README.md").read_text()
    assert "not supported: this release has no `tokenizer.model`" in card and "convert_hf_to_gguf" not in card


def test_sharded_release_loads(runs, tmp_path):
    from transformers import LlamaForCausalLM

    folder = release.consolidate(runs["plain"], tmp_path / "sharded", stock_llama=True, max_shard_size="3MB")
    index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (folder / WEIGHTS_NAME).exists()
    release.check_release_folder(folder)
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            LlamaForCausalLM.from_pretrained(folder).eval()(ids).logits,
            trained_model(runs["plain"])(ids),
            atol=1e-5,
            rtol=0,
        )


# --- (3) push --dry-run -----------------------------------------------------------------------------


def test_push_dry_run_lists_files_and_validates(releases, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the validating child caches remote code here
    push.main(["--dir", str(releases["plain"]), "--repo-id", "someone/tiny-llama", "--dry-run"])
    out = capsys.readouterr().out
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "modeling_dist_llama.py",
        "model.py",
        "README.md",
    ):
        assert f"  {name} " in out, name
    assert "dry run: " in out and "someone/tiny-llama" in out and "DistLlamaForCausalLM" in out
    assert "without dist_llama" in out


def test_push_dry_run_rejects_folder_that_does_not_load(releases, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(releases["plain"], broken)
    (broken / "config.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        push.main(["--dir", str(broken), "--repo-id", "someone/x", "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and len(err.strip().splitlines()) == 1


# --- (4) errors -------------------------------------------------------------------------------------


def _cli_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("missing", ["/nonexistent/release", "./release_here", "runs/debug/release"])
def test_generate_names_a_missing_local_folder(missing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative names resolve here, where nothing exists
    err = _cli_error(generate.main, ["--model", missing, "--prompt", "Hello"], capsys)
    assert f"--model {missing}: no such folder" in err and "Repo id" not in err


def test_push_and_consolidate_name_a_missing_folder(tmp_path, capsys):
    err = _cli_error(
        push.main, ["--dir", str(tmp_path / "missing"), "--repo-id", "someone/x", "--dry-run"], capsys
    )
    assert f"release folder {tmp_path / 'missing'} not found" in err
    err = _cli_error(
        release.main, ["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "out")], capsys
    )
    assert f"no complete checkpoint at {tmp_path / 'missing'}" in err


def test_local_path_or_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "release").mkdir()
    assert release.local_path_or_hub_id("someone/tiny-llama", "--model") == "someone/tiny-llama"
    assert release.local_path_or_hub_id("gpt2", "--model") == "gpt2"
    assert release.local_path_or_hub_id("~/release", "--model") == str(tmp_path / "release")
    monkeypatch.chdir(tmp_path)
    assert release.local_path_or_hub_id("release", "--model") == "release"  # exists here: local, not a Hub id
    for name in ("~/elsewhere", "/no/such", "../up", "a/b/c", "a\\b"):
        with pytest.raises(release.ReleaseError, match="no such folder"):
            release.local_path_or_hub_id(name, "--model")


def test_consolidate_checkpoint_not_found(tmp_path, capsys):
    err = _cli_error(
        release.main, ["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")], capsys
    )
    assert "no complete checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_consolidate_corrupted_checkpoint(runs, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(resolve_checkpoint(runs["plain"]), damaged)
    shard = next(damaged.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        release.consolidate(damaged, tmp_path / "out")
    err = _cli_error(release.main, ["--checkpoint", str(damaged), "--out", str(tmp_path / "out")], capsys)
    assert "checksum mismatch" in err and shard.name in err
    assert not (tmp_path / "out").exists()


def test_loading_a_folder_without_config_fails_clearly(releases, tmp_path, capsys):
    folder = tmp_path / "no_config"
    shutil.copytree(releases["plain"], folder)
    (folder / "config.json").unlink()
    err = _cli_error(generate.main, ["--model", str(folder), "--prompt", "Hello"], capsys)
    assert "no config.json" in err
    (folder / "config.json").write_text((releases["plain"] / "config.json").read_text())
    (folder / "model.safetensors").unlink()
    with pytest.raises(release.ReleaseError, match="no weights"):
        release.check_release_folder(folder)


def test_vocab_and_dtype_mismatch(make_checkpoint, runs, tmp_path):
    with pytest.raises(release.ReleaseError, match="tokenizer has 32000 tokens but model.vocab_size is 512"):
        release.consolidate(make_checkpoint("--model.vocab_size=512"), tmp_path / "small_vocab")
    with pytest.raises(release.ReleaseError, match="dtype 'fp16' is not supported"):
        release.consolidate(runs["plain"], tmp_path / "fp16", dtype="fp16")
    state, meta = load_full_model_state(runs["plain"])
    args = from_dict(meta.config).model
    state["model.norm.weight"] = state["model.norm.weight"].long()
    with pytest.raises(release.ReleaseError, match="dtype mismatch: model.norm.weight"):
        release.release_state_dict(state, args, torch.float32)
    del state["model.norm.weight"]
    with pytest.raises(release.ReleaseError, match="missing \\['model.norm.weight'\\]"):
        release.release_state_dict(state, args, torch.float32)


def test_consolidate_refuses_to_overwrite_a_foreign_folder(runs, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(release.ReleaseError, match="refusing to overwrite"):
        release.consolidate(runs["plain"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- (5) bf16, (6) no pickles, model card ------------------------------------------------------------


def test_bf16_release_has_bf16_tensors(runs, tmp_path):
    folder = release.consolidate(runs["plain"], tmp_path / "bf16", dtype="bf16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    state, _ = load_full_model_state(runs["plain"])
    with safe_open(folder / "model.safetensors", "pt") as handle:
        assert set(handle.keys()) == set(state)
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            assert tensor.dtype == torch.bfloat16, key
            assert torch.equal(tensor, state[key].to(torch.bfloat16)), key


def test_release_folder_holds_no_pickles(releases):
    for folder in releases.values():
        names = [p.name for p in folder.rglob("*")]
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], (
            names
        )
        assert "model.safetensors" in names and "generation_config.json" in names
        release.check_release_folder(folder)


def test_model_card_and_training_config(runs, tmp_path):
    run = shutil.copytree(runs["plain"], tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(
        json.dumps({"tinymmlu": {"acc": 0.2817, "irt_estimate": 0.3104}, "perplexity": 41.5})
    )
    folder = release.consolidate(run, tmp_path / "card", repo_name="someone/tiny-llama")
    card = (folder / "README.md").read_text()
    state, meta = load_full_model_state(run)
    counts = count_parameters(from_dict(meta.config).model)
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert f"{counts['total']:,}" in card and f"{counts['non_embedding']:,}" in card
    assert (
        f"{meta.tokens_seen:,}" in card
        and f"{meta.final_loss:.4f}" in card
        and f"{meta.val_loss:.4f}" in card
    )
    assert "tinymmlu.acc | 0.2817" in card and "perplexity | 41.5000" in card
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny-llama", trust_remote_code=True)' in card
    assert from_dict(yaml.safe_load((folder / "training_config.yaml").read_text())) == from_dict(meta.config)
    low, high = TESTED_TRANSFORMERS
    assert f"needs transformers {low} to {high}" in card
    clients = card[card.index("## Clients") :]
    assert (
        f"| transformers, `trust_remote_code=True` | `auto_map`: this model's own code | {low}, {high} |"
        in clients
    )
    assert TESTED_LLAMA_CPP["commit"][:7] in clients and TESTED_LLAMA_CPP["llama-cpp-python"] in clients
    assert f"| peft (LoRA) | Llama's module names | {TESTED_PEFT}," in clients
    assert "convert_hf_to_gguf.py THIS_FOLDER --outtype q8_0" in clients


def test_the_transformers_range_is_the_tested_one():
    """pyproject.toml admits exactly the minor releases from the oldest to the newest tested version, and
    these tests run on one of them (CI runs both ends: `make test` and `make test-gpu-stack`)."""
    import tomllib

    import transformers
    from packaging.requirements import Requirement
    from packaging.version import Version

    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in dependencies if Requirement(d).name == "transformers"]
    low, high = map(Version, TESTED_TRANSFORMERS)
    assert low in spec and high in spec
    assert Version(f"{low.major}.{low.minor - 1}.99") not in spec
    assert Version(f"{high.major}.{high.minor + 1}.0") not in spec
    assert low <= Version(transformers.__version__) <= high


def test_model_card_rewrite_leaves_the_weights_alone(runs, tmp_path):
    for stock_llama in (False, True):
        folder = release.consolidate(
            runs["plain"],
            tmp_path / f"card_{stock_llama}",
            stock_llama=stock_llama,
            repo_name="someone/tiny-llama",
        )
        weights = folder / "model.safetensors"
        stamp, before = weights.stat().st_mtime_ns, (folder / "README.md").read_text()
        assert "No evaluation results were recorded" in before
        release.write_model_card(
            folder, runs["plain"], eval_summary={"acc": 0.2817}, repo_name="someone/tiny-llama"
        )
        card = (folder / "README.md").read_text()
        assert "acc | 0.2817" in card and "No evaluation results" not in card
        assert ("trust_remote_code" in card) is not stock_llama, (
            "the usage section must match the release kind"
        )
        assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(release.ReleaseError, match="config.json is missing"):
        release.write_model_card(tmp_path, runs["plain"])


# --- (7) the release as transformers users fine-tune it: checkpointing, attention choice, composition -----


def _load_release(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)


def _token_batch(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 32000, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_activation_checkpointing_recomputes_each_block_with_equal_gradients(releases):
    model = _load_release(releases["plain"]).train()
    names = list(model.state_dict())
    ids = _token_batch(2, 24)
    mlp_calls = []
    # A pre-hook: the recomputation stops as soon as it has what backward needs, before the block's end.
    model.model.layers[1].mlp.register_forward_pre_hook(lambda *args: mlp_calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        mlp_calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    plain = gradients()
    assert len(mlp_calls) == 1
    model.gradient_checkpointing_enable()
    assert model.recomputes_activations
    checkpointed = gradients()
    assert len(mlp_calls) == 2, "the block ran once more in backward: its activations were recomputed"
    for name, grad in plain.items():
        assert torch.equal(checkpointed[name], grad), name  # non-reentrant recomputation is exact
    assert list(model.state_dict()) == names  # the blocks are not wrapped: the saved weights' names
    model.eval()
    with torch.no_grad():
        mlp_calls.clear()
        model(input_ids=ids)
        assert len(mlp_calls) == 1  # nothing to recompute outside training
    model.train()
    model.gradient_checkpointing_disable()
    assert not model.recomputes_activations
    gradients()
    assert len(mlp_calls) == 1


def test_trainer_fine_tunes_with_gradient_checkpointing(releases, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _load_release(releases["plain"])
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    rows = [{"input_ids": ids, "labels": ids} for ids in _token_batch(4, 16, seed=1).tolist()]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        gradient_checkpointing=True,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert model.recomputes_activations
    assert all(
        not torch.equal(param, before[name])
        for name, param in model.named_parameters()
        if name.endswith("q_proj.weight")
    ), "the optimizer updated the blocks"


def test_requested_attention_is_honoured_or_refused(releases):
    ids = _token_batch(1, 20)
    default, sdpa, eager = (
        _load_release(releases["plain"], **kwargs).eval()
        for kwargs in ({}, {"attn_implementation": "sdpa"}, {"attn_implementation": "eager"})
    )
    for model, backend in ((default, "sdpa"), (sdpa, "sdpa"), (eager, "eager")):
        assert model.config._attn_implementation == backend
        assert model.transformer.args.attention == backend
        assert {layer.self_attn.attend.__name__ for layer in model.model.layers} == {f"{backend}_attention"}
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, atol=1e-5, rtol=0)
    for name in ("flash_attention_2", "flex_attention"):
        with pytest.raises(
            ValueError,
            match=rf"attn_implementation='{name}' is not supported by DistLlamaForCausalLM.*"
            r"\['eager', 'sdpa'\]",
        ):
            _load_release(releases["plain"], attn_implementation=name)


def test_release_wrapper_composes_the_trained_transformer(releases):
    import copy

    model = _load_release(releases["plain"]).eval()
    assert type(model.transformer).__name__ == "Transformer" and type(model.transformer).__module__.endswith(
        ".model"
    )
    assert model.transformer.model is model.model and model.transformer.lm_head is model.lm_head
    with torch.device("meta"):
        expected = type(model.transformer)(model.transformer.args).state_dict()
    assert list(model.state_dict()) == list(expected)
    twin = copy.deepcopy(model)
    assert twin.transformer.model is twin.model and twin.model is not model.model
    # A head put in place on the wrapper (resize_token_embeddings, peft's modules_to_save) is the
    # one that runs.
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    torch.nn.init.zeros_(head.weight)
    model.set_output_embeddings(head)
    with torch.no_grad():
        assert model(_token_batch(1, 8)).logits.abs().max() == 0
        assert twin(_token_batch(1, 8)).logits.abs().max() > 0
