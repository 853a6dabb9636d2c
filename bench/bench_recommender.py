"""Benchmark the LLM recommenders on a prepared run, e.g. Amazon Beauty on one GPU.

Given a run directory where prepare, fit-collab, fit-quantizer and assign-sids are done, it trains
``fit-recommender`` once per variant: ``random`` (fusion head, code embeddings initialised at random: the
Beauty config's choice on validation), ``codebook`` (fusion head, MME-SID's codebook initialisation) and ``generative`` (the generative SID head with
trie-constrained beam search). Each is evaluated with ``mmrec test`` (``--model fusion`` or ``generative``),
SASRec and popularity the same way, and a Markdown section with Recall/NDCG@5/10/20, MRR, training wall
time, tokens/s, peak GPU memory, evaluation wall time, users/s and the device is appended to
``bench/RESULTS.md`` (or ``--results``). ``<run_dir>/fit-recommender/`` ends up holding the last fusion
variant, ``<run_dir>/fit-recommender-generative/`` the generative head.

    python bench/bench_recommender.py --run_dir runs/beauty --variants random codebook \\
        --backbone /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --results $OUT/RESULTS.md [--trainer.max_epochs=2 ...]

Arguments it does not know are passed on to every ``mmrec fit-recommender``.

Every figure is measured under the protocol ``mmrec test`` reports (TIGER's by default: leave-one-out,
full ranking, history not masked, pessimistic ties); ``--mask_history`` switches it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import RESULTS, append_section, git_commit, machine, mmrec, read_json

K = (5, 10, 20)


VARIANTS = {  # name: (label, evaluated as)
    "random": ("fusion, code init random", "fusion"),
    "codebook": ("fusion, code init codebook", "fusion"),
    "generative": ("generative SID head, beam search", "generative"),
}


def evaluate(run_dir: Path, model: str, batch_size: int, mask_history: bool) -> dict:
    mmrec("test", "--run_dir", str(run_dir), "--model", model, "--batch_size", str(batch_size),
          "--mask_history", str(mask_history).lower())
    name = f"{model}-test" + ("-masked" if mask_history else "")
    return read_json(run_dir / "test" / name / "metrics.json")


def fit(run_dir: Path, configs: list[str], overrides: list[str], folder: str) -> dict:
    args = ["fit-recommender", *(part for config in configs for part in ("--config", config)), "--run_dir", str(run_dir)]
    mmrec(*args, *overrides)
    return read_json(run_dir / folder / "manifest.json")


def row(label: str, test: dict, fit_extra: dict | None) -> str:
    metrics = test["metrics"]
    cells = [label]
    for k in K:
        cells += [f"{metrics[f'recall@{k}']:.4f}", f"{metrics[f'ndcg@{k}']:.4f}"]
    cells.append(f"{metrics['mrr']:.4f}")
    if fit_extra is None:
        cells += ["", "", ""]
    else:
        tokens = fit_extra.get("tokens_per_second")
        peak = fit_extra.get("peak_gpu_memory_gib")
        cells += [f"{fit_extra['train_seconds']:.0f}", f"{tokens:,.0f}" if tokens else "", f"{peak:.1f}" if peak else ""]
    cells += [f"{test['eval_seconds']:.1f}", f"{test['n_users'] / max(test['eval_seconds'], 1e-9):,.0f}"]
    return "| " + " | ".join(cells) + " |"


def section(run_dir: Path, results: dict[str, tuple[dict, dict | None]], configs: list[str], overrides: list[str]) -> str:
    any_test = next(iter(results.values()))[0]
    dataset, proto = any_test["dataset"], any_test["protocol"]
    header = "| model | " + " | ".join(f"R@{k} | N@{k}" for k in K) + " | MRR | train s | tokens/s | peak GiB | eval s | users/s |"
    lines = [
        f"## fit-recommender on {run_dir.name}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine()}; evaluation device: {any_test['device']}",
        (f"- code: commit {git_commit()}; configs: {', '.join(configs)}"
         + (f"; overrides: `{' '.join(overrides)}`" if overrides else "")),
        (f"- data: {dataset['num_users']:,} users, {dataset['num_items']:,} items, "
         f"{dataset['num_interactions']:,} interactions (items {str(dataset['items_sha256'])[:12]})"),
        (f"- protocol: test split, leave-one-out, full ranking, history "
         f"{'masked' if proto['mask_history'] else 'not masked (TIGER)'}, pessimistic ties"),
        ("- train s: training wall time without validation; tokens/s: prompt tokens read in training (padding "
         "excluded); peak GiB: torch.cuda.max_memory_allocated during training; eval s: full test-set ranking "
         "(the generative head: beam search over the catalog's SIDs); users/s: test users / eval s"),
        "",
        header,
        "| " + " | ".join(["---"] * (header.count("|") - 1)) + " |",
        *(row(label, test, extra) for label, (test, extra) in results.items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", type=Path, required=True)
    parser.add_argument("--config", default="configs/beauty/fit-recommender.yaml")
    parser.add_argument("--codebook_config", default="configs/beauty/fit-recommender-codebook-init.yaml")
    parser.add_argument("--generative_config", default="configs/beauty/fit-recommender-generative.yaml")
    parser.add_argument("--backbone", default=None, help="override model.backbone.name_or_path (e.g. a .gguf path)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--batch_size", type=int, default=1024, help="users per evaluation batch")
    parser.add_argument("--generative_batch_size", type=int, default=256, help="users per batch of beam search")
    parser.add_argument("--mask_history", action="store_true", help="remove history items from the ranking")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="what to train, in this order (the last stays in <run_dir>/fit-recommender)",
    )
    parser.add_argument("--no_baselines", action="store_true", help="do not evaluate SASRec and popularity")
    args, overrides = parser.parse_known_args()  # the rest goes to fit-recommender, e.g. --trainer.max_epochs=2
    args.run_dir = args.run_dir.resolve()  # stages run from the repository root
    for stage in ("prepare", "fit-collab", "assign-sids"):
        if not (args.run_dir / stage / "manifest.json").is_file():
            sys.exit(f"{args.run_dir / stage}: missing; run the pipeline up to assign-sids first")
    if args.backbone:
        overrides = ["--model.backbone.name_or_path", args.backbone, *overrides]

    results: dict[str, tuple[dict, dict | None]] = {}
    configs = {"random": [args.config], "codebook": [args.config, args.codebook_config], "generative": [args.generative_config]}
    for variant in args.variants:
        label, model = VARIANTS[variant]
        folder = "fit-recommender-generative" if model == "generative" else "fit-recommender"
        extra = fit(args.run_dir, configs[variant], overrides, folder)["extra"]
        batch_size = args.generative_batch_size if model == "generative" else args.batch_size
        results[label] = (evaluate(args.run_dir, model, batch_size, args.mask_history), extra)
    if not args.no_baselines:
        results["SASRec (fit-collab)"] = (evaluate(args.run_dir, "sasrec", args.batch_size, args.mask_history), None)
        results["popularity"] = (evaluate(args.run_dir, "popularity", args.batch_size, args.mask_history), None)

    ordered = dict(sorted(results.items(), key=lambda item: "codebook" not in item[0]))  # main model first
    used = list(dict.fromkeys(path for variant in args.variants for path in configs[variant]))
    text = section(args.run_dir, ordered, used, overrides)
    print(text)
    append_section(args.results, text)


if __name__ == "__main__":
    main()
