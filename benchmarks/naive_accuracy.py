"""How accurate is the naive Dask product that the benchmark times against bigalign?

Naive Dask computes the uncentred cross product (a.T @ b) with float32 chunk GEMMs summed in
float32; bigalign accumulates centred float64 statistics. Both are compared with a float64
in-memory oracle on one of the benchmark's cases (its data carry common offsets, as real
embeddings do): the relative error of the raw cross product A^T B and of the centred one,
and of the resulting rotation (centred fit).

    python benchmarks/naive_accuracy.py bench-data/d384_n976562_c10922
"""

from __future__ import annotations

import sys

import dask.array as da
import numpy as np
import zarr

import bigalign


def rel(x, ref):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main(case_dir: str) -> int:
    src, tgt = f"{case_dir}/source.zarr", f"{case_dir}/target.zarr"
    a = zarr.open_array(src)[:].astype(np.float64)
    b = zarr.open_array(tgt)[:].astype(np.float64)
    n = len(a)
    raw = a.T @ b
    ma, mb = a.mean(0), b.mean(0)
    centred = raw - n * np.outer(ma, mb)  # exact enough in float64 at these offsets
    u, _, vt = np.linalg.svd(centred)
    q_ref = u @ vt
    del a, b
    naive = (da.from_zarr(src).T @ da.from_zarr(tgt)).compute().astype(np.float64)
    naive_c = naive - n * np.outer(ma, mb)  # what a user of the naive product must do
    un, _, vtn = np.linalg.svd(naive_c)
    t = bigalign.fit(src, tgt, center=True, diagnostics=False)
    print("| method | rel. error of A^T B | rel. error of centred A^T B | max abs error of Q |")
    print("|---|---|---|---|")
    print(f"| naive dask (float32 sums) | {rel(naive, raw):.1e} | {rel(naive_c, centred):.1e} | "
          f"{np.abs(un @ vtn - q_ref).max():.1e} |")
    m = t.statistics
    print(f"| bigalign (centred, float64 sums) | {rel(m.raw_cross(), raw):.1e} | "
          f"{rel(m.cross, centred):.1e} | {np.abs(t.rotation - q_ref).max():.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
