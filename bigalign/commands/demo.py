"""The demo job: a paired corpus with a planted rotation, fitted and applied end to end.

Source rows are x = z + offset_a; target rows are y = z Q + offset_b + noise, with z
standard normal scaled to unit expected norm, Q a random orthogonal (dA = dB) matrix and
large common offsets on both sides (as real models have), so the demo also shows that
centring matters.

The demo writes ``source.zarr``, ``target.zarr``, ``transform`` and ``aligned.zarr`` (and,
while its fit and apply run, their ``.checkpoint`` folders) under its working folder, and
replaces only what an earlier demo left there: :func:`check_workdir` refuses, before
anything is written, any of these paths holding something else (a user's folder or file, a
foreign Zarr array, an imported store, a transform of other data), and a working folder that
is or lies inside a Zarr node. The generated arrays are marked (``bigalign`` attribute
``kind: "demo-data"``, see :mod:`bigalign.storage.outputs`); the transform, the aligned
array and the checkpoints are recognised as the demo's by the source they record, this
folder's ``source.zarr``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..storage.locations import canonical_url
from ..storage.outputs import DEMO_KIND, ZARR_METADATA, inspect

__all__ = ["make_pairs", "planted_rotation", "run_demo", "check_workdir"]

#: The demo's arrays under its working folder, and its fit's and apply's outputs.
DATA = ("source.zarr", "target.zarr")
FIT, APPLY = "transform", "aligned.zarr"


def planted_rotation(dim: int, seed: int = 0) -> np.ndarray:
    """A random orthogonal (dim, dim) float64 matrix (QR of a Gaussian, signs fixed)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def make_pairs(workdir, *, rows: int, dim: int, chunk_rows: int = 16384, noise: float = 0.05,
               offset: float = 2.0, seed: int = 0, dtype="float32"):
    """Write ``source.zarr`` and ``target.zarr`` (rows, dim) under ``workdir``, chunk by
    chunk (memory stays one chunk), each marked as demo data. Returns (source_url,
    target_url, Q). Raises InputError, writing nothing, when either path holds something
    an earlier demo did not write (:func:`check_workdir`)."""
    import zarr

    workdir = Path(workdir)
    check_workdir(workdir, names=DATA)
    workdir.mkdir(parents=True, exist_ok=True)
    q = planted_rotation(dim, seed)
    rng = np.random.default_rng(seed + 1)
    off_a = rng.standard_normal(dim) * offset / math.sqrt(dim)
    off_b = rng.standard_normal(dim) * offset / math.sqrt(dim)
    kw = dict(shape=(rows, dim), chunks=(chunk_rows, dim), dtype=dtype, compressors=None,
              overwrite=True)  # only an earlier demo's arrays, checked above
    mark = {"kind": DEMO_KIND, "seed": seed}  # set at creation: recognisable if cut short
    src, tgt = (zarr.create_array(str(workdir / name), **kw,
                                  attributes={"bigalign": dict(mark, side=name[:-5])})
                for name in DATA)
    for i, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        r = np.random.default_rng([seed, i])
        z = r.standard_normal((n, dim)) / math.sqrt(dim)
        src[start:start + n] = (z + off_a).astype(dtype)
        tgt[start:start + n] = (z @ q + off_b +
                                r.standard_normal((n, dim)) * noise / math.sqrt(dim)).astype(dtype)
    return str(workdir / DATA[0]), str(workdir / DATA[1]), q


def check_workdir(workdir, names=(*DATA, FIT, APPLY)) -> None:
    """Raise InputError, naming the path and what it holds, unless the demo may write
    ``names`` (and the checkpoints of FIT and APPLY) under ``workdir``, a local folder: each
    is absent or what an earlier demo in this folder wrote (see the module doc), and
    ``workdir`` is not a file and neither is nor lies inside a Zarr node (an embedding
    store, a transform, a user's Zarr group). Modifies nothing."""
    from ..storage.job import default_checkpoint

    workdir = Path(workdir).absolute()
    for folder in (workdir, *workdir.parents):
        if _is_zarr_node(folder):
            node = inspect(str(folder))
            what = f"a bigalign {node.kind}" if node.ours else "a Zarr array or group"
            where = "is" if folder == workdir else f"lies inside {str(folder)!r},"
            raise InputError(f"--workdir {str(workdir)!r} {where} {what}: the demo's "
                             "arrays and transform must not go inside one. Choose another "
                             "--workdir.")
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {str(workdir)!r} is a file, not a folder. Choose "
                         "another --workdir.")
    source = str(workdir / DATA[0])
    paths = [workdir / name for name in names]
    paths += [Path(default_checkpoint(str(workdir / name))) for name in (FIT, APPLY)
              if name in names]
    for path in paths:
        what = _not_the_demos(path, source)
        if what:
            raise InputError(f"{str(path)!r} already holds {what}; the demo replaces "
                             "only what an earlier demo wrote there, so nothing was written. "
                             "Remove it yourself or choose another --workdir.")


#: How the demo's fit and apply outputs are recognised: kind, and the source they record.
_RECORDED_SOURCE = {
    FIT: ("transform", lambda a: a.get("metadata", {}).get("inputs", {}).get("source", {})
          .get("url")),
    APPLY: ("apply-output", lambda a: a.get("source")),
}


def _not_the_demos(path: Path, source: str) -> Optional[str]:
    """None when ``path`` (one the demo writes) is absent or what an earlier demo wrote
    from ``source``; else what it holds, in words."""
    from ..storage.job import Job

    if path.name.endswith(".checkpoint"):
        if not os.path.lexists(path):
            return None
        if not path.is_dir():
            return "a file"
        job = Job(str(path))
        job.check_location()  # files bigalign did not write: CheckpointError (exit 2)
        manifest = job.manifest() or {}
        recorded = manifest.get("fingerprint", {}).get("source", {}).get("url")
        return None if not manifest or _made_from(recorded, source) else \
            "the checkpoint of a bigalign run that no earlier demo here started"
    node = inspect(str(path))
    if node.kind == "absent" or (node.kind == DEMO_KIND and path.name in DATA):
        return None
    kind, recorded = _RECORDED_SOURCE.get(path.name, (None, None))
    if node.kind == kind and _made_from(recorded(node.attrs), source):
        return None
    if node.ours:
        return f"a bigalign {node.kind} that no earlier demo here wrote"
    if not path.is_dir():
        return "a file the demo did not write"
    return f"{'a Zarr array or group' if _is_zarr_node(path) else 'a folder'} the demo did " \
        "not write"


def _is_zarr_node(folder: Path) -> bool:
    """True when the local ``folder`` is a Zarr array or group (format 2 or 3)."""
    return any((folder / meta).is_file() for meta in ZARR_METADATA)


def _made_from(recorded, source: str) -> bool:
    """True when ``recorded`` (the source URL an output or checkpoint records) is
    ``source``, however either is spelled."""
    return isinstance(recorded, str) and canonical_url(recorded) == canonical_url(source)


def run_demo(workdir, *, rows: int = 1_000_000, dim: int = 256, workers=None,
             scheduler=None, progress: bool = True, echo=print) -> dict:
    """Generate, fit (centred), apply, check. Returns the report dict; raises AssertionError
    if the planted rotation is not recovered, and InputError, before anything is written,
    when ``workdir`` holds what an earlier demo did not write (:func:`check_workdir`)."""
    import bigalign

    workdir = Path(workdir).absolute()  # recorded by fit and apply: a rerun recognises them
    check_workdir(workdir)  # before anything is written
    t = time.perf_counter()
    src, tgt, q = make_pairs(workdir, rows=rows, dim=dim)
    gen = time.perf_counter() - t
    echo(f"generated {rows:,} pairs x {dim} dims (float32, {2 * rows * dim * 4 / 1e9:.2f} GB) "
         f"in {gen:.1f}s under {workdir}")
    run = dict(workers=workers, scheduler=scheduler, progress=progress)
    t = time.perf_counter()
    transform = bigalign.fit(src, tgt, center=True, output=str(workdir / FIT),
                             overwrite=True, **run)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    bigalign.apply(transform, src, str(workdir / APPLY), overwrite=True, **run)
    apply_s = time.perf_counter() - t
    uncentred = bigalign.fit(src, tgt, center=False, rows=(0, min(rows, 100_000)),
                             **dict(run, progress=False))
    err = float(np.abs(transform.rotation - q).max())
    meta = transform.metadata
    disc = meta.get("discrepancy", {})
    report = {
        "rows": rows, "dim": dim,
        "fit_seconds": fit_s, "fit_rows_per_second": rows / fit_s,
        "apply_seconds": apply_s, "apply_rows_per_second": rows / apply_s,
        "rotation_max_abs_error": err,
        "relative_residual": meta["relative_residual"],
        "relative_residual_uncentred_100k": uncentred.metadata["relative_residual"],
        "achieved_residual": disc.get("achieved_residual"),
        "bound_residual": disc.get("bound_residual"),
    }
    echo(f"fit    {fit_s:6.1f}s  {rows / fit_s:12,.0f} rows/s")
    echo(f"apply  {apply_s:6.1f}s  {rows / apply_s:12,.0f} rows/s")
    echo(f"recovered rotation: max |Q_fit - Q_planted| = {err:.2e}")
    echo(f"relative residual ||AQ - B||^2/||B||^2: centred {meta['relative_residual']:.4f}, "
         f"uncentred {uncentred.metadata['relative_residual']:.4f} (the offsets hurt)")
    if disc:
        echo(f"paper bound: ||AQ - B||_F = {disc['achieved_residual']:.1f} <= "
             f"(2D)^(1/4) sqrt(eps) = {disc['bound_residual']:.1f}")
    assert err < 1e-2, f"planted rotation not recovered (max error {err:.3g})"
    return report
