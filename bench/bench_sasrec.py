"""Benchmark SASRec on Amazon Beauty end to end and append the figures to ``bench/RESULTS.md``.

Full run (a GPU; prepares the data first when ``<run_dir>/prepare`` is missing, without text embeddings,
which SASRec does not read):

    python bench/bench_sasrec.py --run_dir runs/beauty --results $OUT/RESULTS.md

It trains with ``configs/beauty/fit-collab.yaml`` (extra ``--override``s are passed to fit-collab),
evaluates on the validation and test splits and, for reference, evaluates popularity on test; the section
it appends records the machine, commit, configuration, training wall time and epochs, Recall/NDCG@5/10/20,
MRR and evaluation times, next to the published SASRec figures. Every figure uses the TIGER protocol
(leave-one-out, full ranking, history not masked, pessimistic ties).

Evaluation timing only (e.g. "a full Beauty evaluation runs in under a minute on this CPU"), on a run whose
SASRec is already trained:

    python bench/bench_sasrec.py --run_dir runs/beauty --eval_only --device cpu
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import RESULTS, ROOT, append_section, git_commit, machine, mmrec, option_words, read_json

K = (5, 10, 20)
PUBLISHED = {  # TIGER (NeurIPS 2023) Table 1, and Cornac's tuned cross-entropy SASRec notes
    "SASRec, published (TIGER Table 1)": {"recall@5": 0.0387, "recall@10": 0.0605, "ndcg@5": 0.0249, "ndcg@10": 0.0318},
    "SASRec, tuned CE (Cornac notes)": {"recall@5": 0.0508, "ndcg@10": 0.0423},
}


def evaluate(run_dir: Path, model: str, split: str, device: str, batch_size: int) -> tuple[dict, float]:
    """``mmrec test``; returns metrics.json and the command's wall time (process start-up included)."""
    seconds = mmrec("test", "--config", "configs/beauty/test.yaml", "--run_dir", str(run_dir), "--model", model,
                    "--split", split, "--device", device, "--batch_size", str(batch_size))
    return read_json(run_dir / "test" / f"{model}-{split}" / "metrics.json"), seconds


def metric_row(label: str, document: dict, command_seconds: float | None = None) -> str:
    metrics = document.get("metrics", document)
    cells = [label]
    cells += [f"{metrics[f'recall@{k}']:.4f}" if f"recall@{k}" in metrics else "-" for k in K]
    cells += [f"{metrics[f'ndcg@{k}']:.4f}" if f"ndcg@{k}" in metrics else "-" for k in K]
    cells.append(f"{metrics['mrr']:.4f}" if "mrr" in metrics else "-")
    if "eval_seconds" in document:
        cells.append(f"{document['eval_seconds']:.1f} / {document['wall_time_s']:.1f} / {command_seconds:.1f}")
    else:
        cells.append("")
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = [
    "| model / split | R@5 | R@10 | R@20 | N@5 | N@10 | N@20 | MRR | eval s (loop / stage / command) |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def data_line(document: dict) -> str:
    dataset = document["dataset"]
    return (f"- data: {dataset['num_users']:,} users, {dataset['num_items']:,} items, "
            f"{dataset['num_interactions']:,} interactions (items {str(dataset['items_sha256'])[:12]}, "
            f"interactions {str(dataset['interactions_sha256'])[:12]})")


def protocol_line(document: dict) -> str:
    masked = document["protocol"]["mask_history"]
    return ("- protocol: leave-one-out, full ranking over all items, history "
            f"{'masked' if masked else 'not masked (TIGER)'}, pessimistic ties")


def full_run(args: argparse.Namespace) -> str:
    run_dir = args.run_dir
    if not (run_dir / "prepare" / "manifest.json").is_file():
        mmrec("prepare", "--config", "configs/beauty/prepare.yaml", "--run_dir", str(run_dir), "--text.enabled", "false")
    overrides = option_words(args.override)
    fit_command_s = mmrec("fit-collab", "--config", args.config, "--run_dir", str(run_dir), "--trainer.enable_progress_bar", "false", *overrides)
    fit = read_json(run_dir / "fit-collab" / "manifest.json")
    extra, model = fit["extra"], fit["config"]["model"]
    valid, valid_s = evaluate(run_dir, "sasrec", "valid", args.device, args.batch_size)
    test, test_s = evaluate(run_dir, "sasrec", "test", args.device, args.batch_size)
    popularity, popularity_s = evaluate(run_dir, "popularity", "test", args.device, args.batch_size)
    data = fit["config"]["data"]
    lines = [
        f"## SASRec on {run_dir.name}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine()}; commit {git_commit()}",
        f"- config: {args.config}" + (f"; overrides: `{' '.join(overrides)}`" if overrides else ""),
        (f"- model: hidden {model['hidden_size']}, {model['num_blocks']} block(s), {model['num_heads']} head(s), ffn {model['ffn_size'] or model['hidden_size']}, "
        f"dropout {model['dropout']}, loss {model['loss']}, lr {model['lr']}, weight decay {model['weight_decay']}, "
        f"batch {data['batch_size']}, max_len {data['max_len']}, precision {fit['config']['trainer']['precision']}"),
        (f"- training: {extra['fit_wall_time_s']:.1f} s wall in `Trainer.fit` (validation every epoch included; "
        f"{fit_command_s:.1f} s for the whole command), {extra['epochs']} epochs"
        f"{' (early stopped)' if extra['stopped_early'] else ''}, best val NDCG@10 {extra['best_val']['ndcg@10']:.4f}"),
        data_line(test),
        protocol_line(test),
        "",
        *TABLE_HEAD,
        metric_row("SASRec / valid", valid, valid_s),
        metric_row("SASRec / test", test, test_s),
        metric_row("popularity / test", popularity, popularity_s),
        *(metric_row(label, figures) for label, figures in PUBLISHED.items()),
    ]
    return "\n".join(lines)


def eval_only(args: argparse.Namespace) -> str:
    """Timing of one full test evaluation; quality figures belong to full runs, so none are reported here."""
    before = f"{os.getloadavg()[0]:.1f}"
    test, command_s = evaluate(args.run_dir, "sasrec", "test", args.device, args.batch_size)
    fit = read_json(args.run_dir / "fit-collab" / "manifest.json")
    lines = [
        f"## Full evaluation of a trained SASRec on {args.run_dir.name} ({args.device}), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine()}; commit {git_commit()}",
        f"- model: {test['checkpoint']['path']} (trained {fit['extra']['global_steps']} steps; an evaluation costs the same however well a model is trained); batch size {args.batch_size}",
        data_line(test),
        protocol_line(test),
        (f"- {test['n_users']:,} users x {test['dataset']['num_items']:,} items: evaluation loop {test['eval_seconds']:.1f} s, "
        f"whole stage {test['wall_time_s']:.1f} s, whole command (Python start-up and imports included) {command_s:.1f} s"),
        f"- load average before / after: {before} / {os.getloadavg()[0]:.1f} (the timing is only as quiet as the machine)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", type=Path, default=ROOT / "runs" / "beauty")
    parser.add_argument("--config", default="configs/beauty/fit-collab.yaml")
    parser.add_argument("--override", action="append", default=[], help="extra fit-collab option, e.g. '--model.dropout 0.3'")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="evaluation device")
    parser.add_argument("--batch_size", type=int, default=2048, help="evaluation batch size")
    parser.add_argument("--eval_only", action="store_true", help="only time a full test evaluation of the trained model")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the section is appended to")
    args = parser.parse_args()
    args.run_dir = args.run_dir.resolve()
    append_section(args.results, eval_only(args) if args.eval_only else full_run(args))


if __name__ == "__main__":
    main()
