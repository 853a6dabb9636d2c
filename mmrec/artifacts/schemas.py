"""Explicit pyarrow schemas for every Parquet artifact, and the only readers and writers of them.

Each schema carries its name and version in the Parquet metadata (``mmrec.schema``). The reader checks
name, version, column names and types before any data is used, so a file from another tool or another
schema version fails with a message naming the file and the column instead of a shape error later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmrec.errors import InputError

SCHEMA_VERSION = 1
_META_KEY = b"mmrec.schema"


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={_META_KEY: f"{name}/{SCHEMA_VERSION}".encode()})


ITEMS = _schema(
    "items",
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("image", pa.string()),
    ],
)
"""One row per item, ``item_idx`` dense 0..N-1 in first-appearance order. ``text`` is the rendered item
text (null when the item has none); ``image`` a path or URL (null when none)."""

OPTIONAL_FIELDS: dict[str, list[pa.Field]] = {
    "items": [pa.field("text_refined", pa.string())],
}
"""Columns added to a schema after its version was fixed, by schema name. A file written before a column
existed lacks it: the reader adds it as nulls, so old run folders stay readable without a version bump, and
writers may leave it out. ``items.text_refined`` is the language-model rewrite of ``text`` (``prepare``'s
``text.refine``; null where not refined)."""

USERS = _schema(
    "users",
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
    ],
)

INTERACTIONS = _schema(
    "interactions",
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("timestamp", pa.int64()),
        pa.field("split", pa.string(), nullable=False),
    ],
)
"""One row per interaction; ``position`` is the 0-based chronological rank within the user, ``split`` is
``train``, ``valid`` or ``test`` (leave-one-out: last item test, second-last valid)."""

SPLITS = ("train", "valid", "test")

SIDS = _schema(
    "sids",
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("codes", pa.list_(pa.int32()), nullable=False),
        pa.field("sid", pa.string(), nullable=False),
    ],
)
"""One row per item and modality: the code tuple (after collision resolution, so possibly one level longer
than the quantizer's) and its token string, e.g. ``<a_12><b_7><c_201><d_3>``."""

PREDICTIONS = _schema(
    "predictions",
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("target", pa.int32(), nullable=False),
        pa.field("items", pa.list_(pa.int32()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
    ],
)
"""One row per evaluated user: the target item and the top-K items with their scores, best first."""

SLICE_MEMBERS = _schema(
    "slice_members",
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("slice", pa.string(), nullable=False),
    ],
)
"""``mmrec test --slices true``: one row per evaluated user and slice it belongs to (a popularity slice of its
target and a history-length bucket), so that ``mmrec compare --slices true`` pairs users within a slice."""

RECOMMENDATIONS = _schema(
    "recommendations",
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("score", pa.float32(), nullable=False),
    ],
)
"""``mmrec recommend --users``: one row per user and recommended item, ``rank`` 1..K (long format, so it
joins and filters without unnesting lists); ``title`` is the item's text (null when it has none)."""


def embeddings_schema(dim: int) -> pa.Schema:
    """Per-item embeddings of one modality; ``present`` is the explicit mask (False: no content, zeros)."""
    return _schema(
        "embeddings",
        [
            pa.field("item_idx", pa.int32(), nullable=False),
            pa.field("present", pa.bool_(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
    )


def schema_name(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(_META_KEY, b"").decode(errors="replace")


def optional_fields(schema: pa.Schema) -> list[pa.Field]:
    """The optional columns of ``schema`` (see :data:`OPTIONAL_FIELDS`)."""
    return OPTIONAL_FIELDS.get(schema_name(schema).split("/")[0], [])


def with_optional(schema: pa.Schema) -> pa.Schema:
    """``schema`` with its optional columns: what a writer that has them all builds its table with."""
    return pa.schema([*schema, *optional_fields(schema)], metadata=schema.metadata)


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema) -> None:
    """Write ``table`` cast to ``schema`` (with those optional columns it has); callers write into a stage's
    temporary folder (see stage_output)."""
    target = pa.schema([*schema, *(f for f in optional_fields(schema) if f.name in table.column_names)],
                       metadata=schema.metadata)
    table = table.select(target.names).cast(target)
    pq.write_table(table.replace_schema_metadata(schema.metadata), str(path), compression="zstd")


def read_table(path: str | Path, schema: pa.Schema | str) -> pa.Table:
    """Read a Parquet artifact and check it against ``schema``.

    ``schema`` may be a schema name (``"embeddings"``) for variable-width schemas; then only the name,
    version and column names are checked and the caller checks widths. Optional columns the file lacks are
    returned as nulls.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        table = pq.read_table(str(path))
        table.schema.names  # noqa: B018 (column names are decoded lazily: a damaged one fails here)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    expected_name = schema if isinstance(schema, str) else schema_name(schema).split("/")[0]
    found = schema_name(table.schema)
    if found != f"{expected_name}/{SCHEMA_VERSION}":
        raise InputError(
            f"{path}: expected an mmrec '{expected_name}' table of schema version {SCHEMA_VERSION}, "
            f"found {found or 'no mmrec schema metadata'}"
        )
    if isinstance(schema, pa.Schema):
        optional = optional_fields(schema)
        for field in optional:
            if field.name not in table.schema.names:
                table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        for field in [*schema, *optional]:
            if field.name not in table.schema.names:
                raise InputError(f"{path}: missing column '{field.name}' ({field.type})")
            actual = table.schema.field(field.name).type
            if actual != field.type:
                raise InputError(f"{path}: column '{field.name}' has type {actual}, expected {field.type}")
            _require_no_nulls(table, field, path)
        table = table.select([*schema.names, *(field.name for field in optional)])
    return table


def _require_no_nulls(table: pa.Table, field: pa.Field, path: str | Path) -> None:
    """A non-nullable column must hold no nulls (Parquet writers other than ours do not enforce it)."""
    nulls = table.column(field.name).null_count
    if not field.nullable and nulls:
        raise InputError(f"{path}: column '{field.name}' has {nulls} null value(s)")


def embeddings_to_numpy(table: pa.Table, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(matrix [N, d] float32, present [N] bool)`` rows ordered by ``item_idx``.

    Checks the column types (``read_table`` cannot: the width varies), that ``item_idx`` is exactly
    0..N-1 and that present vectors are finite.
    """
    for field in embeddings_schema(1):
        if field.name not in table.schema.names:
            raise InputError(f"{path}: missing column '{field.name}'")
        actual = table.schema.field(field.name).type
        if field.name == "embedding":
            if not (pa.types.is_fixed_size_list(actual) and actual.value_type == pa.float32()):
                raise InputError(f"{path}: column 'embedding' has type {actual}, expected fixed_size_list<float, d>")
        elif actual != field.type:
            raise InputError(f"{path}: column '{field.name}' has type {actual}, expected {field.type}")
        _require_no_nulls(table, field, path)
    if table.column("embedding").combine_chunks().flatten().null_count:
        raise InputError(f"{path}: column 'embedding' has null values inside its vectors")
    idx = table.column("item_idx").to_numpy()
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(idx[order], np.arange(len(idx))):
        raise InputError(f"{path}: column 'item_idx' must hold each item 0..{len(idx) - 1} exactly once")
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    matrix = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(idx), dim)[order].astype(np.float32)
    present = table.column("present").to_numpy(zero_copy_only=False)[order].astype(bool)
    bad = ~np.isfinite(matrix[present]).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(present)[np.flatnonzero(bad)[0]])
        raise InputError(f"{path}: item_idx {row} has a non-finite embedding (NaN or inf)")
    return matrix, present


def embeddings_table(matrix: np.ndarray, present: np.ndarray) -> pa.Table:
    """Build an embeddings table; rows whose ``present`` is False are stored as zeros."""
    matrix = np.asarray(matrix, dtype=np.float32).copy()
    present = np.asarray(present, dtype=bool)
    matrix[~present] = 0.0
    n, dim = matrix.shape
    values = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)
    return pa.table(
        {"item_idx": pa.array(np.arange(n, dtype=np.int32)), "present": pa.array(present), "embedding": values},
        schema=embeddings_schema(dim),
    )
