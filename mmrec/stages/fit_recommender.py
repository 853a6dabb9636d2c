"""``mmrec fit-recommender``: fine-tune the LLM recommender (LoRA + a head) and export it.

Wiring only. The head is the model class (``model.class_path``): the default,
:class:`mmrec.models.llm.recommender.LLMRecommender`, is MME-SID's fusion head; ``--model
GenerativeRecommender`` (:class:`mmrec.models.llm.generative.GenerativeRecommender`) is the generative SID
head. The data is ``SequenceDataModule`` in ``prefix`` mode (every prefix of a user's training sequence is
one sample). The stage loads the backbone that ``model.backbone`` names while it instantiates the model, in
every process of a multi-GPU run (a ``.json`` shape is created on that process's GPU), and hands it to the
model loaded. Checkpoints hold the trained tensors only (LoRA, new token rows, mmrec's heads; the frozen
backbone is rebuilt from its source) and live in ``<run_dir>/<export folder>.work/checkpoints`` (one folder
per head, so training one head never clears or resumes the other's), with ``last.ckpt`` for ``--resume true``. The checkpoint with the best validation NDCG@10 is exported,
atomically, to ``<run_dir>/fit-recommender/``: ``adapter/`` (peft), ``heads.safetensors``,
``recommender.json``, and a manifest with the inputs, the best validation metrics, training time, tokens/s
and peak GPU memory. With ``model.distill_weight > 0`` the data module also loads ``fit-collab``'s SASRec as
the teacher (recorded as input ``teacher``); it is used in training steps only, never exported.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from mmrec.artifacts import Manifest
from mmrec.artifacts.exports import save_llm_export
from mmrec.callbacks.throughput import TrainingThroughput
from mmrec.data.datamodules import SequenceDataModule
from mmrec.data.recommender_inputs import RecommenderInputs
from mmrec.models.llm.backbone import Backbone, BackboneSpec, load_backbone
from mmrec.models.llm.base import MONITOR, STAGE, LLMRecommenderBase
from mmrec.models.llm.generative import GenerativeRecommender  # noqa: F401 (imported: --model GenerativeRecommender resolves)
from mmrec.models.llm.recommender import LLMRecommender
from mmrec.stages.fsdp import FSDPStrategy
from mmrec.stages.lightning_cli import FitResult, StageCLI, TrainingStageCLI, class_path

DEFAULT_HEAD = class_path(LLMRecommender)


def instantiate_backbone(cls: type[Backbone], *args: object, **spec: object) -> Backbone:
    """jsonargparse's instantiator of ``model.backbone``: the backbone its spec fields name, loaded."""
    return load_backbone(BackboneSpec(*args, **spec))


class FitRecommenderCLI(TrainingStageCLI):
    """TrainingStageCLI plus the links the recommender needs and a training-throughput meter.

    The LLM heads also train under FSDP (``configs/strategies/fit-recommender-fsdp.yaml``,
    :class:`mmrec.stages.fsdp.FSDPStrategy`): the best checkpoint is loaded by the strategy and the export is
    written from its full state dict. Lightning's own ``FSDPStrategy`` (``--trainer.strategy fsdp``) is
    refused: it cannot validate after ``fit`` (see :mod:`mmrec.stages.fsdp`).
    """

    strategies = StageCLI.strategies + (FSDPStrategy,)
    monitor = MONITOR
    checkpoint_filename = "best-{epoch}-{step}"

    def __init__(self, args: list[str]) -> None:
        self.meter = TrainingThroughput()
        super().__init__(
            STAGE, LLMRecommenderBase, SequenceDataModule, args, description=__doc__.splitlines()[0],
            trainer_defaults={"callbacks": [self.meter]}, subclass_mode_model=True,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults({"data.train_mode": "prefix", "model": {"class_path": DEFAULT_HEAD}})
        parser.link_arguments("data.max_len", "model.init_args.max_len")
        parser.link_arguments("data", "model.init_args.inputs", compute_fn=self.model_inputs, apply_on="instantiate")
        # model.backbone holds BackboneSpec's fields; the model is given the backbone they name, loaded
        parser.add_instantiator(instantiate_backbone, Backbone, subclasses=False, prepend=True)

    @property
    def head_class(self) -> type[LLMRecommenderBase]:
        module, name = self.config.model.class_path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    @property
    def work_name(self) -> str:
        """The model class's export folder (``fit-recommender`` or ``fit-recommender-generative``)."""
        return self.head_class.export_folder

    @property
    def output_name(self) -> str:
        return self.model.export_folder

    def model_inputs(self, data: SequenceDataModule) -> RecommenderInputs:
        """The catalog tensors the configured head reads, from the data module's run folder."""
        return data.recommender_inputs(self.head_class.input_needs(self.config.model.init_args))

    def gather(self) -> None:
        # the full state dict the export is written from (a collective under FSDP: every rank takes part)
        self.trained = self.trainer.strategy.lightning_module_state_dict()

    def record_inputs(self, manifest: Manifest) -> None:
        data = self.datamodule
        prepared = data.prepared
        manifest.add_input("items", prepared.items_path, prepared.manifest)
        manifest.add_input("interactions", prepared.interactions_path, prepared.manifest)
        for name, source in data.input_sources.items():
            manifest.add_input(name, source.path, source.manifest)

    def summary(self, result: FitResult) -> dict[str, Any]:
        self.throughput = self.meter.summary()
        return {**super().summary(result), **self.throughput}

    def publish(self, out: Path, manifest: Manifest) -> None:
        for name, path in save_llm_export(self.model, out, self.trained).items():
            manifest.add_output(name, path)

    def report(self, result: FitResult) -> None:
        print(
            f"{STAGE} ({self.model.head} head): best {MONITOR} = {result.best_val.get(MONITOR, float('nan')):.4f} "
            f"after {self.trainer.current_epoch} epochs ({result.seconds:.0f} s, "
            f"{self.throughput['tokens_per_second']} tokens/s); wrote {self.run_dir / self.output_name}"
        )


def main(argv: list[str]) -> None:
    FitRecommenderCLI(argv).run()
