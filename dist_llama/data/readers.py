"""Reading documents from files: one reader per format (.jsonl, .jsonl.zst, .parquet, .txt), each giving the
documents of one file by record number, and the globs that name those files."""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

FORMATS = (".jsonl.zst", ".jsonl", ".parquet", ".txt")


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Expand globs (relative to the working directory, `**` allowed) into a sorted list of unique files."""
    files = set()
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = glob.glob(pattern, recursive=True) or ([pattern] if os.path.isfile(pattern) else [])
        files.update(match for match in matches if os.path.isfile(match))
    paths = [Path(f) for f in sorted(files)]
    for path in paths:
        _format_of(path)
    return paths


def _format_of(path: Path) -> str:
    for suffix in FORMATS:
        if path.name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unsupported file type; data files must end in one of {', '.join(FORMATS)}")


def as_text(value, where: str) -> str:
    if value is None:
        return ""  # a null text is an empty document: it still contributes its bos/eos
    if not isinstance(value, str):
        raise ValueError(f"{where}: the text field holds a {type(value).__name__}, not a string")
    return value


class Records:
    """Documents by record number: `text(i)` reads one, `texts(records)` several in one call."""

    def texts(self, records: list[int]) -> list[str]:
        return [self.text(i) for i in records]


class _JsonLines(Records):
    """One .jsonl/.jsonl.zst file held as raw lines; a line is parsed only when its text is asked for."""

    def __init__(self, path: Path, text_field: str):
        if path.name.endswith(".zst"):
            import zstandard

            with open(path, "rb") as fh:
                raw = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()
        else:
            raw = path.read_bytes()
        # Splitting on b"\n" alone is safe for JSON lines: a newline inside a string is always escaped.
        self.lines = [line for line in raw.split(b"\n") if line.strip()]
        self.path = path
        self.text_field = text_field

    def __len__(self) -> int:
        return len(self.lines)

    def text(self, i: int) -> str:
        where = f"{self.path}, record {i}"
        try:
            record = json.loads(self.lines[i])
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON: {error}") from None
        if not isinstance(record, dict) or self.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where} has no field {self.text_field!r} (data.text_field); it has {keys}")
        return as_text(record[self.text_field], where)


class _Parquet(Records):
    def __init__(self, path: Path, text_field: str):
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if text_field not in names:
            raise ValueError(
                f"{path} has no column {text_field!r} (data.text_field); its columns are {names}"
            )
        self.column = pq.read_table(path, columns=[text_field]).column(text_field)
        self.path = path

    def __len__(self) -> int:
        return len(self.column)

    def text(self, i: int) -> str:
        return as_text(self.column[i].as_py(), f"{self.path}, row {i}")


class _TextFile(Records):
    def __init__(self, path: Path, text_field: str):
        self.document = path.read_text(encoding="utf-8")

    def __len__(self) -> int:
        return 1

    def text(self, i: int) -> str:
        return self.document


_READERS = {".jsonl.zst": _JsonLines, ".jsonl": _JsonLines, ".parquet": _Parquet, ".txt": _TextFile}


def open_file(path: Path, text_field: str):
    return _READERS[_format_of(path)](path, text_field)


def iter_documents(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """The documents of files or globs (any supported format), in sorted file order then record order."""
    for path in expand_paths([str(p) for p in paths]):
        docs = open_file(path, text_field)
        for i in range(len(docs)):
            yield docs.text(i)


def read_documents(
    paths: Iterable[str | Path], text_field: str = "text", limit: int | None = None
) -> list[str]:
    """The first `limit` (default: all) documents of `paths`; raises FileNotFoundError when nothing
    matches."""
    paths = list(paths)
    if not expand_paths([str(p) for p in paths]):
        raise FileNotFoundError(f"no data files match {paths}")
    return list(itertools.islice(iter_documents(paths, text_field), limit))
