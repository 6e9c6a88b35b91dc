"""Input formats for ``bigalign import``: one :class:`~.base.Reader` per format, one module
each, found by file extension (:func:`~.base.reader_for`). Importing this package registers
the built-in readers; a new format is one more module imported here (docs/formats.md)."""

from .base import (FORMATS, Location, Reader, SourceFile, expand_inputs, format_of,
                   iter_rows, probe, read_slice, reader_for, reader_of, register,
                   restart_points)
# each registers its reader; this order is the order messages list the extensions in
from . import npy, fvecs, parquet, lance  # noqa: F401,E402,I001

__all__ = ["FORMATS", "Location", "Reader", "SourceFile", "expand_inputs", "format_of",
           "iter_rows", "probe", "read_slice", "reader_for", "reader_of", "register",
           "restart_points"]
