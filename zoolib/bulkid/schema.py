"""The columns of a bulk-identification results table and how they are stored."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

RESULT_COLUMNS = ["path", "rel", "hash", "pred", "confidence", "top5", "top5_prob", "margin",
                  "entropy", "ood", "knn", "embedding", "generation", "error"]
SCHEMA = pa.schema([
    ("path", pa.string()), ("rel", pa.string()), ("hash", pa.string()), ("pred", pa.string()),
    ("confidence", pa.float64()), ("top5", pa.list_(pa.string())),
    ("top5_prob", pa.list_(pa.float32())), ("margin", pa.float64()),
    ("entropy", pa.float64()), ("ood", pa.float64()), ("knn", pa.float64()),
    ("embedding", pa.binary()),
    ("generation", pa.string()), ("error", pa.string()),
])
_META_KEY = b"zoolib.bulkid"
_PARTS_KEY = b"zoolib.parts"  # [first, last]: the part numbers a file holds
FLUSH_SECONDS = 10.0  # at most this much finished work is lost by a hard kill
FLUSH_ROWS = 4096  # ... or this many rows, whichever comes first
EMBEDDING = np.dtype("<f2")  # float16, little-endian whatever the machine
# Dictionary-encode only repetitive strings: trying it on embeddings doubles write time.
_DICT_COLUMNS = ["pred", "generation", "error"]
# Snappy saves ~30 % on embeddings but makes writing them 2.5x slower; the rest is small.
_COMPRESSION = {c: "none" if c == "embedding" else "snappy" for c in RESULT_COLUMNS}


def float16_rows(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """The embedding column read back: a float16 array per row (None where null)."""
    blobs = column.combine_chunks()
    # Slices of one float16 view of the data buffer: no bytes object per row.
    values = np.frombuffer(blobs.buffers()[2] or b"", dtype=EMBEDDING)
    ends = np.frombuffer(blobs.buffers()[1], dtype=np.int32, count=len(blobs) + 1,
                         offset=4 * blobs.offset) // EMBEDDING.itemsize
    valid = blobs.is_valid().to_numpy(zero_copy_only=False).tolist()
    return [values[a:b] if ok else None
            for a, b, ok in zip(ends[:-1].tolist(), ends[1:].tolist(), valid)]


def upgrade(table: pa.Table) -> pa.Table:
    """A table of an older layout brought to SCHEMA: a `knn` column (null) added where
    it is missing; embeddings stored as float16 lists converted to bytes. A table of
    some of the columns gets only what concerns them."""
    names = table.schema.names
    if "knn" not in names and "ood" in names:
        at = table.schema.get_field_index("ood") + 1
        table = table.add_column(at, "knn", pa.nulls(table.num_rows, type=pa.float64()))
    i = table.schema.get_field_index("embedding")
    if i < 0 or not _is_list(table.schema.field(i).type):
        return table
    blobs = [None if v is None else np.asarray(v, dtype=EMBEDDING).tobytes()
             for v in table.column(i).to_pylist()]
    return table.set_column(i, "embedding", pa.array(blobs, type=pa.binary()))


def unreadable(stored: pa.Schema) -> str | None:
    """What keeps a file of schema `stored` from being read as a results table (a
    column missing, or of a type that does not hold the same values), or None."""
    names = stored.names
    missing = [c for c in RESULT_COLUMNS if c not in names and c != "knn"]
    if missing:
        return f"it lacks the column(s) {', '.join(missing)}"
    twice = [c for c in RESULT_COLUMNS if names.count(c) > 1]
    if twice:
        return f"it has the column(s) {', '.join(twice)} twice"
    wrong = [f"{c} is {stored.field(c).type}, not {SCHEMA.field(c).type}"
             for c in RESULT_COLUMNS if c in names
             and not _castable(stored.field(c).type, SCHEMA.field(c).type)]
    return f"column(s) of another kind: {'; '.join(wrong)}" if wrong else None


def conform(table: pa.Table) -> pa.Table:
    """A table read from a results file, in SCHEMA's layout: `upgrade`d, each column
    cast to SCHEMA's type, columns not in SCHEMA left out (a table with every
    column in SCHEMA's order, else in its own). Other tools write the same values
    with other types (large_string paths, float32 scores), which files of one
    dataset cannot mix; `unreadable` says beforehand whether the cast is safe.

    Raises:
        pa.ArrowInvalid: a value that does not fit (a cast is never lossy on strings).
    """
    table = upgrade(table)
    names = [c for c in table.schema.names if c in SCHEMA.names]
    if len(names) == len(RESULT_COLUMNS):
        names = RESULT_COLUMNS
    fields = [SCHEMA.field(c) for c in names]
    if names == table.schema.names and all(
            table.schema.field(c).type == f.type for c, f in zip(names, fields)):
        return table
    columns = [table.column(c) if table.schema.field(c).type == f.type
               else table.column(c).cast(f.type) for c, f in zip(names, fields)]
    return pa.table(columns, schema=pa.schema(fields, metadata=table.schema.metadata))


def _castable(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column of type `have` holds values of `want` (another width or
    encoding of the same kind; nulls fit anything; float lists fit the embedding,
    as `upgrade` converts them)."""
    if pa.types.is_null(have):
        return True
    if pa.types.is_dictionary(have):
        return _castable(have.value_type, want)
    if _is_list(have):
        if pa.types.is_binary(want):  # embeddings of the older layout
            return pa.types.is_floating(have.value_type)
        return _is_list(want) and _castable(have.value_type, want.value_type)
    return _kind(have) is not None and _kind(have) == _kind(want)


_KINDS = {
    "text": (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view),
    "bytes": (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view,
              pa.types.is_fixed_size_binary),
    "float": (pa.types.is_floating,),
}


def _kind(t: pa.DataType) -> str | None:
    """"text", "bytes" or "float" for the types that hold those values, else None."""
    return next((kind for kind, tests in _KINDS.items() if any(f(t) for f in tests)), None)


def _is_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))
