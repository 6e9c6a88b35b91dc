"""What sits at an output location, and whether bigalign may replace it.

bigalign deletes only what it wrote. Before an output is created or replaced, :func:`inspect`
says what is there:

==================  ==========================================================================
kind                meaning
==================  ==========================================================================
absent              nothing (or an empty folder)
transform           a finished transform (Zarr group, ``bigalign`` attribute with its format)
partial-transform   a transform whose save was cut short (``state: "writing"``)
apply-output        an array written by ``apply`` (``bigalign`` attribute, complete or not)
apply-store         an embedding store written by ``apply`` from a store source
                    (``bigalign.kind`` "embedding-store", ``made_by: "apply"``)
embedding-store     a group written by ``import`` (``bigalign.kind``; complete or not)
foreign             anything else: a user's array or group, a folder of files, a file
==================  ==========================================================================

Only the middle ones may be replaced (with ``--overwrite``, or by the run that owns them);
a foreign node is refused whatever the flags, with a message saying so. An imported
embedding store is replaced only by ``import`` (``kinds=OURS``): fit and apply refuse it
even with ``--overwrite``, so an imported corpus is never lost to a mistyped ``-o``. An
apply store is derived data (apply can write it again from its source), so it is
replaceable like a bare apply output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import fsspec

from ..errors import InputError

__all__ = ["Node", "inspect", "check_replaceable", "chunks_damage", "TRANSFORM_FORMAT",
           "APPLY_KINDS"]

TRANSFORM_FORMAT = "bigalign.transform/1"
OURS = ("transform", "partial-transform", "apply-output", "apply-store", "embedding-store")
REPLACEABLE = OURS[:4]  # by fit and apply: see the module doc
APPLY_KINDS = ("apply-output", "apply-store")


@dataclass(frozen=True)
class Node:
    """What :func:`inspect` found: ``kind`` (see module doc) and the ``bigalign``
    attribute (empty unless bigalign wrote the node)."""

    kind: str
    attrs: dict = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        return self.kind in OURS

    @property
    def complete(self) -> bool:
        return self.kind == "transform" or (self.kind in (*APPLY_KINDS, "embedding-store")
                                            and bool(self.attrs.get("complete")))


def inspect(url, storage_options: Optional[dict] = None) -> Node:
    """Classify what is at ``url`` (a path or fsspec URL) without modifying it."""
    import zarr

    url = str(url)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/")
    try:
        if not fs.exists(path):
            return Node("absent")
        if fs.isdir(path) and not fs.ls(path, detail=False):
            return Node("absent")
    except (OSError, ValueError):
        pass
    try:
        node = zarr.open(url, mode="r", storage_options=storage_options)
    except Exception:
        return Node("foreign")
    attrs = node.attrs.get("bigalign")
    attrs = dict(attrs) if isinstance(attrs, dict) else {}
    if isinstance(node, zarr.Group):
        if attrs.get("format") == TRANSFORM_FORMAT:
            kind = "partial-transform" if attrs.get("state") == "writing" else "transform"
            return Node(kind, attrs)
        if attrs.get("kind") == "embedding-store":
            return Node("apply-store" if attrs.get("made_by") == "apply" else
                        "embedding-store", attrs)
        return Node("foreign")
    if "complete" in attrs:
        return Node("apply-output", attrs)
    return Node("foreign")


def chunks_damage(url, storage_options: Optional[dict] = None) -> Optional[str]:
    """What a finished apply output or embedding store at ``url`` lost: ``"N of T chunks of
    its embeddings are not stored (first: rows a:b, KEY)"`` (its ids alike), or None when
    every chunk its shape and chunking imply is stored (they are written with
    ``write_empty_chunks=True``, so each exists once written). One listing of each array's
    objects (shard files when sharded; an inner chunk missing from a shard is found when
    the output is read, by :func:`bigalign.storage.stores.read_rows`)."""
    import zarr

    from .stores import describe_unstored

    node = zarr.open(str(url), mode="r", storage_options=storage_options)
    arrays = [("its embeddings", node)] if isinstance(node, zarr.Array) else \
        [(f"its {name}", node[name]) for name in ("embeddings", "ids") if name in node]
    for what, arr in arrays:
        lost = describe_unstored(arr, what)
        if lost:
            return lost
    return None


def check_replaceable(url, what: str, storage_options: Optional[dict] = None,
                      node: Optional[Node] = None, kinds=REPLACEABLE) -> Node:
    """Raise InputError unless the node at ``url`` is absent or written by bigalign (one
    of ``kinds``). Returns the node."""
    node = node or inspect(url, storage_options)
    if node.ours and node.kind not in kinds:
        raise InputError(f"{what} {str(url)!r} is a bigalign {node.kind}; only 'bigalign "
                         "import' replaces one. Remove it yourself or choose another location.")
    if node.kind == "foreign":
        raise InputError(
            f"{what} {str(url)!r} already exists and was not written by bigalign (no "
            "bigalign attribute): bigalign deletes only what it wrote, even with "
            "--overwrite. Remove it yourself or choose another location.")
    return node
