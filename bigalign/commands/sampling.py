"""Which items to re-embed with the new model: a reproducible sample of a corpus.

A migration fits on a sample: the new model embeds a few million items of the old corpus,
and the fit pairs them by id with the old vectors. :func:`sample_corpus` chooses them:

* ``uniform``: every row equally likely, independently of where it is stored. The best
  sample statistically; gathering the old vectors of n rows later touches up to n stored
  chunks (about min(n, chunks) reads).
* ``chunks``: whole stored chunks chosen at random, spread over the corpus. Gathering
  reads only n / rows-per-chunk chunks (cheap on object stores), but the sample is
  clustered: when storage order follows content (time, source, language), prefer
  ``uniform``.

The result is a Parquet file with the sampled ``row`` numbers (ascending) and, when the
corpus is a store with ids, their ``id``; its key-value metadata records the corpus, the
method and the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from typing import Optional

import numpy as np

from ..errors import InputError
from ..storage.locations import check_disjoint
from ..storage.outputs import refuse_inside_zarr
from ..storage.embedding_store import store_parts
from ..storage.stores import open_embeddings

log = logging.getLogger("bigalign")

__all__ = ["sample_rows", "sample_corpus", "METHODS"]

METHODS = ("uniform", "chunks")


def sample_rows(n_rows: int, n: int, *, method: str = "uniform", seed: int = 0,
                chunk_rows: int = 1) -> np.ndarray:
    """``n`` distinct row numbers of ``n_rows`` (ascending int64), reproducible by
    ``seed``. ``chunks``: whole chunks of ``chunk_rows`` chosen at random (the last one
    cut to make exactly n rows, keeping its first rows)."""
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if n <= 0:
        raise InputError(f"--pairs must be positive, got {n}")
    if n > n_rows:
        raise InputError(f"cannot sample {n:,} rows of a corpus of {n_rows:,}")
    rng = np.random.default_rng(seed)
    if method == "uniform":
        return np.sort(rng.choice(n_rows, size=n, replace=False)).astype(np.int64)
    n_chunks = math.ceil(n_rows / chunk_rows)
    picked = rng.permutation(n_chunks)
    rows, total = [], 0
    for c in picked:
        start, stop = int(c) * chunk_rows, min((int(c) + 1) * chunk_rows, n_rows)
        take = min(stop - start, n - total)
        rows.append(np.arange(start, start + take, dtype=np.int64))
        total += take
        if total == n:
            break
    return np.sort(np.concatenate(rows))


def sample_corpus(corpus, n: int, output: str, *, method: str = "uniform", seed: int = 0,
                  overwrite: bool = False, storage_options: Optional[dict] = None) -> dict:
    """Write a sample of ``n`` rows of ``corpus`` (a store or a bare array) to the Parquet
    file ``output``: columns ``row`` and, for a store with ids, ``id``. Returns a summary
    {rows, method, seed, chunks_touched, chunks_total, already_complete}. A rerun with the
    same corpus (its content witness), size, method and seed finds its file and writes
    nothing (``already_complete``); ``overwrite`` replaces a sample it wrote, never another
    file."""
    import polars as pl

    url, ids, model = store_parts(corpus, storage_options)
    emb = open_embeddings(url, side="corpus", storage_options=storage_options,
                          check_chunks=False)
    check_disjoint({"corpus": corpus}, {"output": output}, storage_options)
    refuse_inside_zarr(output, "output", storage_options)
    if os.path.isdir(output):
        raise InputError(f"output {output!r} is a folder; give a file name (.parquet)")
    job = {"corpus": emb.fingerprint(), "rows": int(n), "method": method, "seed": seed}
    if os.path.exists(output):
        written = _written_by_sample(output)
        if written is None:
            raise InputError(f"output {output!r} already exists and was not written by "
                             "'bigalign sample': bigalign deletes only what it wrote, even "
                             "with --overwrite. Remove it yourself or choose another name.")
        if written.get("job") == job_key(job):
            log.warning("%s is already complete with the same corpus and options: nothing "
                        "to do", output)
            return dict(written, already_complete=True)
        if not overwrite:
            raise InputError(f"output {output!r} already exists (a sample of other rows or "
                             "options; pass --overwrite to replace it)")
    rows = sample_rows(emb.rows, n, method=method, seed=seed, chunk_rows=emb.row_step)
    columns = {"row": rows}
    if ids is not None:
        columns["id"] = _take_ids(ids, rows)
    chunks = np.unique(rows // emb.row_step)
    summary = {"kind": "sample", "rows": int(n), "method": method, "seed": seed,
               "corpus": str(corpus), "model": model, "chunks_touched": int(len(chunks)),
               "chunks_total": int(math.ceil(emb.rows / emb.row_step)),
               "job": job_key(job)}
    frame = pl.DataFrame(columns)
    folder = os.path.dirname(os.path.abspath(output))
    try:  # a missing folder is created, as import, fit, apply and export do for theirs
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InputError(f"output {output!r}: cannot create its folder {folder!r} "
                         f"({e.strerror or e})") from None
    fd, tmp = tempfile.mkstemp(prefix=".bigalign-sample-", suffix=".parquet", dir=folder)
    os.close(fd)
    try:
        frame.write_parquet(tmp, metadata={"bigalign": json.dumps(summary)})
        os.replace(tmp, output)  # whole or absent
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dict(summary, already_complete=False)


def job_key(job: dict) -> str:
    """A sample's identity (corpus fingerprint and options) as a short digest."""
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()


def _written_by_sample(path: str) -> Optional[dict]:
    """The summary a Parquet file this module wrote records (its ``bigalign`` metadata:
    a sample's keys, not an export's), or None for any other file."""
    import polars as pl

    try:
        meta = json.loads(pl.read_parquet_metadata(path)["bigalign"])
    except Exception:
        return None
    if not isinstance(meta, dict) or not {"method", "seed", "chunks_total"} <= meta.keys():
        return None
    return meta


def _take_ids(ids, rows: np.ndarray) -> np.ndarray:
    """ids[rows] for sorted ``rows``, reading each ids chunk that holds some once."""
    step = int(ids.chunks[0])
    out = []
    for c in np.unique(rows // step):
        start = int(c) * step
        block = np.asarray(ids[start:start + step])
        sel = rows[(rows >= start) & (rows < start + step)] - start
        out.append(block[sel])
    values = np.concatenate(out)
    if values.dtype.kind in "TUSO":
        import polars as pl
        return pl.Series("id", values, dtype=pl.String)
    return values
