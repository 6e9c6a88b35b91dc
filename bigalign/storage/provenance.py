"""Provenance of mapped vectors: the record an apply stamps on its output, carried by the
Parquet and Lance exports and back through ``bigalign import``, read by ``info`` and by the
commands that must not take mapped vectors for native ones.

The record (``bigalign.mapped`` in an apply output's or imported store's ``bigalign``
attribute; ``mapped`` in an export's manifest, in every Parquet file's ``bigalign``
key-value metadata and in a Lance dataset's schema metadata)::

    {"from_model": "intfloat/e5-small" | null,   # the transform's source model
     "to_model": "all-MiniLM-L6-v2" | null,      # its target model: whose space they are in
     "transform_sha256": "...",                  # Transform.digest() (64 hex digits)
     "family": "orthogonal" | "similarity" | "affine" | "ridge" | "reduced-rank" | ...,
     "centred": bool,                            # the map subtracts/adds means
     "target_centred": bool,                     # the target mean was left out (non-zero)
     "renormalized": bool,                       # rows L2-normalised after the map
     "normalize": bool,                          # inputs L2-normalised before it
     "chained_from": {...}}                      # only when the input was mapped already

``target_centred`` is true only when the apply left out a *non-zero* target mean: such
vectors live in the target model's centred space, and are comparable only with native
target vectors minus that mean. Pure dictionaries and strings, plus :func:`mapped_of`,
which reads the record from what is at a URL (a store, a bare apply output, an export);
no Dask.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

__all__ = ["KEY", "FIELDS", "mapped_record", "record_of", "record_json", "from_json",
           "mapped_of", "sentence", "centred_note", "not_native", "already_mapped"]

#: Where the record lives in a ``bigalign`` attribute, manifest or file metadata.
KEY = "mapped"
#: The record's fields (``chained_from`` besides, when the input was mapped already).
FIELDS = ("from_model", "to_model", "transform_sha256", "family", "centred", "target_centred",
          "renormalized", "normalize")


def mapped_record(transform, *, target_centred: bool, renormalized: bool,
                  chained_from: Optional[dict] = None) -> dict:
    """The record of vectors that ``transform`` (a :class:`bigalign.Transform`) maps, as an
    apply with ``target_centred`` / ``renormalized`` writes them; ``chained_from``: the
    input's own record when it was mapped already."""
    opts, meta = transform.options or {}, transform.metadata or {}
    means = np.any(np.asarray(transform.source_mean) != 0) or \
        np.any(np.asarray(transform.target_mean) != 0)
    scale = float(transform.scale)
    record = {"from_model": meta.get("source_model"), "to_model": meta.get("target_model"),
              "transform_sha256": transform.digest(),
              "family": opts.get("family") or ("similarity" if scale != 1.0 else "orthogonal"),
              "centred": bool(opts.get("center") or means),
              "target_centred": bool(target_centred and
                                     np.any(np.asarray(transform.target_mean) != 0)),
              "renormalized": bool(renormalized), "normalize": bool(transform.normalize)}
    if chained_from:
        record["chained_from"] = chained_from
    return record


def record_of(attrs: Any) -> Optional[dict]:
    """The record in ``attrs`` (a ``bigalign`` attribute, an export manifest or a file's
    metadata), or None. An apply output of an older bigalign (no ``mapped`` key, but its
    transform digest) gives a partial record: the fields it did not record are None."""
    if not isinstance(attrs, dict):
        return None
    found = attrs.get(KEY)
    if isinstance(found, dict) and found.get("transform_sha256"):
        return dict(found)
    if isinstance(attrs.get("transform"), str) and \
            (attrs.get("made_by") == "apply" or "source_rows" in attrs):
        partial = dict.fromkeys(FIELDS)
        partial.update(to_model=attrs.get("model"), transform_sha256=attrs["transform"])
        if isinstance(attrs.get("target_centred"), bool):
            partial["target_centred"] = attrs["target_centred"]
        return partial
    return None


def record_json(record: Optional[dict]) -> Optional[str]:
    """The record as canonical JSON text (sorted keys): what an import compares between
    its input files."""
    return None if record is None else json.dumps(record, sort_keys=True)


def from_json(raw) -> Optional[dict]:
    """The record in the JSON text ``raw`` (an export's ``bigalign`` metadata, bytes or
    str), or None when it holds none or is not JSON."""
    try:
        meta = json.loads(raw) if raw else None
    except (ValueError, TypeError):
        return None
    return record_of(meta)


def mapped_of(data, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The record of the vectors at ``data``: an embedding store (``STORE`` or
    ``STORE/embeddings``), a bare apply output, a Parquet or Lance export folder, or an
    open zarr.Array; None for anything else (numpy arrays, native stores, unreadable
    paths: this never raises for "not found")."""
    import zarr

    if isinstance(data, zarr.Array):
        return record_of(data.attrs.get("bigalign"))
    if not isinstance(data, str) and not hasattr(data, "__fspath__"):
        return None
    url = str(data).rstrip("/")
    zarr_found = False
    for at in (url, url[:-len("/embeddings")] if url.endswith("/embeddings") else None):
        if at:
            found, is_zarr = _attrs_record(at, storage_options)
            if found is not None:
                return found
            zarr_found = zarr_found or is_zarr
    return None if zarr_found else _export_record(url, storage_options)


def _attrs_record(url: str, so) -> tuple[Optional[dict], bool]:
    """(the record in the ``bigalign`` attribute of the Zarr node at ``url`` or None,
    whether there is a Zarr node there)."""
    import zarr

    from .locations import options_for

    try:
        node = zarr.open(url, mode="r", storage_options=options_for(url, so))
    except Exception:
        return None, False
    return record_of(node.attrs.get("bigalign")), True


def _export_record(url: str, so) -> Optional[dict]:
    from .lance_folder import export_manifest as lance_manifest
    from .parquet_folder import export_manifest as parquet_manifest

    for read in (parquet_manifest, lance_manifest):
        try:
            manifest = read(url, so)
        except Exception:
            manifest = None
        if manifest is not None:
            return record_of(manifest) or record_of(manifest.get("provenance"))
    return None


# ---- in words ---------------------------------------------------------------------------------

def _model(name) -> str:
    return str(name) if name else "an unrecorded model"


def sentence(record: dict) -> str:
    """"mapped from A into B's space by transform 1a2b3c4d5e6f (orthogonal, centred,
    target-centred)": what the vectors are, in one phrase."""
    flags = [record.get("family") or "family not recorded"]
    if record.get("centred") is not None:
        flags.append("centred" if record["centred"] else "uncentred")
    if record.get("target_centred"):
        flags.append("target-centred")
    if record.get("normalize"):
        flags.append("inputs normalised")
    if record.get("renormalized"):
        flags.append("renormalised")
    digest = str(record.get("transform_sha256") or "?")[:12]
    to = record.get("to_model")
    text = (f"mapped from {_model(record.get('from_model'))} into "
            f"{f'{to}' if to else 'the target model'}'s space by transform {digest} "
            f"({', '.join(flags)})")
    if isinstance(record.get("chained_from"), dict):
        text += f", after being {sentence(record['chained_from'])}"
    return text


def centred_note(record: dict) -> str:
    """What target-centred vectors need before they meet native ones ("" when they are
    not target-centred)."""
    if not record.get("target_centred"):
        return ""
    to = record.get("to_model") or "the target model"
    return (f"they live in {to}'s centred space (the transform's target mean left out): "
            f"compare them only with native {to} vectors minus that mean (subtract the "
            "transform's target_mean from native vectors and queries before mixing them in "
            "one index)")


def not_native(record: dict, what: str, expected: str) -> str:
    """A warning: ``what`` (e.g. "target 'x.store'") holds mapped vectors where
    ``expected`` (e.g. "vectors embedded with B") were expected."""
    note = centred_note(record)
    return (f"{what} holds vectors {sentence(record)}, not {expected}" +
            (f"; {note}" if note else ""))


def already_mapped(record: dict, what: str, digest: str, fitted_from) -> tuple[str, bool]:
    """Why applying the transform of ``digest`` (fitted from ``fitted_from``) to ``what``,
    whose vectors are mapped already (``record``), is wrong: (message, refuse?). Refused:
    the same transform again (it maps twice), target-centred vectors (in no model's
    native space), and a transform not recorded as mapping the space they are in. Only
    warned: a transform recorded as mapping exactly that model's space (a deliberate
    chain, e.g. the inverse, or a B -> C map after A -> B)."""
    head = f"{what} holds vectors {sentence(record)}"
    to = record.get("to_model")
    refuse = True
    if record.get("transform_sha256") == digest:
        why = "this very transform mapped them already: mapping them again maps twice"
    elif record.get("target_centred"):
        why = (f"they are in {to or 'the target model'}'s centred space, not native vectors "
               "of any model, so this transform's source mean does not fit them")
    else:
        refuse = not (to and fitted_from and to == fitted_from)
        why = (f"mapping them again chains two maps (the transform maps vectors of "
               f"{_model(fitted_from)}); 'bigalign compose' makes the one map from the "
               "original vectors, which rounds once")
    if refuse:
        return f"{head}: {why}. Pass --allow-model-mismatch if that is really intended.", True
    return f"{head}: {why}", False
