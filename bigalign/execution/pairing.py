"""Pairing rows of two embedding stores by id, and gathering the paired rows.

A real migration rarely has row-aligned inputs: the old model's corpus is a billion vectors
with ids; the new model was run on a sample of a few million of them, in its own order. The
fit then needs pairs (source row, target row) with equal ids:

1. :func:`join`: an inner join of the two id columns with polars (ids are read chunk by
   chunk into Arrow-backed columns: 10^8 ids never become 10^8 Python objects), duplicate
   ids refused unless ``duplicates="first"|"last"``, pairs sorted by source row;
2. :func:`sample_pairs`: optionally a reproducible random subset;
3. :func:`gather`: the paired rows of one side, in pair order, into a local scratch file.
   Rows are read in *storage order*, each stored chunk that holds a needed row once (not
   once per pair), by a pool of threads; the scratch is a memory-mapped ``.npy`` of
   pairs x d, so memory stays bounded by one read per thread.

The fit then runs unchanged on the two gathered arrays: a fit by id *is* a fit on the
explicitly joined pairs.

Every command that pairs (fit, evaluate, evaluate-retrieval, curve, realign) decides
rows-or-ids with :func:`pair_by_ids`. A fit records how it paired (:func:`fit_record`, in
``Transform.metadata["pairs"]``), so that evaluation can rebuild which matched pairs were
training pairs (:func:`fitted_pairing`, :func:`training_positions`, verified against the
recorded SHA-256 of the fitted pairs) and hold out the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import InputError, NonFiniteError
from ..maths.stats import bad_norm_reason, bad_norms

log = logging.getLogger("bigalign")

__all__ = ["Pairs", "pair_by_ids", "join", "sample_positions", "sample_pairs", "fit_record",
           "fitted_pairing", "training_positions", "common_positions", "duplicate_ids", "gather",
           "gathered", "sweep_scratch",
           "GatherReport", "DUPLICATES", "PAIR_BY"]

DUPLICATES = ("error", "first", "last")
PAIR_BY = ("auto", "rows", "ids")


def pair_by_ids(pair_by: str, source_ids, target_ids, option: str = "--pair-by") -> bool:
    """Are rows paired by id? ``pair_by`` "rows": no; "ids": yes, and both inputs must have
    ids (their ``ids`` arrays, or None); "auto": when both have ids. ``option`` names the
    setting in errors."""
    if pair_by not in PAIR_BY:
        raise InputError(f"{option} must be auto, rows or ids, got {pair_by!r}")
    both = source_ids is not None and target_ids is not None
    if pair_by == "ids" and not both:
        raise InputError(f"{option} ids needs both inputs to be embedding stores with ids "
                         f"(source: {'ids' if source_ids is not None else 'no ids'}, target: "
                         f"{'ids' if target_ids is not None else 'no ids'})")
    return pair_by == "ids" or (pair_by == "auto" and both)


@dataclass(frozen=True, eq=False)
class Pairs:
    """Matched rows: ``source_rows`` (n,) int64 ascending, ``target_rows`` (n,) int64,
    row i of the one paired with row i of the other. Counts: ``matched`` (n),
    ``source_only`` / ``target_only`` (ids found on one side only), ``duplicates``
    (ids dropped per side under duplicates="first"/"last")."""

    source_rows: np.ndarray
    target_rows: np.ndarray
    source_only: int = 0
    target_only: int = 0
    duplicates: dict = field(default_factory=dict)

    @property
    def matched(self) -> int:
        return int(len(self.source_rows))

    def digest(self) -> str:
        """SHA-256 of the pairing (both row arrays): identifies it in fingerprints."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.source_rows, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.target_rows, dtype="<i8").tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        return {"matched": self.matched, "source_only": self.source_only,
                "target_only": self.target_only, "duplicates_dropped": dict(self.duplicates),
                "pairs_sha256": self.digest()}

    def take(self, positions: np.ndarray) -> "Pairs":
        """The pairs at ``positions`` ((k,) int64 ascending, indices into this list), with
        this pairing's counts of unmatched and dropped ids."""
        positions = np.asarray(positions, dtype=np.int64)
        return Pairs(self.source_rows[positions], self.target_rows[positions],
                     self.source_only, self.target_only, self.duplicates)


def _ids_frame(ids, side: str, chunk_rows: Optional[int] = None):
    """polars DataFrame {id, row} of an ids array (zarr or numpy), read a chunk at a time
    so that string ids go straight into Arrow buffers."""
    import polars as pl

    n = int(ids.shape[0])
    step = int(chunk_rows or (ids.chunks[0] if hasattr(ids, "chunks") else n) or 1)
    step = max(step, 1 << 16)
    parts = []
    for start in range(0, n, step):
        values = np.asarray(ids[start:start + step])
        if values.dtype.kind in "iu":
            col = pl.Series("id", values.astype(np.int64, copy=False))
        elif values.dtype.kind in "TUSO":
            col = pl.Series("id", values.astype(str) if values.dtype.kind != "T" else values,
                            dtype=pl.String)
        else:
            raise InputError(f"{side} ids: dtype {values.dtype} is neither integer nor string")
        if col.null_count():
            raise InputError(f"{side} ids: {col.null_count()} missing ids in rows "
                             f"{start}:{start + len(values)}")
        parts.append(pl.DataFrame({"id": col,
                                   "row": np.arange(start, start + len(values), dtype=np.int64)}))
    if not parts:
        raise InputError(f"{side} ids: empty")
    return pl.concat(parts, rechunk=False)


def duplicate_ids(ids, side: str = "ids") -> tuple[int, Optional[dict]]:
    """Ids that occur more than once in ``ids`` (a zarr or numpy (n,) int or string array),
    counted with polars on Arrow columns read a chunk at a time (no Python object per id):
    (how many distinct ids occur more than once, an example {"id", "rows": its first two
    rows, "occurrences"} or None). One hash pass (``n_unique``) when there are none."""
    import polars as pl

    frame = _ids_frame(ids, side)
    if frame["id"].rechunk().n_unique() == frame.height:  # one buffer: 3-4x faster on strings
        return 0, None
    counts = (frame.lazy().group_by("id").agg(pl.len().alias("n")).filter(pl.col("n") > 1)
              .collect())
    first = frame.filter(pl.col("id").is_in(counts["id"].implode()))["id"][0]  # row order
    rows = frame.filter(pl.col("id") == first)["row"]
    return counts.height, {"id": first, "rows": rows.head(2).to_list(),
                           "occurrences": len(rows)}


def _dedupe(frame, side: str, duplicates: str):
    import polars as pl

    if duplicates not in DUPLICATES:
        raise InputError(f"--duplicates must be one of {', '.join(DUPLICATES)}, got "
                         f"{duplicates!r}")
    dup = frame.filter(pl.col("id").is_duplicated())
    if dup.height == 0:
        return frame, 0
    if duplicates == "error":
        first = dup.sort("row").row(0, named=True)
        raise InputError(f"{side} ids: {dup['id'].n_unique()} ids occur more than once "
                         f"({dup.height} rows; first: id {first['id']!r} at row {first['row']}). "
                         "Pass --duplicates first|last to keep one row per id.")
    kept = frame.sort("row").unique(subset="id", keep=duplicates, maintain_order=True)
    return kept, frame.height - kept.height


def join(source_ids, target_ids, *, duplicates: str = "error",
         sides: tuple = ("source", "target")) -> Pairs:
    """Inner join of two id arrays (zarr arrays or numpy, (n,) int or string): pairs
    sorted by source row. Ids of both sides must be of one kind (both int or both
    string). Raises InputError for duplicates (unless ``duplicates`` says which row to
    keep), missing ids, or no match at all; ``sides`` names the two sides in errors."""
    import polars as pl

    one, two = sides
    a, dup_a = _dedupe(_ids_frame(source_ids, one), one, duplicates)
    b, dup_b = _dedupe(_ids_frame(target_ids, two), two, duplicates)
    if a.schema["id"] != b.schema["id"]:
        raise InputError(f"{one} ids are {a.schema['id']} but {two} ids are "
                         f"{b.schema['id']}: they cannot match")
    joined = (a.lazy().join(b.lazy(), on="id", how="inner", suffix="_target")
              .select(pl.col("row").alias("source"), pl.col("row_target").alias("target"))
              .sort("source").collect())
    if joined.height == 0:
        raise InputError(f"no id of the {one} ({a.height} ids) occurs in the {two} "
                         f"({b.height} ids): nothing to pair")
    src = joined["source"].to_numpy()
    tgt = joined["target"].to_numpy()
    return Pairs(src, tgt, a.height - joined.height, b.height - joined.height,
                 {k: v for k, v in (("source", dup_a), ("target", dup_b)) if v})


def sample_positions(matched: int, n: int, seed: int = 0) -> np.ndarray:
    """Positions ((min(n, matched),) int64 ascending) of a reproducible random subset of
    ``n`` of ``matched`` pairs: the fit's ``--sample N --seed S``; all when n >= matched."""
    if n <= 0:
        raise InputError(f"--sample must be positive, got {n}")
    if n >= matched:
        return np.arange(matched, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(matched, size=n, replace=False))


def sample_pairs(pairs: Pairs, n: int, seed: int = 0) -> Pairs:
    """A reproducible random subset of ``n`` pairs (all when n >= matched), kept in source
    row order (:func:`sample_positions`)."""
    keep = sample_positions(pairs.matched, n, seed)
    return pairs if len(keep) == pairs.matched else pairs.take(keep)


def fit_record(joined: Pairs, fitted: Pairs, duplicates: str, sample: Optional[int],
               seed: int, rows: Optional[tuple] = None) -> dict:
    """What a fit by id records in ``Transform.metadata["pairs"]``: the fitted pairs'
    :meth:`Pairs.summary` (``matched``: pairs fitted; ``pairs_sha256``: their digest) and
    how to rebuild them: ``by`` "ids", the ``duplicates`` policy, ``sample`` / ``seed``,
    ``rows`` ([start, stop): positions in the matched pairs, a contiguous split; or None),
    and ``joined``, the matched pairs before sampling."""
    record = dict(fitted.summary(), by="ids", duplicates=duplicates, sample=sample, seed=seed,
                  joined=joined.matched)
    if rows is not None:
        record["rows"] = [int(rows[0]), int(rows[1])]
    return record


def fitted_pairing(metadata: Optional[dict]) -> Optional[dict]:
    """How a transform's fit paired by id, from its metadata: {duplicates, sample, seed,
    matched (pairs fitted), joined (matched before sampling, or None), sha256, swapped (an
    inverse: the fit's source side is this transform's target)}; None for a fit by rows (or
    a transform built by hand). Transforms fitted before
    :func:`fit_record` existed have the policy only in their job fingerprint: read there."""
    pairs = (metadata or {}).get("pairs")
    if not isinstance(pairs, dict) or pairs.get("by", "ids") != "ids":
        return None
    job = (((metadata or {}).get("job") or {}).get("fingerprint") or {}).get("pairs") or {}
    get = lambda key, default=None: pairs.get(key, job.get(key, default))  # noqa: E731
    return {"duplicates": get("duplicates", "error"), "sample": get("sample"),
            "seed": int(get("seed", 0) or 0), "matched": int(pairs["matched"]),
            "joined": pairs.get("joined"), "sha256": pairs.get("pairs_sha256", job.get("sha256")),
            "swapped": bool(pairs.get("swapped")), "rows": pairs.get("rows")}


def training_positions(joined: Pairs, record: dict) -> Optional[np.ndarray]:
    """Positions ((k,) int64 ascending) in ``joined`` of the pairs a fit by id was fitted
    on, rebuilt from its :func:`fitted_pairing` record: ``joined`` must be the join of the
    same ids with the fit's duplicates policy; its ``sample`` / ``seed`` pick the same
    positions (:func:`sample_positions`). None when the rebuilt pairs do not have the
    recorded digest (the stores or their ids changed since the fit): then which pairs were
    fitted on cannot be told."""
    sample = record.get("sample")
    rows = record.get("rows")
    if rows:
        pos = np.arange(int(rows[0]), min(int(rows[1]), joined.matched), dtype=np.int64)
    else:
        pos = (sample_positions(joined.matched, int(sample), record.get("seed", 0)) if sample
               else np.arange(joined.matched, dtype=np.int64))
    if record.get("sha256") is None or joined.take(pos).digest() != record["sha256"]:
        return None
    return pos


def common_positions(pairs: Pairs, within: Pairs) -> np.ndarray:
    """Positions ((k,) int64 ascending) in ``within`` of the pairs that are also in
    ``pairs`` (same source and target row). Both lists come from :func:`join`: sorted by
    source row, each source row at most once."""
    i = np.searchsorted(within.source_rows, pairs.source_rows)
    at = np.minimum(i, max(within.matched - 1, 0))
    ok = (i < within.matched) & (within.source_rows[at] == pairs.source_rows) & \
        (within.target_rows[at] == pairs.target_rows)
    return i[ok].astype(np.int64)


@dataclass
class GatherReport:
    """What a gather read: stored chunks (objects) read, and rows gathered."""

    chunks_read: int = 0
    rows: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def gather(emb, rows: np.ndarray, path: str, *, threads: Optional[int] = None,
           report: Optional[GatherReport] = None, normalize=None) -> np.ndarray:
    """Rows ``rows`` (any order, (n,) int64) of ``emb`` (an opened embedding array) written
    in that order to a new memory-mapped ``.npy`` at ``path``; returns the memmap.

    Each stored chunk (shard) holding at least one needed row is read exactly once, in
    storage order, by a pool of ``threads``; memory is one chunk per thread plus the page
    cache of the scratch file. A gathered row holding NaN/Inf, or with ``normalize`` (the
    dtype the rows will be normalised in) one that cannot be normalised (zero norm), raises
    NonFiniteError naming its row in ``emb`` (not its position in the scratch)."""
    from ..storage.stores import read_rows

    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= emb.rows):
        raise InputError(f"{emb.side}: pair rows out of range 0:{emb.rows}")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=emb.dtype,
                                    shape=(len(rows), emb.dim))
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    step = emb.row_step
    chunk_of = sorted_rows // step
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    starts = np.concatenate([[0], bounds]) if len(sorted_rows) else np.array([], np.int64)
    stops = np.concatenate([bounds, [len(sorted_rows)]]) if len(sorted_rows) else starts

    def one(i: int) -> None:
        lo, hi = int(starts[i]), int(stops[i])
        c = int(chunk_of[lo])
        first, last = c * step, min((c + 1) * step, emb.rows)
        block = read_rows(emb, first, last)
        picked = block[sorted_rows[lo:hi] - first]
        ok = np.isfinite(picked).all(axis=1)
        if normalize is not None and ok.all():
            ok = ~bad_norms(picked, normalize)
        if not ok.all():  # name the stored row: positions in the scratch mean nothing to a user
            bad = sorted_rows[lo:hi][~ok]
            what = bad_norm_reason(picked[np.flatnonzero(~ok)[0]], normalize or picked.dtype)
            raise NonFiniteError(f"{emb.side} {emb.url!r} row {int(bad[0])} holds {what} "
                                 f"({bad.size} such rows among the paired rows of chunk rows "
                                 f"{first}:{last})")
        out[order[lo:hi]] = picked
        if report is not None:
            with report._lock:
                report.chunks_read += 1
                report.rows += hi - lo

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        list(pool.map(one, range(len(starts))))
    out.flush()
    return out


#: name prefix of the scratch folders of gathered pairs (``bigalign-pairs-<job key>-<random>``)
SCRATCH_PREFIX = "bigalign-pairs-"
#: the owner record inside a scratch folder: which process on which machine made it
SCRATCH_OWNER = "owner.json"


def _scratch_key(pairs: Pairs, source, target) -> str:
    """16 hex digits naming the job a scratch folder belongs to: the pairs' digest and the
    two inputs' locations."""
    h = hashlib.sha256(pairs.digest().encode())
    for side in (source, target):
        h.update(b"\0" + str(getattr(side, "url", "")).encode())
    return h.hexdigest()[:16]


def _owner_gone(record) -> bool:
    """Whether a scratch folder's owner record names a process of this machine that is gone
    (:func:`bigalign.storage.lease.process_gone`, as a lease holder is judged)."""
    from ..storage.lease import process_gone

    return process_gone(record)


def sweep_scratch(folder: Optional[str] = None, key: Optional[str] = None) -> list:
    """Remove the scratch folders (``bigalign-pairs-*`` in ``folder``, default the system's
    temporary folder) whose owner record names a process of this machine that is gone (a fit
    or evaluation by id that was SIGKILLed: OOM, pre-emption). A folder without a valid
    owner record, or owned by a live process or another machine, is kept; one of job ``key``
    owned by another machine is named in a warning. Returns the paths removed."""
    import json
    import shutil

    from ..storage.lease import _machine

    folder = folder or tempfile.gettempdir()
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(folder, name)
        if not name.startswith(SCRATCH_PREFIX) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, SCRATCH_OWNER)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # no owner record of ours: not ours to delete
        if _owner_gone(record):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
                log.info("removed %s, the scratch of a run killed before it could (pid %s)",
                         path, record.get("pid"))
        elif key is not None and name.startswith(f"{SCRATCH_PREFIX}{key}-") and \
                isinstance(record, dict) and record.get("machine") != _machine():
            log.warning("%s holds gathered pairs of this job left by a run on host %s; if "
                        "that run is gone, remove it", path, record.get("host"))
    return removed


def _make_scratch(folder: Optional[str], key: str) -> str:
    """A new scratch folder ``bigalign-pairs-<key>-<random>`` in ``folder`` with this
    process's owner record (written atomically), so that a later run can tell a killed
    owner's leftovers from a live run's folder."""
    import json

    from ..storage.lease import _machine, _process_start

    path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{key}-", dir=folder)
    record = {"host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(),
              "pid_started": _process_start(os.getpid()), "created": time.time()}
    tmp = os.path.join(path, SCRATCH_OWNER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(path, SCRATCH_OWNER))
    return path


@contextlib.contextmanager
def gathered(pairs: Optional[Pairs], source, target, scratch: Optional[str] = None, *,
             normalize=None):
    """The paired rows of ``source`` and ``target`` (opened embedding arrays) as row-aligned
    in-memory inputs (:class:`bigalign.storage.stores.ArrayRows` over memory-mapped scratch files
    in ``scratch``, default the system's temporary folder), each needed chunk read once;
    the scratch is removed on exit. With ``pairs`` None: the inputs themselves.
    ``normalize``: the dtype the caller will L2-normalise rows in (None: it does not), so
    that a row it cannot normalise is reported at its stored row (see :func:`gather`).

    The scratch folder (pairs x (dA + dB) x itemsize bytes) is named for the job
    (``bigalign-pairs-<key>-<random>``, :func:`_scratch_key`) and holds an owner record; a
    run killed with SIGKILL cannot remove it, so every run first removes the scratch
    folders of dead owners on this machine (:func:`sweep_scratch`)."""
    import shutil

    from ..storage.stores import ArrayRows

    if pairs is None:
        yield source, target
        return
    key = _scratch_key(pairs, source, target)
    sweep_scratch(scratch, key)
    tmp = _make_scratch(scratch, key)
    try:
        reports = (GatherReport(), GatherReport())
        a = gather(source, pairs.source_rows, os.path.join(tmp, "source.npy"),
                   report=reports[0], normalize=normalize)
        b = gather(target, pairs.target_rows, os.path.join(tmp, "target.npy"),
                   report=reports[1], normalize=normalize)
        log.info("gathered %d pairs: %d source and %d target chunks read", pairs.matched,
                 reports[0].chunks_read, reports[1].chunks_read)
        yield ArrayRows(a, "source"), ArrayRows(b, "target")
        del a, b
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
