"""Helpers for the LLM recommender tests: an ``assign-sids`` folder built directly, the catalog tensors of a
run, small models of both heads on the tiny backbone, and a reference NDCG to check ``mmrec test`` against (the ``single_thread`` fixture is in conftest.py).

The SIDs come from a residual quantization of each modality's embeddings with codebooks drawn from the
data, so similar items share codes, as real SIDs do, at a fraction of ``fit-quantizer``'s cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import save_file

from mmrec.artifacts import Manifest, stage_output, write_table
from mmrec.artifacts.schemas import SIDS
from mmrec.data.prepared import PreparedData, load_modality
from mmrec.data.recommender_inputs import RecommenderInputs, load_recommender_inputs
from mmrec.evaluation.registry import load_recommender
from mmrec.models.llm.backbone import Backbone, BackboneSpec, load_backbone
from mmrec.models.llm.base import LLMRecommenderBase
from mmrec.models.llm.generative import GenerativeRecommender
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
    manifest = Manifest(stage="assign-sids", config={"source": "tests.llm_helpers"}, lineage=dict(prepared.lineage))
    with stage_output(run_dir, "assign-sids", manifest) as out:
        write_table(pa.table(rows), out / "sids.parquet", SIDS)
        save_file(books, str(out / "codebooks.safetensors"))
        manifest.add_output("sids", out / "sids.parquet", rows=len(rows["item_idx"]))
        manifest.add_output("codebooks", out / "codebooks.safetensors")
    return run_dir / "assign-sids"


SHORT_PROMPT = PromptSpec(system=None, instruction="History:", question="Next?")
"""A short prompt keeps the byte-level tiny tokenizer's sequences short (fast tests)."""


def run_inputs(run_dir: Path, head: type[LLMRecommenderBase], **hparams: Any) -> RecommenderInputs:
    """The catalog tensors of ``run_dir`` that ``head`` with ``hparams`` reads, as ``fit-recommender`` loads them."""
    return load_recommender_inputs(PreparedData(run_dir), head.input_needs(hparams))[0]


def loaded(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with its ``backbone`` (a spec, default ``tiny``) loaded, as the models take it."""
    backbone = options.get("backbone", BackboneSpec())
    return {**options, "backbone": backbone if isinstance(backbone, Backbone) and backbone.model is not None else load_backbone(backbone)}


def tiny_model(run_dir: Path, **overrides: Any) -> LLMRecommender:
    """A small LLMRecommender on the tiny backbone (seeded: the heads' random init is reproducible);
    ``backbone`` may be a spec, which is loaded."""
    options: dict[str, Any] = {
        "max_len": 8, "backbone": BackboneSpec(), "prompt": SHORT_PROMPT, "proj_dim": 16, "encoder_hidden": 32,
    }
    options.update(overrides)
    torch.manual_seed(options.pop("seed", 0))
    return LLMRecommender(run_inputs(run_dir, LLMRecommender, **options), **loaded(options))


def tiny_generative(run_dir: Path, **overrides: Any) -> GenerativeRecommender:
    """A GenerativeRecommender on the tiny backbone with a short prompt (seeded)."""
    options: dict[str, Any] = {"max_len": 8, "prompt": SHORT_PROMPT}
    options.update(overrides)
    torch.manual_seed(0)
    return GenerativeRecommender(run_inputs(run_dir, GenerativeRecommender, **options), **loaded(options))


def reference_ndcg(run_dir: Path, name: str, k: int = 10) -> float:
    """NDCG@k on the test split computed apart from ``mmrec test``'s evaluator: the registry's model, one
    user at a time, ranks by hand (ties pessimistic: a target ranks after every item scored as high)."""
    model = load_recommender(name, run_dir, None, torch.device("cpu"))
    histories, targets = PreparedData(run_dir).histories("test")
    total = 0.0
    for history, target in zip(histories, targets.tolist()):
        batch = {"user_idx": torch.zeros(1, dtype=torch.long), "history": torch.from_numpy(history)[None],
                 "mask": torch.ones(1, len(history), dtype=torch.bool), "target": torch.tensor([target])}
        if hasattr(model, "score_batch"):
            scores = model.score_batch(batch)[0].float()
            rank = int((scores >= scores[target]).sum())
        else:
            items = model.topk_batch(batch, k)[0][0].tolist()
            rank = items.index(target) + 1 if target in items else k + 1
        total += 1 / np.log2(rank + 1) if rank <= k else 0.0
    return total / len(targets)
