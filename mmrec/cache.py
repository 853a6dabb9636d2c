"""Where mmrec keeps what it can recompute but should not: text embeddings, converted GGUF backbones.

One folder for every cache, so that one variable moves or clears them all: an explicit option where a stage
has one, else ``$MMREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmrec``, else ``~/.cache/mmrec``.
"""

from __future__ import annotations

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
