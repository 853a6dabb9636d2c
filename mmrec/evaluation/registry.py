"""Model names that ``mmrec test --model`` accepts, each mapped to the loader that rebuilds it.

Loaders are import strings, resolved only for the model asked for, so evaluating popularity never imports
the LLM stack. Adding a model is one line here: ``"name": "package.module:loader"``, where ``loader`` has
the signature :data:`mmrec.evaluation.protocol.Loader`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from mmrec.errors import InputError
from mmrec.evaluation.protocol import AnyRecommender, Recommender, TopKRecommender

MODELS: dict[str, str] = {
    "popularity": "mmrec.evaluation.loaders:load_popularity",
    "sasrec": "mmrec.evaluation.loaders:load_sasrec",
    "fusion": "mmrec.evaluation.llm_loaders:load_fusion",
    "generative": "mmrec.evaluation.llm_loaders:load_generative",
}


def load_recommender(name: str, run_dir: str | Path, checkpoint: str | None, device: torch.device) -> AnyRecommender:
    """Build the trained model ``name`` of ``run_dir`` and check that it can be evaluated."""
    if name not in MODELS:
        raise InputError(f"unknown model '{name}'; expected one of {', '.join(sorted(MODELS))}")
    module_name, _, attribute = MODELS[name].partition(":")
    loader = getattr(importlib.import_module(module_name), attribute)
    model = loader(Path(run_dir), checkpoint, device)
    if not isinstance(model, (Recommender, TopKRecommender)):
        raise TypeError(f"{MODELS[name]} returned {type(model).__name__}, which has neither score_batch nor topk_batch")
    return model
