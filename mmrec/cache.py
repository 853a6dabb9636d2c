"""Where mmrec keeps what it can recompute but should not (text embeddings, converted GGUF backbones, refined
texts), and what identifies a model in those caches' keys.

One folder for every cache, so that one variable moves or clears them all: an explicit option where a stage
has one, else ``$MMREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmrec``, else ``~/.cache/mmrec``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_ENV = "MMREC_CACHE_DIR"


def cache_root(option: str | None = None) -> Path:
    """The cache folder: ``option`` when given, else the environment's (see the module docstring)."""
    if option:
        return Path(option).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmrec"


def model_fingerprint(model: str) -> str:
    """The model's identity for the cache key: its files' contents for a local folder, else its name."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return f"name:{model}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return f"files:{digest.hexdigest()}"
