"""Held-out loss by position in a window, and its plot.

One window of seq_len + 1 tokens from the start of each of the first N documents that are that long
([bos] doc [eos], as training encodes them; never joined to a previous document, so position p follows
p tokens of its own document); the loss per position, averaged in four buckets and overall. A model
given as a checkpoint is consolidated first (models.consolidate_if_checkpoint).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dist_llama.devices import default_device, dtype_name
from dist_llama.evaluation import EvaluationError
from dist_llama.evaluation.models import (
    check_dtype,
    checked_model_name,
    consolidate_if_checkpoint,
    load_model,
    torch_dtype_for,
)

logger = logging.getLogger(__name__)

N_BUCKETS = 4


def bucket_edges(seq_len: int, n_buckets: int = N_BUCKETS) -> list[tuple[int, int]]:
    """[start, end) position ranges of n_buckets near-equal buckets (seq_len / n_buckets each when it
    divides)."""
    cuts = [round(i * seq_len / n_buckets) for i in range(n_buckets + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


ENCODE_BATCH = 64  # documents tokenized per call while looking for long enough ones


def _document_windows(documents: Iterable[str], tokenizer, seq_len: int, wanted: int | None):
    """One window of seq_len + 1 tokens from the start of each document that has that many, for the first
    `wanted` such documents (all when None); returns (windows, documents read, longest document's tokens).

    Documents are encoded as training encodes them, [bos] doc [eos], but never joined: in a packed stream
    the late positions of a window mostly follow an earlier, unrelated document (OpenWebText documents
    are shorter than a 1024 window on average), which would dilute a long-context comparison. Here
    position p always has p tokens of its own document before it.
    """
    import numpy as np
    import torch

    from dist_llama.data import DocumentEncoder  # the trainer's document encoding

    encoder = DocumentEncoder(tokenizer)
    documents = iter(documents)
    windows, read, longest = [], 0, 0
    while wanted is None or len(windows) < wanted:
        batch = list(itertools.islice(documents, ENCODE_BATCH))
        if not batch:
            break
        for tokens in encoder.encode(batch):
            read += 1
            longest = max(longest, len(tokens))
            if len(tokens) > seq_len:
                windows.append(tokens[: seq_len + 1])
                if len(windows) == wanted:
                    break
    if not windows:
        return None, read, longest
    return torch.from_numpy(np.stack(windows).astype(np.int64)), read, longest


def loss_by_position(
    model: str,
    data: str | Path,
    seq_len: int = 1024,
    docs: int | None = 32,
    rope_scaling_factor: float | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    text_field: str = "text",
    tokenizer: str | None = None,
    label: str | None = None,
) -> dict:
    """Mean next-token loss per position bucket, and overall, over the first `docs` documents of `data`
    that have at least seq_len + 1 tokens, one window from each document's start (see _document_windows).

    Position p is the loss of predicting window token p + 1 from tokens 0..p. model: a release folder,
    Hub id, or DCP checkpoint / run folder (consolidated to a temporary folder first).
    """
    model = checked_model_name(str(model))
    _check_arguments(data, seq_len, docs, rope_scaling_factor, batch_size, dtype)
    device = device or default_device()
    torch_dtype = torch_dtype_for(dtype, device, auto_means_saved=False)
    hf_model, tok = _load_release_or_checkpoint(
        model, tokenizer, device, torch_dtype, rope_scaling_factor, seq_len
    )
    windows, n_read = _windows_of_file(data, text_field, tok, seq_len, docs)
    per_position = _mean_loss_per_position(hf_model, windows, seq_len, batch_size, device)
    overall = sum(per_position) / seq_len
    rope = getattr(hf_model.config, "rope_parameters", None)
    return {
        "label": label or default_label(model, rope_scaling_factor),
        "model": model,
        "data": str(Path(data).resolve()),
        "seq_len": seq_len,
        "windows": "one from the start of each document of at least seq_len + 1 tokens ([bos] doc [eos])",
        "docs_read": n_read,
        "docs_qualified": len(windows),
        "n_windows": len(windows),
        "n_tokens": len(windows) * seq_len,
        "rope_scaling_factor": rope_scaling_factor,
        "rope_parameters": dict(rope) if rope else None,
        "device": device,
        "dtype": dtype_name(hf_model.dtype),
        "loss": overall,
        "ppl": math.exp(overall),
        "buckets": _bucket_means(per_position),
        "loss_by_position": per_position,
    }


def _bucket_means(per_position: list[float]) -> dict[str, float]:
    """{"0-255": mean loss, ...}: keys name inclusive position ranges, in position order."""
    return {
        f"{start}-{end - 1}": sum(per_position[start:end]) / (end - start)
        for start, end in bucket_edges(len(per_position))
    }


def _check_arguments(
    data: str | Path,
    seq_len: int,
    docs: int | None,
    rope_scaling_factor: float | None,
    batch_size: int,
    dtype: str,
) -> None:
    """EvaluationError, naming the command-line option, for a value loss_by_position cannot use."""
    if seq_len < N_BUCKETS:
        raise EvaluationError(f"--seq-len must be at least {N_BUCKETS}, got {seq_len}")
    if docs is not None and docs <= 0:
        raise EvaluationError(f"--docs must be positive, got {docs}")
    if rope_scaling_factor is not None and not rope_scaling_factor >= 1:
        raise EvaluationError(
            f"--rope-scaling-factor must be >= 1 (it divides positions), got {rope_scaling_factor}"
        )
    if batch_size <= 0:
        raise EvaluationError(f"--batch-size must be positive, got {batch_size}")
    check_dtype(dtype)
    from dist_llama.data import expand_paths

    if not expand_paths([str(data)]):
        raise EvaluationError(f"--data {data}: no such file")


def _load_release_or_checkpoint(
    model: str,
    tokenizer: str | None,
    device: str,
    torch_dtype,
    rope_scaling_factor: float | None,
    seq_len: int,
):
    """(model, tokenizer) of a release folder or Hub id, or of a checkpoint consolidated into a temporary
    folder (gone once the weights are in memory)."""
    with tempfile.TemporaryDirectory(prefix="dist_llama_eval_") as workdir:
        source = consolidate_if_checkpoint(model, workdir, tokenizer)
        return load_model(
            source,
            device=device,
            dtype=torch_dtype,
            rope_scaling_factor=rope_scaling_factor,
            min_positions=seq_len,
            tokenizer=tokenizer,
        )


def _windows_of_file(data: str | Path, text_field: str, tok, seq_len: int, docs: int | None):
    """_document_windows of the documents in `data`, and how many documents were read; an EvaluationError
    when none is long enough, a warning when fewer than `docs` are."""
    from dist_llama.data import iter_documents

    try:
        windows, n_read, longest = _document_windows(
            iter_documents([str(data)], text_field), tok, seq_len, docs
        )
    except ValueError as err:
        raise EvaluationError(f"--data {data}: {err}") from None
    if windows is None:
        raise EvaluationError(
            f"--data {data}: none of its {n_read} documents has the seq_len + 1 = {seq_len + 1} "
            f"tokens a window needs (the longest has {longest}); give longer documents or "
            "lower --seq-len"
        )
    logger.info(
        "loss by position: %d documents of at least %d tokens (of %d read), one window from each "
        "document's start",
        len(windows),
        seq_len + 1,
        n_read,
    )
    if docs is not None and len(windows) < docs:
        logger.warning(
            "only %d of the %d documents in %s have at least %d tokens (asked for %d)",
            len(windows),
            n_read,
            data,
            seq_len + 1,
            docs,
        )
    return windows, n_read


def _mean_loss_per_position(hf_model, windows, seq_len: int, batch_size: int, device: str) -> list[float]:
    """Next-token loss at each of the seq_len positions, averaged over the windows."""
    import torch
    import torch.nn.functional as F

    # Summed in float64 on the CPU: many windows' losses are added, and only seq_len numbers move.
    loss_sum = torch.zeros(seq_len, dtype=torch.float64)
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            out = hf_model(input_ids=batch[:, :-1])
            logits = out.logits if hasattr(out, "logits") else out[0]
            loss = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
            loss_sum += loss.sum(0).double().cpu()
    return (loss_sum / len(windows)).tolist()


def default_label(model: str, rope_scaling_factor: float | None) -> str:
    name = Path(model.rstrip("/")).name or "model"
    return name if rope_scaling_factor is None else f"{name}-rope{rope_scaling_factor:g}"


def bucket_midpoints(buckets: dict[str, float]) -> list[float]:
    """Midpoints of "start-end" bucket names."""
    return [sum(int(x) for x in name.split("-")) / 2 for name in buckets]


def plot_loss_by_position(results: list[dict], path: str | Path) -> Path:
    """Loss at each bucket midpoint, one line per result's label, saved as an image (PNG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise EvaluationError("nothing to plot: give at least one ppl JSON")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        ax.plot(
            bucket_midpoints(result["buckets"]),
            list(result["buckets"].values()),
            marker="o",
            label=result["label"],
        )
    seq_lens = sorted({r["seq_len"] for r in results})
    ax.set_title(f"Held-out loss by position (window {', '.join(map(str, seq_lens))} tokens)")
    ax.set_xlabel("position in window (bucket midpoint)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlim(0, max(seq_lens))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_ppl_result(path: Path) -> dict:
    """A ppl_<label>.json that loss_by_position wrote; raises EvaluationError for anything else."""
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{path} is not JSON ({err})") from None
    if (
        not isinstance(result, dict)
        or not {"label", "buckets", "seq_len"} <= set(result)
        or not isinstance(result["buckets"], dict)
    ):
        raise EvaluationError(f"{path} is not a ppl result (needs label, seq_len and buckets)")
    return result
