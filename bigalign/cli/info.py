"""``bigalign info`` and ``bigalign status``: what is at a path (a transform, an apply
output, an embedding store, a Parquet export, a plain Zarr array) and the progress of a run,
from storage alone. Exit codes: 0 described or finished; 3 unfinished or damaged; 2 nothing
bigalign reads there."""

from __future__ import annotations

from typing import Optional

from ..storage.locations import options_for
from ..words import counted
from .common import (_describe_transform, _print_json, _transform_json, add_storage_option,
                     storage_options)


def _add_info(sub) -> None:
    """``bigalign info``."""
    i = sub.add_parser("info", help="describe a transform, an apply output, an embedding store, "
                                    "a Parquet export, a Zarr array or progress in flight",
                       description="Describe what is at path: a transform (its pairs, "
                                   "options, residual and the paper's bound), an apply "
                                   "output or embedding store (rows, ids, model, complete or "
                                   "not), a Parquet export, a plain Zarr array (shape, dtype, "
                                   "chunks), or the progress of a run in flight. Exit code 0; "
                                   "3: an unfinished output (rerun to resume); 2: nothing "
                                   "bigalign reads.")
    i.add_argument("path", help="a transform, an apply output, an embedding store, a "
                                "Parquet export folder, a Zarr array, or a run's checkpoint")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_storage_option(i)


def _add_status(sub) -> None:
    """``bigalign status``."""
    st = sub.add_parser("status", help="progress of a fit, apply, import or export in flight "
                                       "or interrupted",
                        description="Units done, rows/s and time left, read from the run's "
                                    "checkpoint (works from any machine that sees the storage). "
                                    "Exit code 0: finished; 3: unfinished (rerun to resume); "
                                    "2: nothing recorded there.")
    st.add_argument("path", help="the run's output (a transform, apply output, embedding "
                                 "store or Parquet export folder) or its checkpoint")
    st.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_storage_option(st)


def _describe_apply_output(status: dict) -> str:
    """One line of what a bare apply output's ``bigalign`` attribute records, readable
    (``--json`` has it all: run id, job fingerprint)."""
    a, b = status.get("source_rows") or ("?", "?")
    rows = status.get("rows")
    parts = [f"{rows:,} rows" if isinstance(rows, int) else "rows",
             f"mapped from {status.get('source', '?')} rows {a}:{b}"]
    if status.get("transform"):
        parts.append(f"by the transform {str(status['transform'])[:12]}")
    text = " ".join(parts)
    if status.get("model"):
        text += f"; model: {status['model']}"
    bad = status.get("bad_rows") or {}
    if bad.get("count"):
        text += f"; {counted(bad['count'], 'bad row')} written as {bad.get('policy')}"
    if status.get("completed"):
        took = f" in {status['seconds']:.1f}s" if isinstance(status.get("seconds"), (int, float)) \
            else ""
        text += f"; completed {status['completed']}{took}"
    return text


def _plain_array(path, so) -> Optional[dict]:
    """What ``info`` says of a Zarr array bigalign did not write ({kind, path, shape, dtype,
    chunks, shards, unusable: why no command takes it, or None}), or None when ``path``
    holds no Zarr array. A file is no bigalign output or Zarr store: InputError."""
    import fsspec
    import zarr

    from ..errors import InputError
    from ..storage.stores import open_embeddings

    fs, local = fsspec.core.url_to_fs(str(path), **(options_for(path, so) or {}))
    if fs.isfile(local.rstrip("/")):
        raise InputError(_nothing_described(path, so))
    try:
        arr = zarr.open_array(str(path), mode="r", storage_options=options_for(path, so))
    except Exception:  # no array there (absent, a group, unreadable): not ours to describe
        return None
    try:
        open_embeddings(str(path), side="input", storage_options=so, check_chunks=False)
        unusable = None
    except InputError as e:
        unusable = str(e)
    return {"kind": "zarr-array", "path": str(path), "shape": list(arr.shape),
            "dtype": str(arr.dtype), "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None, "unusable": unusable}


def _user_store(path, so) -> Optional[dict]:
    """What ``info`` says of an embedding store a user made (a Zarr group holding
    ``embeddings`` and optionally ``ids`` and a ``model`` attribute: every command takes
    one), or None when ``path`` is not one."""
    from ..commands.parquet_export import ids_kind
    from ..errors import InputError
    from ..storage.embedding_store import store_parts
    from ..storage.stores import open_embeddings

    try:
        url, ids, model = store_parts(path, so)
    except Exception:
        return None
    if url == path:  # not a group with embeddings
        return None
    try:
        emb = open_embeddings(url, side="input", storage_options=so, check_chunks=False)
    except InputError as e:
        return {"kind": "embedding-store", "path": str(path), "made_by": None, "rows": 0,
                "dim": 0, "dtype": "?", "ids": None, "model": model, "unusable": str(e)}
    try:
        kind, unusable = (ids_kind(ids) if ids is not None else None), None
    except InputError as e:
        kind, unusable = None, str(e)
    return {"kind": "embedding-store", "path": str(path), "made_by": None, "rows": emb.rows,
            "dim": emb.dim, "dtype": str(emb.dtype), "ids": kind, "model": model,
            "unusable": unusable}


def _info(args) -> int:
    """``bigalign info``: what is at the path, tried in order (a Parquet export, an
    embedding store, an apply output, a transform, a user's Zarr array or store, progress)."""
    import bigalign
    from ..commands.parquet_export import export_manifest
    from ..storage.embedding_store import store_attrs
    from ..transform import Transform

    so = storage_options(args)
    from ..storage.lance_folder import export_manifest as lance_manifest

    export = export_manifest(args.path, so)
    if export is not None:  # a folder of Parquet files (export --format parquet)
        return _describe_export(args, export, so)
    export = lance_manifest(args.path, so)
    if export is not None:  # a Lance dataset (export --format lance)
        return _describe_export(args, export, so, "lance")
    store = store_attrs(args.path, so)
    if store is not None:  # an embedding store (written by import or apply)
        return _describe_store(args, store, so)
    status = bigalign.output_status(args.path, so)
    if status is not None:
        return _describe_output(args, status, so)
    try:
        t = Transform.load(args.path, storage_options=so)
    except bigalign.DamagedOutputError as e:
        info = {"kind": "transform", "path": args.path, "complete": False, "damaged": e.lost}
        if args.json:
            _print_json(info)
        else:
            print(f"transform {args.path}: DAMAGED ({e.lost}; rerun the fit with --overwrite "
                  "to write it again)")
        return 3
    except bigalign.InputError:
        return _describe_other(args, so)
    if args.json:
        _print_json(_transform_json(t, args.path))
    else:
        print(_describe_transform(t, args.path))
    return 0


def _describe_store(args, store: dict, so) -> int:
    """``info`` of an embedding store bigalign wrote (``store``: its record): 0 complete,
    3 unfinished or damaged."""
    from ..storage.embedding_store import open_store

    model = open_store(args.path, storage_options=so, allow_incomplete=True)[2]
    info = {"kind": "embedding-store", "path": args.path, "model": model,
            **{k: v for k, v in store.items() if k not in ("kind", "job")}}
    info["mapped"] = _mapped(store)
    made_by = store.get("made_by") or "import"
    state = _completion(info, args.path, so, bool(store.get("complete")), f"the {made_by}")
    if args.json:
        _print_json(info)
        return 0 if info.get("complete") else 3
    print(f"embedding store {args.path}: {state}, {store.get('rows', '?'):,} rows x "
          f"{store.get('dim', '?')}, ids: {store.get('ids') or 'none (row numbers)'}"
          f", model: {model or 'not recorded'}")
    if made_by == "apply":
        a, b = store.get("source_rows") or ("?", "?")
        print(f"  written by apply from {store.get('source')} rows {a}:{b}")
    _print_mapped(info)
    if store.get("duplicate_ids"):
        print(f"  {store['duplicate_ids']:,} ids occur more than once: a fit pairing by "
              "id needs --duplicates first|last")
    if info.get("progress"):
        print("  " + _describe_progress(info["progress"]))
    return 0 if info.get("complete") else 3


def _describe_output(args, status: dict, so) -> int:
    """``info`` of a bare apply output (``status``: its record)."""
    info = {"kind": "apply-output", "path": args.path, **status}
    info["mapped"] = _mapped(status)
    state = _completion(info, args.path, so, bool(status.get("complete")), "apply")
    if args.json:
        _print_json(info)
    else:
        print(f"apply output {args.path}: {state}")
        print("  " + _describe_apply_output(status))
        _print_mapped(info)
        if info.get("progress"):
            print("  " + _describe_progress(info["progress"]))
    return 0 if info.get("complete") else 3


def _describe_other(args, so) -> int:
    """``info`` of what bigalign did not write: a user's Zarr array or embedding store (0),
    a run's checkpoint (its status), else InputError saying what is there and what ``info``
    reads."""
    import bigalign

    array = _plain_array(args.path, so)
    if array is not None:  # a user's (N, d) array: every command takes one
        if args.json:
            _print_json(array)
        else:
            print(f"Zarr array {args.path}: shape {tuple(array['shape'])}, "
                  f"{array['dtype']}, chunks {tuple(array['chunks'])}" +
                  (f", shards {tuple(array['shards'])}" if array["shards"] else "") +
                  (f"\n  not usable as an input: {array['unusable']}"
                   if array["unusable"] else "; usable as an input (rows paired by position)"))
        return 0
    store = _user_store(args.path, so)
    if store is not None:  # a user's group holding embeddings (and ids): an input too
        if args.json:
            _print_json(store)
        else:
            print(f"embedding store {args.path} (not written by bigalign): "
                  f"{store['rows']:,} rows x {store['dim']} ({store['dtype']}), ids: "
                  f"{store['ids'] or 'none (row numbers)'}, model: "
                  f"{store['model'] or 'not recorded'}" +
                  (f"\n  not usable as an input: {store['unusable']}" if store["unusable"]
                   else "; usable as an input"))
        return 0
    if bigalign.run_status(args.path, so):
        return _status(args)
    raise bigalign.InputError(_nothing_described(args.path, so)) from None


#: What ``bigalign info`` describes, for its refusals.
DESCRIBES = ("info describes transforms, apply outputs, embedding stores, Parquet export "
             "folders, Zarr arrays and runs' checkpoints")
#: An import format's name (storage.formats) -> how a message names a file of it.
FILE_WORDS = {"npy": "a NumPy .npy file", "fvecs": "an .fvecs file", "parquet": "a Parquet file"}


def _nothing_described(path, so) -> str:
    """Why ``info`` describes nothing at ``path``, in words: it does not exist; it is a file
    (of vectors: then the ``bigalign import`` that makes a store of it, in its format); or
    what else it is (an empty folder, a Zarr group or folder bigalign did not write)."""
    import fsspec

    from ..storage.formats import format_of

    fs, local = fsspec.core.url_to_fs(str(path), **(options_for(path, so) or {}))
    local = local.rstrip("/")
    if not fs.exists(local):
        return f"{path!r} does not exist ({DESCRIBES})"
    if fs.isfile(local):
        fmt = format_of(str(path))
        if fmt is not None:
            return (f"{path!r} is {FILE_WORDS.get(fmt, f'a {fmt} file')} of vectors, not a "
                    f"bigalign output: 'bigalign import {path} -o STORE' makes an embedding "
                    f"store of it, which every command takes ({DESCRIBES})")
        return (f"{path!r} is a file, not a bigalign output or Zarr store ({DESCRIBES}; files "
                "of vectors (.npy, .fvecs, .parquet) become a store with 'bigalign import')")
    names = fs.ls(local, detail=False)
    if not names:
        what = "an empty folder"
    elif any(n.rstrip("/").endswith("zarr.json") for n in names):
        what = "a Zarr group bigalign did not write, holding no 'embeddings' array"
    else:
        what = "a folder bigalign did not write"
    return (f"{path!r} is {what}: not a transform, apply output, embedding store or Zarr "
            f"array ({DESCRIBES})")


def _completion(info: dict, path: str, so, complete: bool, rerun: str) -> str:
    """The state of the output at ``path`` whose record says ``complete``, in words for
    ``info``'s text ("complete", "DAMAGED (...)", "INCOMPLETE (...)", naming the command
    ``rerun`` to run again); ``info`` (the JSON) gets ``complete: false`` and ``damaged``
    when a complete output lost a file or chunk since (:func:`bigalign.output_damage`), and
    the ``progress`` of an unfinished one."""
    import bigalign

    lost = bigalign.output_damage(path, so) if complete else None
    if lost:
        info.update(complete=False, damaged=lost)
        return f"DAMAGED ({lost}; rerun {rerun} with --overwrite to write it again)"
    if not complete:
        info["progress"] = bigalign.run_status(path, so)
        return f"INCOMPLETE (rerun {rerun} to resume)"
    return "complete"


def _describe_export(args, export: dict, so, fmt: str = "parquet") -> int:
    """``info`` of a Parquet (or Lance) export: 0 when complete, 3 (with its progress) when
    not, or when it lost a file since (damaged)."""
    files = export.get("files", [])
    info = {"kind": f"{fmt}-export", "path": args.path,
            **{k: v for k, v in export.items() if k not in ("job", "files", "format")},
            "files": len(files), "bytes": sum(f.get("bytes", 0) for f in files)}
    info["mapped"] = _mapped(export) or _mapped(export.get("provenance"))
    state = _completion(info, args.path, so, bool(export.get("complete")), "the export")
    if args.json:
        _print_json(info)
    else:
        a, b = export.get("rows", [0, 0])
        print(f"{'Lance' if fmt == 'lance' else 'Parquet'} export {args.path}: {state}, "
              f"rows {a:,}:{b:,} of "
              f"{export.get('source')} in {counted(len(files), 'file')} "
              f"({info['bytes'] / 2**20:,.1f} MiB); columns {export.get('ids_column')}: {export.get('ids')}, "
              f"{export.get('vector_column')}: {export.get('dtype')}[{export.get('dim')}]; "
              f"model: {export.get('model') or '?'}")
        _print_mapped(info)
        if info.get("progress"):
            print("  " + _describe_progress(info["progress"]))
    return 0 if info.get("complete") else 3


def _mapped(attrs) -> Optional[dict]:
    """The record of mapped vectors in ``attrs`` (:mod:`bigalign.storage.provenance`)."""
    from ..storage.provenance import record_of

    return record_of(attrs)


def _print_mapped(info: dict) -> None:
    """The lines ``info`` prints of mapped vectors: what they are, and (target-centred)
    what they need before they meet native vectors."""
    from ..storage.provenance import centred_note, sentence

    record = info.get("mapped")
    if record:
        print(f"  mapped vectors: {sentence(record)}")
        note = centred_note(record)
        if note:
            print(f"  NOTE: {note}")


def _describe_progress(p: dict) -> str:
    """One line of a run's progress (:func:`bigalign.run_status`'s or
    :func:`~bigalign.commands.status.status_report`'s record): units, rows, rate, and the
    time left only while it runs (a dead job has work left, no time)."""
    state = "running" if p.get("running") else "not running (rerun the command to resume)"
    if p.get("units_total") is None:  # an unfinished output whose checkpoint never started
        return f"{p.get('kind') or 'run'}: unfinished, no progress recorded; {state}"
    rate = f"{p['rows_per_second']:,.0f} rows/s" if p.get("rows_per_second") else "rate unknown"
    eta = f", about {p['eta_seconds']:.0f}s left" \
        if p.get("running") and p.get("eta_seconds") is not None else ""
    return (f"{p['kind']}: {p['units_done']:,} of {counted(p['units_total'], 'unit')} done, "
            f"{p['rows_done']:,} of {counted(p['rows_total'], 'row')}, {rate}{eta}; {state}")


def _status(args) -> int:
    """``bigalign status``: one record of the same keys in every state (README, "status
    schema"); exit 0 finished, 3 running, interrupted or damaged, 2 nothing recorded."""
    from ..commands.status import status_report
    from ..errors import InputError

    r = status_report(args.path, storage_options(args))
    if args.json:
        _print_json(r)
    elif r["state"] == "finished":
        print(f"{args.path}: finished, nothing in flight")
    elif r["state"] == "damaged":  # marked complete, but lost a file or chunk since
        print(f"{args.path}: marked complete but DAMAGED: {r['damaged']}; rerun the command "
              "that wrote it with --overwrite to write it again")
    elif r["state"] != "not-started":
        print(_describe_progress(r))
    if r["state"] == "not-started":
        raise InputError(f"{args.path!r}: no progress recorded and no finished output")
    return 0 if r["finished"] else 3
