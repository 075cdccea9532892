"""The offline Mistral-7B-v0.1 tokenizer against the `sentencepiece` library, saving, and loading."""

import json
import logging

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dist_llama import tokenizer as tokenizer_module
from dist_llama.tokenizer import (
    BOS_ID,
    EOS_ID,
    UNK_ID,
    VOCAB_SIZE,
    add_metaspace_presplit,
    build_offline_tokenizer,
    check_tokenizer,
    load_tokenizer,
    read_sentencepiece_pieces,
    sentencepiece_model,
)

HARD_CASES = {
    "empty": "",
    "one space": " ",
    "two spaces": "  ",
    "leading spaces": "   leading spaces",
    "trailing spaces": "trailing spaces   ",
    "space runs": "a  b   c    d" + " " * 20 + "e" + " " * 40,
    "tabs and newlines": "\tcol1\tcol2\n\trow\r\n  indented\n",
    "blank lines": "\n\n\n",
    "leading newline": "\nstarts with a newline",
    "digits": "12345 3.14 -0.5e10 2024-11-27",
    "chinese": "你好，世界。机器学习很有趣。",
    "arabic": "مرحبا بالعالم، هذا اختبار.",
    "russian": "Привет, мир! Это проверка.",
    "hindi": "नमस्ते दुनिया, यह एक परीक्षण है।",
    "emoji and byte fallback": "🦙🤖👍🏽 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ \u2028 \x00 \U0010ffff",
    "literal special tokens": "<s> text </s> and <unk> inside a document</s>",
    "bare bos": "<s>",
    "bare eos": "</s>",
    "mixed": "Hello world! It's 3:00 p.m.\n  — “quotes” café naïve",
}

# SentencePiece escapes spaces as "▁", so a "▁" in the text decodes as a space: the one case here
# where SentencePiece itself does not round-trip. There the offline tokenizer must decode as it does.
NO_ROUND_TRIP = {"literal metaspace": "a▁b ▁▁c"}


@pytest.fixture(scope="module")
def tok():
    return build_offline_tokenizer()


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_proto=sentencepiece_model())


@pytest.fixture(scope="module")
def tiny_docs(shared_data):
    with open(shared_data / "owt" / "tiny.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert len(docs) == 707
    return docs


def _first_mismatches(got, expected, limit=3):
    return [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b][:limit]


def test_piece_reader_matches_the_sentencepiece_proto():
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model())
    expected = [(p.piece, p.score, p.type) for p in proto.pieces]
    assert read_sentencepiece_pieces(sentencepiece_model()) == expected


def test_special_ids_and_vocab(tok, sp):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.vocab_size()) == (UNK_ID, BOS_ID, EOS_ID, VOCAB_SIZE)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == tok.vocab_size == 32000
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert all(tok.convert_ids_to_tokens(i) == sp.id_to_piece(i) for i in range(0, VOCAB_SIZE, 97))
    # bos added, eos not, as the Hub's Mistral tokenizer does.
    assert tok("Hello world").input_ids == [1, 22557, 1526]
    assert tok("").input_ids == [1]


def test_ids_match_sentencepiece_on_tiny_docs(tok, sp, tiny_docs):
    expected = [[BOS_ID] + ids for ids in sp.encode(tiny_docs)]
    got = tok(tiny_docs).input_ids
    assert not _first_mismatches(got, expected), "docs whose ids differ from sentencepiece"


def test_decode_round_trips_tiny_docs(tok, tiny_docs):
    decoded = tok.batch_decode(tok(tiny_docs).input_ids, skip_special_tokens=True)
    assert not _first_mismatches(decoded, tiny_docs), "docs that do not decode back to their text"


@pytest.mark.parametrize(
    "text",
    list(HARD_CASES.values()) + list(NO_ROUND_TRIP.values()),
    ids=list(HARD_CASES) + list(NO_ROUND_TRIP),
)
def test_hard_case_matches_sentencepiece(tok, sp, text):
    ids = sp.encode(text)
    assert tok(text, add_special_tokens=False).input_ids == ids
    assert tok(text).input_ids == [BOS_ID] + ids
    assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode([BOS_ID] + ids, skip_special_tokens=True) == sp.decode(ids)
    if text in HARD_CASES.values():
        assert tok.decode(ids) == text


def test_special_token_text_is_plain_text(tok):
    ids = tok("a <s> b </s> c <unk>", add_special_tokens=False).input_ids
    assert not {UNK_ID, BOS_ID, EOS_ID} & set(ids)


def test_save_and_reload_with_autotokenizer_keeps_ids(tok, tiny_docs, tmp_path):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # Naming LlamaTokenizer here would make transformers 5 rebuild the pipeline on load.
    assert config["tokenizer_class"] == "TokenizersBackend"

    texts = tiny_docs + list(HARD_CASES.values())
    expected = tok(texts).input_ids
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        assert not _first_mismatches(reloaded(texts).input_ids, expected)
        assert reloaded.decode(expected[-1], skip_special_tokens=True) == texts[-1]


def test_folder_naming_llamatokenizer_loads_unchanged(tok, sp, tmp_path):
    tok.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "LlamaTokenizer"  # as in the Hub's Mistral-7B-v0.1 folder
    config_file.write_text(json.dumps(config))
    text = "   leading spaces <s>"
    assert load_tokenizer(str(tmp_path))(text).input_ids == [BOS_ID] + sp.encode(text)


def test_cli_saves_a_loadable_folder(tok, tmp_path):
    tokenizer_module.main(["--save", str(tmp_path / "tok")])
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = HARD_CASES["mixed"]
    assert reloaded(text).input_ids == tok(text).input_ids


def test_model_max_length_is_per_call():
    assert load_tokenizer("offline", model_max_length=2048).model_max_length == 2048
    assert build_offline_tokenizer().model_max_length > 10**20


def test_bad_source_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'nope'.*hub, offline, auto"):
        load_tokenizer("nope")


def test_check_tokenizer_names_the_mismatch(tok):
    check_tokenizer(tok, VOCAB_SIZE)
    with pytest.raises(ValueError, match=r"tokenizer has 32000 tokens but model.vocab_size is 1000"):
        check_tokenizer(tok, 1000)
    other = build_offline_tokenizer()
    other.bos_token = "</s>"
    with pytest.raises(ValueError, match=r"bos id is 2, expected 1"):
        check_tokenizer(other)


def _hub_must_not_be_called(*args, **kwargs):
    raise AssertionError("the Hub was asked")


def test_auto_honours_hf_hub_offline(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tokenizer_module, "snapshot_download", _hub_must_not_be_called)
    with caplog.at_level(logging.INFO, logger=tokenizer_module.__name__):
        tok = load_tokenizer("auto")
    assert tok("Hello world").input_ids == [1, 22557, 1526]
    assert "offline build" in caplog.text


def test_auto_falls_back_when_the_hub_fails(monkeypatch, caplog):
    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(tokenizer_module, "snapshot_download", unreachable)
    with caplog.at_level(logging.INFO, logger=tokenizer_module.__name__):
        tok = load_tokenizer("auto")
    assert tok("Hello world").input_ids == [1, 22557, 1526]
    assert any(r.levelno == logging.WARNING and "offline build" in r.getMessage() for r in caplog.records)


def test_hub_source_loads_the_downloaded_folder(monkeypatch, tok, sp, tmp_path):
    tok.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["split_special_tokens"] = False  # the Hub's config leaves it off
    config_file.write_text(json.dumps(config))
    monkeypatch.setattr(tokenizer_module, "snapshot_download", lambda name, **kwargs: str(tmp_path))
    text = "a <s> b"
    assert load_tokenizer("hub")(text).input_ids == [BOS_ID] + sp.encode(text)


def _hub_like_folder(tok, folder):
    """The offline build saved the way the Hub's Mistral-7B-v0.1 folder has it: the same normalizer, BPE and
    decoder, but no pre-tokenizer (BPE over each whole text) and split_special_tokens off."""
    tok.save_pretrained(folder)
    spec_file, config_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
    spec = json.loads(spec_file.read_text())
    assert spec["pre_tokenizer"] is not None
    spec["pre_tokenizer"] = None
    spec_file.write_text(json.dumps(spec))
    config = json.loads(config_file.read_text())
    config["split_special_tokens"] = False
    config_file.write_text(json.dumps(config))
    return folder


def test_hub_tokenizer_gets_the_offline_presplit_with_the_same_ids(monkeypatch, tok, sp, tiny_docs, tmp_path):
    folder = _hub_like_folder(tok, tmp_path)
    as_downloaded = PreTrainedTokenizerFast.from_pretrained(str(folder), split_special_tokens=True)
    assert as_downloaded.backend_tokenizer.pre_tokenizer is None
    monkeypatch.setattr(tokenizer_module, "snapshot_download", lambda name, **kwargs: str(folder))
    hub = load_tokenizer("hub")
    presplit = json.loads(hub.backend_tokenizer.to_str())["pre_tokenizer"]
    assert presplit == json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"], (
        "the offline build's pre-split"
    )

    texts = tiny_docs + list(HARD_CASES.values()) + list(NO_ROUND_TRIP.values())
    expected = as_downloaded(texts).input_ids
    assert not _first_mismatches(hub(texts).input_ids, expected), "the pre-split must change no id"
    assert expected[: len(tiny_docs)] == [[BOS_ID] + ids for ids in sp.encode(tiny_docs)]


def test_presplit_after_a_metaspace_that_does_not_split_keeps_the_ids(tok, tiny_docs):
    # Later conversions escape spaces with a Metaspace pre-tokenizer (split off) instead of the normalizer.
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["normalizer"], spec["pre_tokenizer"] = None, None
    unsplit = Tokenizer.from_str(json.dumps(spec))
    unsplit.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    presplit = Tokenizer.from_str(unsplit.to_str())
    assert add_metaspace_presplit(presplit)
    assert json.loads(presplit.to_str())["pre_tokenizer"]["type"] == "Sequence"
    texts = tiny_docs[:100] + [text for text in HARD_CASES.values() if text]
    assert [e.ids for e in presplit.encode_batch(texts)] == [e.ids for e in unsplit.encode_batch(texts)]


def test_presplit_is_refused_when_a_merge_would_cross_the_cut():
    vocab = {"<unk>": 0, "a": 1, "▁": 2, "b": 3, "a▁": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "▁")], unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    assert backend.encode("a b").tokens == ["a▁", "b"]  # a cut before "▁" would give "a", "▁", "b"
    assert not add_metaspace_presplit(backend)
    assert backend.pre_tokenizer is None and backend.encode("a b").tokens == ["a▁", "b"]
    assert not add_metaspace_presplit(build_offline_tokenizer().backend_tokenizer), "it already splits"
