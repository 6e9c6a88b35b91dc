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

Only the middle ones may be replaced (with ``--overwrite``, or by the run that owns them),
and each only by a command that writes its kind (:data:`TRANSFORM_KINDS`: fit, compose,
invert; :data:`APPLY_KINDS`: apply; :data:`STORE_KINDS`: import): a mistyped ``-o`` never
turns a fitted transform into a store, or mapped vectors into a transform, whatever the
flags. A foreign node is refused whatever the flags, with a message saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import fsspec

from ..errors import InputError

__all__ = ["Node", "inspect", "check_replaceable", "TRANSFORM_FORMAT", "TRANSFORM_KINDS",
           "APPLY_KINDS", "STORE_KINDS"]

TRANSFORM_FORMAT = "bigalign.transform/1"
OURS = ("transform", "partial-transform", "apply-output", "apply-store", "embedding-store")
#: What each command may replace (see the module doc).
TRANSFORM_KINDS = ("transform", "partial-transform")
APPLY_KINDS = ("apply-output", "apply-store")
STORE_KINDS = ("embedding-store",)
#: How messages name each kind, and the command that writes it.
_NAMES = {"transform": ("a transform", "'bigalign fit', 'compose' or 'invert'"),
          "partial-transform": ("an unfinished transform",
                                "'bigalign fit', 'compose' or 'invert'"),
          "apply-output": ("an apply output", "'bigalign apply'"),
          "apply-store": ("an embedding store of mapped vectors", "'bigalign apply'"),
          "embedding-store": ("an imported embedding store", "'bigalign import'")}


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


def check_replaceable(url, what: str, storage_options: Optional[dict] = None,
                      node: Optional[Node] = None, *, kinds) -> Node:
    """Raise InputError unless the node at ``url`` is absent or one of ``kinds`` (the kinds
    the calling command writes, :data:`TRANSFORM_KINDS` etc.), whatever the flags: bigalign
    replaces only what it wrote, and only with an output of the same kind. Returns the
    node."""
    node = node or inspect(url, storage_options)
    if node.ours and node.kind not in kinds:
        name, maker = _NAMES[node.kind]
        raise InputError(f"{what} {str(url)!r} is {name}, which this command does not "
                         f"replace, even with --overwrite: only {maker} does. Remove it "
                         "yourself or choose another location.")
    if node.kind == "foreign":
        raise InputError(
            f"{what} {str(url)!r} already exists and was not written by bigalign (no "
            "bigalign attribute): bigalign deletes only what it wrote, even with "
            "--overwrite. Remove it yourself or choose another location.")
    return node
