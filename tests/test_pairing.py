"""Pairing by id (a polars join checked against plain Python), gathering paired rows with
each needed chunk read once, fits by id equal to fits on explicitly joined pairs, model
stamps, and apply of a row slice."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.storage import stores
from bigalign.errors import InputError, NonFiniteError
from bigalign.execution.pairing import GatherReport, gather, join, sample_pairs
from bigalign.storage.stores import open_embeddings
from conftest import make_store, planted, reference_join


@pytest.mark.parametrize("kind", ["int", "str"])
def test_join_matches_plain_python(kind):
    rng = np.random.default_rng(1)
    universe = rng.permutation(5000)[:3000]
    ids_a = universe[:2500]
    ids_b = rng.permutation(np.concatenate([universe[1000:2800], rng.integers(10**6, 2 * 10**6, 50)]))
    if kind == "str":
        ids_a = np.array([f"doc-{v}" for v in ids_a])
        ids_b = np.array([f"doc-{v}" for v in ids_b])
    pairs = join(ids_a, ids_b)
    ref = reference_join(list(ids_a), list(ids_b))
    assert list(zip(pairs.source_rows.tolist(), pairs.target_rows.tolist())) == ref
    assert pairs.matched == 1500
    assert pairs.source_only == 1000 and pairs.target_only == 350


def test_duplicate_ids_refused_unless_told_which_to_keep():
    ids_a = np.array([5, 7, 5, 9])
    ids_b = np.array([9, 5, 7])
    with pytest.raises(InputError, match=r"source ids: 1 ids occur more than once .*id 5 at row 0"):
        join(ids_a, ids_b)
    first, last = join(ids_a, ids_b, duplicates="first"), join(ids_a, ids_b, duplicates="last")
    assert first.source_rows.tolist() == [0, 1, 3] and first.target_rows.tolist() == [1, 2, 0]
    assert last.source_rows.tolist() == [1, 2, 3] and last.target_rows.tolist() == [2, 1, 0]
    assert first.duplicates == {"source": 1}
    with pytest.raises(InputError, match="cannot match"):
        join(np.array([5, 7]), np.array(["5", "7"]))
    with pytest.raises(InputError, match="nothing to pair"):
        join(np.array([5, 7]), np.array([1, 2]))


def test_sample_is_reproducible_and_in_source_order():
    pairs = join(np.arange(1000), np.arange(999, -1, -1))
    s1, s2 = sample_pairs(pairs, 100, seed=3), sample_pairs(pairs, 100, seed=3)
    assert s1.matched == 100 and np.array_equal(s1.source_rows, s2.source_rows)
    assert np.all(np.diff(s1.source_rows) > 0)
    assert np.array_equal(s1.target_rows, 999 - s1.source_rows)
    assert not np.array_equal(sample_pairs(pairs, 100, seed=4).source_rows, s1.source_rows)


class CountingArray:
    """A zarr array that counts reads per chunk."""

    def __init__(self, arr):
        self._arr, self.reads = arr, {}

    def __getattr__(self, name):
        return getattr(self._arr, name)

    def __getitem__(self, sel):
        key = sel.start // self._arr.chunks[0]
        self.reads[key] = self.reads.get(key, 0) + 1
        return self._arr[sel]


def test_gather_reads_each_needed_chunk_once(tmp_path):
    data = np.random.default_rng(2).standard_normal((5000, 6)).astype(np.float32)
    arr = zarr.create_array(str(tmp_path / "x.zarr"), data=data, chunks=(250, 6))
    counting = CountingArray(arr)
    emb = stores.EmbeddingArray(counting, "x.zarr", "source")
    rows = np.random.default_rng(3).choice(5000, 700, replace=False)  # any order
    rows[:10] = rows[0]  # a row needed twice
    report = GatherReport()
    got = gather(emb, rows, str(tmp_path / "g.npy"), report=report)
    np.testing.assert_array_equal(got, data[rows])
    needed = set((rows // 250).tolist())
    assert set(counting.reads) == needed and set(counting.reads.values()) == {1}
    assert report.chunks_read == len(needed) and report.rows == 700


@pytest.mark.parametrize("side,bad", [("source", "nan"), ("target", "nan"),
                                      ("source", "zero"), ("target", "zero")])
def test_fit_by_ids_names_the_stored_row_of_a_bad_row(tmp_path, side, bad):
    """A NaN in a paired row, or a zero row when rows are normalised, is reported at its row
    in the store, not at its position in the gathered scratch (the two differ: the target
    is shuffled and only half of it is paired)."""
    a, b, _ = planted(1200, 5, seed=9)
    ids = np.arange(1200)
    rng = np.random.default_rng(10)
    keep = rng.permutation(1200)[:600]
    order = rng.permutation(600)
    tgt, tgt_ids = b[keep][order].copy(), ids[keep][order]
    src = a.copy()
    if side == "source":
        bad_row = int(keep[order[123]])  # a paired source row
        src[bad_row] = 0.0 if bad == "zero" else src[bad_row]
        src[bad_row, 2] = 0.0 if bad == "zero" else np.nan
    else:
        bad_row = 123
        tgt[bad_row] = 0.0 if bad == "zero" else tgt[bad_row]
        tgt[bad_row, 4] = 0.0 if bad == "zero" else np.inf
    s = make_store(tmp_path / "a.store", src, ids, chunk=100)
    t = make_store(tmp_path / "b.store", tgt, tgt_ids, chunk=100)
    position = int(np.searchsorted(np.sort(keep), keep[order[123]]))  # its place in the pairs
    assert position != bad_row
    what = "a zero-norm row" if bad == "zero" else "NaN or Inf"
    with pytest.raises(NonFiniteError, match=rf"{side} .* row {bad_row} holds {what}"):
        bigalign.fit(s, t, center=True, normalize=bad == "zero")


def test_fit_by_ids_equals_fit_on_joined_pairs(tmp_path):
    a, b, q = planted(3000, 8, noise=0.05, offset_a=1.0, seed=4)
    ids = np.array([f"item-{i}" for i in range(3000)])
    # the target model ran on a sample of 2,000 items, in its own order, plus 30 unknown ids
    rng = np.random.default_rng(5)
    sample = rng.permutation(3000)[:2000]
    extra = np.array([f"new-{i}" for i in range(30)])
    tgt_ids = np.concatenate([ids[sample], extra])
    tgt = np.concatenate([b[sample], rng.standard_normal((30, 8)).astype(np.float32)])
    order = rng.permutation(len(tgt_ids))
    s = make_store(tmp_path / "old.store", a, ids, model="old-model", chunk=250)
    t = make_store(tmp_path / "new.store", tgt[order], tgt_ids[order], model="new-model")
    got = bigalign.fit(s, t, center=True, output=str(tmp_path / "t"))
    assert got.metadata["pairs"]["matched"] == 2000
    assert got.metadata["pairs"]["source_only"] == 1000
    assert got.metadata["pairs"]["target_only"] == 30
    assert got.metadata["source_model"] == "old-model"
    assert got.metadata["target_model"] == "new-model"
    rows_a = np.sort(sample)
    # the explicitly joined pairs, stored row by row like the gathered scratch (same plan)
    ref = bigalign.fit(zarr.create_array(str(tmp_path / "ja.zarr"), data=a[rows_a],
                                         chunks=(1, 8)),
                       zarr.create_array(str(tmp_path / "jb.zarr"), data=b[rows_a],
                                         chunks=(1, 8)), center=True)
    np.testing.assert_array_equal(got.rotation, ref.rotation)
    np.testing.assert_array_equal(got.source_mean, ref.source_mean)
    # rerun: the same job, a no-op; --sample: a reproducible subset
    assert bigalign.fit(s, t, center=True, output=str(tmp_path / "t")).metadata["job"] == \
        got.metadata["job"]
    sub = bigalign.fit(s, t, center=True, sample=500, seed=1)
    assert sub.metadata["pairs"]["matched"] == 500
    assert bigalign.fit(s, t, rows="0:100").metadata["pairs"]["rows"] == [0, 100]  # positions
    with pytest.raises(InputError, match="same rows|rows but target has"):
        bigalign.fit(s, t, pair_by="rows")


def test_duplicates_policy_through_fit(tmp_path):
    a, b, _ = planted(400, 4, seed=6)
    ids = np.arange(400)
    ids[10] = ids[11]
    s = make_store(tmp_path / "a.store", a, ids)
    t = make_store(tmp_path / "b.store", b, np.arange(400))
    with pytest.raises(InputError, match="occur more than once"):
        bigalign.fit(s, t)
    assert bigalign.fit(s, t, duplicates="first").metadata["pairs"]["matched"] == 399


def test_model_stamps_guard_apply(tmp_path):
    a, b, _ = planted(600, 4, seed=7)
    s = make_store(tmp_path / "a.store", a, model="e5-small")
    t = make_store(tmp_path / "b.store", b, model="minilm")
    tr = bigalign.fit(s, t, pair_by="rows", output=str(tmp_path / "t"))
    assert (tr.metadata["source_model"], tr.metadata["target_model"]) == ("e5-small", "minilm")
    other = make_store(tmp_path / "c.store", a, model="bge-small")
    with pytest.raises(InputError, match="embedded with 'bge-small'.*--allow-model-mismatch"):
        bigalign.apply(str(tmp_path / "t"), other, str(tmp_path / "o.zarr"))
    rep = bigalign.apply(str(tmp_path / "t"), other, str(tmp_path / "o.zarr"),
                         allow_model_mismatch=True)
    assert rep.rows == 600
    out = zarr.open_group(str(tmp_path / "o.zarr"))  # a store source gives a store
    assert out.attrs["model"] == "minilm" and out["embeddings"].shape == (600, 4)
    bigalign.apply(str(tmp_path / "t"), s, str(tmp_path / "o2.zarr"))  # same model: fine


def test_apply_rows_maps_a_slice(tmp_path):
    a, b, _ = planted(2000, 6, seed=8)
    s = zarr.create_array(str(tmp_path / "a.zarr"), data=a, chunks=(128, 6))
    tr = bigalign.fit(s, zarr.create_array(str(tmp_path / "b.zarr"), data=b, chunks=(128, 6)))
    rep = bigalign.apply(tr, str(tmp_path / "a.zarr"), str(tmp_path / "o.zarr"),
                         rows="300:1700", chunk_rows=200, block_bytes=4000)
    out = zarr.open_array(str(tmp_path / "o.zarr"))
    assert rep.rows == 1400 and out.shape == (1400, 6)
    assert out.attrs["bigalign"]["source_rows"] == [300, 1700]
    np.testing.assert_allclose(out[:], tr.transform(a[300:1700]), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError):
        bigalign.apply(tr, str(tmp_path / "a.zarr"), str(tmp_path / "o2.zarr"), rows="1900:1800")


def test_store_inputs_open_their_embeddings(tmp_path):
    a, _, _ = planted(300, 4, seed=9)
    s = make_store(tmp_path / "a.store", a, np.arange(300))
    from bigalign.storage.embedding_store import store_parts
    url, ids, model = store_parts(s)
    assert url.endswith("a.store/embeddings") and ids.shape == (300,) and model is None
    np.testing.assert_array_equal(open_embeddings(url).array[:], a)


def test_unfinished_store_is_refused(tmp_path):
    a, b, _ = planted(200, 4, seed=10)
    s = make_store(tmp_path / "a.store", a, np.arange(200))
    t = make_store(tmp_path / "b.store", b, np.arange(200))
    g = zarr.open_group(s, mode="r+")
    g.attrs["bigalign"] = {"kind": "embedding-store", "complete": False}
    with pytest.raises(InputError, match="unfinished embedding store"):
        bigalign.fit(s, t)
    g.attrs["bigalign"] = {"kind": "embedding-store", "complete": True}
    assert bigalign.fit(s, t).metadata["pairs"]["matched"] == 200


def test_sample_of_all_matched_pairs_warns_none_held_out(tmp_path, caplog):
    """--sample N >= the matched pairs fits on all of them: a warning says so (none held
    out for evaluate), not only the info line."""
    a, b, _ = planted(300, 4, seed=8)
    s = make_store(tmp_path / "a.store", a, np.arange(300))
    t = make_store(tmp_path / "b.store", b, np.arange(100, 400))
    with caplog.at_level("WARNING", logger="bigalign"):
        fitted = bigalign.fit(s, t, sample=5000, seed=2)
    assert fitted.metadata["pairs"]["matched"] == 200
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("--sample 5000" in m and "200 pairs matched" in m and "holds none out" in m
               for m in warned), warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="bigalign"):
        bigalign.fit(s, t, sample=150, seed=2)
    assert not any("--sample" in r.getMessage() for r in caplog.records)


def test_fit_by_ids_refuses_an_output_on_its_input_before_joining(tmp_path, monkeypatch):
    """An output that aliases an input is refused up front, before the id join (which reads
    every id of both stores) is paid for."""
    from bigalign.commands import fit as api

    a, b, _ = planted(300, 4, seed=2)
    ids = np.arange(300)
    s = make_store(tmp_path / "a.store", a, ids, chunk=100)
    t = make_store(tmp_path / "b.store", b, ids[::-1].copy(), chunk=100)

    def no_join(*_a, **_k):
        raise AssertionError("joined the ids before checking the output")

    monkeypatch.setattr(api, "join", no_join)
    with pytest.raises(InputError, match="never writes over its inputs"):
        bigalign.fit(s, t, output=f"{s}/t")


def test_killed_fit_by_ids_leaves_scratch_that_the_next_run_removes(tmp_path):
    """A fit by id SIGKILLed after gathering (OOM, pre-emption: no cleanup runs) left its
    scratch folder (pairs x (dA + dB) x 4 bytes) for good. The folder holds an owner record
    now, and the next run removes the folders of dead owners on this machine before it
    gathers, then finishes with the uninterrupted fit's result. Folders it cannot prove are
    a dead run's (no owner record, a live owner, another machine) are kept."""
    import json
    import os
    import socket

    from bigalign.storage.lease import _machine, _process_start
    from conftest import run_cli

    a, b, _ = planted(2000, 8, noise=0.05, offset_a=1.0, seed=8)
    ids = np.array([f"doc-{i}" for i in range(2000)])
    order = np.random.default_rng(9).permutation(2000)[:1500]
    s = make_store(tmp_path / "a.store", a, ids, chunk=200)
    t = make_store(tmp_path / "b.store", b[order], ids[order], chunk=200)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "pid_started": _process_start(os.getpid())}
    kept = {"bigalign-pairs-foreign": None,  # not ours: no owner record
            "bigalign-pairs-live": dict(me, machine=_machine()),  # a live run (this test)
            "bigalign-pairs-elsewhere": dict(me, machine="other-host|boot|pid:[1]")}
    for name, record in kept.items():
        (scratch / name).mkdir()
        if record is not None:
            (scratch / name / "owner.json").write_text(json.dumps(record))
    args = ["fit", s, t, "-o", tmp_path / "t", "--center", "--scratch", scratch,
            "--block-mb", "0.005", "-q"]
    killed = run_cli(*args, faults="kill:fit.block@1")
    assert killed.returncode == -9, killed.stderr
    left = sorted(set(os.listdir(scratch)) - set(kept))
    assert len(left) == 1 and left[0].startswith("bigalign-pairs-"), left
    owner = json.loads((scratch / left[0] / "owner.json").read_text())
    assert owner["machine"] == _machine() and owner["pid"] != os.getpid()
    assert (scratch / left[0] / "source.npy").stat().st_size > 1500 * 8 * 4
    run_cli(*args, check=0)
    assert sorted(os.listdir(scratch)) == sorted(kept)  # the dead run's scratch is gone
    got = bigalign.Transform.load(str(tmp_path / "t"))
    ref = bigalign.fit(s, t, center=True, block_bytes=int(0.005 * 2**20))
    np.testing.assert_array_equal(got.rotation, ref.rotation)
    np.testing.assert_array_equal(got.source_mean, ref.source_mean)
    np.testing.assert_array_equal(got.target_mean, ref.target_mean)


# ---- training splits: --rows with inputs of other lengths, and with ids ----------------

def test_rows_split_inputs_of_different_lengths(tmp_path):
    import bigalign
    from bigalign import InputError
    from conftest import planted, write_zarr

    a, b, _ = planted(1500, 6, noise=0.05, seed=31)
    extra = np.random.default_rng(0).standard_normal((500, 6)).astype(np.float32)
    s = write_zarr(tmp_path / "a.zarr", a, 100)
    t = write_zarr(tmp_path / "b.zarr", np.r_[b, extra], 100)  # the target is longer
    with pytest.raises(InputError, match=r"1,500 rows but target has 2,000.*--rows 0:1500"):
        bigalign.fit(s, t)
    got = bigalign.fit(s, t, rows="0:1000")
    ref = bigalign.fit(write_zarr(tmp_path / "a1.zarr", a[:1000], 100),
                       write_zarr(tmp_path / "b1.zarr", b[:1000], 100))
    np.testing.assert_allclose(got.rotation, ref.rotation, atol=1e-6)
    with pytest.raises(InputError, match="1600"):
        bigalign.fit(s, t, rows="0:1600")  # past the shorter input's end


def test_rows_with_ids_are_positions_in_the_matched_pairs_and_evaluate_holds_out_the_rest(
        tmp_path):
    import bigalign
    from bigalign import InputError
    from conftest import make_store, planted, write_zarr

    a, b, _ = planted(800, 6, noise=0.05, seed=32)
    ids = np.arange(800) * 3
    order = np.random.default_rng(1).permutation(800)[:700]  # 100 source ids unmatched
    src = make_store(tmp_path / "s.store", a, ids)
    tgt = make_store(tmp_path / "t.store", b[order], ids[order])
    t = bigalign.fit(src, tgt, rows="0:500")
    assert t.metadata["n_pairs"] == 500 and t.metadata["pairs"]["rows"] == [0, 500]
    # the oracle: the first 500 matched pairs in source row order, fitted row by row
    matched = np.sort(order)
    ref = bigalign.fit(write_zarr(tmp_path / "ra.zarr", a[matched[:500]], 100),
                       write_zarr(tmp_path / "rb.zarr", b[matched[:500]], 100))
    np.testing.assert_allclose(t.rotation, ref.rotation, atol=1e-6)
    t.save(str(tmp_path / "t.transform"))
    r = bigalign.evaluate(str(tmp_path / "t.transform"), src, tgt)
    assert r["pairs"] == 200 and r["overlap_with_training"] == 0
    assert "matched pairs 0:500" in str(r["pairing"])
    with pytest.raises(InputError, match="give one"):
        bigalign.fit(src, tgt, rows="0:500", sample=100)
