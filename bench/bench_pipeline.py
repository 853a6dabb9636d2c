"""Benchmark the whole pipeline from the raw files, every stage as a user runs it, and append the figures.

On one GPU, Amazon Beauty (configs/beauty), the data where this repository's configs do not expect it:

    python bench/bench_pipeline.py --run_dir runs/bench --data_dir data/beauty --results $OUT/RESULTS.md

Stages, in order (``--stages`` picks some, ``--skip`` leaves some out, e.g. to finish a pipeline a failure
stopped halfway): prepare, fit-collab, fit-quantizer, assign-sids, fit-recommender, test-fusion,
fit-recommender-generative, test-generative, test-sasrec, test-popularity. Each runs in its own process,
started as ``mmrec pipeline`` starts it (:mod:`mmrec.pipeline.runner`: on Linux a child of a fork server that
imports the stage modules once; ``--fork false``: a fresh interpreter each, as by hand), so its wall time
includes start-up and loading. A failing stage is recorded and the benchmark goes on; later stages that need
its output then fail too, and say so in the table.

After the stages it measures the GPU's bf16 matrix-product rate (8192^3, median of five), which the MFU
of the LLM stages is relative to: tokens/s x FLOP per token / that rate, where FLOP per token is 6 x the
backbone's parameters when it is fine-tuned in full and 4 x when it is frozen or trained through LoRA
(forward and the backward through activations, no weight gradients). Parameters come from the stage's
manifest or the JSON files it exported (``backbone_parameters``); where it has none, MFU is left out and the table says so.

The Markdown section (machine, commit, configs, overrides, one row per stage: command wall time, training
seconds, tokens/s, peak GPU memory, MFU, test R@10 / N@10 and evaluation seconds, then the total) is
appended to ``--results``; every figure also goes to ``--json`` (default: the results file with ``.json``).
``--configs configs/demo`` runs the synthetic demo on a CPU in a few minutes, which checks this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import RESULTS, ROOT, append_section, git_commit, machine, matmul_tflops, mfu, read_json_if_any

from mmrec.pipeline.runner import run_stage as run_stage_process

STAGES = (
    "prepare", "fit-collab", "fit-quantizer", "assign-sids", "fit-recommender", "test-fusion",
    "fit-recommender-generative", "test-generative", "test-sasrec", "test-popularity",
)
TRAINING = ("fit-collab", "fit-quantizer", "fit-recommender", "fit-recommender-generative")
LLM_STAGES = ("fit-recommender", "fit-recommender-generative")
TEST_BATCH = {"generative": 1024}  # tree-attention beam search keeps one prompt cache row per user
BASELINES = ("test-sasrec", "test-popularity")  # evaluations of the baselines: not stages of pipeline.yaml


@dataclass
class StageResult:
    """What one stage cost and gave; None where the stage does not record a figure."""

    stage: str
    command: list[str]
    ok: bool = False
    error: str | None = None
    wall_s: float | None = None
    fit_s: float | None = None
    """``trainer.fit`` alone: the rest of ``wall_s`` is start-up, loading, the best checkpoint's validation, export."""
    validation_s: float | None = None
    """Validation passes inside ``fit`` (manifests written before commit 264e55a also count the best checkpoint's, after it)."""
    train_s: float | None = None
    tokens_per_second: float | None = None
    tokens_per_second_steady: float | None = None
    peak_gpu_memory_gib: float | None = None
    backbone_parameters: int | None = None
    finetune: str | None = None
    mfu: float | None = None
    mfu_note: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    eval_seconds: float | None = None


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each stage's ``mmrec`` arguments, overrides appended (later options win in LightningCLI and jsonargparse)."""
    configs, run = args.configs, str(args.run_dir)
    quiet = ["--trainer.enable_progress_bar", "false"]  # a progress bar reads the loss back every step
    prepare = ["prepare", "--config", f"{configs}/prepare.yaml", "--run_dir", run]
    if args.text_model:
        prepare += ["--text.model", args.text_model]
    if args.data_dir:
        prepare += ["--source.init_args.sequences", str(Path(args.data_dir) / "user_sequences.txt"),
                    "--source.init_args.items", str(Path(args.data_dir) / "items.csv")]
    backbone = ["--model.backbone.name_or_path", args.backbone] if args.backbone else []
    table = {
        "prepare": prepare,
        "fit-collab": ["fit-collab", "--config", f"{configs}/fit-collab.yaml", "--run_dir", run, *quiet],
        "fit-quantizer": ["fit-quantizer", "--config", f"{configs}/fit-quantizer.yaml", "--run_dir", run, *quiet],
        "assign-sids": ["assign-sids", "--config", f"{configs}/assign-sids.yaml", "--run_dir", run],
        "fit-recommender": ["fit-recommender", "--config", f"{configs}/fit-recommender.yaml", "--run_dir", run, *quiet, *backbone],
        "fit-recommender-generative": [
            "fit-recommender", "--config", f"{configs}/fit-recommender-generative.yaml", "--run_dir", run, *quiet, *backbone,
        ],
    }
    for model in ("fusion", "generative", "sasrec", "popularity"):
        table[f"test-{model}"] = ["test", "--config", f"{configs}/test.yaml", "--run_dir", run, "--model", model]
        if model in TEST_BATCH:
            table[f"test-{model}"] += ["--batch_size", str(TEST_BATCH[model])]
    for stage, extra in args.overrides.items():
        table[stage] += extra
    return table


def training_figures(result: StageResult, run_dir: Path, matmul: float | None) -> None:
    """Training seconds, tokens/s, peak memory and MFU from the stage's manifest."""
    manifest = read_json_if_any(run_dir / result.stage / "manifest.json")
    if manifest is None:
        return
    extra = manifest.get("extra", {})
    result.fit_s = extra.get("fit_wall_time_s")
    result.validation_s = extra.get("validation_seconds_during_fit")
    result.train_s = extra.get("train_seconds") or extra.get("fit_wall_time_s") or extra.get("wall_time_s")
    result.tokens_per_second = extra.get("tokens_per_second")
    result.tokens_per_second_steady = extra.get("tokens_per_second_steady")
    result.peak_gpu_memory_gib = extra.get("peak_gpu_memory_gib")
    if result.stage not in LLM_STAGES:
        return
    spec = read_json_if_any(run_dir / result.stage / "recommender.json")
    if spec is not None:
        result.backbone_parameters = spec.get("backbone_parameters")
        result.finetune = spec["hparams"]["backbone"].get("finetune", "lora")
    if matmul is None:
        result.mfu_note = "no GPU matmul rate"
    elif not result.backbone_parameters:
        result.mfu_note = "no backbone_parameters in recommender.json"
    elif not result.tokens_per_second:
        result.mfu_note = "manifest has no tokens_per_second"
    else:
        result.mfu = mfu(spec, result.tokens_per_second_steady or result.tokens_per_second, matmul)


def test_figures(result: StageResult, run_dir: Path) -> None:
    model = result.stage.removeprefix("test-")
    document = read_json_if_any(run_dir / "test" / f"{model}-test" / "metrics.json")
    if document is None:
        return
    metrics = document.get("metrics", {})
    result.metrics = {name: metrics[name] for name in ("recall@10", "ndcg@10") if name in metrics}
    result.eval_seconds = document.get("eval_seconds")


def run_stage(stage: str, command: list[str], run_dir: Path, fork: bool) -> StageResult:
    """One stage as ``mmrec pipeline`` starts it (``fork``: from the fork server, else a fresh interpreter)."""
    result = StageResult(stage, command)
    print("+ mmrec", shlex.join(command), flush=True)
    start = time.perf_counter()
    outcome = run_stage_process(command, verbose=False, fork=fork)
    result.wall_s = time.perf_counter() - start
    result.ok = outcome.returncode == 0
    if not result.ok:
        result.error = f"exit code {outcome.returncode}: {outcome.last_error_line}"
    elif stage.startswith("test-"):
        test_figures(result, run_dir)
    print(f"bench_pipeline: {stage}: {'ok' if result.ok else result.error} in {result.wall_s:.1f} s", flush=True)
    return result


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(args: argparse.Namespace, results: list[StageResult], matmul_note: str, total_s: float) -> str:
    overrides = "; ".join(f"{stage}: `{' '.join(extra)}`" for stage, extra in args.overrides.items()) or "none"
    lines = [
        f"## Pipeline on {args.run_dir.name} ({args.configs}), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine()}; commit {git_commit()}",
        (f"- configs: {args.configs}/*.yaml; data: {args.data_dir or 'as the configs say'}; "
         f"text model: {args.text_model or 'as the config says'}; backbone: {args.backbone or 'as the configs say'}"),
        f"- overrides: {overrides}",
        ("- stages started as `mmrec pipeline` starts them: children of a fork server that imports the stage modules "
         "once (the first stage's wall time includes that)" if args.fork else
         "- stages started as by hand: a fresh interpreter each (`--fork false`), imports included in every wall time"),
        f"- matrix-product rate: {matmul_note}",
        "",
        ("| stage | status | wall s (command) | fit s | validation s | train s | tokens/s (whole run) | tokens/s (steady) "
         "| peak GPU GiB | MFU (steady) | R@10 | N@10 | eval s |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else (r.mfu_note or "-")
        lines.append(
            f"| {r.stage} | {'ok' if r.ok else 'FAILED: ' + str(r.error)} | {cell(r.wall_s, '.1f')} | {cell(r.fit_s, '.1f')} "
            f"| {cell(r.validation_s, '.1f')} | {cell(r.train_s, '.1f')} "
            f"| {cell(r.tokens_per_second, ',.0f')} | {cell(r.tokens_per_second_steady, ',.0f')} | {cell(r.peak_gpu_memory_gib, '.2f')} | {mfu} "
            f"| {cell(r.metrics.get('recall@10'), '.4f')} | {cell(r.metrics.get('ndcg@10'), '.4f')} | {cell(r.eval_seconds, '.1f')} |"
        )
    failed = [r.stage for r in results if not r.ok]
    baselines = ", ".join(r.stage for r in results if r.stage in BASELINES)
    own_s = sum(r.wall_s or 0.0 for r in results if r.stage not in BASELINES)
    own = (f"- the pipeline's own stages (pipeline.yaml: all but the baselines' evaluations, {baselines}): "
           f"{own_s:.1f} s ({own_s / 60:.1f} min)")
    lines += [
        "",
        f"- total wall time: {total_s:.1f} s ({total_s / 60:.1f} min) for {len(results)} stage(s)"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        *([own] if baselines else []),
        ("- fit s: `trainer.fit` (the manifest's fit_wall_time_s; wall minus fit is start-up, loading, the best "
         "checkpoint's validation and the export); validation s: the validation passes the training stage timed"),
        "- MFU: tokens/s x (6 x backbone parameters under full fine-tuning, 4 x under LoRA or frozen) / the rate above",
    ]
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    overrides: dict[str, list[str]] = {}
    for item in items:
        stage, sep, extra = item.partition("=")
        if not sep or stage not in STAGES:
            raise SystemExit(f"bench_pipeline: --override expects STAGE=ARGS with STAGE one of {', '.join(STAGES)}; got {item!r}")
        overrides.setdefault(stage, []).extend(shlex.split(extra))
    return overrides


def stage_list(names: str | None, default: tuple[str, ...]) -> list[str]:
    chosen = [name.strip() for name in names.split(",") if name.strip()] if names is not None else list(default)
    unknown = [name for name in chosen if name not in STAGES]
    if unknown:
        raise SystemExit(f"bench_pipeline: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", type=Path, default=ROOT / "runs" / "bench-pipeline")
    parser.add_argument("--configs", default="configs/beauty", help="config folder (configs/demo: the CPU demo)")
    parser.add_argument("--data_dir", help="folder holding user_sequences.txt and items.csv (SeqTxt sources)")
    parser.add_argument("--text_model", help="local text encoder folder for prepare's text.model")
    parser.add_argument("--backbone", help="model.backbone.name_or_path for both LLM stages")
    parser.add_argument("--stages", help="comma-separated stages to run (default: all, in pipeline order)")
    parser.add_argument("--skip", default="", help="comma-separated stages to leave out")
    parser.add_argument("--override", action="append", default=[], help="STAGE=ARGS, extra options for one stage (repeatable)")
    parser.add_argument("--fork", type=lambda text: text.lower() == "true", default=True, metavar="{true,false}",
                        help="start stages as `mmrec pipeline` does on Linux, from a fork server that has imported the "
                             "stack once (default); false: a fresh interpreter each, as by hand")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the section is appended to")
    parser.add_argument("--json", type=Path, help="JSON file of all figures (default: --results with .json)")
    args = parser.parse_args()
    args.run_dir = args.run_dir.resolve()
    os.chdir(ROOT)  # the configs' relative paths, as the stages' commands name them
    args.overrides = parse_overrides(args.override)
    skip = set(stage_list(args.skip, ()))
    chosen = [stage for stage in STAGES if stage in stage_list(args.stages, STAGES) and stage not in skip]

    table = commands(args)
    start = time.perf_counter()
    results = [run_stage(stage, table[stage], args.run_dir, args.fork) for stage in chosen]
    total_s = time.perf_counter() - start
    # measured after the stages: this process's own CUDA context never shares the GPU with a stage
    matmul = matmul_tflops()
    matmul_note = "no GPU: MFU not computed" if matmul is None else f"bf16 8192^3 matmul, median of 5: {matmul:.0f} TFLOP/s"
    print(f"bench_pipeline: {matmul_note}", flush=True)
    for result in results:
        if result.ok and result.stage in TRAINING:
            training_figures(result, args.run_dir, matmul)

    append_section(args.results, markdown(args, results, matmul_note, total_s))
    json_path = args.json or args.results.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "machine": machine(), "commit": git_commit(), "configs": args.configs, "data_dir": args.data_dir,
        "text_model": args.text_model, "backbone": args.backbone, "overrides": args.overrides,
        "matmul_tflops": matmul, "total_wall_s": total_s, "stages": [asdict(r) for r in results],
    }, indent=2) + "\n")
    print(f"bench_pipeline: wrote {json_path}")


if __name__ == "__main__":
    main()
