"""Shared fixtures: small Zarr arrays on disk and the real embedding samples."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

#: The environment variable naming the folder of the real embedding samples (e5small_docs.npy,
#: minilm_docs.npy, texts.jsonl.gz, ...); without it, ../shared/data beside the checkout.
SHARED_DATA_VARIABLE = "BIGALIGN_SHARED_DATA"
SHARED_DATA = Path(os.environ.get(SHARED_DATA_VARIABLE) or
                   Path(__file__).resolve().parents[1].parent / "shared" / "data")


def shared_path(name: str) -> Path:
    """``SHARED_DATA / name``, or skip the test saying which folder was looked in and how to
    name another (a silent skip hid that a checkout elsewhere tests no real data)."""
    path = SHARED_DATA / name
    if not path.exists():
        var = SHARED_DATA_VARIABLE
        where = f"named by {var}; point {var}=FOLDER at the samples" if os.environ.get(var) \
            else f"the default; set {var}=FOLDER"
        pytest.skip(f"real embedding sample {name} not in {SHARED_DATA} ({where} to test on "
                    "real data)")
    return path


def write_zarr(path, data, chunk_rows, **kw):
    """Write ``data`` as an uncompressed row-chunked Zarr array; return its path as str."""
    zarr.create_array(str(path), data=np.asarray(data), chunks=(chunk_rows, data.shape[1]),
                      compressors=None, overwrite=True, **kw)
    return str(path)


def imported_store(path, vectors, ids=None, *, model=None, chunk_rows=100):
    """An embedding store made by ``bigalign import`` from a Parquet file of ``vectors``
    (n, d) and ``ids`` (n,) int or str (a ``doc_id`` column; None: no ids); returns its
    path as str."""
    import polars as pl

    from bigalign.commands.ingest import import_vectors

    cols = {} if ids is None else {"doc_id": np.asarray(ids)}
    parquet = f"{path}.parquet"
    pl.DataFrame({**cols, "emb": np.asarray(vectors)}).with_columns(
        pl.col("emb").arr.to_list()).write_parquet(parquet)
    import_vectors([parquet], str(path), ids_column=None if ids is None else "doc_id",
                   model=model, chunk_rows=chunk_rows)
    return str(path)


def make_store(path, vectors, ids=None, model=None, chunk=100):
    """An embedding store by hand: a group with embeddings (+ ids, + model attribute)."""
    g = zarr.open_group(str(path), mode="w")
    g.create_array("embeddings", data=vectors, chunks=(chunk, vectors.shape[1]),
                   compressors=None)
    if ids is not None:
        ids = np.asarray(ids)
        if ids.dtype.kind == "U":  # variable-length strings, as zarr 3 specifies them
            ids = ids.astype(np.dtypes.StringDType())
        g.create_array("ids", data=ids, chunks=(chunk,))
    if model:
        g.attrs["model"] = model
    return str(path)


def reference_join(ids_a, ids_b, keep="error"):
    """Plain Python: pairs (row_a, row_b) of equal ids, sorted by row_a. ``keep``: "first" /
    "last" keeps one row per id on each side (first / last occurrence); "error" assumes
    unique ids."""
    def index(ids):
        where = {}
        for i, v in enumerate(ids):
            if keep == "last" or v not in where:
                where[v] = i
        return where

    where_a, where_b = index(list(ids_a)), index(list(ids_b))
    return sorted((i, where_b[v]) for v, i in where_a.items() if v in where_b)


def planted(n, dim_a, dim_b=None, *, noise=0.01, offset_a=0.0, offset_b=0.0, seed=0,
            dtype=np.float32):
    """Paired rows B = A Q + noise with a known Q (dA, dB) with orthonormal rows/cols."""
    dim_b = dim_b or dim_a
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((max(dim_a, dim_b), max(dim_a, dim_b))))
    q = q[:dim_a, :dim_b]
    a = rng.standard_normal((n, dim_a))
    b = a @ q + noise * rng.standard_normal((n, dim_b))
    return (a + offset_a).astype(dtype), (b + offset_b).astype(dtype), q


@pytest.fixture
def pair(tmp_path):
    """Factory: write a planted pair to Zarr; returns (src_url, tgt_url, A, B, Q)."""
    def make(n=2000, dim_a=16, dim_b=None, chunk_a=300, chunk_b=None, **kw):
        a, b, q = planted(n, dim_a, dim_b, **kw)
        s = write_zarr(tmp_path / "src.zarr", a, chunk_a)
        t = write_zarr(tmp_path / "tgt.zarr", b, chunk_b or chunk_a)
        return s, t, a, b, q
    return make


def load_shared(name):
    """The real sample ``name`` (an .npy file) as an array, or skip (:func:`shared_path`)."""
    return np.load(shared_path(name))


def race_for_lease(url, storage_options=None, runs: int = 8):
    """``runs`` threads take the lease of the job at ``url`` at the same instant; returns
    (winners' leases, refusal messages). The caller releases the winners."""
    import threading

    from bigalign.storage.job import Job
    from bigalign.errors import CheckpointError

    barrier, won, refused = threading.Barrier(runs), [], []

    def start():
        job = Job(url, storage_options)
        barrier.wait()
        try:
            won.append(job.lease(ttl=60).__enter__())
        except CheckpointError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start) for _ in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


@contextlib.contextmanager
def moto_s3(*buckets):
    """An S3-compatible server (moto's) on 127.0.0.1 with ``buckets`` created; yields the
    fsspec storage options that reach it. Skips when moto is not installed."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}
        client = boto3.client("s3", endpoint_url=opts["endpoint_url"],
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield opts
    finally:
        server.stop()


def run_cli(*argv, faults=None, check=None):
    """``python -m bigalign.cli ARGV`` in a subprocess (a real exit, real signals), with the
    fault points ``faults`` armed (BIGALIGN_FAULTS) or none; ``check``: the expected exit
    code. Returns the CompletedProcess (text stdout/stderr)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("BIGALIGN_FAULTS", None)
    if faults:
        env["BIGALIGN_FAULTS"] = faults
    p = subprocess.run([sys.executable, "-m", "bigalign.cli", *map(str, argv)], env=env,
                       capture_output=True, text=True, timeout=300)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def main_cli(*argv, check=None, cwd=None):
    """``bigalign ARGV`` in this process (:func:`bigalign.cli.main`): the parsing, the
    messages and the exit code of a real run without a new interpreter's start-up. A usage
    error's SystemExit becomes its exit code, as it does for a process; stdout and stderr
    are captured as text (stderr is no terminal, as in a pipe). ``cwd``: run from there.
    ``check``: the expected exit code. Returns what :func:`run_cli` returns (returncode,
    stdout, stderr). Signals, SIGKILL fault points and a real process's exit need
    :func:`run_cli`."""
    import io
    import os
    import types
    from contextlib import redirect_stderr, redirect_stdout

    from bigalign.cli import main

    saved_cwd, faults = os.getcwd(), os.environ.pop("BIGALIGN_FAULTS", None)
    out, err = io.StringIO(), io.StringIO()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(x) for x in argv])
            except SystemExit as e:  # argparse: usage errors 2, --help 0
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        if faults is not None:
            os.environ["BIGALIGN_FAULTS"] = faults
    p = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def cli(*argv, faults=None, check=None):
    """``bigalign ARGV`` as most tests run it: in this process (:func:`main_cli`), or in a
    real process (:func:`run_cli`) where fault points are armed (a SIGKILL or SIGTERM needs
    a process to end)."""
    if faults:
        return run_cli(*argv, faults=faults, check=check)
    return main_cli(*argv, check=check)
