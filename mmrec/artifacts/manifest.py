"""``manifest.json``: what a stage produced, from what, and how.

Every stage folder holds one. A later stage records the hashes of the files it read (``inputs``) and
carries forward the ``lineage`` of its predecessors, so two artifacts can be checked for a common origin
(for example: collaborative embeddings and text embeddings must come from the same items table).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmrec import __version__
from mmrec.artifacts.schemas import SCHEMA_VERSION
from mmrec.errors import InputError, LineageError

MANIFEST = "manifest.json"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: str | Path) -> str:
    """Content hash of a file, or of a folder (its files' relative paths and hashes, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


@dataclass
class Manifest:
    """The record a stage leaves beside its outputs."""

    stage: str
    config: dict[str, Any]
    seed: int | None = None
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    mmrec_version: str = __version__
    python: str = field(default_factory=platform.python_version)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def add_input(self, name: str, path: str | Path, manifest: Manifest | None = None) -> None:
        """Record an input file by content hash, and inherit the lineage of the stage that wrote it."""
        path = Path(path)
        self.inputs[name] = {"path": str(path.resolve()), "sha256": file_sha256(path)}
        if manifest is not None:
            for key, value in manifest.lineage.items():
                self.lineage.setdefault(key, value)

    def add_output(self, name: str, path: str | Path, rows: int | None = None) -> None:
        """Record an output file or folder (in the stage folder) by content hash."""
        path = Path(path)
        self.outputs[name] = {"file": path.name, "sha256": path_sha256(path), "rows": rows}

    def write(self, folder: str | Path) -> Path:
        target = Path(folder) / MANIFEST
        target.write_text(json.dumps(asdict(self), indent=2, sort_keys=True, default=str) + "\n")
        return target

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise InputError(f"{path}: no manifest; run the stage that produces {Path(folder).name}/ first")
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (ValueError, TypeError, RecursionError, OSError) as exc:
            raise InputError(f"{path}: not a valid mmrec manifest ({exc})") from None
        problem = manifest._malformed()
        if problem:
            raise InputError(f"{path}: not a valid mmrec manifest ({problem})")
        if manifest.schema_version != SCHEMA_VERSION:
            raise InputError(
                f"{path}: written with schema version {manifest.schema_version}, this mmrec reads "
                f"{SCHEMA_VERSION}; re-run stage '{manifest.stage}'"
            )
        return manifest

    def _malformed(self) -> str | None:
        """What is wrong with the types of a manifest read from disk, or None; JSON alone does not check them,
        and an output's ``file`` must be a plain name so that it cannot point outside its folder."""
        expected = {"stage": str, "config": dict, "inputs": dict, "outputs": dict, "lineage": dict, "extra": dict}
        for name, kind in expected.items():
            if not isinstance(getattr(self, name), kind):
                return f"'{name}' must be a {kind.__name__}"
        if not isinstance(self.schema_version, int) or not (self.seed is None or isinstance(self.seed, int)):
            return "'schema_version' and 'seed' must be integers"
        if not all(isinstance(value, str) for value in self.lineage.values()):
            return "'lineage' values must be strings"
        for name, entry in self.outputs.items():
            file = entry.get("file") if isinstance(entry, dict) else None
            if not (isinstance(file, str) and file not in ("", ".", "..") and Path(file).name == file):
                return f"output '{name}' must name a file in the stage folder"
            if not isinstance(entry.get("sha256"), str):
                return f"output '{name}' has no sha256"
        return None

    def verify_output(self, folder: str | Path, name: str) -> Path:
        """Return the path of output ``name`` after checking that its bytes are the ones recorded."""
        folder = Path(folder)
        if name not in self.outputs:
            raise InputError(f"{folder / MANIFEST}: stage '{self.stage}' recorded no output '{name}'")
        path = folder / self.outputs[name]["file"]
        if not path.exists():
            raise InputError(f"{path}: listed in {folder / MANIFEST} but missing")
        if path_sha256(path) != self.outputs[name]["sha256"]:
            raise LineageError(f"{path}: content differs from the hash in {folder / MANIFEST}; re-run '{self.stage}'")
        return path


def require_same_lineage(a: Manifest, a_path: str | Path, b: Manifest, b_path: str | Path, key: str) -> None:
    """Fail unless two artifacts descend from the same ``key`` input (e.g. the same items table)."""
    left, right = a.lineage.get(key), b.lineage.get(key)
    if left is None or right is None or left != right:
        raise LineageError(
            f"{a_path} and {b_path} come from different '{key}' inputs "
            f"({(left or 'unknown')[:12]} vs {(right or 'unknown')[:12]}); re-run the later stage on the same data"
        )
