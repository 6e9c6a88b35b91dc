"""End to end on dask.distributed: a LocalCluster of 2 worker processes on loopback."""

import json

import numpy as np
import pytest
import zarr

import bigalign
from conftest import imported_store, planted, write_zarr

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=":0") as c:
        yield c


@pytest.mark.slow
def test_fit_apply_on_two_worker_processes(tmp_path, cluster):
    a, b, q = planted(6000, 16, noise=0.05, offset_a=1.5, seed=11)
    s, t = write_zarr(tmp_path / "a.zarr", a, 250), write_zarr(tmp_path / "b.zarr", b, 250)
    local = bigalign.fit(s, t, center=True)
    remote = bigalign.fit(s, t, center=True, scheduler=cluster.scheduler_address,
                          output=str(tmp_path / "t"))
    # same plan and merge tree on any workers: the same float64 result, bit for bit
    assert np.array_equal(local.rotation, remote.rotation)
    np.testing.assert_allclose(remote.rotation, q, atol=1e-2)
    rep = bigalign.apply(str(tmp_path / "t"), s, str(tmp_path / "o.zarr"),
                         scheduler=cluster.scheduler_address)
    assert rep.rows == 6000
    out = zarr.open_array(str(tmp_path / "o.zarr"))
    np.testing.assert_allclose(out[:], remote.transform(a), rtol=1e-6, atol=1e-6)
    assert out.attrs["bigalign"]["complete"]


@pytest.mark.slow
def test_apply_of_a_store_on_two_worker_processes(tmp_path, cluster):
    """The region tasks carry the source and output ids arrays to worker processes."""
    a, b, _ = planted(3000, 8, noise=0.05, seed=13)
    ids = np.array([f"w{i * 17 % 3000}" for i in range(3000)])
    s = imported_store(tmp_path / "a.store", a, ids, model="old", chunk_rows=200)
    tr = bigalign.fit(s, write_zarr(tmp_path / "b.zarr", b, 200), center=True)
    bigalign.apply(tr, s, str(tmp_path / "o.store"), rows="100:2900",
                   scheduler=cluster.scheduler_address)
    out = zarr.open_group(str(tmp_path / "o.store"))
    assert out.attrs["bigalign"]["complete"] and out["ids"][:].tolist() == ids[100:2900].tolist()
    np.testing.assert_allclose(out["embeddings"][:], tr.transform(a[100:2900]), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.slow
def test_cli_starts_its_own_local_cluster(tmp_path):
    from bigalign.cli import main
    a, b, _ = planted(3000, 8, seed=12)
    s, t = write_zarr(tmp_path / "a.zarr", a, 200), write_zarr(tmp_path / "b.zarr", b, 200)
    assert main(["fit", s, t, "-o", str(tmp_path / "t"), "--workers", "2", "-q"]) == 0
    assert main(["apply", str(tmp_path / "t"), s, "-o", str(tmp_path / "o.zarr"),
                 "--workers", "2", "--memory-limit", "1GiB", "-q"]) == 0
    assert bigalign.output_status(str(tmp_path / "o.zarr"))["complete"]


def calls_then(path, outcome):
    """A task that records each call in a file (workers are other processes), then fails
    deterministically ("nan"), fails transiently on its first call ("flaky"), or returns 42."""
    with open(path, "a") as f:
        f.write("call\n")
    with open(path) as f:
        n = len(f.readlines())
    if outcome == "nan":
        from bigalign.errors import NonFiniteError
        raise NonFiniteError("source row 5 holds NaN or Inf")
    if outcome == "flaky" and n == 1:
        raise ConnectionResetError("connection reset by peer")
    return 42


@pytest.mark.slow
def test_deterministic_errors_are_not_retried(tmp_path, cluster):
    """A NaN row (or a corrupt chunk) fails at once: distributed's retries would re-run it."""
    from bigalign.execution.cluster import Session
    from bigalign.errors import NonFiniteError
    with distributed.Client(cluster) as client:
        with pytest.raises(NonFiniteError, match="row 5"):
            Session(client).get({"x": (calls_then, str(tmp_path / "nan"), "nan")}, "x")
        # a transient error that no lower layer retried is re-run in the task
        assert Session(client).get({"y": (calls_then, str(tmp_path / "flaky"), "flaky")},
                                   "y") == 42
    assert (tmp_path / "nan").read_text().count("call") == 1
    assert (tmp_path / "flaky").read_text().count("call") == 2


@pytest.mark.slow
def test_progress_lines_on_distributed(tmp_path, cluster, capsys):
    """Not a terminal: line-based progress on stderr, nothing on stdout (distributed's own
    bar writes \\r updates to stdout)."""
    from bigalign.cli import main
    a, b, _ = planted(3000, 8, seed=13)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    assert main(["fit", s, t, "-o", str(tmp_path / "t"), "--scheduler",
                 cluster.scheduler_address, "--block-mb", "0.01", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["metadata"]["n_pairs"] == 3000
    assert "\r" not in err and "\r" not in out
    lines = [ln for ln in err.splitlines() if ln.startswith("bigalign: progress ")]
    assert lines and lines[-1].startswith("bigalign: progress 100% ("), err


@pytest.mark.slow
def test_own_cluster_shuts_down_without_dask_tracebacks(capsys):
    """A LocalCluster bigalign started closes without distributed's ERROR tracebacks (its
    scheduler logged the progress bar's cancelled ``feed`` as asyncio CancelledError on
    most runs), and distributed's loggers are back at their levels afterwards."""
    import logging

    from bigalign.execution.cluster import session

    class Collect(logging.Handler):     # distributed's loggers do not propagate to root
        def emit(self, record):
            records.append(record)

    records, handler = [], Collect(logging.ERROR)
    names = ("distributed", "distributed.scheduler", "distributed.client")
    levels = {n: logging.getLogger(n).level for n in names}
    logging.getLogger("distributed").addHandler(handler)
    try:
        for _ in range(2):
            with session(workers=2, progress=True) as s:
                assert s.get({"x": (sum, [1, 2]), "y": (max, "x", 0)}, "y") == 3
    finally:
        logging.getLogger("distributed").removeHandler(handler)
    assert "bigalign: progress 100%" in capsys.readouterr().err
    assert [(r.name, r.getMessage(), r.exc_info) for r in records] == []
    assert {n: logging.getLogger(n).level for n in names} == levels
