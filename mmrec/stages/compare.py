"""``mmrec compare``: paired significance between ``mmrec test`` folders of one split and protocol.

    mmrec compare RUN/test/sasrec-test RUN/test/fusion-test [RUN/test/generative-test ...]
    mmrec compare --baseline R42/test/sasrec-valid R43/test/sasrec-valid --candidate R42/test/fusion-valid R43/test/fusion-valid

The first folder (or the ``--baseline`` group, several seeds of one model) is the baseline; each other folder
(or the ``--candidate`` group) is compared with it. Wiring only: the statistics live in
:mod:`mmrec.evaluation.compare`. Prints a table and writes the result as JSON, atomically.
"""

from __future__ import annotations

import json
import re
from argparse import SUPPRESS
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from mmrec.artifacts.stage_output import atomic_file
from mmrec.errors import InputError
from mmrec.evaluation.compare import compare as compare_folders
from mmrec.evaluation.compare import format_comparison
from mmrec.stages.arguments import parse_or_refuse, stage_parser


def default_output(first_folder: str, result: dict[str, Any]) -> Path:
    """``<first folder's parent>/compare-<baseline label>-vs-<candidate labels>.json``."""
    labels = [result["baseline"]["label"], *(side["candidate"]["label"] for side in result["comparisons"])]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-vs-".join(labels))
    return Path(first_folder).resolve().parent / f"compare-{slug}.json"


def compare(
    folders: list[str], baseline: list[str], candidate: list[str], k: int | None = None, bootstrap: int = 10_000,
    seed: int = 0, slices: bool = False, output: str | None = None,
) -> dict[str, Any]:
    """Paired significance of each candidate against the baseline.

    Args:
        folders: test folders; the first is the baseline, each other is a candidate.
        baseline: instead of positional folders: the baseline's folders, one per seed.
        candidate: with --baseline: the candidate's folders, one per seed.
        k: cutoff of Recall@K and NDCG@K; default 10 when the folders measured it, else their largest K.
        bootstrap: paired bootstrap resamples for the 95% confidence interval.
        seed: seed of the bootstrap resampling, so the interval is reproducible.
        slices: also compare within each slice of the users (folders tested with ``mmrec test --slices true``).
        output: JSON file to write; default ``<first folder's parent>/compare-<labels>.json``.
    """
    if folders and (baseline or candidate):
        raise InputError("give either positional folders or --baseline/--candidate, not both")
    if (baseline or candidate) and not (baseline and candidate):
        raise InputError("--baseline and --candidate go together, each with one or more test folders")
    base, sides = (baseline, [candidate]) if baseline else (folders[:1], [[folder] for folder in folders[1:]])
    result = compare_folders(base, sides, k, bootstrap, seed, slices)
    path = Path(output) if output else default_output(base[0], result)
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(result, indent=2) + "\n")
    print(format_comparison(result))
    print(f"wrote {path}")
    return result


def build_parser() -> ArgumentParser:
    parser = stage_parser("compare", __doc__.splitlines()[0], config_help="a YAML of these options (repeatable; later wins)")
    parser.add_argument("folders", nargs="*", default=SUPPRESS, help="test folders; the first is the baseline")
    # SUPPRESS: an empty positional list would otherwise overwrite the ``folders`` of a --config file
    parser.add_argument("--baseline", nargs="+", default=[], help="the baseline's test folders, one per seed")
    parser.add_argument("--candidate", nargs="+", default=[], help="the candidate's test folders, one per seed")
    parser.add_function_arguments(compare, skip={"folders", "baseline", "candidate"})
    return parser


def main(argv: list[str]) -> None:
    config = parse_or_refuse(build_parser(), argv, "compare")
    options = {key: config[key] for key in ("baseline", "candidate", "k", "bootstrap", "seed", "slices", "output")}
    compare(config.get("folders") or [], **options)  # positional folders are SUPPRESSed when absent, so a config's list survives
