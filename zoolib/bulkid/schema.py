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
    it is missing; embeddings stored as float16 lists converted to bytes."""
    if "knn" not in table.schema.names:
        at = table.schema.get_field_index("ood") + 1
        table = table.add_column(at, "knn", pa.nulls(table.num_rows, type=pa.float64()))
    i = table.schema.get_field_index("embedding")
    if not pa.types.is_list(table.schema.field(i).type):
        return table
    blobs = [None if v is None else np.asarray(v, dtype=EMBEDDING).tobytes()
             for v in table.column(i).to_pylist()]
    return table.set_column(i, "embedding", pa.array(blobs, type=pa.binary()))
