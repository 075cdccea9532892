"""llama.cpp for checking a release as its users run it: pinned sources, built once and cached.

The sources are llama.cpp as the llama-cpp-python sdist vendors it (PyPI is reachable where GitHub may not
be), pinned by version and sha256. `build` extracts them and compiles llama-perplexity and llama-tokenize
only: CPU, no CUDA, no network code (LLAMA_OPENSSL off), static, GGML_NATIVE off so that a cache on a shared
home folder runs on any x86-64 machine. The converter, convert_hf_to_gguf.py, is Python and needs no build:
it runs in this environment (torch, transformers, sentencepiece) with the gguf package from the sources'
gguf-py.

    python tools/llama_cpp.py build [--jobs 2] [--sdist FILE]   # prints the cache folder
    python tools/llama_cpp.py convert RELEASE OUT.gguf [--outtype f32|f16|bf16|q8_0]   # needs no build
    python tools/llama_cpp.py perplexity MODEL.gguf TEXT [--ctx 128]

The cache is $DIST_LLAMA_CACHE/llama.cpp-<version> (default ~/.cache/dist_llama), outside any checkout:
src/ and sources.json (the sources and the llama.cpp commit the sdist records), bin/ (the two tools) and
build.json (the commit, the flags, the build's seconds). Each record is written last: a folder without it is
fetched or built again. A lock file makes concurrent runs wait for the first. tests/test_clients.py uses
it; its first run builds (8 min of CPU time: about 5 min on 2 idle cores).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; dist_llama.cards.TESTED_LLAMA_CPP names the same
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TOOLS = ("llama-perplexity", "llama-tokenize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CUDA=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)
PERPLEXITY_LINE = re.compile(r"Final estimate: PPL = ([0-9.]+)")


class LlamaCppError(RuntimeError):
    """A build or a run of a llama.cpp tool that failed."""


class LlamaCppUnavailable(LlamaCppError):
    """No build, and none can be made here: no compiler or cmake, or no way to the sources."""


def cache_dir() -> Path:
    root = os.environ.get("DIST_LLAMA_CACHE") or Path.home() / ".cache" / "dist_llama"
    return Path(root) / f"llama.cpp-{VERSION}"


def missing_build_tools() -> list[str]:
    """The programs a build needs that are not on PATH (Debian: apt-get install cmake g++)."""
    return [tool for tool in ("cmake", "make", "cc", "c++") if shutil.which(tool) is None]


def built() -> dict | None:
    """build.json of a complete build in the cache, or None."""
    record = cache_dir() / "build.json"
    return json.loads(record.read_text()) if record.is_file() else None


@contextlib.contextmanager
def _cache_lock():
    """Held while the cache is written: another process fetching or building the same version waits."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder


def sources(sdist: str | Path | None = None) -> Path:
    """The pinned sources' folder in the cache, downloaded and extracted first where missing (no build:
    enough for the converter)."""
    with _cache_lock():
        return _fetch_sources(sdist)


def _fetch_sources(sdist: str | Path | None) -> Path:
    folder = cache_dir()
    if not (folder / "sources.json").is_file():
        commit = _extract_sources(Path(sdist) if sdist else _download_sdist(folder), folder / "src")
        shutil.rmtree(folder / "download", ignore_errors=True)  # the sdist: 77 MB, all but src/ unused
        (folder / "sources.json").write_text(json.dumps({"llama-cpp-python": VERSION, "commit": commit}))
    return folder / "src"


def build(jobs: int = 2, sdist: str | Path | None = None) -> dict:
    """The cached build, made first where there is none; returns build.json's record."""
    with _cache_lock() as folder:
        if (record := built()) is not None:
            return record
        if missing := missing_build_tools():
            raise LlamaCppUnavailable(
                f"building llama.cpp needs {', '.join(missing)} (apt-get install cmake g++)"
            )
        _fetch_sources(sdist)
        seconds = _compile(folder, jobs)
        record = {
            **json.loads((folder / "sources.json").read_text()),
            "cmake_flags": list(CMAKE_FLAGS),
            "tools": list(TOOLS),
            "jobs": jobs,
            "build_seconds": round(seconds, 1),
        }
        (folder / "build.json").write_text(json.dumps(record, indent=1) + "\n")
        return record


def _download_sdist(folder: Path) -> Path:
    download = folder / "download"
    shutil.rmtree(download, ignore_errors=True)
    requirement = download / "requirement.txt"
    download.mkdir()
    requirement.write_text(f"llama-cpp-python=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--require-hashes", "-r", str(requirement), "-d", str(download), "-q"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LlamaCppUnavailable(
            f"pip could not download llama-cpp-python {VERSION}: {result.stderr.strip()[-2000:]}"
        )
    return download / f"llama_cpp_python-{VERSION}.tar.gz"


def _extract_sources(sdist: Path, src: Path) -> str:
    """vendor/llama.cpp of the sdist into src; returns the llama.cpp commit the sdist records."""
    if hashlib.sha256(sdist.read_bytes()).hexdigest() != SDIST_SHA256:
        raise LlamaCppError(f"{sdist} is not llama-cpp-python {VERSION}'s sdist (sha256 differs)")
    top = f"llama_cpp_python-{VERSION}"
    vendored = f"{top}/vendor/llama.cpp/"
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(sdist) as archive, tempfile.TemporaryDirectory(dir=src.parent) as scratch:
        members = [m for m in archive.getmembers() if m.name.startswith(vendored)]
        archive.extractall(scratch, members=members, filter="data")
        Path(scratch, vendored).rename(src)
        head = archive.extractfile(f"{top}/.git/modules/vendor/llama.cpp/HEAD")
        return head.read().decode().strip()


def _compile(folder: Path, jobs: int) -> float:
    work = folder / "build"
    shutil.rmtree(work, ignore_errors=True)
    start = time.monotonic()
    log = folder / "build.log"
    with open(log, "w") as out:
        for command in (
            ["cmake", "-S", str(folder / "src"), "-B", str(work), *CMAKE_FLAGS],
            ["cmake", "--build", str(work), "--target", *TOOLS, f"-j{jobs}"],
        ):
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise LlamaCppError(f"`{' '.join(command)}` failed; its output is in {log}")
    (folder / "bin").mkdir(exist_ok=True)
    for tool in TOOLS:
        shutil.copy2(work / "bin" / tool, folder / "bin" / tool)
    shutil.rmtree(work)  # objects and static libraries: ~100 MB the tools no longer need
    return time.monotonic() - start


def _run(command: list, what: str, timeout: float = 1200) -> str:
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise LlamaCppError(f"{what} failed (exit {result.returncode}): {result.stderr[-3000:]}")
    return result.stdout + result.stderr


def convert(release: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """llama.cpp's own convert_hf_to_gguf.py on a release folder; the GGUF file written."""
    return run_converter(release, out, "--outtype", outtype)


def run_converter(release: str | Path, out: str | Path, *options: str) -> Path:
    script = sources() / "convert_hf_to_gguf.py"
    _run([sys.executable, script, release, *options, "--outfile", out], f"convert_hf_to_gguf.py {release}")
    return Path(out)


def tokenize(model: str | Path, text_file: str | Path) -> list[int]:
    """llama-tokenize's ids for the file's text, bos first when the GGUF vocabulary asks for it."""
    command = [cache_dir() / "bin" / "llama-tokenize", "-m", model, "-f", text_file]
    output = _run([*command, "--ids", "--no-escape", "--log-disable"], "llama-tokenize")
    return json.loads(output[output.index("[") : output.rindex("]") + 1])


def perplexity(model: str | Path, text_file: str | Path, ctx: int = 128, threads: int = 1) -> float:
    """llama-perplexity's final estimate: the text's tokens (bos first) cut into ctx-token chunks, each
    chunk's first token replaced by bos, the second half of each chunk scored. The text file must not end
    in a newline (llama.cpp's -f drops one)."""
    command = [cache_dir() / "bin" / "llama-perplexity", "-m", model, "-f", text_file, "-c", ctx, "-b", ctx]
    command += ["--threads", threads, "--no-escape", "--no-warmup"]
    # llama.cpp logs from a thread that the process does not wait for at exit (common/log.cpp says so at
    # common_log_main): on a loaded machine the last lines, the estimate among them, were seen lost.
    for _ in range(3):
        output = _run(command, "llama-perplexity")
        if found := PERPLEXITY_LINE.search(output):
            return float(found.group(1))
    raise LlamaCppError(f"llama-perplexity printed no final estimate in 3 runs: {output[-2000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="download, extract and compile, unless cached")
    build_parser.add_argument("--jobs", type=int, default=2)
    build_parser.add_argument(
        "--sdist", default=None, help="a local llama-cpp-python sdist (its sha256 is checked)"
    )
    convert_parser = commands.add_parser("convert", help="a release folder -> a GGUF file")
    convert_parser.add_argument("release")
    convert_parser.add_argument("out")
    convert_parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    perplexity_parser = commands.add_parser("perplexity", help="llama-perplexity's estimate on a text file")
    perplexity_parser.add_argument("model")
    perplexity_parser.add_argument("text")
    perplexity_parser.add_argument("--ctx", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            record = build(args.jobs, args.sdist)
            print(f"{cache_dir()} (llama.cpp {record['commit'][:7]}, built in {record['build_seconds']} s)")
        elif args.command == "convert":
            print(convert(args.release, args.out, args.outtype))
        else:
            print(perplexity(args.model, args.text, args.ctx))
    except LlamaCppError as error:
        sys.exit(f"llama_cpp: error: {error}")


if __name__ == "__main__":
    main()
