"""The pairs of one realign run: the stable held-out split (:func:`holdout_mask`, a pure
function of each pair's key) and the gathered training / held-out copies written under
``REG/runs/<run id>/pairs/`` (:class:`RunFiles`, :func:`gather_side`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InputError
from ..storage.locations import canonical_url, options_for
from ..storage.registry import Registry
from .realign_config import RealignConfig

log = logging.getLogger("bigalign")

__all__ = ["stable_unit", "holdout_mask", "Side", "open_side", "split_pairs", "RunFiles",
           "copy_complete", "copy_chunk_rows", "gather_side", "COPY_CHUNK_BYTES"]

#: bytes of input per chunk of the gathered copies
COPY_CHUNK_BYTES = 16 * 2**20

# ---------------------------------------------------------------------------------------
# the held-out split: a stable function of each pair's key
# ---------------------------------------------------------------------------------------

_M1, _M2, _GOLDEN = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB),
                     np.uint64(0x9E3779B97F4A7C15))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014), elementwise on uint64 (wrapping)."""
    z = x.astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def stable_unit(keys, seed: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per key, a pure function of (key, seed): (n,) float64.

    Integer keys (ids or row numbers, as int64) go through splitmix64; string keys (any
    numpy string dtype, or bytes) through BLAKE2b-64 of their UTF-8 bytes. The top 53 bits
    of the hash make the float."""
    keys = np.asarray(keys)
    salt = _splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))[0]
    if keys.dtype.kind in "iub":
        h = _splitmix64(keys.astype(np.int64).view(np.uint64) ^ salt)
    else:
        person = int(salt).to_bytes(8, "little")
        def digest(k) -> int:
            raw = k if isinstance(k, bytes) else str(k).encode("utf-8")
            return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=person).digest(),
                                  "little")
        h = np.fromiter((digest(k) for k in keys.tolist()), dtype=np.uint64, count=len(keys))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def holdout_mask(keys, fraction: float, seed: int = 0) -> np.ndarray:
    """(n,) bool: which keys are held out, ``stable_unit(key, seed) < fraction``."""
    return stable_unit(keys, seed) < fraction


@dataclass
class Side:
    """One input of the pairs: its embeddings, ids (or None) and model stamp."""

    name: str
    url: str
    emb: object  # bigalign.storage.stores.EmbeddingArray
    ids: object = None
    model: Optional[str] = None

    def fingerprint(self) -> dict:
        from ..storage.stores import content_witness

        fp = dict(self.emb.fingerprint(), canonical_url=canonical_url(self.emb.url),
                  model=self.model)
        if self.ids is not None:
            fp["ids"] = {"shape": list(self.ids.shape), "dtype": str(self.ids.dtype),
                         "content": content_witness(self.ids)}
        return fp


def open_side(name: str, url: str, so) -> Side:
    from ..storage.embedding_store import store_parts
    from ..storage.stores import open_embeddings

    emb_url, ids, model = store_parts(url, so)
    return Side(name, url, open_embeddings(emb_url, side=name, storage_options=so), ids, model)


def _ids_at(ids, rows: np.ndarray) -> np.ndarray:
    """ids[rows] for ascending ``rows``, read a few chunks at a time."""
    step = max(int(ids.chunks[0]), 1 << 16)
    parts = []
    for s in range(0, int(ids.shape[0]), step):
        lo, hi = np.searchsorted(rows, [s, s + step])
        if hi > lo:
            parts.append(np.asarray(ids[s:s + step])[rows[lo:hi] - s])
    return np.concatenate(parts) if parts else np.array([], dtype=np.int64)


def split_pairs(cfg: RealignConfig, src: Side, tgt: Side, by_ids: bool) -> dict:
    """The training and held-out pairs: row arrays of both sides, counts and a digest."""
    from ..execution.pairing import join

    if by_ids:
        pairs = join(src.ids, tgt.ids, duplicates=cfg.duplicates)
        s_rows, t_rows = pairs.source_rows, pairs.target_rows
        keys = _ids_at(src.ids, s_rows)
        unmatched = {"source_only": pairs.source_only, "target_only": pairs.target_only}
    else:
        from ..storage.stores import validate_pair
        validate_pair(src.emb, tgt.emb)
        s_rows = t_rows = keys = np.arange(src.emb.rows, dtype=np.int64)
        unmatched = {}
    held = holdout_mask(keys, cfg.holdout, cfg.holdout_seed)
    out = {"train_source": s_rows[~held], "train_target": t_rows[~held],
           "holdout_source": s_rows[held], "holdout_target": t_rows[held]}
    n_train, n_hold = int((~held).sum()), int(held.sum())
    if n_train < 2 or n_hold < 2:
        raise InputError(f"holdout {cfg.holdout} of {len(keys)} pairs leaves {n_train} "
                         f"training and {n_hold} held-out pairs: too few (need at least 2 "
                         "of each)")
    if n_hold < 100:
        log.warning("only %d held-out pairs: the gate's figures are noisy", n_hold)
    h = hashlib.sha256()
    for k in ("train_source", "train_target", "holdout_source", "holdout_target"):
        h.update(np.ascontiguousarray(out[k], dtype="<i8").tobytes())
    counts = {"by": "ids" if by_ids else "rows", "pairs": len(keys), "train": n_train,
              "holdout": n_hold, "holdout_fraction": cfg.holdout, "holdout_seed": cfg.holdout_seed,
              "sha256": h.hexdigest(), **unmatched}
    return {"rows": out, "summary": counts}


# ---------------------------------------------------------------------------------------
# the run's files under REG/runs/<run id>/
# ---------------------------------------------------------------------------------------

class RunFiles:
    """JSON files and gathered arrays of one realign run, written fenced by its job (the
    run's :class:`bigalign.storage.job.Job`)."""

    def __init__(self, reg: Registry, run_id: str, job):
        self.reg, self.run_id, self.job = reg, run_id, job
        self.url = reg.run_url(run_id)

    def read(self, name: str) -> Optional[dict]:
        return self.reg._json("runs", self.run_id, name)

    def write(self, name: str, value: dict) -> None:
        from ..jsonsafe import json_safe

        self.job.fenced_put(self.reg._path("runs", self.run_id, name),
                            json.dumps(json_safe(value), indent=1).encode())

    def array(self, part: str) -> str:
        return f"{self.url}/pairs/{part}.zarr"

    @property
    def candidate(self) -> str:
        return f"{self.url}/candidate.transform"

    def remove(self, *parts: str) -> None:
        """Remove a gathered copy or the candidate (and its checkpoint), named by its parts
        under the run folder: files this run wrote. Missing is fine."""
        fs, path = self.reg.files.fs, self.reg._path("runs", self.run_id, *parts)
        self.job.check_fence()
        for p in (path, path + ".checkpoint"):
            try:
                if fs.exists(p):
                    fs.rm(p, recursive=True)
            except FileNotFoundError:
                pass


def copy_complete(url: str, digest: str, so) -> bool:
    import zarr

    try:
        arr = zarr.open_array(url, mode="r", storage_options=options_for(url, so))
    except Exception:
        return False
    info = arr.attrs.get("bigalign_pairs") or {}
    return bool(info.get("complete")) and info.get("sha256") == digest


def copy_chunk_rows(*sides: Side) -> int:
    """Rows per chunk of the gathered copies, the same on both sides (so the fit's blocks
    align): the smaller input chunk, at most COPY_CHUNK_BYTES of the wider side."""
    widest = max(s.emb.row_bytes for s in sides)
    return max(1, min(min(s.emb.row_step for s in sides), COPY_CHUNK_BYTES // widest))


def gather_side(side: Side, parts: dict, files: RunFiles, digest: str, so,
                 scratch: Optional[str], threads: Optional[int], chunk_rows: int) -> None:
    """Write the training and held-out rows of one side as Zarr copies (each stored chunk
    of the input read once, through a local memory-mapped scratch)."""
    import zarr

    from ..execution.pairing import GatherReport, gather

    todo = {p: rows for p, rows in parts.items()
            if not copy_complete(files.array(p), digest, so)}
    if not todo:
        return
    names = list(parts)
    rows = np.concatenate([parts[p] for p in names])
    bounds = np.cumsum([0] + [len(parts[p]) for p in names])
    emb = side.emb
    with tempfile.TemporaryDirectory(prefix="bigalign-realign-", dir=scratch) as tmp:
        report = GatherReport()
        data = gather(emb, rows, os.path.join(tmp, f"{side.name}.npy"), threads=threads,
                      report=report)
        log.info("realign: gathered %d %s rows (%d stored chunks read)", len(rows), side.name,
                 report.chunks_read)
        for i, p in enumerate(names):
            if p not in todo:
                continue
            block = data[bounds[i]:bounds[i + 1]]
            n = len(block)
            chunk = min(n, chunk_rows)
            files.job.check_fence()
            arr = zarr.create_array(files.array(p), shape=(n, emb.dim), chunks=(chunk, emb.dim),
                                    dtype=emb.dtype, compressors=None, fill_value=0.0,
                                    overwrite=True, storage_options=options_for(files.array(p), so),
                                    config={"write_empty_chunks": True},
                                    attributes={"bigalign_pairs": {"complete": False}})

            def write(s: int, arr=arr, block=block, chunk=chunk) -> None:
                arr[s:s + chunk] = np.asarray(block[s:s + chunk])

            with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
                list(pool.map(write, range(0, n, chunk)))
            files.job.check_fence()
            arr.attrs["bigalign_pairs"] = {"complete": True, "sha256": digest, "rows": n,
                                           "run_id": files.run_id}
        del data
