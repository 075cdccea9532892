"""Evaluation: tinyMMLU through lm-eval-harness (with IRT estimates), and held-out loss by position.

Subcommands of `python -m dist_llama.evaluate` (with no subcommand, `mmlu` is assumed):

  mmlu      --model DIR|HUB_ID --output DIR [--data FILE.jsonl] [--limit N] [--batch-size B] [--device D]
            [--dtype auto|fp32|bf16|fp16] [--irt-params PKL]
            Runs lm-eval (HF backend, trust_remote_code) and writes results.json (lm-eval's results),
            samples_<task>.jsonl (one line per item: doc_id, subject, target, pred, acc, acc_norm, ...),
            per_subject.json, tasks/<task>.yaml and summary.json (accuracy and subject-balanced accuracy
            with 95% CIs, IRT estimates, items/s = items / wall time of lm-eval's run, model load excluded).
  irt       --params PKL --samples SAMPLES.jsonl [--metric acc_norm] [--bench mmlu]
            tinyBenchmarks' irt / pirt / gpirt from a samples file (ours or lm-eval's), as JSON. PKL is
            the file tinyBenchmarks/tinyBenchmarks.pkl of github.com/felipemaiapolo/tinyBenchmarks, which
            `mmlu` downloads into ~/.cache/dist_llama/ when the network allows. SAMPLES is
            OUT/samples_tinyMMLU.jsonl of a Hub run, or OUT/samples_tinymmlu_local.jsonl of a --data run
            over items with tb_index that include the 100 tinyMMLU anchors (e.g. all of MMLU).
  ppl       --model DIR|HUB_ID|CHECKPOINT --data FILE --output DIR [--seq-len 1024] [--docs N]
            [--rope-scaling-factor F] [--label NAME] [--batch-size B] [--device D] [--dtype ...] [--plot PNG]
            Held-out loss in four position buckets of a seq_len window, and overall, as ppl_<label>.json:
            one window of seq_len + 1 tokens from the start of each of the first N documents that are that
            long ([bos] doc [eos], as training encodes them; never joined to a previous document, so
            position p follows p tokens of its own document). The JSON says how many documents were read
            and how many qualified; none qualifying is an error. A checkpoint
            (DCP step folder or run folder) is consolidated to a temporary stock-Llama folder first.
            --rope-scaling-factor F loads the model with linear RoPE scaling (Position Interpolation) of
            factor F, F = 1 with plain RoPE, whatever its config says.
  ppl-plot  --inputs A.json B.json ... --output PLOT.png
            Loss against position (bucket midpoints), one line per label.

The code lives in dist_llama/evaluation/ (its package docstring says which module holds what): the
task definition, the intervals and the IRT rule that this help refers to are described there.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from dist_llama.cli import CommandParser, print_error
from dist_llama.evaluation import EvaluationError, irt
from dist_llama.evaluation.mmlu import format_summary, run_mmlu
from dist_llama.evaluation.models import DTYPE_CHOICES
from dist_llama.evaluation.position import loss_by_position, plot_loss_by_position, read_ppl_result
from dist_llama.evaluation.tasks import HUB_TASK


def _safe_filename(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {value!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {size}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(command="evaluate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_mmlu_command(sub)
    _add_irt_command(sub)
    _add_ppl_command(sub)
    _add_ppl_plot_command(sub)
    return parser


def _add_mmlu_command(sub) -> None:
    mmlu = sub.add_parser("mmlu", help="tinyMMLU (or a local tinyMMLU-format JSONL) through lm-eval")
    mmlu.add_argument("--model", required=True, help="release folder or Hub id")
    mmlu.add_argument(
        "--tasks",
        default=HUB_TASK,
        choices=[HUB_TASK],
        help="tinyMMLU, run as our copy of lm-eval's task definition (see the module docstring)",
    )
    mmlu.add_argument(
        "--data", default=None, help="local JSONL with tinyMMLU's fields (default: the Hub dataset)"
    )
    mmlu.add_argument(
        "--limit",
        type=int,
        default=None,
        help="N items: the first N of the Hub task, or N rows spread evenly over a --data file",
    )
    mmlu.add_argument("--batch-size", type=_batch_size, default=4)
    mmlu.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    mmlu.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: as saved (lm-eval's default)"
    )
    mmlu.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    mmlu.add_argument(
        "--irt-params",
        default=None,
        help="tinyBenchmarks parameter pickle (default: the official one, if reachable)",
    )
    mmlu.add_argument("--output", required=True, help="output folder")


def _add_irt_command(sub) -> None:
    irt_cmd = sub.add_parser("irt", help="IRT estimates from a samples jsonl, printed as JSON")
    irt_cmd.add_argument(
        "--params",
        required=True,
        help="tinyBenchmarks.pkl (github.com/felipemaiapolo/tinyBenchmarks; the mmlu command caches the "
        "official one in ~/.cache/dist_llama/ when it can download it)",
    )
    irt_cmd.add_argument(
        "--samples",
        required=True,
        help="samples_<task>.jsonl of the mmlu command (samples_tinyMMLU.jsonl, or "
        "samples_tinymmlu_local.jsonl with --data), or lm-eval's --log_samples file",
    )
    irt_cmd.add_argument("--metric", default="acc_norm")
    irt_cmd.add_argument("--bench", default=irt.IRT_BENCH)


def _add_ppl_command(sub) -> None:
    ppl = sub.add_parser("ppl", help="held-out loss by position bucket")
    ppl.add_argument("--model", required=True, help="release folder, Hub id, or DCP checkpoint / run folder")
    ppl.add_argument(
        "--data",
        required=True,
        help="held-out documents (.jsonl, .jsonl.zst, .parquet, .txt) the model did not train on, e.g. "
        "the file the config names in data.val_paths",
    )
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--seq-len", type=int, default=1024)
    ppl.add_argument("--docs", type=int, default=32, help="first N documents of at least seq-len + 1 tokens")
    ppl.add_argument(
        "--rope-scaling-factor",
        type=float,
        default=None,
        help="override RoPE: linear scaling (Position Interpolation) with this factor; 1 = plain RoPE",
    )
    ppl.add_argument(
        "--label", default=None, help="name in the JSON and the plot (default: model name + factor)"
    )
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ppl.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ppl.add_argument(
        "--tokenizer", default=None, help="tokenizer folder, Hub id or 'offline' (default: the model's)"
    )
    ppl.add_argument("--output", required=True, help="output folder; writes ppl_<label>.json")
    ppl.add_argument("--plot", default=None, help="also draw this result alone to this image file")


def _add_ppl_plot_command(sub) -> None:
    plot = sub.add_parser("ppl-plot", help="plot loss by position from ppl JSON files")
    plot.add_argument("--inputs", nargs="+", required=True)
    plot.add_argument("--output", required=True, help="image file (e.g. plot.png)")


def _run_mmlu(args) -> None:
    summary = run_mmlu(
        args.model,
        args.output,
        data=args.data,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        irt_params=args.irt_params,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
    )
    print(format_summary(summary))
    print(f"wrote results.json, samples_{summary['task']}.jsonl and summary.json to {args.output}")


def _run_irt(args) -> dict:
    params = irt.load_params_file(Path(args.params))
    if not Path(args.samples).is_file():
        raise EvaluationError(f"--samples {args.samples}: no such file")
    return irt.estimate_from_samples_file(args.samples, params, args.metric, args.bench)


def _run_ppl(args) -> None:
    result = loss_by_position(
        args.model,
        args.data,
        seq_len=args.seq_len,
        docs=args.docs,
        rope_scaling_factor=args.rope_scaling_factor,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        text_field=args.text_field,
        tokenizer=args.tokenizer,
        label=args.label,
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ppl_{_safe_filename(result['label'])}.json"
    path.write_text(json.dumps(result, indent=2))
    buckets = "  ".join(f"{name}: {loss:.4f}" for name, loss in result["buckets"].items())
    print(
        f"{result['label']}: loss {result['loss']:.4f} over {result['n_windows']} windows "
        f"(documents of at least {result['seq_len'] + 1} tokens: "
        f"{result['docs_qualified']} of {result['docs_read']} read) | {buckets}"
    )
    if args.plot:
        plot_loss_by_position([result], args.plot)
        print(f"wrote {args.plot}")
    print(f"wrote {path}")


def _run_ppl_plot(args) -> None:
    path = plot_loss_by_position([read_ppl_result(Path(p)) for p in args.inputs], args.output)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"mmlu", "irt", "ppl", "ppl-plot"}
    if argv and argv[0] not in commands and argv[0] not in {"-h", "--help"}:
        argv.insert(0, "mmlu")  # `python -m dist_llama.evaluate --model ...` means mmlu
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar would run into an error line on stderr
    try:
        if args.command == "mmlu":
            _run_mmlu(args)
        elif args.command == "irt":
            print(json.dumps(_run_irt(args)))
        elif args.command == "ppl":
            _run_ppl(args)
        else:
            _run_ppl_plot(args)
    except EvaluationError as err:
        return print_error("evaluate", str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
