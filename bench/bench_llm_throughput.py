"""Training throughput of the LLM heads, variant by variant, with a step-time breakdown.

Each variant is the real stage (``mmrec fit-recommender``) for a fixed number of steps on a prepared run
(``prepare``, ``fit-collab`` and ``assign-sids`` done), with its own overrides: what trains (LoRA or the
whole backbone), eager or compiled, the batch size, the head, the backbone (a GGUF, or a shape from
``configs/backbones/`` for the cost of a model whose weights you do not have), the strategy and devices.
It reads tokens/s (steady state: after the warm-up steps that compilation costs, and overall), peak GPU
memory and MFU from the stage's manifest, and the data / forward / backward / optimizer split and the
host syncs per step from :class:`mmrec.callbacks.step_breakdown.StepBreakdown`, then appends one Markdown
table to ``bench/RESULTS.md``. The run directory's own exports are never touched: each variant trains in a
copy of its input folders.

    python bench/bench_llm_throughput.py --run_dir runs/beauty --backbone /root/m/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --variant "lora, eager, 256=--model.init_args.backbone.finetune lora --data.batch_size 256" \\
        --variant "full, compiled, 2048=--model.init_args.backbone.finetune full --model.init_args.backbone.compile true --data.batch_size 2048"

Without ``--variant`` it runs :data:`DEFAULT_VARIANTS`. MFU counts 6 FLOP per backbone parameter and token
under full fine-tuning and 4 under LoRA (no weight gradients for frozen weights), against the bf16 matmul
rate it measures on the same GPU first.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path

from common import RESULTS, append_section, git_commit, machine, matmul_tflops, mfu, mmrec, read_json

FUSION = "configs/beauty/fit-recommender.yaml"
GENERATIVE = "configs/beauty/fit-recommender-generative.yaml"
INPUTS = ("prepare", "fit-collab", "assign-sids")
DEFAULT_VARIANTS = {
    "fusion, LoRA, eager, batch 256 (the old config)": f"--config {FUSION} --model.init_args.backbone.finetune lora --model.init_args.backbone.dtype bfloat16 --model.init_args.backbone.compile false --data.batch_size 256",
    "fusion, full, eager, batch 2048": f"--config {FUSION} --model.init_args.backbone.compile false",
    "fusion, full, compiled layers, batch 2048 (shipped)": f"--config {FUSION}",
    "generative, LoRA, eager, batch 256 (the old config)": f"--config {GENERATIVE} --model.init_args.backbone.finetune lora --model.init_args.backbone.dtype bfloat16 --model.init_args.backbone.compile false --data.batch_size 256",
    "generative, full, eager, batch 1024": f"--config {GENERATIVE} --model.init_args.backbone.compile false",
    "generative, full, compiled layers, batch 1024 (shipped)": f"--config {GENERATIVE}",
}


def fresh_copy(run_dir: Path, work: Path) -> Path:
    """``work`` holding copies of the run's input folders (lineage is by content, so a copy is accepted)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for stage in INPUTS:
        shutil.copytree(run_dir / stage, work / stage)
    return work


def run_variant(run_dir: Path, args: list[str], steps: int, skip: int) -> dict:
    """Train one variant for ``steps`` steps; return its manifest ``extra``, spec and step breakdown."""
    extra = ["--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.max_time", "null",
             "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", str(steps),
             "--trainer.check_val_every_n_epoch", "null", "--checkpoint_every_n_steps", "0",
             "--model_checkpoint.save_top_k", "0", "--model_checkpoint.save_last", "false",
             "--trainer.callbacks+", "mmrec.callbacks.step_breakdown.StepBreakdown",
             "--trainer.callbacks.skip", str(skip), "--trainer.callbacks.steps", "10"]
    mmrec("fit-recommender", *args, *extra, "--run_dir", str(run_dir))  # after the configs, which name their own
    folder = next(p for p in (run_dir / "fit-recommender", run_dir / "fit-recommender-generative") if p.is_dir())
    manifest = read_json(folder / "manifest.json")
    breakdown_file = run_dir / f"{folder.name}.work" / "step_breakdown.json"
    return {
        "extra": manifest["extra"],
        "spec": read_json(folder / "recommender.json"),
        "config": manifest["config"],
        "breakdown": read_json(breakdown_file) if breakdown_file.is_file() else {},
    }


def row(label: str, result: dict, peak: float | None) -> str:
    extra, split = result["extra"], result["breakdown"]
    cells = [label, str(result["config"]["data"]["batch_size"]), str(extra.get("world_size", 1))]
    for key in ("tokens_per_second_steady", "tokens_per_second"):
        cells.append(f"{extra[key]:,.0f}" if extra.get(key) else "")
    cells.append(f"{extra['peak_gpu_memory_gib']:.1f}" if extra.get("peak_gpu_memory_gib") else "")
    tokens = extra.get("tokens_per_second_steady") or extra.get("tokens_per_second")
    value = mfu(result["spec"], tokens, peak, extra.get("world_size", 1))
    cells.append(f"{100 * value:.1f}%" if value else "")
    cells += [f"{1000 * split[f'{phase}_s']:.1f}" if f"{phase}_s" in split else "" for phase in ("data", "forward", "backward", "optimizer", "step")]
    syncs = split.get("host_syncs_per_step")
    cells.append("" if syncs is None else str(syncs))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", type=Path, required=True, help="a run with prepare, fit-collab and assign-sids done")
    parser.add_argument("--work_dir", type=Path, default=None, help="where variants train (default: <run_dir>-throughput)")
    parser.add_argument("--backbone", default=None, help="model.backbone.name_or_path for every variant (a .gguf or a shape .json)")
    parser.add_argument("--variant", action="append", default=[], help="'LABEL=ARGS' (ARGS for mmrec fit-recommender); repeatable")
    parser.add_argument("--steps", type=int, default=60, help="training steps per variant")
    parser.add_argument("--skip", type=int, default=30, help="steps before the breakdown (compilation, warm-up)")
    parser.add_argument("--title", default="LLM head training throughput")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else DEFAULT_VARIANTS
    run_dir = args.run_dir.resolve()
    work = (args.work_dir or run_dir.with_name(run_dir.name + "-throughput")).resolve()
    peak = matmul_tflops()

    results: dict[str, dict] = {}
    for label, variant in variants.items():
        overrides = shlex.split(variant)
        if args.backbone:
            overrides += ["--model.init_args.backbone.name_or_path", args.backbone]
        try:
            results[label] = run_variant(fresh_copy(run_dir, work), overrides, args.steps, args.skip)
        except Exception as error:  # noqa: BLE001 (a variant that fails, out of memory say, is reported; the rest still run)
            print(f"{label}: failed: {error}")
            results[label] = {"error": str(error)}
    header = ("| variant | batch / device | devices | tokens/s (steady) | tokens/s (whole run) | peak GiB / device | MFU | "
              "data ms | forward ms | backward ms | optimizer ms | step ms | host syncs / step |")
    lines = [
        f"## {args.title}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine()}; bf16 matmul measured at {peak:.0f} TFLOP/s" if peak else f"- machine: {machine()}",
        (f"- code: commit {git_commit()}; backbone: {args.backbone or 'as configured'}; {args.steps} steps a variant, "
         f"the breakdown over 10 steps after {args.skip}"),
        ("- tokens: prompt tokens the backbone reads, padding excluded, summed over devices; steady: after the first "
         "20 steps (compilation; the breakdown's synchronised steps fall inside and slow it by a few percent); MFU: "
         "(6 full / 4 LoRA) x backbone parameters x steady tokens/s over the measured matmul rate x devices; ms: "
         "medians of synchronised phases (a breakdown, not a throughput); host syncs: operations per step that made "
         "the CPU wait for the GPU"),
        "",
        header,
        "| " + " | ".join(["---"] * (header.count("|") - 1)) + " |",
    ]
    for label, result in results.items():
        lines.append(row(label, result, peak) if "error" not in result else f"| {label} | failed: {result['error'][:120]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    append_section(args.results, text)
    if args.json:
        args.json.write_text(json.dumps({"peak_tflops": peak, "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
