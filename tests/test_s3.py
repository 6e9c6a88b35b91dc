"""fsspec URLs against an S3-compatible server (moto's) on 127.0.0.1: inputs, transform,
output and checkpoints on an object store (no rename; whole-object PUTs; listings)."""

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.cli import main
from conftest import planted, race_for_lease, moto_s3

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    with moto_s3("bigalign-test") as opts:
        yield opts


def test_fit_apply_resume_on_s3(s3, monkeypatch):
    a, b, _ = planted(3000, 8, noise=0.1, offset_a=1.0, seed=31)
    zarr.create_array("s3://bigalign-test/a.zarr", data=a, chunks=(250, 8), storage_options=s3)
    zarr.create_array("s3://bigalign-test/b.zarr", data=b, chunks=(250, 8), storage_options=s3)
    tr = bigalign.fit("s3://bigalign-test/a.zarr", "s3://bigalign-test/b.zarr", center=True,
                      output="s3://bigalign-test/t", storage_options=s3, block_bytes=8000)
    assert bigalign.Transform.load("s3://bigalign-test/t", storage_options=s3).metadata[
        "n_pairs"] == 3000
    # an apply that fails half way (a region raises) leaves done-markers; the rerun resumes
    from bigalign.execution import engine
    real = engine.map_rows
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        return real(*args, **kw)

    monkeypatch.setattr(engine, "map_rows", flaky)
    with pytest.raises(RuntimeError):
        bigalign.apply("s3://bigalign-test/t", "s3://bigalign-test/a.zarr",
                       "s3://bigalign-test/o.zarr", storage_options=s3, block_bytes=8000,
                       threads=1)
    assert bigalign.output_status("s3://bigalign-test/o.zarr", s3)["complete"] is False
    monkeypatch.setattr(engine, "map_rows", real)
    rep = bigalign.apply("s3://bigalign-test/t", "s3://bigalign-test/a.zarr",
                         "s3://bigalign-test/o.zarr", storage_options=s3, block_bytes=8000)
    assert rep.units_resumed == 4
    out = zarr.open_array("s3://bigalign-test/o.zarr", storage_options=s3)
    assert out.attrs["bigalign"]["complete"]
    np.testing.assert_allclose(out[:], tr.transform(a), rtol=1e-6, atol=1e-6)


def test_cli_storage_options(s3, capsys):
    a, b, _ = planted(500, 4, seed=32)
    zarr.create_array("s3://bigalign-test/c.zarr", data=a, chunks=(100, 4), storage_options=s3)
    zarr.create_array("s3://bigalign-test/d.zarr", data=b, chunks=(100, 4), storage_options=s3)
    so = [f"--storage-option=endpoint_url={s3['endpoint_url']}",
          "--storage-option=key=testing", "--storage-option=secret=testing"]
    assert main(["fit", "s3://bigalign-test/c.zarr", "s3://bigalign-test/d.zarr", "-o",
                 "s3://bigalign-test/t2", "-q", *so]) == 0
    assert main(["info", "s3://bigalign-test/t2", "--json", *so]) == 0
    assert '"n_pairs": 500' in capsys.readouterr().out


@pytest.mark.parametrize("spelling", ["s3://bigalign-test/src.zarr/", "s3a://bigalign-test/src.zarr",
                                      "s3://bigalign-test//src.zarr", "s3://bigalign-test"])
def test_output_aliasing_the_source_on_s3_is_refused(s3, spelling):
    a, b, _ = planted(400, 4, seed=33)
    zarr.create_array("s3://bigalign-test/src.zarr", data=a, chunks=(100, 4), storage_options=s3,
                      overwrite=True)
    zarr.create_array("s3://bigalign-test/tgt.zarr", data=b, chunks=(100, 4), storage_options=s3,
                      overwrite=True)
    t = bigalign.fit("s3://bigalign-test/src.zarr", "s3://bigalign-test/tgt.zarr",
                     storage_options=s3)
    with pytest.raises(bigalign.InputError, match="never writes over its inputs"):
        bigalign.apply(t, "s3://bigalign-test/src.zarr", spelling, overwrite=True,
                       storage_options=s3)
    np.testing.assert_array_equal(
        zarr.open_array("s3://bigalign-test/src.zarr", storage_options=s3)[:], a)


def test_lease_on_s3_is_a_conditional_create(s3):
    """Eight runs starting at once against moto's S3 (If-None-Match: *): one wins."""
    won, refused = race_for_lease("s3://bigalign-test/race.checkpoint", s3)
    assert len(won) == 1 and len(refused) == 7, refused
    won[0].__exit__(None, None, None)


def test_rerun_on_s3_is_a_noop_and_a_rewritten_input_is_detected(s3):
    a, b, _ = planted(600, 4, seed=34)
    src, tgt = "s3://bigalign-test/rerun-a.zarr", "s3://bigalign-test/rerun-b.zarr"
    zarr.create_array(src, data=a, chunks=(100, 4), storage_options=s3, overwrite=True)
    zarr.create_array(tgt, data=b, chunks=(100, 4), storage_options=s3, overwrite=True)
    first = bigalign.fit(src, tgt, output="s3://bigalign-test/t5", storage_options=s3)
    again = bigalign.fit(src, tgt, output="s3://bigalign-test/t5", storage_options=s3)
    assert again.metadata["job"] == first.metadata["job"]
    zarr.open_array(tgt, mode="r+", storage_options=s3)[:] = b[::-1]  # same shape, new data
    with pytest.raises(bigalign.InputError, match=r"target.content"):
        bigalign.fit(src, tgt, output="s3://bigalign-test/t5", storage_options=s3)


def test_cli_nested_storage_options(s3, capsys):
    """Nested fsspec options as JSON values, and a whole --storage-options object, reach
    s3fs from every command: the endpoint is given only inside client_kwargs, so nothing
    works unless the nested value is passed on."""
    a, b, _ = planted(300, 4, seed=33)
    zarr.create_array("s3://bigalign-test/e.zarr", data=a, chunks=(100, 4), storage_options=s3)
    zarr.create_array("s3://bigalign-test/f.zarr", data=b, chunks=(100, 4), storage_options=s3)
    nested = ['--storage-option=client_kwargs={"endpoint_url": "%s", "region_name": '
              '"us-east-1"}' % s3["endpoint_url"],
              '--storage-option=config_kwargs={"s3": {"addressing_style": "path"}}']
    blob = '{"key": "testing", "secret": "testing"}'
    assert main(["fit", "s3://bigalign-test/e.zarr", "s3://bigalign-test/f.zarr", "-o",
                 "s3://bigalign-test/t3", "-q", "--storage-options", blob, *nested]) == 0
    assert main(["status", "s3://bigalign-test/t3", "--storage-options", blob, *nested]) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["info", "s3://bigalign-test/t3", "--json", "--storage-options", blob,
                 *nested]) == 0
    assert '"n_pairs": 300' in capsys.readouterr().out
