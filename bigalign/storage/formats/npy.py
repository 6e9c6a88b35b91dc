"""``.npy`` input: a 2-D numeric array (C or Fortran order), read through ``np.memmap`` at the
array's data offset (local files: memory-mapped, so files larger than RAM work; remote ones:
byte ranges through fsspec). Any row is directly addressable."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...errors import InputError
from .base import Location, Reader, SourceFile, fixed_rows, numeric, register


@register
class NpyReader(Reader):
    format = "npy"
    extensions = (".npy",)

    def probe(self, at: Location, *, vector_column: Optional[str] = None,
              ids_column: Optional[str] = None) -> SourceFile:
        from numpy.lib import format as npf

        name = at.name
        with at.fs.open(at.path, "rb") as f:
            try:
                version = npf.read_magic(f)
                reader = npf.read_array_header_1_0 if version == (1, 0) else \
                    npf.read_array_header_2_0
                shape, fortran, dtype = reader(f) if version in ((1, 0), (2, 0)) else \
                    npf._read_array_header(f, version)
            except Exception as e:
                raise InputError(f"{name}: not a readable .npy file ({e})") from None
            offset = f.tell()
        if len(shape) != 2:
            raise InputError(f"{name}: expected a 2-D (rows, dim) array, got shape {shape}")
        if not numeric(dtype):
            raise InputError(f"{name}: dtype {dtype} is not numeric; vectors must be floats "
                             "(or integers)")
        if shape[1] == 0:
            raise InputError(f"{name}: vectors of dimension 0 (shape {shape})")
        need = offset + int(shape[0]) * int(shape[1]) * dtype.itemsize
        size = at.size
        if size and size < need:  # refused before an output or checkpoint exists (0: unknown)
            whole = max(size - offset, 0) // (int(shape[1]) * dtype.itemsize)
            raise InputError(f"{name}: truncated .npy file: its header says shape {shape} of "
                             f"{dtype}, {need:,} bytes with the header, but the file has "
                             f"{size:,} bytes ({whole:,} whole rows)")
        return at.source(self, rows=int(shape[0]), dim=int(shape[1]), dtype=dtype.str,
                         offset=offset, order="F" if fortran else "C")

    def read(self, f: SourceFile, start: int, stop: int,
             storage_options: Optional[dict] = None) -> tuple[np.ndarray, None]:
        if f.order == "F":  # column-major: rows are strided, memmap the whole array
            mm = np.memmap(f.url, dtype=f.dtype, mode="r", offset=f.offset,
                           shape=(f.rows, f.dim), order="F")
            return np.ascontiguousarray(mm[start:stop]), None
        raw = fixed_rows(f, start, stop, f.dim * np.dtype(f.dtype).itemsize, storage_options)
        return raw.view(f.dtype).reshape(stop - start, f.dim), None
