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
and peak GPU memory.
"""

from __future__ import annotations

import importlib

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.strategies import FSDPStrategy

from mmrec.artifacts import stage_output
from mmrec.artifacts.exports import save_llm_export
from mmrec.callbacks.throughput import TrainingThroughput
from mmrec.data.datamodules import SequenceDataModule
from mmrec.data.recommender_inputs import RecommenderInputs
from mmrec.models.llm.backbone import Backbone, BackboneSpec, load_backbone
from mmrec.models.llm.base import MONITOR, STAGE, LLMRecommenderBase
from mmrec.models.llm.generative import GenerativeRecommender  # noqa: F401 (imported: --model GenerativeRecommender resolves)
from mmrec.models.llm.recommender import LLMRecommender
from mmrec.stages.lightning_cli import StageCLI

DEFAULT_HEAD = f"{LLMRecommender.__module__}.{LLMRecommender.__qualname__}"


def instantiate_backbone(cls: type[Backbone], *args: object, **spec: object) -> Backbone:
    """jsonargparse's instantiator of ``model.backbone``: the backbone its spec fields name, loaded."""
    return load_backbone(BackboneSpec(*args, **spec))


class FitRecommenderCLI(StageCLI):
    """StageCLI plus the links the recommender needs and a configurable checkpoint callback.

    The LLM heads also train under FSDP (``configs/strategies/fit-recommender-fsdp.yaml``): the best
    checkpoint is loaded by the strategy and the export is written from its full state dict.
    """

    strategies = StageCLI.strategies + (FSDPStrategy,)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults({"data.train_mode": "prefix", "model": {"class_path": DEFAULT_HEAD}})
        parser.link_arguments("data.max_len", "model.init_args.max_len")
        parser.link_arguments("data", "model.init_args.inputs", compute_fn=self.model_inputs, apply_on="instantiate")
        # model.backbone holds BackboneSpec's fields; the model is given the backbone they name, loaded
        parser.add_instantiator(instantiate_backbone, Backbone, subclasses=False, prepend=True)
        parser.add_lightning_class_args(ModelCheckpoint, "model_checkpoint")
        parser.set_defaults({
            "model_checkpoint.monitor": MONITOR, "model_checkpoint.mode": "max",
            "model_checkpoint.save_last": True, "model_checkpoint.filename": "best-{epoch}-{step}",
        })

    @property
    def head_class(self) -> type[LLMRecommenderBase]:
        module, name = self.config.model.class_path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    @property
    def work_name(self) -> str:
        """The model class's export folder (``fit-recommender`` or ``fit-recommender-generative``)."""
        return self.head_class.export_folder

    def model_inputs(self, data: SequenceDataModule) -> RecommenderInputs:
        """The catalog tensors the configured head reads, from the data module's run folder."""
        return data.recommender_inputs(self.head_class.input_needs(self.config.model.init_args))

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        if self.config.model_checkpoint.dirpath is None:
            self.config.model_checkpoint.dirpath = str(self.checkpoint_dir)


def main(argv: list[str]) -> None:
    meter = TrainingThroughput()
    cli = FitRecommenderCLI(
        STAGE, LLMRecommenderBase, SequenceDataModule, argv, description=__doc__.splitlines()[0],
        trainer_defaults={"callbacks": [meter]}, subclass_mode_model=True,
    )
    trainer, data, model = cli.trainer, cli.datamodule, cli.model
    resumed_from, fit_seconds = cli.fit()

    # The strategy loads the best checkpoint into the model however it holds it (one device, DDP replicas,
    # FSDP shards), and hands back the full state dict that the export is written from (all ranks take part).
    best = cli.best_checkpoint or None
    best_val = trainer.validate(model, datamodule=data, ckpt_path=best, verbose=False, weights_only=True)[0]
    trained = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return

    prepared = data.prepared
    manifest = cli.manifest()
    manifest.add_input("items", prepared.items_path, prepared.manifest)
    manifest.add_input("interactions", prepared.interactions_path, prepared.manifest)
    for name, source in data.input_sources.items():
        manifest.add_input(name, source.path, source.manifest)
    throughput = meter.summary()
    manifest.extra = {**cli.fit_summary(best_val, resumed_from, fit_seconds), **throughput}
    with stage_output(cli.run_dir, model.export_folder, manifest) as out:
        for name, path in save_llm_export(model, out, trained).items():
            manifest.add_output(name, path)
    print(
        f"{STAGE} ({model.head} head): best {MONITOR} = {best_val.get(MONITOR, float('nan')):.4f} after {trainer.current_epoch} epochs "
        f"({fit_seconds:.0f} s, {throughput['tokens_per_second']} tokens/s); wrote {cli.run_dir / model.export_folder}"
    )
