"""Does LLM-refined item text (``text.refine``, VL-CLIP) help? Prepare with and without it, and compare.

On one GPU, Amazon Beauty (the refinement is a generation pass over 12,101 titles):

    python bench/bench_text_refinement.py --config configs/beauty/prepare.yaml --runs runs/refine-bench \\
        --model smollm2 --batch_size 256

For each variant, ``plain`` (the titles as they are) and ``refined`` (``--text.refine.enabled true`` with
``--model``), in ``<runs>/<variant>/``, it runs the real commands: ``mmrec prepare``, then a text-only
quantizer (``mmrec fit-quantizer --data.modalities [text]``: the text SIDs depend on the text embeddings
alone, and a collab branch would need a ``fit-collab`` per variant, since the items table differs) and
``mmrec assign-sids``. It reports

- **text-SID collisions before resolution** (``assign-sids/report.json``): items sharing a code tuple, which
  near-duplicate titles cause and a good description should separate;
- **a text-only retrieval baseline** on the validation split: each user is the mean of the (L2-normalised)
  text embeddings of their training items, every item is ranked by cosine similarity (full ranking,
  pessimistic ties), Recall@10 and NDCG@10, with the history kept in the ranking (mmrec's default, the
  TIGER protocol) and removed from it;
- **the refinement's cost and outcome** from the prepare manifest: wall time, generations, items the
  evaluator accepted, rounds histogram, failures;

and appends a section to ``--results`` (``bench/RESULTS.md``). A variant whose ``assign-sids/report.json``
exists is not run again, and the refinement cache makes an interrupted ``refined`` prepare resume where it
stopped, so the benchmark can span several device calls. Nothing here is estimated: every figure is read
from what the commands wrote.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, append_section, git_commit, machine, mmrec, option_words, read_json

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


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, float]:
    """Prepare, quantize text alone and assign SIDs in ``<runs>/<variant>``; returns the commands' wall times."""
    run_dir = args.runs / variant
    if (run_dir / "assign-sids" / "report.json").is_file():
        print(f"{variant}: {run_dir}/assign-sids/report.json exists, not run again", flush=True)
        return {}
    times = {"prepare": mmrec("prepare", "--config", args.config, "--run_dir", str(run_dir), *prepare_args(args, variant))}
    times["fit-quantizer"] = mmrec("fit-quantizer", "--config", args.quantizer_config, "--run_dir", str(run_dir),
                                   "--data.modalities", "[text]")
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
    prepare_s = f"{times['prepare']:.0f}" if "prepare" in times else "(earlier run)"
    return (f"| {variant} | {collisions['colliding_items']:,} ({collisions['collision_rate']:.2%}), "
            f"{collisions['colliding_tuples']:,} tuples, largest {collisions['largest_group']} | {kept.recall:.4f} | "
            f"{kept.ndcg:.4f} | {masked.recall:.4f} | {masked.ndcg:.4f} | {prepare_s} | {cost} |")


def section(args: argparse.Namespace, rows: list[str]) -> str:
    return "\n".join([
        f"## Refined item text (VL-CLIP, `text.refine`) with {args.model}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {machine()}; commit {git_commit()}",
        (f"- prepare: {args.config}; refined: `{' '.join(prepare_args(args, 'refined'))}` (default prompts); text-only "
         f"quantizer {args.quantizer_config} with `--data.modalities [text]`; {args.sids_config}"),
        ("- retrieval: validation split, user = mean of normalised training-item text embeddings, cosine, full "
         "ranking, pessimistic ties, items without text ranked last"),
        "",
        ("| variant | text-SID collisions before resolution | R@10 | N@10 | R@10 (history masked) | N@10 (history masked) "
         "| prepare s | refinement |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/beauty/prepare.yaml", help="prepare config of both variants")
    parser.add_argument("--quantizer_config", default="configs/beauty/fit-quantizer.yaml")
    parser.add_argument("--sids_config", default="configs/beauty/assign-sids.yaml")
    parser.add_argument("--runs", type=Path, required=True, help="folder that receives <runs>/plain and <runs>/refined")
    parser.add_argument("--model", default="smollm2", help="text.refine.model")
    parser.add_argument("--batch_size", type=int, default=256, help="text.refine.batch_size")
    parser.add_argument("--max_rounds", type=int, default=5, help="text.refine.max_rounds")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the section is appended to")
    parser.add_argument("--prepare_option", action="append", default=[], metavar='"--KEY VALUE"',
                        help="an mmrec prepare option for both variants (repeatable): where the data, the text model are")
    args = parser.parse_args()
    args.runs = args.runs.resolve()
    rows = [variant_row(args, variant, run_variant(args, variant)) for variant in VARIANTS]
    append_section(args.results, section(args, rows))


if __name__ == "__main__":
    main()
