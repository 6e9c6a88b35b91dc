"""Accuracy of the streamed fit against a float64 in-memory oracle (scipy).

Measures, for float32 block GEMMs (the default) and float64 ones, the largest absolute
difference between bigalign's rotation and scipy.linalg.orthogonal_procrustes on the same
float32 data held in float64, for synthetic data with a large common offset and for the real
samples in ../shared/data.

    python benchmarks/accuracy.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import scipy.linalg
import zarr

import bigalign

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def oracle(a, b):
    """float64 in memory: scipy when square, else the same SVD by hand."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    ac, bc = a - a.mean(0), b - b.mean(0)
    if a.shape == b.shape:
        return scipy.linalg.orthogonal_procrustes(ac, bc)[0]
    u, _, vt = np.linalg.svd(ac.T @ bc, full_matrices=False)
    return u @ vt


def case(name, a, b, tmp):
    s = str(Path(tmp) / f"{name}-a.zarr")
    t = str(Path(tmp) / f"{name}-b.zarr")
    zarr.create_array(s, data=a, chunks=(8192, a.shape[1]), compressors=None, overwrite=True)
    zarr.create_array(t, data=b, chunks=(8192, b.shape[1]), compressors=None, overwrite=True)
    ref = oracle(a, b)
    ac = a.astype(np.float64) - a.mean(0, dtype=np.float64)
    s_min = np.linalg.svd(ac.T @ (b - b.mean(0, dtype=np.float64)), compute_uv=False).min()
    row = [name, f"{a.shape[0]:,}x{a.shape[1]}->{b.shape[1]}", f"{s_min:.1e}"]
    for precision in ("float32", "float64"):
        q = bigalign.fit(s, t, center=True, precision=precision, diagnostics=False).rotation
        mapped = np.linalg.norm(ac @ (q - ref)) / np.linalg.norm(ac)
        row += [f"{np.abs(q - ref).max():.1e}", f"{mapped:.1e}"]
    print("| " + " | ".join(row) + " |", flush=True)


def main():
    print("| data | shape | smallest singular value | float32 GEMM: max abs error of Q | "
          "float32: relative error of mapped rows | float64 GEMM: max abs error of Q | "
          "float64: relative error of mapped rows |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        n, d = 200_000, 384
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        z = rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
        offset = 5.0 * rng.standard_normal(d) / np.sqrt(d)  # offset 5x the spread
        a = (z + offset).astype(np.float32)
        b = (z @ q + 0.1 * rng.standard_normal((n, d)) / np.sqrt(d) - offset).astype(np.float32)
        case("synthetic, offset 5x spread", a, b, tmp)
        if (SHARED / "minilm_docs.npy").exists():
            e5 = np.load(SHARED / "e5small_docs.npy").astype(np.float32)
            mini = np.load(SHARED / "minilm_docs.npy").astype(np.float32)
            stat = np.load(SHARED / "static64_docs.npy").astype(np.float32)
            case("real e5-small -> MiniLM", e5, mini[: len(e5)], tmp)
            case("real static64 -> MiniLM", stat, mini, tmp)
            case("real MiniLM docs -> queries", mini, np.load(SHARED / "minilm_queries.npy").astype(np.float32), tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
