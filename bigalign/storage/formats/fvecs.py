"""``.fvecs`` input (the TEXMEX / ANN-benchmarks format): each row is an int32 dimension d
followed by d float32, every row the same d. Rows are fixed-size, so any row is directly
addressable (memory-mapped locally, one ranged read per slice remotely)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...errors import InputError
from .base import Location, Reader, SourceFile, fixed_rows, register


@register
class FvecsReader(Reader):
    format = "fvecs"
    extensions = (".fvecs",)

    def probe(self, at: Location, *, vector_column: Optional[str] = None,
              ids_column: Optional[str] = None) -> SourceFile:
        if at.size == 0:
            return at.source(self, rows=0, dim=0, dtype="<f4")
        with at.fs.open(at.path, "rb") as f:
            head = f.read(4)
        dim = int(np.frombuffer(head, "<i4")[0]) if len(head) == 4 else -1
        if not 0 < dim <= 1 << 20:
            raise InputError(f"{at.name}: not an .fvecs file (row 0 header says the vector "
                             f"has {dim} values)")
        row_bytes = 4 * (dim + 1)
        if at.size % row_bytes:
            raise InputError(f"{at.name}: {at.size} bytes is not a whole number of rows of "
                             f"{row_bytes} bytes (an int32 header and {dim} float32, as row 0 "
                             "says): the file is truncated or its rows have different "
                             "dimensions")
        return at.source(self, rows=at.size // row_bytes, dim=dim, dtype="<f4")

    def read(self, f: SourceFile, start: int, stop: int,
             storage_options: Optional[dict] = None) -> tuple[np.ndarray, None]:
        raw = fixed_rows(f, start, stop, 4 * (f.dim + 1), storage_options)
        rows = raw.view("<i4").reshape(stop - start, f.dim + 1)
        bad = np.flatnonzero(rows[:, 0] != f.dim)
        if bad.size:
            i = int(bad[0])
            raise InputError(f"{f.name} row {start + i}: its header says {int(rows[i, 0])} "
                             f"values, but row 0 has {f.dim}: an .fvecs file holds vectors "
                             "of one dimension (or the file is corrupt)")
        return raw.view("<f4").reshape(stop - start, f.dim + 1)[:, 1:], None
