"""Run one training stage for several seeds, test each, and append mean ± std over seeds to ``bench/RESULTS.md``.

One seed's figure is not a result: GPU training is not bit-exact and SASRec alone moves by several percent
between seeds. Every claim about a configuration therefore comes from this script:

    python bench/bench_seeds.py --prepared runs/beauty --stage fit-collab --config configs/beauty/fit-collab.yaml \\
        --model sasrec --seeds 42 43 44 --runs runs/seeds/sasrec
    python bench/bench_seeds.py --prepared runs/beauty --stage fit-recommender --config configs/beauty/fit-recommender.yaml \\
        --model fusion --seeds 42 43 44 --runs runs/seeds/fusion \\
        --baseline_runs runs/seeds/sasrec/seed42 runs/seeds/sasrec/seed43 runs/seeds/sasrec/seed44 --baseline_model sasrec

Each seed runs in ``<runs>/seed<N>/``, a copy of ``--prepared`` (a run folder holding what the stage reads:
``prepare/``, and ``fit-collab/`` or the SIDs for the LLM stages) without its test results and scratch
folders, as ``mmrec <stage> ... --seed_everything N`` and then ``mmrec test --split <split>``. A seed whose test
folder already exists is not run again, so a benchmark longer than one device call resumes where it stopped
(delete ``<runs>`` after changing the config). Selection happens on the validation split (the default);
``--split test`` is for the final configurations only. With ``--baseline_runs`` the section also holds
``mmrec compare`` of the baseline's seeds against these (paired over users, per-user metrics averaged over seeds).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import time
from pathlib import Path

from common import RESULTS, append_section, git_commit, machine, mmrec, option_words, read_json

from mmrec.evaluation.compare import format_evidence

SLICE_METRICS = ("recall@10", "ndcg@10")
NOT_COPIED = ("test", "*.work", ".*", "pipeline.json", "report.html", "recommend")
"""Another run's results, checkpoints (a seed must not resume from them) and temporary folders."""


def run_seed(args: argparse.Namespace, seed: int) -> Path:
    """Train and test one seed in its own copy of the prepared run; returns its test folder."""
    run_dir = args.runs / f"seed{seed}"
    folder = test_folder(run_dir, args.model, args.split)
    if (folder / "metrics.json").is_file():
        print(f"seed {seed}: {folder} exists, not run again", flush=True)
        return folder
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(args.prepared, run_dir, ignore=shutil.ignore_patterns(*NOT_COPIED))
    configs = [part for config in args.config for part in ("--config", config)]
    overrides = option_words(args.override)
    mmrec(args.stage, *configs, "--run_dir", str(run_dir), "--seed_everything", str(seed), *overrides)
    test_config = ["--config", args.test_config] if args.test_config else []
    test_options = option_words(args.test_option)
    mmrec("test", *test_config, "--run_dir", str(run_dir), "--model", args.model, "--split", args.split,
          "--device", args.device, *test_options)
    return folder


def test_folder(run_dir: Path, model: str, split: str) -> Path:
    return run_dir / "test" / f"{model}-{split}"


def metric_names(document: dict) -> list[str]:
    k = document["protocol"]["k"]
    return [*(f"recall@{x}" for x in k), *(f"ndcg@{x}" for x in k), "mrr"]


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def seeds_table(seeds: list[int], documents: list[dict]) -> list[str]:
    """One row per metric: mean ± std over seeds (sample std), then each seed's value; with ``mmrec test
    --slices true``, also Recall@10 and NDCG@10 of every slice (``slice / metric``, the slice's users)."""
    rows = [f"| metric | mean ± std ({len(seeds)} seeds) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "| --- | --- |" + " --- |" * len(seeds)]
    series = {name: [document["metrics"][name] for document in documents] for name in metric_names(documents[0])}
    for slice_name, first in documents[0].get("slices", {}).items():
        for name in SLICE_METRICS if first.get("users") else ():
            series[f"{slice_name} ({first['users']:,} users) / {name}"] = [d["slices"][slice_name][name] for d in documents]
    for name, values in series.items():
        rows.append(f"| {name} | {mean_std(values)} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return rows


def compare_table(args: argparse.Namespace, folders: list[Path]) -> list[str]:
    """``mmrec compare`` of the baseline's seeds with these seeds, as Markdown."""
    baseline = [test_folder(run, args.baseline_model or args.model, args.split) for run in args.baseline_runs]
    output = args.runs / f"compare-{baseline[0].name}-vs-{folders[0].name}.json"
    sliced = tested_by_slice(args)
    mmrec("compare", "--baseline", *map(str, baseline), "--candidate", *map(str, folders), "--output", str(output),
          *(["--slices", "true"] if sliced else []))
    result = read_json(output)
    comparison = result["comparisons"][0]
    rows = [
        "",
        (f"`mmrec compare` (K={result['k']}, {result['n_users']:,} users, paired, per-user metrics averaged over seeds, "
        f"{result['bootstrap']['resamples']:,} bootstrap resamples; baseline {', '.join(map(str, baseline))}):"),
        "",
        "| metric | baseline | candidate | diff | 95% CI | rel | p (t-test) | p (Wilcoxon) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in comparison["metrics"].items():
        base, cand = (f"{side['mean'][name]:.4f} ± {side['std'][name]:.4f}" for side in (result["baseline"], comparison["candidate"]))
        rows.append(markdown_row(name, base, cand, s))
    for slice_name, part in comparison.get("slices", {}).items():
        for name, s in part["metrics"].items():
            rows.append(markdown_row(f"{slice_name} ({part['n_users']:,} users) / {name}", f"{s['baseline']:.4f}",
                                     f"{s['candidate']:.4f}", s))
    return rows


def markdown_row(label: str, baseline: str, candidate: str, statistics: dict) -> str:
    """One metric's row of the comparison table: both sides, the difference and its evidence."""
    relative, interval = format_evidence(statistics)
    p = ["n/a" if x is None else f"{x:.3g}" for x in (statistics["p_ttest"], statistics["p_wilcoxon"])]
    return f"| {label} | {baseline} | {candidate} | {statistics['difference']:+.4f} | {interval} | {relative} | {p[0]} | {p[1]} |"


def tested_by_slice(args: argparse.Namespace) -> bool:
    """Whether the seeds were tested with ``--slices true``: their comparison then goes slice by slice too."""
    words = option_words(args.test_option)
    return any(word == "--slices" and following == "true" for word, following in itertools.pairwise(words))


def section(args: argparse.Namespace, folders: list[Path]) -> str:
    documents = [read_json(folder / "metrics.json") for folder in folders]
    first = documents[0]
    dataset = first["dataset"]
    masked = "masked" if first["protocol"]["mask_history"] else "not masked (TIGER)"
    lines = [
        (f"## {args.label or args.model} over {len(args.seeds)} seeds, {args.split} split ({args.stage}), "
         f"{time.strftime('%Y-%m-%d %H:%M')}"),
        "",
        f"- machine: {machine()}; commit {git_commit()}",
        f"- config: {' + '.join(args.config)}" + (f"; overrides: `{' '.join(args.override)}`" if args.override else "")
        + (f"; test config {args.test_config}" if args.test_config else ""),
        f"- runs: {args.runs}/seed<N>, copies of {args.prepared}",
        (f"- data: {dataset['num_users']:,} users, {dataset['num_items']:,} items (items {str(dataset['items_sha256'])[:12]}, "
         f"interactions {str(dataset['interactions_sha256'])[:12]}); protocol: leave-one-out, full ranking, history {masked}, "
         "pessimistic ties"),
        "",
        *seeds_table(args.seeds, documents),
    ]
    if args.baseline_runs:
        lines += compare_table(args, folders)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's options, folders made absolute (the stages run from the repository root); another
    benchmark passes ``argv`` to run seeds with the same options and defaults (bench/bench_text_refinement.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True, help="run folder every seed's run is copied from")
    parser.add_argument("--stage", required=True, help="training stage to run per seed, e.g. fit-collab, fit-recommender")
    parser.add_argument("--config", action="append", required=True, help="the stage's config (repeat to compose)")
    parser.add_argument("--override", action="append", default=[], help="extra stage option, e.g. '--model.dropout 0.3'")
    parser.add_argument("--model", required=True, help="model name for `mmrec test` (sasrec, fusion, generative, ...)")
    parser.add_argument("--label", help="what the section's title calls these runs (default: --model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--runs", type=Path, required=True, help="folder that receives one run folder per seed")
    parser.add_argument("--split", choices=["valid", "test"], default="valid", help="select on valid; test once, at the end")
    parser.add_argument("--test_config", help="config for `mmrec test` (e.g. configs/beauty/test.yaml)")
    parser.add_argument("--test_option", action="append", default=[], help="extra `mmrec test` option, e.g. '--slices true'")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="evaluation device")
    parser.add_argument("--baseline_runs", type=Path, nargs="+", default=[], help="run folders of the baseline's seeds")
    parser.add_argument("--baseline_model", help="the baseline's model name in those runs (default: --model)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the section is appended to")
    args = parser.parse_args(argv)
    args.prepared, args.runs = args.prepared.resolve(), args.runs.resolve()
    args.baseline_runs = [run.resolve() for run in args.baseline_runs]
    return args


def main() -> None:
    args = parse_args()
    folders = [run_seed(args, seed) for seed in args.seeds]
    append_section(args.results, section(args, folders))


if __name__ == "__main__":
    main()
