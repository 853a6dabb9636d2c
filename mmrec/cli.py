"""``mmrec <stage> ...``: dispatch to one stage's own command line.

Stage names are hyphenated and are not Trainer methods, so each stage builds its own parser (a
LightningCLI with ``run=False`` for training stages, a jsonargparse function otherwise). Stage modules are
imported only when chosen, which keeps ``mmrec --help`` instant.
"""

from __future__ import annotations

import importlib
import sys

from mmrec import __version__
from mmrec.errors import MMRecError
from mmrec.logs import quiet_third_party, verbose

STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("mmrec.stages.prepare", "turn raw logs and item content into canonical tables and item embeddings"),
    "fit-collab": ("mmrec.stages.fit_collab", "train SASRec (and popularity); export collaborative item embeddings"),
    "fit-quantizer": ("mmrec.stages.fit_quantizer", "train the multimodal RQ-VAE whose codes become semantic IDs"),
    "assign-sids": ("mmrec.stages.assign_sids", "map every item to its semantic ID per modality; SID quality report"),
    "fit-recommender": ("mmrec.stages.fit_recommender", "fine-tune the LLM recommender (LoRA) on SIDs and embeddings"),
    "test": ("mmrec.stages.test", "evaluate a trained model: full-ranking Recall/NDCG@K and MRR"),
    "compare": ("mmrec.stages.compare", "paired significance between test folders: CI and p-values per metric"),
    "pipeline": ("mmrec.stages.pipeline", "run the stages a pipeline YAML names, skipping those already up to date"),
    "recommend": ("mmrec.stages.recommend", "top-K items for a user, an ad-hoc history or a file of users"),
    "report": ("mmrec.stages.report", "one self-contained HTML report of a run: data, metrics, SIDs, curves"),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [
        f"usage: mmrec <stage> [--config FILE.yaml ...] [--dotted.key value ...]   (mmrec {__version__})",
        "",
        "stages, in pipeline order:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in STAGES.items()),
        "",
        "`mmrec <stage> --help` lists a stage's options; `--print_config` prints its resolved configuration.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"mmrec {__version__}")
        return 0
    stage = argv[0]
    if stage not in STAGES:
        print(f"mmrec: error: unknown stage '{stage}'\n\n{usage()}", file=sys.stderr)
        return 2
    if not verbose():
        quiet_third_party()
    module = importlib.import_module(STAGES[stage][0])
    try:
        module.main(argv[1:])
    except MMRecError as exc:
        print(f"mmrec {stage}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse/jsonargparse exit codes (0 for --help, 2 for bad arguments)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
