"""``mmrec fit-quantizer``: train the MM-RQ-VAE on the run directory's item embeddings and publish it.

Wiring only (the model is :class:`mmrec.models.mm_rqvae.MMRQVAE`). Checkpoints go to
``<run_dir>/fit-quantizer.work/checkpoints`` with ``last.ckpt`` kept, so ``--resume true`` continues an
interrupted run (without it, earlier checkpoints there are deleted); the CSV log goes to
``<run_dir>/fit-quantizer.work/logs``. The published quantizer is the model as training ends (the last
epoch, identical to ``last.ckpt``), not a "best" checkpoint: dead-code re-seeding makes later epochs the
ones with the best code usage, and no single validation number ranks quantizers fairly.

Outputs in ``<run_dir>/fit-quantizer/``: ``quantizer.safetensors`` and ``quantizer.json`` (reload with
``MMRQVAE.from_state(*read_quantizer(folder))``), ``codebooks.safetensors`` (``"<modality>.<level>"`` -> ``[K, code_dim]`` float32) and
``manifest.json`` whose ``extra`` holds the final code-quality metrics over the whole item table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from mmrec.artifacts import Manifest, Stage
from mmrec.artifacts.exports import save_quantizer
from mmrec.artifacts.manifest import file_sha256
from mmrec.artifacts.run import save_codebooks
from mmrec.callbacks.throughput import peak_gpu_memory_gib
from mmrec.data.datamodules import ItemFeatureDataModule
from mmrec.models.mm_rqvae import MMRQVAE
from mmrec.stages.lightning_cli import FitResult, TrainingStageCLI

STAGE = str(Stage.FIT_QUANTIZER)
CODEBOOKS = "codebooks.safetensors"
FINAL_TAU_PAIRS = 100_000


class QuantizerCLI(TrainingStageCLI):
    """TrainingStageCLI plus the link of embedding widths into the model; no best checkpoint (the model as
    training ends is published), and a CSV logger in the work folder unless another logger is configured."""

    checkpoint_filename = "{epoch}"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.input_dims", "model.input_dims", apply_on="instantiate")

    def record_inputs(self, manifest: Manifest) -> None:
        for modality, table in self.datamodule.tables.items():
            manifest.add_input(f"emb_{modality}", table.path, table.manifest)

    def summary(self, result: FitResult) -> dict[str, Any]:
        """The final code-quality metrics over the whole item table, and the fit's size and cost."""
        self.code_report = self.model.evaluate_codes(self.datamodule.predict_dataloader(), tau_pairs=FINAL_TAU_PAIRS)
        trainer = self.trainer
        return {
            "metrics": self.code_report,
            "wall_time_s": round(result.seconds, 2),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "device": str(trainer.strategy.root_device),
            "peak_gpu_memory_gib": peak_gpu_memory_gib(trainer.strategy.root_device),
            "resumed_from": result.resumed_from,
        }

    def publish(self, out: Path, manifest: Manifest) -> None:
        model = self.model
        config_path, weights_path = save_quantizer(model, out)
        save_codebooks(model.codebooks(), out / CODEBOOKS)
        manifest.add_output("quantizer", weights_path)
        manifest.add_output("quantizer_config", config_path)
        manifest.add_output("codebooks", out / CODEBOOKS)
        manifest.lineage["quantizer"] = file_sha256(weights_path)

    def report(self, result: FitResult) -> None:
        for modality, metrics in self.code_report.items():
            print(
                f"fit-quantizer: {modality}: utilisation per level {[round(u, 3) for u in metrics['utilisation']]}, "
                f"unique tuples {metrics['unique_tuple_fraction']:.4f}, recon cosine {metrics['recon_cosine']:.3f}, "
                f"Kendall tau {metrics['kendall_tau']:.3f} ({metrics['items']} items)"
            )
        print(f"fit-quantizer: wrote {self.run_dir / STAGE} in {result.seconds:.1f}s of training")


def main(argv: list[str]) -> None:
    QuantizerCLI(STAGE, MMRQVAE, ItemFeatureDataModule, argv, description=__doc__.splitlines()[0]).run()
