"""Does LLM-refined item text (``text.refine``, VL-CLIP) help? Prepare with and without it, and compare.

On one GPU, Amazon Beauty (the refinement is a generation pass over 12,101 titles):

    python bench/bench_text_refinement.py --config configs/beauty/prepare.yaml --runs runs/refine-bench \\
        --model smollm2 --batch_size 256 [--fusion_seeds 42 43 44 --fusion_option "--model.backbone.name_or_path GGUF"
        --fusion_gpus 0 1]

For each variant, ``plain`` (the titles as they are) and ``refined`` (``--text.refine.enabled true`` with
``--model``), in ``<runs>/<variant>/``, it runs the real commands: ``mmrec prepare``, then a text-only
quantizer (``mmrec fit-quantizer --data.modalities [text]``: the text SIDs depend on the text embeddings
alone) and ``mmrec assign-sids``. It reports

- **text-SID collisions before resolution** (``assign-sids/report.json``): items sharing a code tuple, which
  near-duplicate titles cause and a good description should separate;
- **a text-only retrieval baseline** on the validation split: each user is the mean of the (L2-normalised)
  text embeddings of their training items, every item is ranked by cosine similarity (full ranking,
  pessimistic ties), Recall@10 and NDCG@10, with the history kept in the ranking (mmrec's default, the
  TIGER protocol) and removed from it;
- **the refinement's cost and outcome** from the prepare manifest: wall time, generations, items the
  evaluator accepted, rounds histogram, failures;
- with ``--fusion_seeds``, **the full fusion head** on each variant: in ``<runs>/<variant>-sids/``, a copy of the
  variant's ``prepare/`` with its own ``mmrec fit-collab`` (SASRec), a quantizer over the fusion head's
  modalities (``--quantizer_config`` as it is: collab + text on Beauty) and ``mmrec assign-sids``; then
  ``bench/bench_seeds.py``'s runs in ``<runs>/<variant>-fusion/seed<N>/`` (``mmrec fit-recommender`` with
  ``--trainer.max_time null`` so that early stopping, not a shared GPU's speed, ends it, and ``mmrec test
  --model fusion`` on the test split), its mean ± std over seeds, and ``mmrec compare`` of the refined seeds
  against the plain ones. On one GPU both variants' inputs are made first, at once, then the seeds go plain,
  refined, seed by seed; ``--fusion_gpus 0 1`` runs the two variants at once, one GPU each, after the text part.
  Make both variants on one machine: the same titles gave 113 text-SID collisions on an H200 and 139 on a CPU.
  The refined variant cannot reuse the plain variant's SASRec although SASRec reads only the interactions:
  ``text_refined`` makes the two ``items.parquet`` differ, and every stage refuses a ``fit-collab`` of another
  items table (``RunFolder.open``'s lineage check). Both train it with the same config and seed; the section
  gives each one's validation NDCG@10, so what is left of SASRec's seed noise is visible. ``mmrec compare``
  pairs the two although their items tables differ: their catalogs (``catalog_sha256``) are the same.

and appends to ``--results`` (``bench/RESULTS.md``) the variants' section as soon as both are made, then, once
every fusion seed is tested, the fusion head's inputs and its seeds' sections: a session cut short during the
fusion runs keeps the first (a resumed run appends it again). A variant whose ``assign-sids/report.json`` exists
is not run again, nor is a stage of ``<runs>/<variant>-sids/`` already published or a seed already tested, and
the refinement cache makes an interrupted ``refined`` prepare resume where it stopped, so the benchmark can span
several device calls. Nothing here is estimated: every figure is read from what the commands wrote.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import bench_seeds
import numpy as np
import torch
from common import RESULTS, append_section, git_commit, machine, mmrec, option_words, read_json, read_json_if_any

from mmrec.data.text_refinement import diversity_text
from mmrec.metrics.ranking import RankingMetrics, target_ranks

VARIANTS = ("plain", "refined")
USER_CHUNK = 2048
"""Users scored at a time: 2,048 x 12,101 float32 scores is 100 MB."""


@dataclass(frozen=True)
class Retrieval:
    """Recall@K and NDCG@K of one ranking rule over the evaluated users."""

    recall: float
    ndcg: float
    users: int


def normalized(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows (items without text) stay zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def user_vectors(histories: list[np.ndarray], items: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Each user's mean of the normalised text embeddings of the history items that have text, normalised."""
    users = np.zeros((len(histories), items.shape[1]), dtype=np.float32)
    for row, history in enumerate(histories):
        known = history[present[history]]
        if len(known):
            users[row] = items[known].mean(axis=0)
    return normalized(users)


def text_retrieval(
    histories: list[np.ndarray], targets: np.ndarray, matrix: np.ndarray, present: np.ndarray, k: int = 10,
    mask_history: bool = False,
) -> Retrieval:
    """Rank every item for every user by cosine with the user's mean history text embedding. Items without
    text score -inf (a content model cannot place them), as do history items with ``mask_history``."""
    items = normalized(matrix.astype(np.float32))
    users = user_vectors(histories, items, present)
    metrics = RankingMetrics((k,))  # mmrec test's rules: pessimistic ties, the same Recall and NDCG
    for start in range(0, len(histories), USER_CHUNK):
        scores = users[start:start + USER_CHUNK] @ items.T
        scores[:, ~present] = -np.inf
        if mask_history:
            for row, history in enumerate(histories[start:start + USER_CHUNK]):
                scores[row, history] = -np.inf
        metrics.update(target_ranks(torch.from_numpy(scores), torch.from_numpy(targets[start:start + USER_CHUNK])))
    values = metrics.compute()
    return Retrieval(float(values[f"recall@{k}"]), float(values[f"ndcg@{k}"]), len(histories))


def prepare_args(args: argparse.Namespace, variant: str) -> list[str]:
    """The ``mmrec prepare`` options of a variant (after ``--prepare_option``'s, common to both)."""
    common = option_words(args.prepare_option)
    if variant == "plain":
        return common
    return [*common, "--text.refine.enabled", "true", "--text.refine.model", args.model, "--text.refine.batch_size",
            str(args.batch_size), "--text.refine.max_rounds", str(args.max_rounds)]


def failed_batches(run_dir: Path) -> int:
    """Generation batches that raised in the refinement of ``run_dir``'s prepare (0 without one): their items
    kept their titles, so the variant would not measure refined text (beside a training run that held nearly
    all of the GPU's memory, every batch once ran out of memory, and the row showed the plain variant's figures
    under the refined variant's name)."""
    manifest = read_json_if_any(run_dir / "prepare" / "manifest.json") or {}
    return manifest.get("extra", {}).get("text_refine", {}).get("failed_batches", 0)


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, float]:
    """Prepare, quantize text alone and assign SIDs in ``<runs>/<variant>``; returns the commands' wall times. A
    variant already done is not run again, unless batches of its refinement raised: the cache keeps the items
    that were refined, and the run retries the others."""
    run_dir = args.runs / variant
    if (run_dir / "assign-sids" / "report.json").is_file() and not failed_batches(run_dir):
        print(f"{variant}: {run_dir}/assign-sids/report.json exists, not run again", flush=True)
        return {}
    times = {"prepare": mmrec("prepare", "--config", args.config, "--run_dir", str(run_dir), *prepare_args(args, variant))}
    times["fit-quantizer"] = mmrec("fit-quantizer", "--config", args.quantizer_config, "--run_dir", str(run_dir),
                                   *option_words(args.quantizer_option), "--data.modalities", "[text]")
    times["assign-sids"] = mmrec("assign-sids", "--config", args.sids_config, "--run_dir", str(run_dir))
    return times


def variant_row(args: argparse.Namespace, variant: str, times: dict[str, float]) -> str:
    """One Markdown row: collisions before resolution, the two retrieval figures, the refinement's cost."""
    from mmrec.data.prepared import PreparedData, load_modality

    run_dir = args.runs / variant
    collisions = read_json(run_dir / "assign-sids" / "report.json")["text"]["collisions_before"]
    data = PreparedData(run_dir)
    text = load_modality(run_dir, "text", data)
    histories, targets = data.histories("valid")
    kept = text_retrieval(histories, targets, text.matrix, text.present)
    masked = text_retrieval(histories, targets, text.matrix, text.present, mask_history=True)
    refine = data.manifest.extra.get("text_refine")
    if refine is None:
        cost = "-"
    else:
        rounds = " ".join(f"{r}:{n:,}" for r, n in refine["rounds_histogram"].items()) or "none"
        cost = (f"{refine['wall_time_s']:.0f} s, {refine['generations']:,} generations, {refine['accepted']:,} accepted, "
                f"rounds {rounds}, {refine['failed']:,} failed, {refine['cache_hits']:,} cache hits")
        if "distinct_refined" in refine:  # recorded since session 16
            cost += f", {diversity_text(refine)}"
    prepare_s = f"{times['prepare']:.0f}" if "prepare" in times else "(earlier run)"
    return (f"| {variant} | {collisions['colliding_items']:,} ({collisions['collision_rate']:.2%}), "
            f"{collisions['colliding_tuples']:,} tuples, largest {collisions['largest_group']} | {kept.recall:.4f} | "
            f"{kept.ndcg:.4f} | {masked.recall:.4f} | {masked.ndcg:.4f} | {prepare_s} | {cost} |")


def inputs_stages(args: argparse.Namespace) -> dict[str, list[str]]:
    """The commands that make the fusion head's inputs on a variant's prepare, in order, by stage folder."""
    return {
        "fit-collab": ["--config", args.collab_config, *option_words(args.collab_option)],
        "fit-quantizer": ["--config", args.quantizer_config, *option_words(args.quantizer_option)],
        "assign-sids": ["--config", args.sids_config],
    }


def inputs_dir(args: argparse.Namespace, variant: str) -> Path:
    return args.runs / f"{variant}-sids"


def fusion_runs(args: argparse.Namespace, variant: str) -> Path:
    return args.runs / f"{variant}-fusion"


def fusion_inputs(args: argparse.Namespace, variant: str) -> None:
    """Fill ``<runs>/<variant>-sids`` with the variant's ``prepare/``, its own SASRec, a quantizer over the fusion
    head's modalities and their SIDs. A stage published there is not run again; with no SASRec yet, the folder
    starts afresh from the variant's ``prepare/`` (an interrupted copy or an earlier prepare is not trusted)."""
    run_dir = inputs_dir(args, variant)
    if not (run_dir / "fit-collab" / "manifest.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(args.runs / variant / "prepare", run_dir / "prepare")
    for stage, options in inputs_stages(args).items():
        if (run_dir / stage / "manifest.json").is_file():
            print(f"{variant}: {run_dir / stage} exists, not run again", flush=True)
        else:
            mmrec(stage, *options, "--run_dir", str(run_dir))


def seeds_args(args: argparse.Namespace, variant: str) -> argparse.Namespace:
    """``bench/bench_seeds.py``'s options for the fusion head's seeds on a variant, parsed by its own parser (the
    same defaults as its command line); the refined variant's baseline is the plain variant's seeds."""
    configs = [word for config in args.fusion_config for word in ("--config", config)]
    overrides = [word for option in ("--trainer.max_time null", *args.fusion_option) for word in ("--override", option)]
    words = ["--prepared", str(inputs_dir(args, variant)), "--stage", "fit-recommender", *configs, *overrides,
             "--model", "fusion", "--label", f"Fusion head on {variant} item text (text.refine benchmark)",
             "--seeds", *map(str, args.fusion_seeds), "--runs", str(fusion_runs(args, variant)), "--split", "test",
             "--test_config", args.test_config]
    if variant != "plain":
        words += ["--baseline_runs", *(str(fusion_runs(args, "plain") / f"seed{seed}") for seed in args.fusion_seeds)]
    return bench_seeds.parse_args(words)


def train_fusion_on_gpu(args: argparse.Namespace, variant: str, gpu: str) -> None:
    """Make a variant's inputs, then train and test the fusion head for every seed, on GPU ``gpu`` (this process,
    one of ``--fusion_gpus``' pool, runs this variant alone: its stages inherit the setting)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    fusion_inputs(args, variant)
    seeds = seeds_args(args, variant)
    for seed in seeds.seeds:
        bench_seeds.run_seed(seeds, seed)


def train_all_fusion(args: argparse.Namespace) -> None:
    """Both variants' fusion runs. On one GPU, both variants' inputs at once (SASRec and the quantizer take a few GiB
    each, a fusion run up to 72), then seed by seed a plain and a refined run, one at a time, so that a session cut
    short leaves seeds that pair; with ``--fusion_gpus`` all at once, a process and a GPU each (the same GPU time,
    half the wall time)."""
    if not args.fusion_gpus:
        with ThreadPoolExecutor(len(VARIANTS)) as pool:
            list(pool.map(fusion_inputs, [args] * len(VARIANTS), VARIANTS))
        for seed in args.fusion_seeds:
            for variant in VARIANTS:
                bench_seeds.run_seed(seeds_args(args, variant), seed)
        return
    with ProcessPoolExecutor(len(VARIANTS), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(train_fusion_on_gpu, [args] * len(VARIANTS), VARIANTS, args.fusion_gpus))


def fusion_section(args: argparse.Namespace, variant: str) -> str:
    """bench_seeds' section of a variant's seeds: mean ± std, and for the refined one ``mmrec compare`` with plain."""
    seeds = seeds_args(args, variant)
    return bench_seeds.section(seeds, [bench_seeds.test_folder(seeds.runs / f"seed{seed}", seeds.model, seeds.split)
                                       for seed in seeds.seeds])


def inputs_lines(args: argparse.Namespace) -> list[str]:
    """The fusion head's inputs: the commands, then per variant its SASRec's seed and best validation NDCG@10 (how far
    the two differ is what is left of SASRec's seed noise) and the text-SID collisions of its multimodal quantizer."""
    commands = "; ".join(f"`mmrec {stage} {' '.join(options)}`" for stage, options in inputs_stages(args).items())
    lines = [(f"- inputs (the sections below): per variant, in <runs>/<variant>-sids, {commands}; a SASRec per variant "
              "(the same config and seed), since mmrec refuses a fit-collab of another items table and `text_refined` makes "
              "the two differ")]
    for variant in VARIANTS:
        collab = read_json(inputs_dir(args, variant) / "fit-collab" / "manifest.json")
        collisions = read_json(inputs_dir(args, variant) / "assign-sids" / "report.json")["text"]["collisions_before"]
        lines.append(f"  - {variant}: SASRec seed {collab['seed']}, best validation N@10 "
                     f"{collab['extra']['best_val']['ndcg@10']:.4f}; this quantizer's text-SID collisions before resolution "
                     f"{collisions['colliding_items']:,} ({collisions['collision_rate']:.2%})")
    return lines


def section(args: argparse.Namespace, rows: list[str]) -> str:
    return "\n".join([
        f"## Refined item text (VL-CLIP, `text.refine`) with {args.model}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine()}; commit {git_commit()}",
        (f"- prepare: {args.config}; refined: `{' '.join(prepare_args(args, 'refined'))}` (default prompts); text-only "
         f"quantizer `{' '.join(inputs_stages(args)['fit-quantizer'])} --data.modalities [text]`; {args.sids_config}"),
        ("- retrieval: validation split, user = mean of normalised training-item text embeddings, cosine, full "
         "ranking, pessimistic ties, items without text ranked last"),
        "",
        ("| variant | text-SID collisions before resolution | R@10 | N@10 | R@10 (history masked) | N@10 (history masked) "
         "| prepare s | refinement |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/beauty/prepare.yaml", help="prepare config of both variants")
    parser.add_argument("--quantizer_config", default="configs/beauty/fit-quantizer.yaml")
    parser.add_argument("--sids_config", default="configs/beauty/assign-sids.yaml")
    parser.add_argument("--runs", type=Path, required=True, help="folder that receives <runs>/plain and <runs>/refined")
    parser.add_argument("--model", default="smollm2", help="text.refine.model")
    parser.add_argument("--batch_size", type=int, default=256, help="text.refine.batch_size")
    parser.add_argument("--max_rounds", type=int, default=5, help="text.refine.max_rounds")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the sections are appended to")
    parser.add_argument("--prepare_option", action="append", default=[], metavar='"--KEY VALUE"',
                        help="an mmrec prepare option for both variants (repeatable): where the data, the text model are")
    parser.add_argument("--quantizer_option", action="append", default=[], metavar='"--KEY VALUE"',
                        help="an mmrec fit-quantizer option for every quantizer (repeatable)")
    fusion = parser.add_argument_group("the fusion head (with --fusion_seeds)")
    fusion.add_argument("--fusion_seeds", type=int, nargs="*", default=[],
                        help="its seeds (none: the fusion head is not run)")
    fusion.add_argument("--collab_config", default="configs/beauty/fit-collab.yaml")
    fusion.add_argument("--collab_option", action="append", default=[], metavar='"--KEY VALUE"',
                        help="an mmrec fit-collab option (repeatable)")
    fusion.add_argument("--fusion_config", nargs="+", default=["configs/beauty/fit-recommender.yaml"],
                        help="fit-recommender config(s), composed in order")
    fusion.add_argument("--fusion_option", action="append", default=[], metavar='"--KEY VALUE"',
                        help="an mmrec fit-recommender option (repeatable), after `--trainer.max_time null`: the backbone")
    fusion.add_argument("--test_config", default="configs/beauty/test.yaml", help="mmrec test config (the test split)")
    fusion.add_argument("--fusion_gpus", nargs="*", default=[], metavar="GPU",
                        help="two GPU ids: the plain and the refined runs at once, one on each (none: on one GPU, seed "
                        "by seed, plain then refined)")
    args = parser.parse_args()
    if args.fusion_gpus and len(args.fusion_gpus) != len(VARIANTS):
        parser.error(f"--fusion_gpus takes {len(VARIANTS)} GPU ids, one a variant, or none")
    args.runs = args.runs.resolve()
    return args


def main() -> None:
    args = parse_args()
    times = {variant: run_variant(args, variant) for variant in VARIANTS}
    if failed := failed_batches(args.runs / "refined"):
        raise SystemExit(f"bench_text_refinement: {args.runs / 'refined'}/prepare: generation raised for {failed} "
                         "batch(es) (prepare's warning says why); no section written, since those items kept their "
                         "titles. Free the GPU or lower --batch_size and run again: the cache keeps what was refined")
    append_section(args.results, section(args, [variant_row(args, variant, times[variant]) for variant in VARIANTS]))
    if args.fusion_seeds:
        train_all_fusion(args)
        append_section(args.results, "\n\n".join([f"## The fusion head on plain and {args.model}-refined item text",
                                                    "\n".join(inputs_lines(args)),
                                                    *(fusion_section(args, variant) for variant in VARIANTS)]))


if __name__ == "__main__":
    main()
