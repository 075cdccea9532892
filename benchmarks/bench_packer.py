"""Packer throughput against the bare tokenizer: is tokenization the only real cost of PackedBatches?

Both sides tokenize the same documents (the first --docs of --paths, unshuffled, no held-out rule) with the
same tokenizer settings and documents per encode_batch call:
  bare    backend_tokenizer.encode_batch(texts) over texts already in memory, counting len + 2 (bos, eos),
          timed twice: reading each Encoding's .ids (the Python list any user of the ids pays for) and
          without;
  packer  PackedBatches from its construction: copying the tokenizer, reading and decompressing the file (the
          documents rewritten as one .jsonl.zst), JSON parsing, tokenizing on its thread, packing windows. It
          counts the tokens it yields (rows * seq_len per batch) and stops at the bare run's count. Its steady
          state is timed from 10% to 90% of that count: start-up and the tokens tokenized ahead at the end
          are left out.
Runs alternate, --repeats times, and the median ratios are printed. Target: >= 0.9.

--longest N takes the N longest documents of --paths instead of the first --docs. --tokenizer
mistral-no-presplit is the offline build without its pre-tokenizer: the Hub's tokenizer.json as it is
downloaded, before load_tokenizer adds the cut before each "▁" run (BPE then runs over each whole document).
--join-bytes N joins the documents into documents of at least N bytes. Several tokenizers run in turn within
each repeat, so that they share the machine's load.

    python benchmarks/bench_packer.py [--paths ../shared/data/owt/train/shard-00000.jsonl.zst] [--docs 4000]
    python benchmarks/bench_packer.py --longest 1000 --tokenizer mistral-no-presplit mistral
    python benchmarks/bench_packer.py --docs 3000 --join-bytes 2000000 --bare-only
        --tokenizer mistral-no-presplit mistral
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_llama import data  # noqa: E402
from dist_llama.config import DataConfig  # noqa: E402
from dist_llama.data import token_sources  # noqa: E402

DEFAULT_PATHS = [str(Path(__file__).resolve().parents[2] / "shared/data/owt/train/shard-00000.jsonl.zst")]


def load_tokenizer(name: str):
    if name in ("mistral", "mistral-no-presplit"):
        from dist_llama.tokenizer import load_tokenizer as load

        tokenizer = load(source="offline")
        if name == "mistral-no-presplit":
            tokenizer.backend_tokenizer.pre_tokenizer = None
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def join_documents(texts: list[str], min_bytes: int) -> list[str]:
    """Consecutive documents joined by blank lines into documents of at least `min_bytes` (the last may be
    shorter)."""
    joined, current, size = [], [], 0
    for text in texts:
        current.append(text)
        size += len(text.encode())
        if size >= min_bytes:
            joined.append("\n\n".join(current))
            current, size = [], 0
    return joined + (["\n\n".join(current)] if current else [])


def bare(tokenizer, texts: list[str], batch_docs: int, with_ids: bool) -> tuple[int, float]:
    backend = data.DocumentEncoder(
        tokenizer
    ).backend  # the packer's own settings (no truncation, special text as text)
    tokens, start = 0, time.perf_counter()
    for first in range(0, len(texts), batch_docs):
        encodings = backend.encode_batch(texts[first : first + batch_docs], add_special_tokens=False)
        if with_ids:  # what any user of the tokens pays: Encoding.ids builds a Python list
            tokens += sum(len(encoding.ids) + 2 for encoding in encodings)
        else:
            tokens += sum(len(encoding) + 2 for encoding in encodings)
    return tokens, time.perf_counter() - start


def packer(config: DataConfig, tokenizer, rows: int, target_tokens: int) -> dict:
    """Tokens/s from construction to the last batch, and in the steady state: from 10% to 90% of the run,
    leaving out the start-up (tokenizer copy, first file) and the tokens tokenized ahead at the end."""
    start = time.perf_counter()
    batches = data.PackedBatches(config, tokenizer, global_rows=rows)
    tokens, marks = 0, {}
    try:
        while tokens < target_tokens:
            inputs, _ = next(batches)
            tokens += inputs.numel()
            for fraction in (0.1, 0.9):
                if fraction not in marks and tokens >= fraction * target_tokens:
                    marks[fraction] = (time.perf_counter(), tokens)
    finally:
        batches.close()
    (t0, n0), (t1, n1) = marks[0.1], marks[0.9]
    return {"tokens": tokens, "wall": time.perf_counter() - start, "steady": (n1 - n0) / (t1 - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", nargs="+", default=DEFAULT_PATHS, help="data files or globs")
    parser.add_argument(
        "--tokenizer",
        nargs="+",
        default=["mistral"],
        help="one or more, run in turn within each repeat: 'mistral' (dist_llama.tokenizer, offline), "
        "'mistral-no-presplit' (the same without its pre-tokenizer, as the Hub's file is) or a "
        "folder",
    )
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=32, help="global rows (lanes), all on this one rank")
    parser.add_argument(
        "--docs",
        type=int,
        default=4000,
        help="documents (the first of --paths, rewritten to a temporary .jsonl.zst); 0: all of --paths",
    )
    parser.add_argument(
        "--longest",
        type=int,
        default=0,
        help="the N longest documents of --paths instead of the first --docs (rewritten likewise)",
    )
    parser.add_argument(
        "--join-bytes",
        type=int,
        default=0,
        help="join the documents (with blank lines) into documents of at least this many bytes",
    )
    parser.add_argument(
        "--bare-only",
        action="store_true",
        help="time the bare tokenizer only (for documents too long for a short packer run: it "
        "tokenizes whole documents ahead, TOKENIZE_BATCH_DOCS per batch)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternating bare/packer runs; the median ratio counts"
    )
    parser.add_argument("--batch-docs", type=int, default=token_sources.TOKENIZE_BATCH_DOCS)
    parser.add_argument("--prefetch-steps", type=int, default=4)
    args = parser.parse_args()
    token_sources.TOKENIZE_BATCH_DOCS = args.batch_docs

    tokenizers = {name: load_tokenizer(name) for name in args.tokenizer}
    if args.longest:
        texts = sorted(data.read_documents(args.paths), key=len, reverse=True)[: args.longest]
    else:
        texts = data.read_documents(args.paths, limit=args.docs or None)
    if args.join_bytes:
        texts = join_documents(texts, args.join_bytes)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    kind = (
        "longest " if args.longest else f"joined (>= {args.join_bytes:,} bytes) " if args.join_bytes else ""
    )
    print(f"{len(texts)} {kind}documents, {megabytes:.1f} MB of text from {args.paths}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.paths
        if (
            args.docs or args.longest
        ):  # the packer reads exactly these documents, decompressing and parsing them
            paths = [str(Path(tmp) / "subset.jsonl.zst")]
            lines = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
            Path(paths[0]).write_bytes(zstandard.ZstdCompressor(level=19).compress(lines))
        config = DataConfig(
            source="local",
            paths=paths,
            seq_len=args.seq_len,
            shuffle=False,
            val_per_mille=0,
            prefetch_steps=args.prefetch_steps,
        )
        results = {
            name: {
                "bare encode+ids tok/s": [],
                "packer steady tok/s": [],
                "end to end / encode+ids": [],
                "steady / encode+ids": [],
                "steady / encode only": [],
            }
            for name in tokenizers
        }
        for repeat in range(args.repeats):
            for (
                name,
                tokenizer,
            ) in tokenizers.items():  # alternating, so that every tokenizer sees the same load
                ids_tokens, ids_s = bare(tokenizer, texts, args.batch_docs, with_ids=True)
                only_tokens, only_s = bare(tokenizer, texts, args.batch_docs, with_ids=False)
                tag = f"[{repeat}]" if len(tokenizers) == 1 else f"[{repeat} {name}]"
                print(
                    f"{tag} bare encode_batch + .ids: {ids_tokens / ids_s:>9,.0f} tokens/s   "
                    f"encode_batch only: {only_tokens / only_s:>9,.0f} tokens/s   ({ids_tokens:,} tokens)"
                )
                results[name]["bare encode+ids tok/s"].append(ids_tokens / ids_s)
                if args.bare_only:
                    continue
                # The packer yields every token once as a target; stop once it has yielded as many
                # as bare made.
                run = packer(config, tokenizer, args.rows, ids_tokens)
                ids_rate, only_rate, rate = (
                    ids_tokens / ids_s,
                    only_tokens / only_s,
                    run["tokens"] / run["wall"],
                )
                result = results[name]
                result["packer steady tok/s"].append(run["steady"])
                result["end to end / encode+ids"].append(rate / ids_rate)
                result["steady / encode+ids"].append(run["steady"] / ids_rate)
                result["steady / encode only"].append(run["steady"] / only_rate)
                print(
                    f"{tag} PackedBatches end to end: {rate:>9,.0f} tokens/s   steady state:      "
                    f"{run['steady']:>9,.0f} tokens/s   ({run['tokens']:,} tokens in {run['wall']:.2f} s)"
                )
    for name, result in results.items():
        print(
            f"{name}: medians of {args.repeats} ({args.rows} rows x {args.seq_len}, "
            f"{args.batch_docs} documents per encode_batch; ratio target >= 0.9):"
        )
        for key, values in result.items():
            if not values:  # --bare-only
                continue
            runs = ", ".join(f"{v:,.0f}" if "tok/s" in key else f"{v:.3f}" for v in values)
            median = statistics.median(values)
            print(f"  {key:<24} {f'{median:,.0f}' if 'tok/s' in key else f'{median:.3f}'}   (runs: {runs})")


if __name__ == "__main__":
    main()
