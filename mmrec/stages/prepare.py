"""``mmrec prepare``: raw logs and item content in, the canonical tables and item embeddings out.

This module is the command line only: it reads the configuration, hands the source's raw data to
:func:`mmrec.data.preparation.build_prepared` (where filtering, ordering, numbering, the split and the
embeddings live) and writes the result atomically to ``<run_dir>/prepare/``, with its manifest, only once
all of it exists, so a bad input leaves no artifact.
"""

from __future__ import annotations

from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, lazy_instance

from mmrec.artifacts import Manifest, stage_output, write_table
from mmrec.artifacts.manifest import file_sha256
from mmrec.artifacts.schemas import INTERACTIONS, ITEMS, USERS, embeddings_schema, embeddings_table
from mmrec.data.config_paths import check_input_paths, check_output_folder, resolve
from mmrec.data.filters import FilterOptions
from mmrec.data.image_embeddings import ImageOptions
from mmrec.data.preparation import Prepared, build_prepared
from mmrec.data.sources import Source, Synthetic
from mmrec.data.split import MIN_SPLIT_LENGTH, SplitOptions
from mmrec.data.text_embeddings import TextOptions
from mmrec.data.text_refinement import diversity_text
from mmrec.errors import InputError, MMRecError
from mmrec.stages.arguments import one_line, parse_or_refuse, stage_parser

STAGE = "prepare"
MAX_SEED = 2**63
"""Seeds must fit numpy's and torch's generators."""


def prepare(
    source: Source = lazy_instance(Synthetic),  # noqa: B008 (jsonargparse reads defaults from the signature)
    run_dir: str = "runs/demo",
    seed: int = 42,
    filters: FilterOptions = FilterOptions(),  # noqa: B008 (frozen, so safe to share)
    text: TextOptions = TextOptions(),  # noqa: B008 (frozen, so safe to share)
    image: ImageOptions | None = None,
    split: SplitOptions = SplitOptions(),  # noqa: B008 (frozen, so safe to share)
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Turn raw interactions and item content into items, users, interactions (leave-one-out) and item
    embeddings under ``<run_dir>/prepare/``.

    Args:
        source: where the data comes from: ``Synthetic`` (the embedded default), ``SeqTxt``,
            ``Amazon2014`` or ``Interactions``, as ``class_path`` + ``init_args``.
        run_dir: run directory; this stage writes ``<run_dir>/prepare/``.
        seed: seed of everything random here (the synthetic catalog, a randomly initialised encoder).
        filters: k-core, history length and unknown-item policy.
        text: item text template and text embeddings.
        image: image embeddings; ``null`` for none (or the source's own, e.g. synthetic image vectors).
        split: the new-item protocol (``split.new_items``: share of items kept out of training, drawn with
            ``seed``); leave-one-out otherwise.
        record: the configuration to record in the manifest (the command line passes its resolved one).

    Returns:
        The summary stored in ``manifest.extra``.
    """
    arguments = {"source": source, "run_dir": run_dir, "seed": seed, "filters": filters, "text": text, "image": image,
                 "split": split}
    check_options(source, seed, filters, text, image, split)
    check_input_paths([*source.input_paths(), *text.input_paths(), *(image.input_paths() if image else [])])
    check_output_folder("run_dir", run_dir)
    raw = source.load(seed)
    prepared = build_prepared(raw, filters, text, image, split, seed)
    manifest = Manifest(stage=STAGE, config=record if record is not None else _describe(arguments), seed=seed)
    for name, path in raw.files.items():
        manifest.add_input(name, path)
    if image is not None and image.precomputed:
        manifest.add_input("image_embeddings", resolve(image.precomputed))
    manifest.extra = {"source": type(source).__name__, **prepared.summary}
    try:
        with stage_output(run_dir, STAGE, manifest) as out:
            _write(prepared, out, manifest)
    except OSError as exc:
        raise InputError(f"{run_dir}: cannot write the {STAGE} folder ({exc.strerror or exc})") from None
    print(report(Path(run_dir) / STAGE, prepared.summary))
    return manifest.extra


def check_options(
    source: Source, seed: int, filters: FilterOptions, text: TextOptions, image: ImageOptions | None,
    split: SplitOptions,
) -> None:
    """Values that are wrong whatever the data, checked before anything is read."""
    check_seed(seed)
    for option, value, kind in (("source", source, Source), ("filters", filters, FilterOptions), ("text", text, TextOptions),
                                ("split", split, SplitOptions)):
        if not isinstance(value, kind):
            raise InputError(f"{option} must be set (a {kind.__name__}), got {value!r}")
    filters.check()
    split.check()
    text.check()
    if image is not None:
        image.check()


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise InputError(f"seed must be an integer between 0 and {MAX_SEED - 1}, got {seed!r}")


def _write(prepared: Prepared, out: Path, manifest: Manifest) -> None:
    """Every table and embedding matrix into the stage's temporary folder, each recorded in the manifest."""
    write_table(prepared.items, out / "items.parquet", ITEMS)
    write_table(prepared.users, out / "users.parquet", USERS)
    write_table(prepared.interactions, out / "interactions.parquet", INTERACTIONS)
    for name, table in (("items", prepared.items), ("users", prepared.users), ("interactions", prepared.interactions)):
        manifest.add_output(name, out / f"{name}.parquet", rows=table.num_rows)
    for modality, (matrix, present) in prepared.embeddings.items():
        path = out / f"emb_{modality}.parquet"
        write_table(embeddings_table(matrix, present), path, embeddings_schema(matrix.shape[1]))
        manifest.add_output(f"emb_{modality}", path, rows=len(matrix))
    manifest.lineage = {
        "items": file_sha256(out / "items.parquet"),
        "interactions": file_sha256(out / "interactions.parquet"),
    }


def report(folder: Path, summary: dict[str, Any]) -> str:
    """The few lines printed after a run: sizes, what was dropped and why, embedding widths."""
    counts, dropped = summary["counts"], summary["dropped"]
    lines = [
        f"mmrec prepare: wrote {folder}",
        (
            f"  users {counts['users']:,}  items {counts['items']:,}  interactions {counts['interactions']:,}  "
            f"sparsity {100 * counts['sparsity']:.3f}%  length mean {counts['mean_length']:.1f} max {counts['max_length']}"
        ),
        (
            f"  dropped: {dropped['users']:,} users ({dropped['kcore_users']:,} by k-core, {dropped['short_users']:,} with "
            f"fewer than {MIN_SPLIT_LENGTH} interactions), {dropped['items']:,} items ({dropped['kcore_items']:,} by "
            f"k-core), {dropped['unknown_item_interactions']:,} interactions with unknown items, "
            f"{dropped['history_interactions']:,} beyond max_history"
        ),
    ]
    held = summary["split"]
    if held["new_item_count"]:
        lines.append(
            f"  new items: {held['new_item_count']:,} ({held['new_items']:.0%}) kept out of training, "
            f"{held['new_test_targets']:,} are test targets; {held['held_out_interactions']:,} interactions and "
            f"{held['dropped_users']:,} users too short to split dropped"
        )
    if "text_refine" in summary:
        lines.append(refinement_line(summary["text_refine"]))
    text = summary["text"]
    if text["enabled"]:
        cache = "cache hit" if text["cache_hit"] else "computed" + (", cached" if text["cache_file"] else "")
        lines.append(f"  text: {text['dim']}-d, {text['present']:,} items with text, {text['missing']:,} masked ({cache})")
    else:
        lines.append("  text: embeddings disabled (text.enabled false)")
    if "image" in summary:
        image = summary["image"]
        lines.append(
            f"  image: {image['dim']}-d from {image['origin']}, {image['present']:,} items, {image['missing']:,} masked"
            + (f" ({image['unreadable']:,} unreadable)" if image["unreadable"] else "")
        )
    return "\n".join(lines)


def refinement_line(refine: dict[str, Any]) -> str:
    """One line on ``text.refine``: items, model, rounds taken, failures, cache hits, wall time, and how many
    distinct descriptions came out (a collapse onto a few generic sentences shows only there)."""
    rounds = " ".join(f"{rounds}:{count:,}" for rounds, count in refine["rounds_histogram"].items()) or "none"
    return (
        f"  refined text: {refine['items']:,} items by {refine['model']} in {refine['wall_time_s']:.1f} s, "
        f"{refine['accepted']:,} accepted by the evaluator, rounds {rounds}, {refine['failed']:,} failed (original "
        f"text kept), {refine['cache_hits']:,} cache hits, {refine['generations']:,} generations"
        + (f", {diversity_text(refine)}" if refine["refined"] else "")
    )


def _describe(value: Any) -> Any:
    """A JSON-able record of the arguments, for calls from Python that pass no resolved configuration."""
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    if isinstance(value, dict):
        return {str(key): _describe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(item) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {key: _describe(item) for key, item in vars(value).items()}
    if isinstance(value, Source):
        return {"class_path": f"{type(value).__module__}.{type(value).__name__}", "init_args": _describe(vars(value))}
    return repr(value)


def build_parser() -> ArgumentParser:
    parser = stage_parser(
        "prepare",
        "Turn raw logs and item content into items, users, leave-one-out interactions and item "
        "embeddings under <run_dir>/prepare/. See docs/prepare.md.",
    )
    parser.add_function_arguments(prepare, as_group=False, skip={"record"})
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    try:
        config = parse_or_refuse(parser, argv, "prepare")
    except UnicodeDecodeError as exc:
        raise InputError(f"a --config file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # noqa: BLE001 (jsonargparse fails on some malformed configs with its own errors)
        raise InputError(f"the configuration cannot be parsed: {type(exc).__name__}: {one_line(str(exc))}") from None
    record = config.clone()
    del record["config"]
    check_seed(config.seed)
    torch.manual_seed(config.seed)  # before instantiating: a randomly initialised image encoder is built here
    try:
        init = parser.instantiate(config)
    except MMRecError:
        raise
    except Exception as exc:  # noqa: BLE001 (a class the configuration names, e.g. image.encoder, failed to build)
        raise InputError(f"the configuration cannot be built: {type(exc).__name__}: {one_line(str(exc))}") from None
    prepare(
        source=init.source,
        run_dir=init.run_dir,
        seed=init.seed,
        filters=init.filters,
        text=init.text,
        image=init.image,
        split=init.split,
        record=record.as_dict(),
    )
