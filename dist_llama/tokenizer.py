"""Mistral-7B-v0.1's tokenizer, id for id with SentencePiece, with or without the Hub.

This file owns how the project gets its tokenizer: built offline from the SentencePiece model that
ships in the mistral-common wheel (`build_offline_tokenizer`), fetched from the Hub or read from a
saved folder (`load_tokenizer`), checked against the model's vocabulary (`check_tokenizer`), and the
SentencePiece model a release carries beside it as tokenizer.model (`release_sentencepiece_model`).
`python -m dist_llama.tokenizer --save DIR` writes the offline build as a folder that
`AutoTokenizer.from_pretrained(DIR)` reloads unchanged.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import logging
import os
import struct
from pathlib import Path

from huggingface_hub import snapshot_download
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dist_llama.release_folder import SENTENCEPIECE_FILE

logger = logging.getLogger(__name__)

HUB_TOKENIZER = "mistralai/Mistral-7B-v0.1"
SOURCES = ("hub", "offline", "auto")

VOCAB_SIZE = 32000
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Mistral-7B-v0.1's SentencePiece model, byte for byte; mistral-common is a runtime dependency.
_SP_MODEL_PACKAGE, _SP_MODEL_FILE = "mistral_common", "data/tokenizer.model.v1"

# SentencePiece piece types (sentencepiece_model.proto, SentencePiece.Type).
_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3

# Cuts text before each run of "▁" (SentencePiece's escaped space): "a▁▁b" -> "a", "▁▁b".
_METASPACE_WORDS = "▁*[^▁]+|▁+"

# Only the files that make up a tokenizer: `PreTrainedTokenizerFast.from_pretrained(repo)` asks the
# Hub for a dozen files, each with five retries, and took over 2 min to fail without a network;
# `snapshot_download` failed in under a second. tokenizer.model (the SentencePiece model) is not needed
# to tokenize: a release carries it for llama.cpp (release_sentencepiece_model).
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", SENTENCEPIECE_FILE]


def sentencepiece_model() -> bytes:
    """The serialized SentencePiece ModelProto of Mistral-7B-v0.1, from the mistral-common wheel."""
    return importlib.resources.files(_SP_MODEL_PACKAGE).joinpath(_SP_MODEL_FILE).read_bytes()


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field number, raw value) of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} in the SentencePiece model")
        yield number, value


def read_sentencepiece_pieces(model: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) for every piece of a SentencePiece ModelProto, in id order.

    A hand-written reader of the one repeated field needed (ModelProto.pieces = 1; piece = 1,
    score = 2, type = 3), so that neither `sentencepiece` nor `protobuf` is a runtime dependency.
    """
    pieces = []
    for number, message in _proto_fields(model):
        if number != 1:
            continue
        piece, score, piece_type = "", 0.0, _NORMAL  # the proto's defaults for absent fields
        for field, value in _proto_fields(message):
            if field == 1:
                piece = bytes(value).decode("utf-8")
            elif field == 2:
                (score,) = struct.unpack("<f", value)
            elif field == 3:
                piece_type = value
        pieces.append((piece, score, piece_type))
    return pieces


def _bpe_merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    # SentencePiece's BPE joins, at each step, the adjacent pair whose joined piece has the highest
    # score, so every split of a piece into two pieces becomes a merge ranked by that score. The
    # whitespace-only pieces ("▁▁", "▁▁▁▁", ...) have small ids but score -1e9: ranking by id
    # instead put them first and changed the ids of 348 of the 707 docs in tiny.jsonl.
    ranked = []
    for piece_id, (piece, score, piece_type) in enumerate(pieces):
        if piece_type != _NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, piece_id, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


@functools.lru_cache(maxsize=1)
def _offline_backend_json() -> str:
    # Cached because it took 0.8-1.1 s on the 2-core CPU machine (each wrapper after it ~0.5 s).
    # Cached as JSON, not as a Tokenizer, so that no caller can change what later callers get.
    pieces = read_sentencepiece_pieces(sentencepiece_model())
    vocab = {piece: piece_id for piece_id, (piece, _, _) in enumerate(pieces)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(
            f"{_SP_MODEL_PACKAGE}/{_SP_MODEL_FILE} has {len(vocab)} pieces, expected {VOCAB_SIZE}"
        )

    backend = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_bpe_merges(pieces, vocab), unk_token=pieces[UNK_ID][0], byte_fallback=True
        )
    )
    # The model's normalizer spec: identity rule (no NFKC), add_dummy_prefix, no whitespace
    # collapsing, and only U+0020 escaped as "▁". Prepend leaves "" empty, as SentencePiece does.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # SentencePiece runs BPE over the whole string; no piece has a "▁" after another character, so
    # cutting before each "▁" run changes no ids and keeps the BPE words short enough for the
    # tokenizers word cache (see add_metaspace_presplit).
    backend.pre_tokenizer = _metaspace_presplit()
    # Strip drops the dummy prefix from the fused text, as SentencePiece's decoder does.
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [piece for piece, _, piece_type in pieces if piece_type in (_UNKNOWN, _CONTROL)]
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials])
    return backend.to_str()


def _metaspace_presplit() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(_METASPACE_WORDS), behavior="isolated")


def add_metaspace_presplit(backend: Tokenizer) -> bool:
    """Give a SentencePiece-style BPE pipeline the offline build's pre-split when it cannot change an id;
    returns whether it did.

    The Hub's Mistral-7B-v0.1 tokenizer.json has no pre-tokenizer (and later conversions a Metaspace that
    does not split), so BPE runs over each whole document as one word. With the cut, the Hub path runs the
    offline build's pipeline. Speed is a trade (BENCHMARKS.md, "Tokenizer pre-split"): the whole-document
    BPE was faster on web documents up to 120 KB and 1.4-1.5x slower on 2 MB ones.
    Cutting before each "▁" run changes no id exactly when no merge joins a piece ending in another
    character to a piece starting with "▁": no BPE step can then cross a cut. That is checked on the
    merges themselves, so a vocabulary that breaks it is left as it is.
    """
    spec = json.loads(backend.to_str())
    current = spec.get("pre_tokenizer")
    unsplit_metaspace = (
        current is not None and current.get("type") == "Metaspace" and not current.get("split", True)
    )
    if spec["model"].get("type") != "BPE" or (current is not None and not unsplit_metaspace):
        return False
    for merge in spec["model"].get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if right.startswith("▁") and not left.endswith("▁"):
            return False
    if current is None:
        backend.pre_tokenizer = _metaspace_presplit()
    else:  # the Metaspace escapes spaces first; the cut comes after it
        backend.pre_tokenizer = pre_tokenizers.Sequence([backend.pre_tokenizer, _metaspace_presplit()])
    return True


def build_offline_tokenizer(model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Mistral-7B-v0.1's tokenizer built from mistral-common's SentencePiece model, without the Hub.

    Gives the ids of `sentencepiece` on the same model, with bos `<s>` (id 1) prepended when
    `add_special_tokens=True`, like the Hub tokenizer (add_bos True, add_eos False). Each call
    returns a new object; the backend is built once per process.
    """
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_offline_backend_json()),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        # transformers writes the TemplateProcessing post-processor ("<s> $A") from these flags.
        add_bos_token=True,
        add_eos_token=False,
        # SentencePiece never matches control pieces inside text: a document's literal "<s>" is
        # "<", "s", ">" (ids 523, 28713, 28767), not id 1. tokenizers matches added special tokens
        # in the input unless this is on; it is saved in tokenizer_config.json and reloaded.
        split_special_tokens=True,
        # The cleanup would rewrite " ." to "." on decode, which SentencePiece does not. transformers
        # 5.24 skips it for BPE anyway, but warns unless it is off.
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def check_tokenizer(tok, vocab_size: int = VOCAB_SIZE) -> None:
    """Raise ValueError naming the problem unless `tok` fits a model with `vocab_size` embeddings
    and uses Mistral's special ids (unk 0, bos 1, eos 2)."""
    if len(tok) != vocab_size:
        raise ValueError(
            f"tokenizer has {len(tok)} tokens but model.vocab_size is {vocab_size}; set "
            f"model.vocab_size={len(tok)} or load a tokenizer with {vocab_size} tokens"
        )
    found = {"unk": tok.unk_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    expected = {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
    if found != expected:
        wrong = ", ".join(
            f"{name} id is {found[name]}, expected {expected[name]}"
            for name in found
            if found[name] != expected[name]
        )
        raise ValueError(f"tokenizer special ids do not match Mistral-7B-v0.1's: {wrong}")


def release_sentencepiece_model(tok) -> tuple[bytes | None, str]:
    """(the SentencePiece model `tok` is built from, where it was found), or (None, why none was).

    A release carries it as tokenizer.model beside tokenizer.json for llama.cpp: its converter builds the
    GGUF vocabulary from tokenizer.model when the folder has one (SentencePiece's ids), and otherwise from
    tokenizer.json, whose conversion gave other ids on real text. Looked for in the folder `tok` was loaded
    from (a saved folder, or the Hub snapshot, which load_tokenizer fetches it into), else mistral-common's
    Mistral-7B-v0.1 model, which the offline build is made from. A model counts only when its pieces are
    `tok`'s vocabulary, id for id: a folder's tokenizer.model that is not raises ValueError; when
    mistral-common's is not either (a tokenizer.json of other pieces), there is none to release.
    """
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    folder = Path(tok.name_or_path) if tok.name_or_path else None
    if folder is not None and (folder / SENTENCEPIECE_FILE).is_file():
        model = (folder / SENTENCEPIECE_FILE).read_bytes()
        if _pieces(model) != vocab:
            raise ValueError(
                f"{folder / SENTENCEPIECE_FILE} is not the SentencePiece model of the tokenizer.json "
                "beside it: their vocabularies differ"
            )
        return model, str(folder / SENTENCEPIECE_FILE)
    model = sentencepiece_model()
    if _pieces(model) != vocab:
        where = f"{folder} has no {SENTENCEPIECE_FILE}, and " if folder is not None else ""
        return None, f"{where}{_SP_MODEL_PACKAGE}/{_SP_MODEL_FILE} has other pieces than the tokenizer"
    return model, f"{_SP_MODEL_PACKAGE}/{_SP_MODEL_FILE}"


def _pieces(model: bytes) -> list[str]:
    return [piece for piece, _, _ in read_sentencepiece_pieces(model)]


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub.constants.HF_HUB_OFFLINE is frozen when it is imported.
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _load_folder(folder: str | os.PathLike, **overrides) -> PreTrainedTokenizerFast:
    # Loaded as PreTrainedTokenizerFast rather than AutoTokenizer: when tokenizer_config.json names
    # LlamaTokenizer (as the Hub's Mistral-7B-v0.1 does), transformers 5's AutoTokenizer rebuilds the
    # pipeline from tokenizer.json's vocab and merges, and the rebuilt one drops leading spaces
    # ("   leading" -> [259, 5374] instead of SentencePiece's [2287, 5374]).
    if not (Path(folder) / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json; write one with `python -m dist_llama.tokenizer --save DIR`"
        )
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder), **overrides)
    if add_metaspace_presplit(tok.backend_tokenizer):
        logger.info(
            "tokenizer: %s has no pre-split; cutting text before each '▁' run as the offline build does "
            "(the same ids)",
            folder,
        )
    return tok


def _load_hub(name: str) -> PreTrainedTokenizerFast:
    # The Hub's tokenizer.json maps a literal "<s>" to id 1; SentencePiece does not (see above).
    return _load_folder(snapshot_download(name, allow_patterns=_TOKENIZER_FILES), split_special_tokens=True)


def load_tokenizer(
    source: str = "auto", name: str = HUB_TOKENIZER, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """The project's tokenizer, checked to be Mistral-7B-v0.1's (32000 tokens, bos 1, eos 2).

    source: "hub" (download `name`), "offline" (`build_offline_tokenizer`), "auto" (the Hub, or
    offline when HF_HUB_OFFLINE is set or the Hub cannot be reached), or a saved tokenizer folder.
    """
    if source == "offline" or (source == "auto" and _hub_offline()):
        logger.info("tokenizer: offline build from %s/%s", _SP_MODEL_PACKAGE, _SP_MODEL_FILE)
        tok = build_offline_tokenizer()
    elif source == "hub":
        tok = _load_hub(name)
        logger.info("tokenizer: %s from the Hub", name)
    elif source == "auto":
        try:
            tok = _load_hub(name)
            logger.info("tokenizer: %s from the Hub", name)
        except OSError as err:  # connection, offline-mode, not-found and gated-repo errors are all OSErrors
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            logger.warning("tokenizer: Hub unavailable for %s (%s); using the offline build", name, reason)
            tok = build_offline_tokenizer()
    elif Path(source).is_dir():
        tok = _load_folder(source)
        logger.info("tokenizer: loaded from folder %s", source)
    else:
        raise ValueError(
            f"unknown tokenizer source {source!r}; choose one of {', '.join(SOURCES)} "
            "or a saved tokenizer folder"
        )

    check_tokenizer(tok, VOCAB_SIZE)
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    return tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--save", required=True, metavar="DIR", help="folder to write the offline tokenizer to"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in load_tokenizer("offline").save_pretrained(args.save):
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
