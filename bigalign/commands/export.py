"""``bigalign.export``: the ``bigalign export`` command in Python, one name for its two uses,
told apart as the command line tells them (by what ``source`` is, or by ``format``):

- a transform -> plain arrays (``format`` "npz", "json" or "safetensors"; default from the
  output's suffix): :func:`bigalign.commands.map_export.export`, returns an ExportResult;
- an embedding store or (N, d) Zarr array -> vectors (``format`` "parquet" or "lance"):
  :func:`bigalign.commands.parquet_export.export_parquet` /
  :func:`bigalign.commands.lance_export.export_lance`, returns a RunReport.

``keywords`` go to the function chosen (see each for its options)."""

from __future__ import annotations

from typing import Optional

from ..errors import InputError

__all__ = ["export", "VECTOR_FORMATS"]

#: Formats of an export of vectors (the others are a transform's).
VECTOR_FORMATS = ("parquet", "lance")


def export(source, output, format: Optional[str] = None, **keywords):
    """Export ``source`` to ``output`` (see the module doc)."""
    from ..storage.outputs import inspect

    fmt = None if format is None else str(format).lower()
    kind = inspect(source, keywords.get("storage_options")).kind \
        if isinstance(source, str) or hasattr(source, "__fspath__") else "transform"
    if kind == "absent":
        raise InputError(f"no transform, embedding store or Zarr array at {str(source)!r}")
    is_transform = kind in ("transform", "partial-transform")
    if fmt in VECTOR_FORMATS or (fmt is None and not is_transform):
        if is_transform:
            raise InputError(f"{str(source)!r} is a transform, which has no vectors to write "
                             f"as {fmt}: export it as npz, json or safetensors")
        if fmt is None:
            raise InputError(f"{str(source)!r} holds vectors: say how to write them, "
                             "format='parquet' or format='lance'")
        if fmt == "lance":
            from .lance_export import export_lance as run
        else:
            from .parquet_export import export_parquet as run
        return run(source, output, **keywords)
    if not is_transform:
        raise InputError(f"{str(source)!r} is not a transform: its vectors export as "
                         "format='parquet' or 'lance'")
    from .map_export import export as export_transform

    return export_transform(source, output, fmt, **keywords)
