"""Shared pytest fixtures: tiny prepared run directories (see tests/fixtures.py) and a single-thread switch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import make_prepared_run, write_modality

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2``) each worker runs single-threaded, and so do the
    interpreters its tests start: two workers then fill two cores, where each worker's own intra-op threads
    would contend for them (OpenMP's barriers made one tiny-model test 20x slower that way)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """A run directory with ``prepare/`` (60 users, 40 items, 16-d text) and ``fit-collab/`` (8-d collab)."""
    run = make_prepared_run(tmp_path / "run")
    write_modality(run, "fit-collab", "collab", np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32))
    return run


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's barriers make
    them 10-100x slower; the tests that use this run single-threaded and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
