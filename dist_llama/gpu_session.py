"""One command on a GPU: install, preflight, bench, train, release, evaluate and report inside one deadline.

    python -m dist_llama.gpu_session --out OUT [--bundle gpu_bundle] [--deadline-s 540] [--rehearse]
        [--config FILE] [--work DIR] [--nproc N] [--skip STAGE,...] [--section.key=value ...]

`launch/gpu_session.sh` is the same command. It is made for a short, hard-limited GPU slot with no
network and little room to bring results back: everything the run needs comes from one bundle folder
(built by `launch/prepare_gpu_bundle.sh`), and what must come back is packed into at most five small files
in OUT: summary.md, summary.json, session.tar.gz (the run's metrics, tensorboard events, config,
environment, evaluation summaries and samples, plots, generations and every stage's log), loss.png and
loss_by_position.png. Weights and checkpoints stay in the work folder (WORK, default a new temporary one).

Stages, each in its own process(es) with its own time limit, against one deadline counted from the start:
  install    the bundle's wheels that are not installed already, into WORK/site, put on PYTHONPATH
  preflight  GPU name, torch and CUDA versions, free memory, packages, the bundle's data and tokenizer and
             the resolved training config; then a 3-step smoke of that exact config (a failing compiled
             smoke is retried eager, and training then runs eager)
  bench      benchmarks/bench_model_step.py: ours vs transformers' Llama (same weights), and ours compiled
  train      the config with train.time_budget_s = what the deadline leaves after the later stages'
             reserve; a compiled run that fails is retried eager, as a new run, with the time left
  release    consolidate (our code, and a stock Llama config on the same weights); then, in a process
             where dist_llama is not importable: load with trust_remote_code, compare logits with stock
             LlamaForCausalLM, and generate from fixed prompts (greedy, and sampled with a seed)
  evaluate   lm-eval on the 100 tinyMMLU items (IRT when eval.irt_params names a parameter file), held-out
             loss by position at the training length, lm-eval on the MMLU items spread over all subjects
  report     python -m dist_llama.report; then the summary and the pack
A stage runs when its inputs exist, whatever an unrelated stage did. Each outcome (ok, failed with the last
error line, skipped and why) goes into summary.json and summary.md; the last thing printed is a short table.
`--rehearse` runs the same stages on the CPU with configs/debug.yaml and a deadline under five minutes.
Exit status: 0 when every stage that ran succeeded, 1 when one failed, 2 for bad input (missing bundle, no
GPU, a deadline too short for the preflight, a config error), each told in one line.

Other subcommands:
    python -m dist_llama.gpu_session bundle --out gpu_bundle [...]          the data half of the bundle
    python -m dist_llama.gpu_session install --bundle B --target DIR        install its wheels and import them
    python -m dist_llama.gpu_session preflight --bundle B --report F.json   the environment check alone

Only the standard library is imported at the top: this module runs before the packages it installs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "gpu_bundle"
MANIFEST = "manifest.json"
STAGES = ("install", "preflight", "bench", "train", "release", "evaluate", "report")
MIB = 2**20
FINISH_S = 5  # kept after every stage for the summary and the pack

# What comes back from the GPU machine: at most 8 files of at most 16 MiB (64 MiB together).
PACK_NAME, PACK_LIMIT_BYTES = "session.tar.gz", 16 * MIB
PACKED_FILE_LIMIT_BYTES = 4 * MIB  # a single file larger than this is a weight or a cache, not a result
# The bundle travels with the checkout's files in 64 MiB; keep a margin for files added after the build.
BUNDLE_LIMIT_MIB = 60

# Fixed prompts of the release check: a fact, a story opening, a date (the project's usual three).
PROMPTS = ("The capital of France is", "Once upon a time, there was a", "In 1905, Albert Einstein published")
GENERATION = {"max_new_tokens": 40, "temperature": 0.8, "top_p": 0.95, "seed": 0}
# Logits of our code and of stock Llama on the same fp32 weights differ only by kernel rounding.
PARITY_RELATIVE_TOLERANCE = 1e-4

TRAINING_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "yaml", "numpy", "pyarrow", "tensorboard",
                    "psutil")
EVALUATION_MODULES = ("lm_eval", "lm_eval.models.huggingface", "datasets", "evaluate", "accelerate", "scipy")
REPORT_MODULES = ("matplotlib",)


class BadInput(Exception):
    """A problem with what the session was given; told in one line, exit status 2."""


class Interrupted(Exception):
    """SIGTERM from whoever runs the session: stop the stage, still write the summary."""


@dataclass(frozen=True)
class Mode:
    """Where the session runs and how its time is shared. Seconds per stage: (least worth starting, most)."""

    name: str
    config: str
    deadline_s: float
    require_gpu: bool
    install_wheels: bool
    bench_args: tuple[str, ...]
    limits: dict[str, tuple[float, float]]
    after_train_s: float  # planned time of release + evaluate + report, kept free when training is planned
    train_grace_s: float  # past its own budget, the trainer is stopped
    train_overrides: tuple[str, ...] = ()  # before the user's own
    mmlu_spread_limit: int | None = None  # items of the spread MMLU file to evaluate (None: all); eval.limit wins


# One H200, a >= 100M model at 1024 tokens. Planned: install ~15 s, preflight ~60 s (a cold compile in the
# smoke warms TORCHINDUCTOR_CACHE_DIR for training), bench ~50 s, release ~45 s (two consolidations, load,
# generation), evaluate ~80 s (three processes), report and pack ~15 s.
GPU = Mode(name="gpu", config="configs/speedrun.yaml", deadline_s=540, require_gpu=True, install_wheels=True,
           bench_args=("--preset", "main", "--seq-len", "1024", "--batch", "16", "--dtype", "bf16", "--compile",
                       "--repeats", "10", "--warmup", "3", "--device", "cuda"),
           limits={"install": (5, 120), "preflight": (30, 200), "bench": (20, 75), "train": (60, 0),
                   "release": (20, 100), "evaluate": (20, 200), "report": (5, 45)},
           after_train_s=160, train_grace_s=30)
# This machine's CPU, the debug model: the same stages and files in under five minutes. The bench leaves
# out compile: on this CPU it costs ~30 s per graph and gains nothing for a tiny model (STACK_NOTES.md).
REHEARSAL = Mode(name="rehearse", config="configs/debug.yaml", deadline_s=290, require_gpu=False, install_wheels=False,
                 bench_args=("--preset", "debug", "--seq-len", "128", "--batch", "8", "--repeats", "3", "--warmup", "1",
                             "--device", "cpu"),
                 limits={"install": (0, 10), "preflight": (15, 90), "bench": (10, 40), "train": (50, 0),
                         "release": (15, 60), "evaluate": (15, 100), "report": (5, 30)},
                 after_train_s=150, train_grace_s=20,
                 # A shared 2-core CPU's step time varies twofold with the load: plan with a quarter kept free.
                 train_overrides=("--train.device=cpu", "--train.budget_safety=0.25"),
                 mmlu_spread_limit=100)  # the debug model scores ~13 items/s here: 1,400 would take two minutes


@dataclass
class Outcome:
    stage: str
    status: str = "skipped"  # ok | failed | skipped
    seconds: float = 0.0
    detail: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Child:
    """One finished child process."""

    returncode: int | None
    timed_out: bool
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def why(self) -> str:
        if self.timed_out:
            return f"stopped at its time limit after {self.seconds:.0f} s (log {self.log.name})"
        return f"{last_error_line(self.log)} (exit {self.returncode}, log {self.log.name})"


def last_error_line(log: Path) -> str:
    """The line that says what went wrong: the last error-looking line near the end, else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    tail = lines[1:][-60:]  # the first line is the command
    errors = [line for line in tail if re.search(r"error|exception|traceback|failed|killed", line, re.IGNORECASE)]
    line = (errors or tail or ["no output"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- The bundle: wheels and data for a machine without network ---------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def checkout_bytes() -> int:
    """Bytes of the checkout's files that travel with the bundle: tracked, plus untracked and not ignored."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BadInput(f"cannot list the checkout's files with git ({error}); the bundle size limit counts them") from None
    paths = {REPO / name for name in listed.decode().split("\0") if name}
    return sum(p.stat().st_size for p in paths if p.is_file())


def _gzip_copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src, gzip.open(target, "wb", compresslevel=9) as dst:
        shutil.copyfileobj(src, dst)
    return target


def _write_parquet(texts: list[str], target: Path, compression_level: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Measured on shard-00000 (12,283 documents): zstd 19 in large pages without a dictionary is 8,756,117
    # bytes against 8,748,620 for its .jsonl.zst, and the GPU machine's pyarrow reads it without zstandard.
    pq.write_table(pa.table({"text": texts}), target, compression="zstd", compression_level=compression_level,
                   use_dictionary=False, data_page_size=64 * MIB)


def build_bundle(out: Path, train_data: list[str], held_out: str, tinymmlu: str, mmlu: str, mmlu_items: int,
                 limit_mib: float = BUNDLE_LIMIT_MIB, compression_level: int = 19) -> dict:
    """The data half of the bundle in `out` (wheels are put in out/wheels by launch/prepare_gpu_bundle.sh):
    the tokenizer folder, training shards as parquet, the held-out documents, tinyMMLU and spread MMLU items;
    then manifest.json. Training shards that would take the total over limit_mib are left out, and said so."""
    from dist_llama.data import expand_paths, read_documents
    from dist_llama.evaluation.tasks import check_mmlu_data, spread_subset
    from dist_llama.tokenizer import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    previous = read_json(out / MANIFEST) or {}
    for name, path in (("--held-out", held_out), ("--tinymmlu", tinymmlu), ("--mmlu", mmlu)):
        if not Path(path).is_file():
            raise BadInput(f"{name} {path}: no such file")
    sources = expand_paths(train_data)
    if not sources:
        raise BadInput(f"--train-data {' '.join(train_data)} matches no files")

    with tempfile.TemporaryDirectory() as scratch:
        # tokenizer.json is 3.5 MB of JSON, 1 MB gzipped: the session unpacks it (gzip is in the stdlib).
        load_tokenizer("offline").save_pretrained(scratch)
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        for path in sorted(Path(scratch).iterdir()):
            _gzip_copy(path, out / "tokenizer" / f"{path.name}.gz")
    _write_parquet(read_documents([held_out]), out / "held_out.parquet", compression_level)
    _gzip_copy(Path(tinymmlu), out / "items" / "tinymmlu.jsonl.gz")
    available = check_mmlu_data(Path(mmlu))
    with tempfile.TemporaryDirectory() as scratch:
        spread = spread_subset(Path(mmlu), min(mmlu_items, available), Path(scratch) / "mmlu_spread.jsonl")
        rows = [json.loads(line) for line in spread.read_text().splitlines()]
        _gzip_copy(spread, out / "items" / "mmlu_spread.jsonl.gz")
    subjects = len({row.get("subject") for row in rows})

    limit = limit_mib * MIB
    repo_bytes = checkout_bytes()
    train_dir = out / "train"
    train_dir.mkdir(exist_ok=True)
    kept, dropped, shard_sources = [], [], {}
    fixed = repo_bytes + sum(_folder_bytes(out / part) for part in ("wheels", "tokenizer", "items")) \
        + (out / "held_out.parquet").stat().st_size
    total = fixed
    for source in sources:
        target = train_dir / (source.name.split(".")[0] + ".parquet")
        stamp = {"source": str(source.resolve()), "bytes": source.stat().st_size}
        if not (target.is_file() and previous.get("shard_sources", {}).get(target.name) == stamp):
            print(f"converting {source} to {target.name}", flush=True)
            _write_parquet(read_documents([source]), target, compression_level)
        size = target.stat().st_size
        if dropped or total + size > limit:
            target.unlink()
            dropped.append(str(source))
            continue
        kept.append(target.name)
        shard_sources[target.name] = stamp
        total += size
    for stale in set(p.name for p in train_dir.glob("*.parquet")) - set(kept):
        (train_dir / stale).unlink()
    if not kept:
        raise BadInput(f"not even one training shard fits: the rest of the bundle and the checkout take "
                       f"{fixed / MIB:.1f} MiB of the {limit_mib:g} MiB limit")

    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": "tokenizer",
        "train": [f"train/{name}" for name in kept],
        "held_out": "held_out.parquet",
        "items": {"tinymmlu": "items/tinymmlu.jsonl", "mmlu_spread": "items/mmlu_spread.jsonl"},
        "gzipped": sorted(name for name in files if name.endswith(".gz")),
        "mmlu_spread_items": len(rows),
        "mmlu_spread_subjects": subjects,
        "wheels": sorted(name for name in files if name.startswith("wheels/") and name.endswith(".whl")),
        "dropped_training_shards": dropped,
        "shard_sources": shard_sources,
        "files": files,
        "bundle_bytes": sum(files.values()),
        "checkout_bytes": repo_bytes,
        "sha256": {name: _sha256(out / name) for name in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_manifest(bundle: Path) -> dict:
    """The bundle's manifest, with every listed file present at its recorded size; BadInput otherwise."""
    manifest = read_json(bundle / MANIFEST)
    if manifest is None:
        raise BadInput(f"bundle folder {bundle} not found or has no {MANIFEST}: build it with "
                       "launch/prepare_gpu_bundle.sh (and name it in the machine's carry)")
    wrong = [name for name, size in manifest["files"].items()
             if not (bundle / name).is_file() or (bundle / name).stat().st_size != size]
    if wrong:
        raise BadInput(f"bundle {bundle} is incomplete: {len(wrong)} file(s) missing or changed, e.g. {wrong[0]}; "
                       "rebuild it with launch/prepare_gpu_bundle.sh")
    return manifest


def _distribution_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def install_wheels(bundle: Path, manifest: dict, target: Path) -> tuple[list[str], list[str]]:
    """Install the bundle's wheels whose distributions are not installed yet into target (pip --no-index
    --no-deps --target; the bundle holds the whole dependency set). Returns (installed, already present);
    raises RuntimeError with pip's error line."""
    import importlib.metadata

    present, wanted = [], []
    for name in manifest["wheels"]:
        wheel = bundle / name
        try:
            importlib.metadata.distribution(_distribution_name(wheel))
            present.append(wheel.name)  # the machine's own copy wins over ours: its other packages were built with it
        except importlib.metadata.PackageNotFoundError:
            wanted.append(wheel)
    target.mkdir(parents=True, exist_ok=True)
    if wanted:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                                 "--disable-pip-version-check", "--target", str(target), *map(str, wanted)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()] or ["no output"]
            raise RuntimeError(f"{len(wanted)} wheel(s) failed to install: {lines[-1].strip()}")
    return [w.name for w in wanted], present


def import_errors(modules, env: dict | None = None) -> dict[str, str]:
    """{module: error} for the modules that do not import: here, or with `env` in a fresh interpreter."""
    if env is None:
        import importlib

        errors = {}
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as error:  # noqa: BLE001 - any failure to import is what is asked about
                errors[name] = f"{type(error).__name__}: {error}".splitlines()[0]
        return errors
    script = ("import importlib, json, sys\nerrors = {}\nfor name in sys.argv[1:]:\n    try:\n"
              "        importlib.import_module(name)\n    except Exception as error:\n"
              "        errors[name] = f'{type(error).__name__}: {error}'.splitlines()[0]\nprint(json.dumps(errors))")
    result = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, env=env,
                            timeout=300)
    if result.returncode != 0:
        return {name: f"import check crashed: {last_line(result.stderr)}" for name in modules}
    return json.loads(result.stdout.strip().splitlines()[-1])


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def unpack_bundle(bundle: Path, manifest: dict, inputs: Path) -> None:
    """The bundle's gzipped files (tokenizer, items) as plain files under inputs/, where the commands read them."""
    for name in manifest["gzipped"]:
        target = inputs / name.removesuffix(".gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(bundle / name, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)


def data_overrides(bundle: Path, manifest: dict, inputs: Path) -> list[str]:
    """The training config's data from the bundle: local shards, held-out file, saved tokenizer."""
    shards = ",".join(str(bundle / name) for name in manifest["train"])
    return ["--data.source=local", f"--data.paths=[{shards}]", f"--data.val_paths=[{bundle / manifest['held_out']}]",
            f"--data.tokenizer={inputs / manifest['tokenizer']}"]


# --- Preflight (its own process: it imports torch) -----------------------------------------------------


def preflight_report(bundle: Path, inputs: Path, config_path: str, overrides: list[str],
                     require_gpu: bool) -> tuple[dict, list[str]]:
    """(facts about this machine and the inputs, problems that stop the session)."""
    import platform

    report: dict = {"python": platform.python_version(), "executable": sys.executable}
    problems: list[str] = []
    errors = import_errors(TRAINING_MODULES + EVALUATION_MODULES + REPORT_MODULES)
    report["import_errors"] = errors
    problems += [f"{name} does not import ({error}); training needs it" for name, error in errors.items()
                 if name in TRAINING_MODULES]
    if problems:
        return report, problems

    import importlib.metadata

    import torch

    report["packages"] = {}
    for name in ("torch", "transformers", "tokenizers", "lm_eval", "datasets", "pyarrow", "numpy", "accelerate"):
        try:
            report["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            report["packages"][name] = None
    report["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        report["gpu"] = {"name": torch.cuda.get_device_name(), "count": torch.cuda.device_count(),
                         "free_gib": free / 2**30, "total_gib": total / 2**30,
                         "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    else:
        report["gpu"] = None
        if require_gpu:
            problems.append("no GPU visible (torch.cuda.is_available() is False); use --rehearse to run on the CPU")

    try:
        manifest = load_manifest(bundle)
    except BadInput as error:
        return report, problems + [str(error)]
    from dist_llama.config import ConfigError, load_config, to_dict
    from dist_llama.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(str(inputs / manifest["tokenizer"]))
        report["tokenizer"] = {"vocab": len(tokenizer), "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    except (OSError, ValueError) as error:
        problems.append(f"the bundle's tokenizer does not load: {error}")
    import pyarrow.parquet as pq

    report["data"] = {name: pq.ParquetFile(bundle / name).metadata.num_rows
                      for name in [*manifest["train"], manifest["held_out"]]}
    report["mmlu_spread"] = {"items": manifest["mmlu_spread_items"], "subjects": manifest["mmlu_spread_subjects"]}
    report["dropped_training_shards"] = manifest["dropped_training_shards"]
    try:
        report["config"] = to_dict(load_config(config_path, [*data_overrides(bundle, manifest, inputs), *overrides]))
    except ConfigError as error:
        problems.append(f"config error: {error}")
    return report, problems


# --- The session --------------------------------------------------------------------------------------


class Session:
    def __init__(self, mode: Mode, args: argparse.Namespace, overrides: list[str]):
        self.mode = mode
        self.start = time.monotonic()
        self.deadline_s = args.deadline_s if args.deadline_s is not None else mode.deadline_s
        self.config = resolve_config_path(args.config or mode.config)
        self.out = Path(args.out).resolve()
        self.bundle = Path(args.bundle).resolve()
        self.user_overrides = overrides
        self.skip = set(args.skip)
        self.nproc = args.nproc
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="dist_llama_session_"))
        self.logs = self.work / "logs"
        self.inputs = self.work / "inputs"  # the bundle's gzipped files, unpacked
        self.site = self.work / "site"
        self.outcomes = {stage: Outcome(stage) for stage in STAGES}
        self.manifest: dict | None = None
        self.preflight: dict = {}
        self.site_installed = False
        self.eager_only = False  # compile failed in the smoke
        self.runs: list[Path] = []  # training attempts, in order
        self.release: Path | None = None
        self.stock_release: Path | None = None
        self.bad_input: str | None = None

    # Time ------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.deadline_s - self.elapsed()

    def minimum_after(self, stage: str) -> float:
        """Seconds to keep for the stages after `stage` that will run: their least worth starting."""
        later = STAGES[STAGES.index(stage) + 1:]
        return FINISH_S + sum(self.mode.limits[s][0] for s in later if s not in self.skip)

    def allowance(self, stage: str) -> float:
        most = self.mode.limits[stage][1]
        reserve = self.minimum_after(stage)
        if STAGES.index(stage) < STAGES.index("train") and "train" not in self.skip:
            reserve += self.mode.after_train_s - sum(self.mode.limits[s][0] for s in ("release", "evaluate", "report"))
        available = self.remaining() - reserve
        return min(most, available) if most else available

    # Children --------------------------------------------------------------------------------------

    def env(self) -> dict:
        env = dict(os.environ)
        paths = ([str(self.site)] if self.site_installed else []) + [str(REPO)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(self.work / "hf"),
                    "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                    "TQDM_DISABLE": "1",  # progress bars would fill the logs with carriage returns
                    # The smoke's compile fills this cache, so training's compile of the same graphs is warm.
                    "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor_cache")})
        return env

    def run(self, label: str, command: list[str], timeout: float, env: dict | None = None,
            cwd: Path | None = None) -> Child:
        log = self.logs / f"{label}.log"
        start = time.monotonic()
        with log.open("w") as handle:
            handle.write(f"$ {shlex.join(command)}\n")
            handle.flush()
            process = subprocess.Popen(command, cwd=cwd or REPO, env=env or self.env(), stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode, timed_out = process.wait(timeout=max(1.0, timeout)), False
            except (subprocess.TimeoutExpired, Interrupted) as stop:
                self._stop(process)
                if isinstance(stop, Interrupted):
                    raise
                returncode, timed_out = process.returncode, True
        seconds = time.monotonic() - start
        with log.open("a") as handle:
            handle.write(f"# {'stopped at the time limit' if timed_out else f'exit {returncode}'} after {seconds:.1f} s "
                         f"(limit {timeout:.0f} s)\n")
        return Child(returncode, timed_out, seconds, log)

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        """SIGTERM to the child's whole process group (torchrun's workers too), SIGKILL if it lingers."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def trainer(self, overrides: list[str]) -> list[str]:
        launcher = (self.python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}")
                    if self.nproc > 1 else self.python())
        return [*launcher, "-m", "dist_llama.train", "--config", self.config, *self.base_overrides(), *overrides]

    def session_overrides(self) -> list[str]:
        """The mode's overrides, then the user's (the preflight adds the bundle's data itself)."""
        return [*self.mode.train_overrides, *self.user_overrides]

    def base_overrides(self) -> list[str]:
        return [*data_overrides(self.bundle, self.manifest, self.inputs), *self.session_overrides()]

    def resolved(self, section: str, key: str, default=None):
        return (self.preflight.get("config") or {}).get(section, {}).get(key, default)

    @property
    def device(self) -> str:
        return "cuda" if self.mode.require_gpu else "cpu"

    # Stages ----------------------------------------------------------------------------------------

    def stage_install(self) -> Outcome:
        if not self.mode.install_wheels:
            return Outcome("install", "skipped", detail="rehearsal: this machine's environment has the packages "
                           "(launch/prepare_gpu_bundle.sh --check installs the cp312 wheels in a clean 3.12 venv)")
        if not self.manifest["wheels"]:
            return Outcome("install", "failed", detail=f"the bundle {self.bundle} holds no wheels; lm-eval will be "
                           "missing (build the bundle with launch/prepare_gpu_bundle.sh)")
        try:
            installed, present = install_wheels(self.bundle, self.manifest, self.site)
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            return Outcome("install", "failed", detail=str(error).splitlines()[0])
        self.site_installed = True
        return Outcome("install", "ok", detail=f"{len(installed)} wheels installed into {self.site}, "
                       f"{len(present)} already present")

    def stage_preflight(self, allowance: float) -> Outcome:
        report = self.work / "preflight.json"
        check = self.run("preflight", self.python("-m", "dist_llama.gpu_session", "preflight", "--bundle",
                                                  str(self.bundle), "--inputs", str(self.inputs), "--config", self.config,
                                                  "--report", str(report),
                                                  *(["--require-gpu"] if self.mode.require_gpu else []),
                                                  *self.session_overrides()),
                         min(allowance, 120))
        self.preflight = read_json(report) or {}
        problems = self.preflight.get("problems", [])
        if not check.ok or problems:
            reason = problems[0] if problems else check.why()
            if any(p.startswith(("no GPU visible", "config error")) for p in problems):
                self.bad_input = reason
            return Outcome("preflight", "failed", detail=reason)
        notes = [f"{name} does not import" for name in self.preflight.get("import_errors", {})]
        smoke = ["--train.steps=3", "--train.time_budget_s=null", "--train.name=smoke",
                 f"--train.run_root={self.work / 'smoke'}", "--train.log_every=1", "--train.eval_every=3",
                 "--checkpoint.every=3", "--checkpoint.keep_last=1", "--logging.tensorboard=false"]
        left = allowance - check.seconds
        first = self.run("smoke", self.trainer(smoke), left)
        if not first.ok and self.resolved("parallel", "compile") and not first.timed_out:
            shutil.rmtree(self.work / "smoke", ignore_errors=True)
            eager = self.run("smoke_eager", self.trainer([*smoke, "--parallel.compile=false"]), left - first.seconds)
            if not eager.ok:
                return Outcome("preflight", "failed", detail=f"3-step smoke failed, compiled: {first.why()}; "
                               f"eager: {eager.why()}")
            self.eager_only = True
            notes.append(f"compiled smoke failed ({first.why()}); training runs eager")
        elif not first.ok:
            return Outcome("preflight", "failed", detail=f"3-step smoke failed: {first.why()}")
        gpu = self.preflight.get("gpu") or {}
        facts = (f"{gpu['name']}, {gpu['free_gib']:.0f}/{gpu['total_gib']:.0f} GiB free" if gpu else "CPU")
        packages = self.preflight.get("packages", {})
        facts += f", torch {packages.get('torch')} (CUDA {self.preflight.get('cuda')}); smoke ok"
        return Outcome("preflight", "ok", detail="; ".join([facts, *notes]))

    def stage_bench(self, allowance: float) -> Outcome:
        result = self.work / "bench.json"
        child = self.run("bench", self.python("benchmarks/bench_model_step.py", *self.mode.bench_args, "--json",
                                              str(result)), allowance)
        bench = read_json(result)
        if bench is None:
            return Outcome("bench", "failed", detail=child.why())
        models = bench["models"]
        detail = ", ".join(f"{name} {m['tokens_per_s']:,.0f} tok/s" + (f" (MFU {100 * m['mfu']:.1f}%)" if m.get("mfu")
                           else "") for name, m in models.items())
        if not child.ok:
            return Outcome("bench", "failed", detail=f"{child.why()}; kept: {detail}")
        return Outcome("bench", "ok", detail=detail)

    def stage_train(self) -> Outcome:
        from dist_llama.checkpoint import complete_checkpoints

        name = self.resolved("train", "name", "run")
        attempts = [(name, [])] if not self.eager_only else [(f"{name}_eager", ["--parallel.compile=false"])]
        notes = []
        for attempt, (run_name, extra) in enumerate(attempts):
            budget = self.remaining() - self.mode.after_train_s
            if budget < self.mode.limits["train"][0]:
                notes.append(f"{budget:.0f} s left for training, less than the {self.mode.limits['train'][0]:.0f} s "
                             "worth starting")
                break
            run_dir = self.work / "runs" / run_name
            self.runs.append(run_dir)
            overrides = [*extra, f"--train.run_root={self.work / 'runs'}", f"--train.name={run_name}",
                         f"--train.time_budget_s={budget:.0f}"]
            child = self.run(f"train_{run_name}", self.trainer(overrides), budget + self.mode.train_grace_s)
            checkpoints = complete_checkpoints(run_dir / "checkpoints")
            if child.ok:
                return Outcome("train", "ok", detail="; ".join([*notes, f"{run_name}: budget {budget:.0f} s, "
                                                                f"final checkpoint {checkpoints[-1].name}"]))
            notes.append(f"{run_name}: {child.why()}" + (f" (latest checkpoint {checkpoints[-1].name})"
                                                           if checkpoints else ""))
            retry_eager = (attempt == 0 and not child.timed_out and self.resolved("parallel", "compile")
                           and not self.eager_only)
            if retry_eager:
                attempts.append((f"{name}_eager", ["--parallel.compile=false"]))
        return Outcome("train", "failed", detail="; ".join(notes))

    def trained_run(self) -> Path | None:
        """The latest training attempt that left a checkpoint (a timed-out run keeps its last one)."""
        from dist_llama.checkpoint import complete_checkpoints

        with_checkpoints = [run for run in self.runs if complete_checkpoints(run / "checkpoints")]
        return with_checkpoints[-1] if with_checkpoints else None

    def reported_run(self) -> Path | None:
        """The run whose files the report and summary show: the released one, else the last that logged."""
        if not self.runs:
            return None
        logged = [run for run in self.runs if (run / "metrics.jsonl").is_file()]
        return self.trained_run() or (logged[-1] if logged else None)

    def stage_release(self, allowance: float) -> Outcome:
        run_dir = self.trained_run()
        if run_dir is None:
            return Outcome("release", "skipped", detail="no training checkpoint to release")
        deadline = time.monotonic() + allowance
        custom, stock = run_dir / "release", self.work / "release_stock"
        for label, out, extra in (("consolidate", custom, []), ("consolidate_stock", stock, ["--stock-llama"])):
            child = self.run(label, self.python("-m", "dist_llama.consolidate", "--checkpoint", str(run_dir),
                                                "--out", str(out), *extra), deadline - time.monotonic())
            if not child.ok:
                return Outcome("release", "failed", detail=f"{label}: {child.why()}")
        self.release, self.stock_release = custom, stock
        check = self.work / "release_check.json"
        child = self.run("release_check", self.isolated_check_command(check), deadline - time.monotonic(),
                         env=self.isolated_env(), cwd=self.isolated_cwd())
        result = read_json(check)
        if result is None or not child.ok:
            reason = (result or {}).get("problem") or child.why()
            return Outcome("release", "failed", detail=f"isolated load: {reason}")
        return Outcome("release", "ok", detail=f"{result['class']} loads without dist_llama; logits vs stock Llama "
                       f"max |diff| {result['max_abs_logit_diff']:.2e}; {len(result['generations'])} prompts generated")

    def isolated_check_command(self, report: Path) -> list[str]:
        # -S: no site-packages .pth files, so an editable install of dist_llama is never set up; the
        # packages come from PYTHONPATH (isolated_env) instead, without the checkout. The script lies in
        # the isolated folder, which becomes sys.path[0].
        script = self.isolated_cwd() / "release_check.py"
        script.write_text(RELEASE_CHECK_SCRIPT)
        return [sys.executable, "-S", str(script), str(report), str(self.release),
                str(self.stock_release), self.device, json.dumps(list(PROMPTS)), json.dumps(GENERATION),
                str(PARITY_RELATIVE_TOLERANCE)]

    def isolated_env(self) -> dict:
        """This interpreter's import path without any folder that holds dist_llama (the checkout, cwd)."""
        paths = [str(self.site)] if self.site_installed else []
        for entry in sys.path:
            folder = Path(entry or ".").resolve()
            if folder.is_dir() and not (folder / "dist_llama").exists() and str(folder) not in paths:
                paths.append(str(folder))
        env = {key: value for key, value in self.env().items() if key != "PYTHONPATH"}
        return {**env, "PYTHONPATH": os.pathsep.join(paths)}

    def isolated_cwd(self) -> Path:
        folder = self.work / "isolated"
        folder.mkdir(exist_ok=True)
        return folder

    def stage_evaluate(self) -> Outcome:
        if self.release is None or not (self.release / "config.json").is_file():
            return Outcome("evaluate", "skipped", detail="no release folder to evaluate")
        run_dir = self.release.parent
        items = {name: self.inputs / relative for name, relative in self.manifest["items"].items()}
        batch = str(self.resolved("eval", "batch_size", 8))
        limit = self.resolved("eval", "limit")
        spread_limit = limit or self.mode.mmlu_spread_limit
        irt = self.resolved("eval", "irt_params")
        common = ["--model", str(self.release), "--batch-size", batch, "--device", self.device]
        missing_eval = [m for m in ("lm_eval", "lm_eval.models.huggingface", "datasets")
                        if m in self.preflight.get("import_errors", {})]
        steps = [
            ("tinymmlu", ["mmlu", "--data", str(items["tinymmlu"]), "--output", str(run_dir / "eval"), *common,
                          *(["--limit", str(limit)] if limit else []), *(["--irt-params", str(irt)] if irt else [])],
             True),
            ("ppl", ["ppl", "--data", str(self.bundle / self.manifest["held_out"]), "--output", str(run_dir / "eval"),
                     "--seq-len", str(self.resolved("data", "seq_len", 1024)),
                     "--docs", str(self.resolved("eval", "ppl_docs", 32)), "--label", run_dir.name, *common], False),
            ("mmlu_spread", ["mmlu", "--data", str(items["mmlu_spread"]), "--output",
                             str(run_dir / "eval" / "mmlu_spread"), *common,
                             *(["--limit", str(spread_limit)] if spread_limit else [])], True),
        ]
        done, problems = [], []
        report_reserve = self.minimum_after("evaluate")
        for label, arguments, needs_lm_eval in steps:
            if needs_lm_eval and missing_eval:
                problems.append(f"{label} skipped: {missing_eval[0]} does not import")
                continue
            allowance = self.remaining() - report_reserve
            if allowance < self.mode.limits["evaluate"][0] / 2:
                problems.append(f"{label} skipped for time ({allowance:.0f} s left)")
                continue
            child = self.run(f"evaluate_{label}", self.python("-m", "dist_llama.evaluate", *arguments), allowance)
            (done if child.ok else problems).append(label if child.ok else f"{label}: {child.why()}")
        status = "ok" if not problems else "failed"
        return Outcome("evaluate", status, detail="; ".join([*(f"{d} ok" for d in done), *problems]))

    def stage_report(self, allowance: float) -> Outcome:
        run_dir = self.reported_run()
        if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
            return Outcome("report", "skipped", detail="no training metrics to report")
        child = self.run("report", self.python("-m", "dist_llama.report", "--run", str(run_dir)), allowance)
        if not child.ok:
            return Outcome("report", "failed", detail=child.why())
        return Outcome("report", "ok", detail=f"{run_dir.name}/report/results.md and plots")

    # The whole session -----------------------------------------------------------------------------

    def execute(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        print(f"session: mode {self.mode.name}, deadline {self.deadline_s:.0f} s, bundle {self.bundle}, "
              f"work {self.work}, out {self.out}", flush=True)
        try:
            self._check_inputs()
            self._stages()
        except BadInput as error:
            self.bad_input = str(error)
            print(f"error: {error}", file=sys.stderr, flush=True)
        except Interrupted:
            print("session: interrupted (SIGTERM); writing the summary", file=sys.stderr, flush=True)
            for outcome in self.outcomes.values():
                if outcome.status == "running":
                    outcome.status, outcome.detail = "failed", "interrupted by SIGTERM"
        finally:
            self._finish()
        if self.bad_input:
            return 2
        return 1 if any(o.status == "failed" for o in self.outcomes.values()) else 0

    def _check_inputs(self) -> None:
        least = sum(self.mode.limits[s][0] for s in ("install", "preflight"))
        if self.deadline_s < least:
            raise BadInput(f"--deadline-s {self.deadline_s:g} is too short: install and preflight alone need at "
                           f"least {least:.0f} s here ({self.mode.name})")
        if self.work.exists() and any(p for p in self.work.iterdir() if p.name != "logs"):
            raise BadInput(f"--work {self.work} is not empty: give a new folder (a finished run there would be resumed)")
        self.manifest = load_manifest(self.bundle)
        unpack_bundle(self.bundle, self.manifest, self.inputs)

    def _stages(self) -> None:
        for stage in STAGES:
            outcome = self.outcomes[stage]
            if stage in self.skip:
                outcome.detail = "skipped by --skip"
                continue
            if stage not in ("install", "preflight") and self.outcomes["preflight"].status != "ok":
                outcome.detail = "preflight did not pass"
                continue
            allowance = self.allowance(stage)
            if stage != "train" and allowance + 1 < self.mode.limits[stage][0]:  # 1 s: rounding, not a plan
                outcome.detail = f"skipped for time: {allowance:.0f} s allowed, {self.mode.limits[stage][0]:.0f} s needed"
                print(f"[{self.elapsed():5.0f}s] {stage}: {outcome.detail}", flush=True)
                continue
            print(f"[{self.elapsed():5.0f}s] {stage}: running" + ("" if stage == "train" else
                                                                   f" (at most {allowance:.0f} s)"), flush=True)
            outcome.status = "running"
            started = time.monotonic()
            runner = getattr(self, f"stage_{stage}")
            result = runner(allowance) if stage in ("preflight", "bench", "release", "report") else runner()
            result.seconds = time.monotonic() - started
            self.outcomes[stage] = result
            print(f"[{self.elapsed():5.0f}s] {stage}: {result.status} ({result.seconds:.0f} s) {result.detail}", flush=True)
            if self.bad_input and stage == "preflight":
                print(f"error: {self.bad_input}", file=sys.stderr, flush=True)
        for outcome in self.outcomes.values():
            if outcome.status == "skipped" and not outcome.detail:
                outcome.detail = "not reached"

    def _finish(self) -> None:
        summary = self.summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (self.out / "summary.md").write_text(summary_markdown(summary))
        run_dir = self.reported_run()
        for plot in ("loss.png", "loss_by_position.png"):
            if run_dir is not None and (run_dir / "report" / plot).is_file():
                shutil.copyfile(run_dir / "report" / plot, self.out / plot)
        try:
            packed = self.pack()
            print(f"packed {len(packed)} files into {self.out / PACK_NAME} "
                  f"({(self.out / PACK_NAME).stat().st_size / MIB:.2f} MiB)", flush=True)
        except OSError as error:
            print(f"error: packing the run's files failed: {error}", file=sys.stderr, flush=True)
        print(final_table(summary), flush=True)

    def summary(self) -> dict:
        run_dir = self.reported_run()
        report = read_json(run_dir / "report" / "summary.json") if run_dir else None
        evaluation = {}
        if run_dir is not None:
            evaluation = {"tinymmlu": read_json(run_dir / "eval" / "summary.json"),
                          "mmlu_spread": read_json(run_dir / "eval" / "mmlu_spread" / "summary.json"),
                          "ppl": [read_json(p) for p in sorted((run_dir / "eval").glob("ppl_*.json"))]}
        return {
            "mode": self.mode.name, "deadline_s": self.deadline_s, "elapsed_s": round(self.elapsed(), 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": self.config, "overrides": self.user_overrides,
            "bad_input": self.bad_input, "work": str(self.work),
            "stages": [o.as_dict() for o in self.outcomes.values()],
            "preflight": self.preflight or None,
            "bundle": {key: (self.manifest or {}).get(key) for key in ("created", "train", "dropped_training_shards",
                                                                        "mmlu_spread_items", "mmlu_spread_subjects",
                                                                        "bundle_bytes")},
            "bench": read_json(self.work / "bench.json"),
            "run": run_dir.name if run_dir else None,
            "train": (report or {}).get("run"),
            "plan": training_plan(run_dir) if run_dir else None,
            "release": read_json(self.work / "release_check.json"),
            "eval": evaluation,
        }

    def pack(self) -> list[str]:
        """Every small file of the session into OUT/session.tar.gz (<= 16 MiB; logs go first if it is over)."""
        chosen: list[tuple[Path, str]] = [(self.out / "summary.md", "summary.md"), (self.out / "summary.json", "summary.json")]
        for name in ("preflight.json", "bench.json", "release_check.json"):
            chosen.append((self.work / name, name))
        for run_dir in self.runs:
            for path in sorted(run_dir.rglob("*")):
                relative = path.relative_to(run_dir)
                if relative.parts[0] in ("checkpoints",) or path.name.endswith((".safetensors", "tokenizer.json")):
                    continue
                if relative.parts[0] == "release" and path.suffix == ".py":
                    continue  # the model code is the checkout's, which the summary names by commit
                chosen.append((path, f"runs/{run_dir.name}/{relative}"))
        logs = [(path, f"logs/{path.name}") for path in sorted(self.logs.glob("*.log"))]
        for candidate in (chosen + logs, chosen):
            files = [(path, name) for path, name in candidate
                     if path.is_file() and path.stat().st_size <= PACKED_FILE_LIMIT_BYTES]
            with tarfile.open(self.out / PACK_NAME, "w:gz") as tar:
                for path, name in files:
                    tar.add(path, arcname=f"session/{name}")
            if (self.out / PACK_NAME).stat().st_size <= PACK_LIMIT_BYTES:
                return [name for _, name in files]
        raise OSError(f"{PACK_NAME} is over {PACK_LIMIT_BYTES / MIB:.0f} MiB even without the logs")


def resolve_config_path(config: str) -> str:
    """A config path as given when it exists from here, else relative to the checkout (configs/...)."""
    return str(Path(config).resolve()) if Path(config).is_file() else str(REPO / config)


def training_plan(run_dir: Path) -> dict | None:
    """The trainer's plan record (planned steps, measured step time) from metrics.jsonl, if it wrote one."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    plans = [record for record in map(json.loads, filter(str.strip, lines)) if record.get("kind") == "plan"]
    return plans[-1] if plans else None


# The release check, run with `python -S` where dist_llama cannot be imported (see Session.isolated_env).
RELEASE_CHECK_SCRIPT = r"""
import importlib.util, json, sys
report_path, custom, stock, device, prompts, generation, tolerance = sys.argv[1:8]
prompts, generation, tolerance = json.loads(prompts), json.loads(generation), float(tolerance)
report = {"dist_llama_importable": importlib.util.find_spec("dist_llama") is not None, "device": device}

def finish(problem=None):
    report["problem"] = problem
    open(report_path, "w").write(json.dumps(report, indent=1))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)

if report["dist_llama_importable"]:
    finish("dist_llama is importable in the isolated process; the check would not prove the folder stands alone")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

model, info = AutoModelForCausalLM.from_pretrained(custom, trust_remote_code=True, output_loading_info=True)
llama, llama_info = LlamaForCausalLM.from_pretrained(stock, output_loading_info=True)
model, llama = model.to(device).eval(), llama.to(device).eval()
tokenizer = AutoTokenizer.from_pretrained(custom, trust_remote_code=True)
report.update({"class": type(model).__name__, "module": type(model).__module__, "dtype": str(model.dtype),
               "loading_info": {k: sorted(map(str, v)) for k, v in info.items() if v},
               "stock_loading_info": {k: sorted(map(str, v)) for k, v in llama_info.items() if v}})
if report["loading_info"] or report["stock_loading_info"]:
    finish(f"weights did not load cleanly: {report['loading_info'] or report['stock_loading_info']}")
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
worst, largest, report["generations"] = 0.0, 0.0, []
with torch.no_grad():
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        ours, theirs = model(**inputs).logits.float(), llama(**inputs).logits.float()
        worst = max(worst, (ours - theirs).abs().max().item())
        largest = max(largest, theirs.abs().max().item())
        greedy = model.generate(**inputs, max_new_tokens=generation["max_new_tokens"], do_sample=False, pad_token_id=pad)
        stock_greedy = llama.generate(**inputs, max_new_tokens=generation["max_new_tokens"], do_sample=False,
                                      pad_token_id=pad)
        torch.manual_seed(generation["seed"])
        sampled = model.generate(**inputs, max_new_tokens=generation["max_new_tokens"], do_sample=True,
                                 temperature=generation["temperature"], top_p=generation["top_p"], pad_token_id=pad)
        report["generations"].append({
            "prompt": prompt, "greedy": tokenizer.decode(greedy[0], skip_special_tokens=True),
            "sampled": tokenizer.decode(sampled[0], skip_special_tokens=True),
            "greedy_equals_stock_llama": torch.equal(greedy, stock_greedy)})
report.update({"max_abs_logit_diff": worst, "max_abs_logit": largest, "relative_tolerance": tolerance,
               "sampling": generation})
if worst > tolerance * max(1.0, largest):
    finish(f"logits differ from stock LlamaForCausalLM by {worst:.3g} (> {tolerance:g} x max(1, {largest:.3g}))")
finish()
"""


# --- Summary ------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _accuracy(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    acc = summary["acc"]
    text = f"{acc['value']:.4f} [{acc['ci95_low']:.4f}, {acc['ci95_high']:.4f}] (n={summary['n']})"
    if summary.get("irt"):
        text += " IRT " + ", ".join(f"{k} {v:.4f}" for k, v in summary["irt"].items())
    return text


def summary_markdown(summary: dict) -> str:
    lines = [f"# GPU session ({summary['mode']}), {summary['date']}", "",
             f"Config `{summary['config']}` {' '.join(summary['overrides'])}; deadline {summary['deadline_s']:g} s, "
             f"used {summary['elapsed_s']:g} s.", ""]
    if summary["bad_input"]:
        lines += [f"**Stopped: {summary['bad_input']}**", ""]
    lines += ["| stage | status | seconds | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['detail'].replace('|', chr(92) + '|')} |"
              for s in summary["stages"]]
    preflight = summary.get("preflight") or {}
    if preflight.get("packages"):
        gpu = preflight.get("gpu")
        device = (f"{gpu['name']} (x{gpu['count']}, compute capability {gpu['capability']}), {gpu['free_gib']:.1f} of "
                  f"{gpu['total_gib']:.1f} GiB free" if gpu else "no GPU (CPU)")
        lines += ["", "## Machine", "", f"{device}; Python {preflight['python']}; CUDA {preflight.get('cuda')}; "
                  + ", ".join(f"{k} {v}" for k, v in preflight["packages"].items())]
    if summary.get("bench"):
        bench = summary["bench"]
        lines += ["", "## Model step: ours vs transformers' Llama (`benchmarks/bench_model_step.py`)", "",
                  f"{bench['preset']} preset, {bench['batch']} x {bench['seq_len']} tokens, {bench['dtype']}, "
                  f"{bench['device']}, torch {bench['torch']}, {bench['repeats']} repeats (medians).", "",
                  "| model | s/step | tokens/s | MFU | step peak GiB |", "| --- | --- | --- | --- | --- |"]
        for name, m in bench["models"].items():
            mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
            lines.append(f"| {name} | {m['median_s_per_step']:.4f} | {m['tokens_per_s']:,.0f} | {mfu} | "
                         f"{_fmt(m.get('step_peak_gib'), 2)} |")
        lines += [""] + [f"- {key}: {value:.3f}" for key, value in bench["ratios"].items()]
    if summary.get("train"):
        train = summary["train"]
        lines += ["", f"## Training (`{summary['run']}`)", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in train.items() if key not in ("run",)]
        if summary.get("plan"):
            lines += ["", "Plan: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary["plan"].items() if k != "kind")]
    evaluation = summary.get("eval") or {}
    if evaluation.get("tinymmlu") or evaluation.get("mmlu_spread") or evaluation.get("ppl"):
        lines += ["", "## Evaluation (accuracy with its 95% Wilson interval)", "",
                  f"- tinyMMLU (100 items): {_accuracy(evaluation.get('tinymmlu'))}",
                  f"- MMLU spread over all subjects: {_accuracy(evaluation.get('mmlu_spread'))}"]
        for result in evaluation.get("ppl") or []:
            if result:
                buckets = ", ".join(f"{k}: {v:.4f}" for k, v in result["buckets"].items())
                lines.append(f"- held-out loss by position, window {result['seq_len']} ({result['label']}, "
                             f"{result['n_windows']} documents): {buckets}; all {result['loss']:.4f}")
    release = summary.get("release")
    if release and release.get("generations"):
        lines += ["", "## Release check and generations", "",
                  f"Loaded as `{release['class']}` with trust_remote_code where dist_llama is not importable; logits "
                  f"vs stock LlamaForCausalLM: max |diff| {release['max_abs_logit_diff']:.3g} (max |logit| "
                  f"{release['max_abs_logit']:.3g}). Sampling: {json.dumps(release['sampling'])}.", ""]
        for item in release["generations"]:
            lines += [f"- greedy: {json.dumps(item['greedy'], ensure_ascii=False)} (stock Llama greedy equal: "
                      f"{item['greedy_equals_stock_llama']})",
                      f"  sampled: {json.dumps(item['sampled'], ensure_ascii=False)}"]
    failed = [s for s in summary["stages"] if s["status"] != "ok"]
    if failed:
        lines += ["", "## Not done", ""] + [f"- {s['stage']}: {s['status']}: {s['detail']}" for s in failed]
    return "\n".join(lines) + "\n"


def final_table(summary: dict) -> str:
    """A few lines that fit the end of a console: each stage, then the headline numbers."""
    rows = [(s["stage"], s["status"], f"{s['seconds']:.0f}s", s["detail"]) for s in summary["stages"]]
    train = summary.get("train") or {}
    if train:
        mfu = train.get("median_mfu")
        rows.append(("result", "train", "", f"{_fmt(train.get('steps'))} steps, {_fmt(train.get('tokens_seen'))} "
                     f"tokens, val loss {_fmt(train.get('final_val_loss'))}, {_fmt(train.get('median_tokens_per_s'), 0)} "
                     f"tok/s" + (f", MFU {100 * mfu:.1f}%" if mfu else "")))
    evaluation = summary.get("eval") or {}
    for key, label in (("tinymmlu", "tinyMMLU"), ("mmlu_spread", "MMLU")):
        if evaluation.get(key):
            rows.append(("result", label, "", _accuracy(evaluation[key])))
    width = 110
    lines = [f"{'stage':<10} {'status':<8} {'time':>6}  detail"]
    for stage, status, seconds, detail in rows:
        detail = detail if len(detail) <= width else detail[:width - 3] + "..."
        lines.append(f"{stage:<10} {status:<8} {seconds:>6}  {detail}")
    lines.append(f"total {summary['elapsed_s']:.0f} s of {summary['deadline_s']:g} s; summary in "
                 f"{'summary.md' if not summary['bad_input'] else 'summary.md (stopped: ' + summary['bad_input'] + ')'}")
    return "\n".join(lines)


# --- Command line -------------------------------------------------------------------------------------


def _raise_interrupted(signum, frame):
    raise Interrupted()


def _stages_list(text: str) -> list[str]:
    stages = [s for s in text.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    return stages


def run_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_llama.gpu_session",
                                     description="Install, preflight, bench, train, release, evaluate and report "
                                                 "inside one deadline.",
                                     epilog="Any --section.key=value after the options overrides the training config.")
    parser.add_argument("--out", required=True, help="folder for the few files that must come back")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="the offline bundle (default: gpu_bundle/)")
    parser.add_argument("--work", default=None, help="working folder for runs and weights (default: a new temp folder)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help=f"seconds for everything (default {GPU.deadline_s:g}; rehearsal {REHEARSAL.deadline_s:g})")
    parser.add_argument("--rehearse", action="store_true", help="the same stages on the CPU with configs/debug.yaml")
    parser.add_argument("--config", default=None, help=f"training config (default {GPU.config}; rehearsal "
                                                       f"{REHEARSAL.config})")
    parser.add_argument("--nproc", type=int, default=1, help="training processes (GPUs); >1 launches torchrun")
    parser.add_argument("--skip", type=_stages_list, default=[], help=f"comma-separated stages to leave out: "
                                                                        f"{', '.join(STAGES)}")
    args, overrides = parser.parse_known_args(argv)
    strays = [item for item in overrides if not re.fullmatch(r"--\w+\.\w+=.*", item)]
    if strays:
        parser.exit(2, f"error: unrecognized argument {strays[0]!r}; overrides look like --section.key=value\n")
    if args.nproc < 1:
        parser.exit(2, "error: --nproc must be at least 1\n")
    mode = REHEARSAL if args.rehearse else GPU
    try:
        session = Session(mode, args, overrides)
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.exit(2, f"error: cannot create --out/--work folders: {error}\n")
    signal.signal(signal.SIGTERM, _raise_interrupted)
    return session.execute()


def bundle_main(argv: list[str]) -> int:
    shared = REPO.parent / "shared" / "data"
    parser = argparse.ArgumentParser(prog="python -m dist_llama.gpu_session bundle",
                                     description="Write the data half of the offline bundle and its manifest.")
    parser.add_argument("--out", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--train-data", nargs="+", default=[str(shared / "owt/train/*.jsonl.zst")])
    parser.add_argument("--held-out", default=str(shared / "owt/tiny.jsonl"))
    parser.add_argument("--tinymmlu", default=str(shared / "tinymmlu/tinymmlu.jsonl"))
    parser.add_argument("--mmlu", default=str(shared / "tinymmlu/mmlu_test.jsonl"))
    parser.add_argument("--mmlu-items", type=int, default=1400,
                        help="MMLU items spread over every subject (1,400 gives about +-2.6 points at 95%%)")
    parser.add_argument("--limit-mib", type=float, default=BUNDLE_LIMIT_MIB,
                        help="refuse above this many MiB for the bundle plus the checkout's files")
    parser.add_argument("--compression-level", type=int, default=19, help="zstd level of the parquet files")
    args = parser.parse_args(argv)
    try:
        manifest = build_bundle(Path(args.out), args.train_data, args.held_out, args.tinymmlu, args.mmlu,
                                args.mmlu_items, args.limit_mib, args.compression_level)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = manifest["bundle_bytes"] + manifest["checkout_bytes"]
    for name in manifest["dropped_training_shards"]:
        print(f"left out training shard {name}: the bundle would exceed {args.limit_mib:g} MiB")
    print(f"bundle {args.out}: {manifest['bundle_bytes'] / MIB:.2f} MiB ({len(manifest['wheels'])} wheels "
          f"{sum(manifest['files'][w] for w in manifest['wheels']) / MIB:.2f} MiB, {len(manifest['train'])} training "
          f"shards {sum(manifest['files'][t] for t in manifest['train']) / MIB:.2f} MiB, "
          f"{manifest['mmlu_spread_items']} MMLU items over {manifest['mmlu_spread_subjects']} subjects) + checkout "
          f"{manifest['checkout_bytes'] / MIB:.2f} MiB = {total / MIB:.2f} MiB of {args.limit_mib:g} MiB")
    return 0


def install_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_llama.gpu_session install",
                                     description="Install the bundle's wheels as the session does, then import them.")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--target", required=True)
    parser.add_argument("--modules", nargs="*", default=["lm_eval", "lm_eval.tasks", "lm_eval.api.task", "datasets",
                                                           "evaluate", "sqlitedict", "word2number", "rouge_score",
                                                           "pytablewriter", "multiprocess", "dill"],
                        help="modules that must import afterwards (those needing torch cannot be checked without it)")
    args = parser.parse_args(argv)
    bundle, target = Path(args.bundle).resolve(), Path(args.target).resolve()
    try:
        manifest = load_manifest(bundle)
        installed, present = install_wheels(bundle, manifest, target)
    except (BadInput, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"installed {len(installed)} wheels into {target}; {len(present)} already present: {', '.join(present)}")
    scratch = Path(tempfile.mkdtemp(prefix="dist_llama_install_check_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)]), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(scratch / "hf")}
    errors = import_errors(args.modules, env)
    for name, error in errors.items():
        print(f"error: {name} does not import: {error}", file=sys.stderr)
    if errors:
        return 1
    print(f"all {len(args.modules)} modules import: {', '.join(args.modules)}")
    # The evaluation's own path short of the model: lm-eval builds our task and datasets reads the items.
    unpack_bundle(bundle, manifest, scratch / "inputs")
    for name, relative in manifest["items"].items():
        items = scratch / "inputs" / relative
        result = subprocess.run([sys.executable, "-c", TASK_CHECK_SCRIPT, str(scratch / name), str(items)], env=env,
                                capture_output=True, text=True, timeout=300)
        expected = sum(1 for line in items.read_text().splitlines() if line.strip())
        found = last_line(result.stdout) if result.returncode == 0 else None
        if found != str(expected):
            print(f"error: lm-eval did not build the {name} task from {items}: "
                  f"{found or last_line(result.stderr)}", file=sys.stderr)
            return 1
        print(f"lm-eval builds the {name} task from the bundle: {expected} items")
    return 0


TASK_CHECK_SCRIPT = r"""
import sys
from pathlib import Path
from lm_eval.tasks import TaskManager, get_task_dict
from dist_llama.evaluation.tasks import write_task
name, path = write_task(Path(sys.argv[1]), Path(sys.argv[2]))
task = get_task_dict([name], TaskManager(include_path=str(path.parent), include_defaults=False))[name]
print(len(list(task.test_docs())))
"""


def preflight_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_llama.gpu_session preflight",
                                     description="Report this machine, the bundle and the resolved config as JSON.")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--inputs", default=None, help="folder with the bundle unpacked (default: unpack to a temp folder)")
    parser.add_argument("--config", default=GPU.config)
    parser.add_argument("--report", required=True, help="JSON file to write")
    parser.add_argument("--require-gpu", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    bundle = Path(args.bundle).resolve()
    inputs = Path(args.inputs) if args.inputs else Path(tempfile.mkdtemp(prefix="dist_llama_inputs_"))
    if args.inputs is None and (manifest := read_json(bundle / MANIFEST)) is not None:
        unpack_bundle(bundle, manifest, inputs)
    report, problems = preflight_report(bundle, inputs, resolve_config_path(args.config), overrides, args.require_gpu)
    report["problems"] = problems
    Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bundle": bundle_main, "install": install_main, "preflight": preflight_main, "run": run_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
