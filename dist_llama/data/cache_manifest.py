"""The token cache's manifest: what a cache was made from, and whether that is what a config asks for.

manifest.json records the format version, the source (its identity as the data state records it; for local
files also each file's name, bytes, modification time, blake2b and documents; for a Hub dataset the requested
revision besides the resolved one and the fingerprint), the text field, the tokenizer's identity (a hash of
what decides the ids, with bos and eos), the held-out rule, and the shards (cache_build.py writes it).
ExpectedCache compares a manifest with a config, and a cache that disagrees on any of them is refused in one
line naming each difference (refusal).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dist_llama.config import ConfigError, DataConfig
from dist_llama.data.encoding import DocumentEncoder
from dist_llama.data.heldout import held_out_files
from dist_llama.data.sources import LocalSource, local_files

CACHE_FORMAT = 1
MANIFEST = "manifest.json"


def file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _held_out_rule(config: DataConfig) -> int:
    """The per-mille the training stream holds out by hash, as PackedBatches applies it
    (0 with data.val_paths)."""
    return 0 if held_out_files(config) else config.val_per_mille


class ExpectedCache:
    """What a cache for this config must record; for local files, reading no more than their sizes."""

    def __init__(self, config: DataConfig, encoder: DocumentEncoder):
        self.config = config
        self.files = local_files(config, "token cache")
        self.tokenizer = encoder.identity()
        self.held_out_per_mille = _held_out_rule(config)
        self.identity = None if self.files is None else LocalSource(self.files, config.text_field).identity

    def differences(self, manifest: dict) -> list[str]:
        """Each way in which `manifest` does not describe this config's tokens (empty: it does)."""
        if manifest.get("format") != CACHE_FORMAT:
            return [f"format version {manifest.get('format')} (this code reads {CACHE_FORMAT})"]
        found = []
        found += [
            f"tokenizer {key} {manifest['tokenizer'].get(key)!r} -> {value!r} (data.tokenizer)"
            for key, value in self.tokenizer.items()
            if manifest["tokenizer"].get(key) != value
        ]
        if manifest["held_out_per_mille"] != self.held_out_per_mille:
            found.append(
                f"held-out rule {manifest['held_out_per_mille']} -> {self.held_out_per_mille} per mille "
                "(data.val_per_mille, 0 with data.val_paths)"
            )
        source, config = manifest["source"], self.config
        if source["text_field"] != config.text_field:
            found.append(f"text field {source['text_field']!r} -> {config.text_field!r} (data.text_field)")
        if self.files is None:
            wanted = {"kind": "hub", "dataset": config.hub_dataset, "split": config.hub_split}
            found += [
                f"{key} {source.get(key)!r} -> {value!r}"
                for key, value in wanted.items()
                if source.get(key) != value
            ]
            if config.hub_revision is not None and manifest.get("hub_revision") != config.hub_revision:
                found.append(
                    f"hub revision {manifest.get('hub_revision')!r} -> {config.hub_revision!r} "
                    "(data.hub_revision)"
                )
        elif source.get("kind") != "local":
            found.append(f"kind {source.get('kind')!r} -> 'local' (data.source / data.paths)")
        else:
            cached = [(f["name"], f["bytes"]) for f in manifest["files"]]
            live = [(path.name, path.stat().st_size) for path in self.files]
            if cached != live:
                gone, new = sorted(set(cached) - set(live)), sorted(set(live) - set(cached))
                found.append(
                    f"files (name, bytes): {len(cached)} -> {len(live)}, only in the cache {gone[:3]}, "
                    f"only in data.paths {new[:3]}"
                )
            else:
                for entry, path in zip(manifest["files"], self.files):
                    # The same name, size and modification time are taken as the same file;
                    # else its bytes decide.
                    if path.stat().st_mtime_ns != entry["mtime_ns"] and file_hash(path) != entry["blake2b"]:
                        found.append(
                            f"the content of {path.name} (blake2b {entry['blake2b']} -> {file_hash(path)})"
                        )
        return found


def read_manifest(folder: Path) -> dict | None:
    """The manifest of the cache in `folder`; None when there is none (no folder, or a build not finished)."""
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def refusal(folder: Path, differences: list[str]) -> ConfigError:
    """The one-line error for a cache that does not match the config, naming each difference."""
    return ConfigError(
        f"the token cache {folder} does not match this config ({'; '.join(differences)}): "
        "point data.token_cache at another folder, "
        "or rebuild it with python -m dist_llama.data.prepare --force"
    )
