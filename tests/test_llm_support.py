"""Helpers for the LLM recommender tests (no tests here): an ``assign-sids`` folder built directly, a
small model on the tiny backbone, and a single-thread fixture.

The SIDs come from a residual quantization of each modality's embeddings with codebooks drawn from the
data, so similar items share codes, as real SIDs do, at a fraction of ``fit-quantizer``'s cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from mmrec.artifacts import Manifest, stage_output, write_table
from mmrec.artifacts.schemas import SIDS
from mmrec.data.prepared import load_modality
from mmrec.models.llm.backbone import BackboneSpec
from mmrec.models.llm.prompt import PromptSpec
from mmrec.models.llm.recommender import LLMRecommender


def write_sids(
    run_dir: Path, modalities: Sequence[str] = ("collab", "text"), levels: int = 2, codebook_size: int = 6,
    dim: int = 8, seed: int = 0, suffix: bool = False,
) -> Path:
    """Publish ``<run_dir>/assign-sids`` (sids.parquet + codebooks.safetensors + manifest, prepare's lineage).

    ``suffix`` appends a disambiguation level (0, 1, ... among items sharing codes), as ``assign-sids``'
    ``collisions: suffix`` does, so that every SID is unique.
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"item_idx": [], "modality": [], "codes": [], "sid": []}
    books: dict[str, torch.Tensor] = {}
    for name in modalities:
        table = load_modality(run_dir, name)
        items = np.flatnonzero(table.present)
        residual = table.matrix[items] @ rng.normal(size=(table.dim, dim)) / np.sqrt(table.dim)
        codes = np.zeros((len(items), levels), dtype=np.int64)
        for level in range(levels):
            book = residual[rng.choice(len(items), codebook_size, replace=False)]
            codes[:, level] = ((residual[:, None, :] - book[None]) ** 2).sum(-1).argmin(1)
            residual = residual - book[codes[:, level]]
            books[f"{name}.{level}"] = torch.tensor(book, dtype=torch.float32)
        if suffix:
            counts: dict[tuple[int, ...], int] = {}
            extra = []
            for code in map(tuple, codes):
                extra.append(counts.get(code, 0))
                counts[code] = extra[-1] + 1
            codes = np.concatenate([codes, np.asarray(extra, dtype=np.int64)[:, None]], axis=1)
        for item, code in zip(items, codes):
            rows["item_idx"].append(int(item))
            rows["modality"].append(name)
            rows["codes"].append([int(c) for c in code])
            rows["sid"].append("".join(f"<{chr(97 + level)}_{c}>" for level, c in enumerate(code)))
    prepared = Manifest.read(run_dir / "prepare")
    manifest = Manifest(stage="assign-sids", config={"source": "tests.test_llm_support"}, lineage=dict(prepared.lineage))
    with stage_output(run_dir, "assign-sids", manifest) as out:
        write_table(pa.table(rows), out / "sids.parquet", SIDS)
        save_file(books, str(out / "codebooks.safetensors"))
        manifest.add_output("sids", out / "sids.parquet", rows=len(rows["item_idx"]))
        manifest.add_output("codebooks", out / "codebooks.safetensors")
    return run_dir / "assign-sids"


@pytest.fixture(autouse=False)
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's barriers make
    them 10-100x slower; the tests that use this run single-threaded and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHORT_PROMPT = PromptSpec(system=None, instruction="History:", question="Next?")
"""A short prompt keeps the byte-level tiny tokenizer's sequences short (fast tests)."""


def tiny_model(run_dir: Path, **overrides: Any) -> LLMRecommender:
    """A small LLMRecommender on the tiny backbone (seeded: the heads' random init is reproducible)."""
    options: dict[str, Any] = {
        "num_items": 40, "run_dir": str(run_dir), "max_len": 8, "backbone": BackboneSpec(), "prompt": SHORT_PROMPT,
        "proj_dim": 16, "encoder_hidden": 32,
    }
    options.update(overrides)
    torch.manual_seed(options.pop("seed", 0))
    return LLMRecommender(**options)
