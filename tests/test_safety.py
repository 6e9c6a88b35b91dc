"""Never lose or corrupt data (issue 7): outputs that alias inputs under other spellings,
shared checkpoint folders, stale outputs and units, inputs changed in place, runs started
together, lost leases, and reruns of finished jobs. Each test reproduces a defect found on
an earlier version and checks the input bytes and the result afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.storage.job import Job
from bigalign.storage.lease import Lease, LeaseLostError
from bigalign.errors import CheckpointError, InputError
from conftest import imported_store, main_cli, planted, write_zarr

ROWS, DIM, CHUNK = 6000, 8, 250
SMALL = ["--block-mb", "0.02", "-q"]  # 24 blocks: room for kills between units


def cli(*argv, faults=None, check=None, cwd=None):
    """``bigalign ARGV``: in this process (conftest.main_cli), or with ``faults`` (SIGKILL at
    a fault point) in a real process. ``check``: the expected exit code."""
    if not faults:
        return main_cli(*argv, check=check, cwd=cwd)
    env = dict(os.environ)
    env.pop("BIGALIGN_FAULTS", None)
    if faults:
        env["BIGALIGN_FAULTS"] = faults
    p = subprocess.run([sys.executable, "-m", "bigalign.cli", *map(str, argv)], env=env,
                       capture_output=True, text=True, timeout=300, cwd=cwd)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture
def corpus(tmp_path):
    a, b, _ = planted(ROWS, DIM, noise=0.1, offset_a=1.0, seed=5)
    s = write_zarr(tmp_path / "a.zarr", a, CHUNK)
    t = write_zarr(tmp_path / "b.zarr", b, CHUNK)
    tr = bigalign.fit(s, t, center=True, output=str(tmp_path / "t"))
    return tmp_path, s, t, a, b, tr


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes: proof an input is untouched."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ---- 1. outputs and checkpoints never alias inputs ----------------------------------------

SPELLINGS = {
    "relative": lambda tmp: "./a.zarr",
    "trailing-slash": lambda tmp: f"{tmp}/a.zarr/",
    "dot-dot": lambda tmp: f"{tmp}/sub/../a.zarr",
    "symlink": lambda tmp: f"{tmp}/link.zarr",
    "file-url": lambda tmp: f"file://{tmp}/a.zarr",
    "parent-folder": lambda tmp: str(tmp),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_apply_output_aliasing_the_source_is_refused(corpus, spelling):
    tmp, s, _, a, _, _ = corpus
    os.makedirs(tmp / "sub", exist_ok=True)
    os.symlink(tmp / "a.zarr", tmp / "link.zarr")
    before = snapshot(tmp / "a.zarr")
    r = cli("apply", tmp / "t", s, "-o", SPELLINGS[spelling](tmp), "--overwrite", "-q",
            check=2, cwd=tmp)
    assert "never writes over its inputs" in r.stderr
    assert snapshot(tmp / "a.zarr") == before
    np.testing.assert_array_equal(zarr.open_array(s)[:], a)


@pytest.mark.parametrize("spelling", ["relative", "symlink", "file-url", "trailing-slash"])
def test_fit_output_aliasing_the_target_is_refused(corpus, spelling):
    tmp, s, t, _, b, _ = corpus
    os.symlink(tmp / "a.zarr", tmp / "link.zarr")
    target_spelling = SPELLINGS[spelling](tmp).replace("a.zarr", "b.zarr")
    before = snapshot(tmp / "b.zarr")
    r = cli("fit", s, t, "-o", target_spelling, "--overwrite", "-q", check=2, cwd=tmp)
    assert "never writes over its inputs" in r.stderr
    assert snapshot(tmp / "b.zarr") == before


def test_checkpoint_inside_or_around_an_input_is_refused(corpus):
    tmp, s, t, _, _, _ = corpus
    for ck in (f"{tmp}/a.zarr/progress", str(tmp)):
        r = cli("fit", s, t, "-o", tmp / "t2", "--checkpoint", ck, "-q", check=2)
        assert "checkpoint" in r.stderr and "never writes over its inputs" in r.stderr
    r = cli("apply", tmp / "t", s, "-o", tmp / "o.zarr", "--checkpoint", tmp / "t", "-q",
            check=2)
    assert "transform" in r.stderr


def test_apply_output_aliasing_the_transform_is_refused(corpus):
    tmp, s, _, _, _, _ = corpus
    r = cli("apply", tmp / "t", s, "-o", f"file://{tmp}/t/", "--overwrite", "-q", check=2)
    assert "never writes over its inputs" in r.stderr
    assert bigalign.Transform.load(str(tmp / "t")).dims == (DIM, DIM)


def test_foreign_output_is_never_deleted_even_with_overwrite(corpus):
    """--overwrite replaces only what bigalign wrote: a user's array, group or folder at the
    output location is refused and left as it was."""
    tmp, s, t, _, _, _ = corpus
    user = write_zarr(tmp / "user.zarr", np.arange(40, dtype=np.float32).reshape(10, 4), 5)
    zarr.open_group(str(tmp / "group.zarr"), mode="w").attrs["mine"] = True
    (tmp / "folder").mkdir()
    (tmp / "folder" / "notes.txt").write_text("keep me")
    for out in (user, tmp / "group.zarr", tmp / "folder"):
        before = snapshot(out)
        for argv in (["apply", tmp / "t", s], ["fit", s, t]):
            r = cli(*argv, "-o", out, "--overwrite", "-q", check=2)
            assert "was not written by bigalign" in r.stderr
        assert snapshot(out) == before


# ---- 2. a shared checkpoint folder is not deleted ------------------------------------------

def test_shared_checkpoint_folder_is_refused_and_kept(corpus):
    tmp, s, t, _, _, _ = corpus
    shared = tmp / "progress"
    shared.mkdir()
    (shared / "other-job.json").write_text("{}")
    r = cli("fit", s, t, "-o", tmp / "t2", "--checkpoint", shared, "-q", check=2)
    assert "holds files bigalign did not write" in r.stderr
    assert (shared / "other-job.json").exists()
    # an empty folder is fine; after success only bigalign's files are gone
    cli("apply", tmp / "t", s, "-o", tmp / "o.zarr", "--checkpoint", tmp / "ck", "-q",
        check=0)
    assert not (tmp / "ck").exists()


# ---- 3. a stale output is never reused ------------------------------------------------------

def test_stale_output_of_another_run_is_recreated(corpus):
    """Run A (chunks 250, float32) killed half way; run B (--overwrite, chunks 500, float16)
    killed after its manifest but before it created its output; B rerun without
    --overwrite. Before: A's array was reused, regions straddled its chunks and the result
    was marked complete with NaN rows, A's dtype and A's transform."""
    tmp, s, _, a, _, tr = corpus
    out = tmp / "o.zarr"
    cli("apply", tmp / "t", s, "-o", out, "--block-mb", "0.02", "-q",
        faults="kill:apply.region-done@5", check=-signal.SIGKILL)
    assert zarr.open_array(str(out)).dtype == np.float32
    argv = ["apply", tmp / "t", s, "-o", out, "--chunk-rows", "500", "--dtype", "float16",
            "--block-mb", "0.02", "-q"]
    killed = cli(*argv, "--overwrite", faults="kill:apply.begun@1")
    assert killed.returncode == -signal.SIGKILL
    cli(*argv, check=0)
    arr = zarr.open_array(str(out))
    assert arr.dtype == np.float16 and arr.chunks == (500, DIM)
    assert arr.attrs["bigalign"]["complete"] is True
    got = arr[:]
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got, tr.transform(a, dtype=np.float16))


# ---- 4. statistics of an earlier run are not loaded -----------------------------------------

def test_stale_units_are_recomputed(corpus):
    """Units of an interrupted fit over rows 0:6000 copied into the checkpoint of a fit over
    rows 0:4000 (the same unit names): before, n_pairs came out larger than the rows. Files
    stamped with another run are not this job's: the checkpoint is refused, and they are
    never read or deleted."""
    tmp, s, t, a, b, _ = corpus
    big = tmp / "big"
    cli("fit", s, t, "-o", big, *SMALL, faults="kill:fit.unit-saved@3", check=-signal.SIGKILL)
    stale = {n: (tmp / "big.checkpoint" / "units" / n).read_bytes()
             for n in os.listdir(tmp / "big.checkpoint" / "units") if n.endswith(".npz")}
    assert len(stale) >= 3
    small = tmp / "small"
    cli("fit", s, t, "-o", small, "--rows", "0:4000", *SMALL, faults="kill:fit.unit-saved@1",
        check=-signal.SIGKILL)
    for name, raw in stale.items():
        (tmp / "small.checkpoint" / "units" / name).write_bytes(raw)
    # units stamped with another run are not this job's: the folder is refused, untouched
    r = cli("fit", s, t, "-o", small, "--rows", "0:4000", "--block-mb", "0.02", check=2)
    assert "holds files bigalign did not write (units/" in r.stderr
    assert all((tmp / "small.checkpoint" / "units" / n).exists() for n in stale)
    for name in stale:
        os.remove(tmp / "small.checkpoint" / "units" / name)
    cli("fit", s, t, "-o", small, "--rows", "0:4000", "--block-mb", "0.02", check=0)
    got = bigalign.Transform.load(str(small))
    assert got.metadata["n_pairs"] == 4000
    fresh = bigalign.fit(s, t, rows=(0, 4000), block_bytes=int(0.02 * 2**20))
    np.testing.assert_array_equal(got.rotation, fresh.rotation)


# ---- 5. an input changed in place between a kill and the rerun ------------------------------

def test_input_rewritten_in_place_is_detected(corpus):
    tmp, s, t, a, b, _ = corpus
    out = tmp / "t2"
    cli("fit", s, t, "-o", out, "--center", *SMALL, faults="kill:fit.unit-saved@2",
        check=-signal.SIGKILL)
    rng = np.random.default_rng(9)
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    new_b = (a @ q).astype(np.float32)  # re-embedded: same shape, chunks and dtype
    time.sleep(0.01)
    zarr.open_array(t, mode="r+")[:] = new_b
    r = cli("fit", s, t, "-o", out, "--center", *SMALL, check=2)
    assert "target.content" in r.stderr and "changed" in r.stderr
    cli("fit", s, t, "-o", out, "--center", "--restart", *SMALL, check=0)
    got = bigalign.Transform.load(str(out))
    fresh = bigalign.fit(s, t, center=True, block_bytes=int(0.02 * 2**20))
    np.testing.assert_allclose(got.rotation, fresh.rotation, atol=1e-12)
    np.testing.assert_allclose(got.rotation, q, atol=1e-5)


# ---- 6. runs started together ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["apply", "fit"])
def test_three_runs_started_together(corpus, command):
    """Three processes on one output at once: one takes the lease and does the work, the
    other two are refused (exit 2, naming the holder). Every process is stopped (SIGSTOP)
    as soon as a lease exists, and the holder resumed only after the others have ended, so
    they meet it mid-run however loaded the machine is; a rerun after it finds it done."""
    tmp, s, t, a, _, tr = corpus
    out = tmp / f"{command}-out"
    argv = (["apply", tmp / "t", s] if command == "apply" else ["fit", s, t, "--center"]) + \
        ["-o", out, *SMALL]
    env = dict(os.environ, BIGALIGN_FAULTS="delay:fit.block@0.05,delay:apply.region-written@0.05")
    job = Job(f"{out}.checkpoint")
    procs = [subprocess.Popen([sys.executable, "-m", "bigalign.cli", *map(str, argv)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    try:
        deadline, held = time.monotonic() + 120, None
        while time.monotonic() < deadline and not (held and held[1].get("pid")):
            held = Lease.newest(job) if os.path.isdir(f"{out}.checkpoint") else None
            time.sleep(0.005)
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        held = Lease.newest(job)  # as it stands now that no one moves
        assert held and Lease.alive(held[1]), ("the holder finished before it was stopped",
                                               held)
        holder, = [p for p in procs if p.pid == held[1]["pid"]]
        others = [p for p in procs if p is not holder]
        for p in others:
            p.send_signal(signal.SIGCONT)
        for p in others:
            err = p.communicate(timeout=300)[1]
            assert p.returncode == 2, (p.returncode, err)
            assert "another bigalign run" in err, err
        assert holder.poll() is None  # still mid-run, holding the lease
        holder.send_signal(signal.SIGCONT)
        err = holder.communicate(timeout=300)[1]
        assert holder.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    r = cli(*argv[:-1], check=0)  # not -q
    assert "nothing to do" in r.stderr, r.stderr
    if command == "apply":
        arr = zarr.open_array(str(out))
        assert arr.attrs["bigalign"]["complete"] is True
        np.testing.assert_allclose(arr[:], tr.transform(a), rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(bigalign.Transform.load(str(out)).rotation, tr.rotation,
                                   atol=1e-6)
    assert not os.path.exists(f"{out}.checkpoint")


# ---- 6b. a run that lost its lease stops ----------------------------------------------------

def test_run_that_lost_its_lease_stops_without_completing(corpus, monkeypatch):
    """The run stalls past its lease's expiry (as a paused VM would) and a second run takes
    the job over: the first stops (LeaseLostError) and never marks the output complete.
    The takeover happens when the first has stored its second region (the fault point
    apply.region-done, in this process), not after a sleep."""
    from bigalign import faults

    tmp, s, _, _, _, _ = corpus
    out = tmp / "o.zarr"
    job = Job(f"{out}.checkpoint")
    reached, taken = [], []

    def point(name):
        if name == "apply.region-done" and len(reached) < 2:
            reached.append(name)
            if len(reached) == 2:
                gen, record = Lease.newest(job)
                record.update(expires=time.time() - 1, machine="elsewhere")
                (tmp / "o.zarr.checkpoint" / "lease" / f"{gen:012d}.json").write_text(
                    json.dumps(record))
                taken.append(job.lease(ttl=60).__enter__())

    monkeypatch.setattr(faults, "point", point)
    try:
        with pytest.raises(LeaseLostError):
            bigalign.apply(str(tmp / "t"), s, str(out), block_bytes=int(0.02 * 2**20),
                           threads=1)
    finally:
        for lease in taken:
            lease.__exit__(None, None, None)
    assert len(taken) == 1  # taken over mid-run
    assert bigalign.output_status(str(out))["complete"] is False


# ---- 11. reruns of finished jobs ------------------------------------------------------------

def test_finished_jobs_rerun_are_noops_and_changes_are_refused(corpus):
    tmp, s, t, _, _, _ = corpus
    fit = ["fit", s, t, "-o", tmp / "t3", "--center", "-q"]
    cli(*fit, check=0)
    mtime = os.path.getmtime(tmp / "t3" / "zarr.json")
    r = cli(*fit[:-1], check=0)
    assert "already complete with the same inputs and options: nothing to do" in r.stderr
    assert os.path.getmtime(tmp / "t3" / "zarr.json") == mtime
    r = cli(*fit, "--scale", check=2)
    assert "options.scale: False -> True" in r.stderr and "--overwrite" in r.stderr
    apply = ["apply", tmp / "t3", s, "-o", tmp / "o.zarr", "-q"]
    cli(*apply, check=0)
    r = cli(*apply[:-1], check=0)
    assert "nothing to do" in r.stderr
    r = cli(*apply, "--renormalize", check=2)
    assert "options.renormalize: False -> True" in r.stderr
    # --restart recomputes a finished job of the same inputs (bytes equal)
    before = zarr.open_array(str(tmp / "o.zarr"))[:]
    cli(*apply, "--restart", check=0)
    np.testing.assert_array_equal(zarr.open_array(str(tmp / "o.zarr"))[:], before)


def test_python_api_refusals_are_input_errors(corpus):
    tmp, s, t, _, _, _ = corpus
    with pytest.raises(InputError, match="never writes over its inputs"):
        bigalign.apply(str(tmp / "t"), s, f"{tmp}/./a.zarr", overwrite=True)
    (tmp / "shared").mkdir()
    (tmp / "shared" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="did not write"):
        bigalign.fit(s, t, output=str(tmp / "t4"), checkpoint=str(tmp / "shared"))


# ---- --bad-rows: one NaN row does not doom a long apply -------------------------------------

def test_bad_rows_policy_tolerates_every_row_normalisation_refuses(tmp_path):
    """--bad-rows finds bad rows with the kernel's own test: a row of tiny values is not zero,
    but its squared norm underflows float32, so normalising it fails; the policy must write
    it as NaN rather than stop the apply at it (the old float64 test let it through)."""
    a, b, _ = planted(600, 4, seed=3)
    tr = bigalign.fit(write_zarr(tmp_path / "fa.zarr", a, 100),
                      write_zarr(tmp_path / "fb.zarr", b, 100), center=True, normalize=True)
    a[250] = 1e-30  # 1e-60 is 0 in float32
    a[410] = 0.0
    s = write_zarr(tmp_path / "a.zarr", a, 100)
    with pytest.raises(bigalign.NonFiniteError, match="source row (250|410) holds a zero-norm row"):
        bigalign.apply(tr, s, str(tmp_path / "o1.zarr"), threads=1)
    rep = bigalign.apply(tr, s, str(tmp_path / "o2.zarr"), bad_rows="nan")
    assert rep.bad_rows == [250, 410]
    got = zarr.open_array(str(tmp_path / "o2.zarr"))[:]
    assert np.isnan(got[[250, 410]]).all() and np.isfinite(np.delete(got, [250, 410], 0)).all()


@pytest.mark.parametrize("policy", ["nan", "zero"])
def test_bad_rows_policy_resumes_a_run_stopped_by_a_nan_row(tmp_path, policy):
    a, b, _ = planted(2000, 4, seed=8)
    tr = bigalign.fit(write_zarr(tmp_path / "fa.zarr", a, 100),
                      write_zarr(tmp_path / "fb.zarr", b, 100), center=True)
    a[1234, 1] = np.nan
    a[1500, 0] = np.inf
    s = write_zarr(tmp_path / "a.zarr", a, 100)
    out = str(tmp_path / "o.zarr")
    with pytest.raises(bigalign.NonFiniteError, match="source row (1234|1500) holds NaN"):
        bigalign.apply(tr, s, out, block_bytes=2000, threads=1)
    rep = bigalign.apply(tr, s, out, block_bytes=2000, bad_rows=policy)
    assert rep.units_resumed > 0 and rep.bad_rows == [1234, 1500]
    arr = zarr.open_array(out)
    assert arr.attrs["bigalign"]["bad_rows"] == {"policy": policy, "count": 2,
                                                 "rows": [1234, 1500]}
    got, ok = arr[:], np.ones(2000, bool)
    ok[[1234, 1500]] = False
    np.testing.assert_allclose(got[ok], tr.transform(a[ok]), rtol=1e-5, atol=1e-6)
    if policy == "nan":
        assert np.isnan(got[~ok]).all()
    else:
        assert (got[~ok] == 0).all()


# ---- apply outputs that are embedding stores (a store source) ------------------------------

@pytest.fixture
def stores(tmp_path):
    """An imported source store with string ids, a target store, a transform."""
    a, b, _ = planted(ROWS, DIM, noise=0.1, offset_a=1.0, seed=6)
    ids = np.array([f"id-{i * 31 % ROWS}" for i in range(ROWS)])
    s = imported_store(tmp_path / "a.store", a, ids, model="old", chunk_rows=CHUNK)
    t = imported_store(tmp_path / "b.store", b, ids, model="new", chunk_rows=CHUNK)
    tr = bigalign.fit(s, t, center=True, output=str(tmp_path / "t"))
    return tmp_path, s, t, a, ids, tr


def test_apply_never_replaces_an_imported_store_or_a_foreign_group(stores):
    """Even with --overwrite: an imported store (bigalign's, but not apply's), a store a
    user made, a plain group. Each is left byte for byte as it was."""
    tmp, s, t, _, _, _ = stores
    user = zarr.open_group(str(tmp / "user.store"), mode="w")
    user.create_array("embeddings", data=np.ones((10, DIM), np.float32), chunks=(5, DIM))
    zarr.open_group(str(tmp / "group.zarr"), mode="w").attrs["mine"] = True
    for out, why in ((t, "only 'bigalign import' does"),
                     (tmp / "user.store", "was not written by bigalign"),
                     (tmp / "group.zarr", "was not written by bigalign")):
        before = snapshot(out)
        for extra in ([], ["--overwrite"], ["--restart"]):
            r = cli("apply", tmp / "t", s, "-o", out, *extra, "-q", check=2)
            assert why in r.stderr, r.stderr
        assert snapshot(out) == before
    assert bigalign.storage.outputs.inspect(t).kind == "embedding-store"


def test_overwrite_replaces_only_an_output_of_the_same_kind(stores):
    """A mistyped -o with --overwrite: fit never replaces mapped vectors (an apply output
    store or array), apply never replaces a transform, compose/invert never replace an
    apply output. Each is refused (exit 2) and left byte for byte as it was; the same
    command still replaces its own kind."""
    tmp, s, t, _, _, _ = stores
    mapped = tmp / "mapped.store"
    cli("apply", tmp / "t", s, "-o", mapped, "-q", check=0)
    bare = tmp / "mapped.zarr"
    cli("apply", tmp / "t", write_zarr(tmp / "bare.zarr", np.ones((40, DIM), np.float32), 20),
        "-o", bare, "-q", check=0)
    cases = [(["fit", s, t, "-o", mapped], "an embedding store of mapped vectors"),
             (["fit", s, t, "-o", bare], "an apply output"),
             (["invert", tmp / "t", "-o", mapped], "an embedding store of mapped vectors"),
             (["compose", tmp / "t", tmp / "inv", "-o", bare], "an apply output"),
             (["apply", tmp / "t", s, "-o", tmp / "inv"], "a transform")]
    cli("invert", tmp / "t", "-o", tmp / "inv", "-q", check=0)
    for argv, what in cases:
        out = argv[argv.index("-o") + 1]
        before = snapshot(out)
        r = cli(*argv, "--overwrite", "-q", check=2)
        assert f"is {what}, which this command does not replace, even with --overwrite: " \
            "only 'bigalign " in r.stderr, r.stderr
        assert snapshot(out) == before
    cli("fit", s, t, "-o", tmp / "t", "--center", "--overwrite", "-q", check=0)  # its own kind
    cli("apply", tmp / "t", s, "-o", mapped, "--overwrite", "-q", check=0)


def test_apply_store_output_never_aliases_the_source_store(stores):
    tmp, s, _, _, _, _ = stores
    before = snapshot(s)
    for out in (s, f"{s}/mapped", f"{s}/ids", f"file://{s}/"):
        r = cli("apply", tmp / "t", s, "-o", out, "--overwrite", "-q", check=2)
        assert "never writes over its inputs" in r.stderr
    assert snapshot(s) == before


def test_apply_over_its_own_finished_store(stores):
    """A rerun is a no-op; other options are refused naming them; --overwrite replaces it.
    An old bare-array output of the same rows (apply of STORE/embeddings, as bigalign wrote
    before stores) is refused as another job, and replaced with --overwrite."""
    tmp, s, _, a, ids, tr = stores
    out = tmp / "o.store"
    apply = ["apply", tmp / "t", s, "-o", out, "-q"]
    cli(*apply, check=0)
    mtime = os.path.getmtime(out / "zarr.json")
    r = cli(*apply[:-1], check=0)
    assert "nothing to do" in r.stderr and os.path.getmtime(out / "zarr.json") == mtime
    r = cli(*apply, "--dtype", "float16", check=2)
    assert "options.dtype: 'float32' -> 'float16'" in r.stderr and "--overwrite" in r.stderr
    r = cli(*apply, "--rows", "250:5000", check=2)
    assert "rows: [0, 6000] -> [250, 5000]" in r.stderr
    cli(*apply, "--rows", "250:5000", "--dtype", "float16", "--overwrite", check=0)
    g = zarr.open_group(str(out))
    assert g["embeddings"].dtype == np.float16 and g["embeddings"].shape == (4750, DIM)
    assert g["ids"][:].tolist() == ids[250:5000].tolist()
    got = g["embeddings"][:]  # float32 GEMM round-off, then float16: within a float16 ulp
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, tr.transform(a[250:5000], dtype=np.float16), rtol=1e-3,
                               atol=1e-3)
    bare = tmp / "bare.zarr"
    cli("apply", tmp / "t", f"{s}/embeddings", "-o", bare, "-q", check=0)
    r = cli("apply", tmp / "t", s, "-o", bare, "-q", check=2)
    assert "output: None -> {'kind': 'embedding-store'" in r.stderr
    cli("apply", tmp / "t", s, "-o", bare, "--overwrite", "-q", check=0)
    assert zarr.open_group(str(bare))["ids"][:].tolist() == ids.tolist()


def test_stale_store_of_another_run_is_recreated(stores):
    """As test_stale_output_of_another_run_is_recreated, for a store: run A killed half
    way, run B (--overwrite, other chunks and dtype) killed before it made its store, B
    rerun: A's store is not reused; B's vectors and ids are all there."""
    tmp, s, _, a, ids, tr = stores
    out = tmp / "o.store"
    cli("apply", tmp / "t", s, "-o", out, "--block-mb", "0.02", "-q",
        faults="kill:apply.region-done@5", check=-signal.SIGKILL)
    assert zarr.open_group(str(out))["ids"].chunks == (CHUNK,)
    argv = ["apply", tmp / "t", s, "-o", out, "--chunk-rows", "500", "--dtype", "float16",
            "--block-mb", "0.02", "-q"]
    killed = cli(*argv, "--overwrite", faults="kill:apply.begun@1")
    assert killed.returncode == -signal.SIGKILL
    cli(*argv, check=0)
    g = zarr.open_group(str(out))
    assert g.attrs["bigalign"]["complete"] is True
    assert g["embeddings"].dtype == np.float16 and g["embeddings"].chunks == (500, DIM)
    assert g["ids"].chunks == (500,) and g["ids"][:].tolist() == ids.tolist()
    got = g["embeddings"][:]
    assert not np.isnan(got).any()  # A's regions are not taken as B's
    np.testing.assert_allclose(got, tr.transform(a, dtype=np.float16), rtol=1e-3, atol=1e-3)


def test_source_ids_rewritten_in_place_are_detected(stores):
    """The ids an output store copies are part of the job: re-written between a kill and
    the rerun, the rerun is refused; --restart copies the new ones."""
    tmp, s, _, _, ids, _ = stores
    out = tmp / "o.store"
    apply = ["apply", tmp / "t", s, "-o", out, "--block-mb", "0.02", "-q"]
    cli(*apply, faults="kill:apply.region-done@3", check=-signal.SIGKILL)
    time.sleep(0.01)
    new_ids = np.array([f"new-{i}" for i in range(ROWS)], dtype=np.dtypes.StringDType())
    zarr.open_group(s, mode="r+")["ids"][:] = new_ids
    r = cli(*apply, check=2)
    assert "output.ids.content" in r.stderr and "changed" in r.stderr
    cli(*apply, "--restart", check=0)
    assert zarr.open_group(str(out))["ids"][:].tolist() == new_ids.tolist()


# ---- finished outputs that lost a part since: never "complete", never "nothing to do" ------

@pytest.mark.parametrize("bare", [False, True], ids=["store", "bare-array"])
def test_apply_output_that_lost_a_chunk_is_refused_and_reported(stores, bare):
    """A chunk file of a finished apply output deleted (a store from a store source, a
    bare array from a bare-array source): the rerun refuses it naming how many chunks and
    the first (exit 2) instead of "nothing to do"; info and status say DAMAGED (exit 3);
    --overwrite writes it again."""
    tmp, s, _, a, ids, tr = stores
    src, out = (f"{s}/embeddings", tmp / "o.zarr") if bare else (s, tmp / "o.store")
    apply = ["apply", tmp / "t", src, "-o", out, "-q"]
    cli(*apply, check=0)
    chunk = out / ("" if bare else "embeddings") / "c" / "3" / "0"
    os.remove(chunk)
    r = cli(*apply[:-1], check=2)
    assert "nothing to do" not in r.stderr
    assert re.search(r"marked complete but is damaged: 1 of \d+ chunks of its embeddings are "
                     r"not stored or truncated \(first: rows \d+:\d+, c/3/0\)", r.stderr), r.stderr
    assert "Rerun with --overwrite" in r.stderr
    r = cli("info", out, check=3)
    assert "DAMAGED" in r.stdout and "c/3/0" in r.stdout and "--overwrite" in r.stdout
    doc = json.loads(cli("info", out, "--json", check=3).stdout)
    assert doc["complete"] is False and "c/3/0" in doc["damaged"]
    r = cli("status", out, check=3)
    assert "DAMAGED" in r.stdout and "c/3/0" in r.stdout
    cli(*apply, "--overwrite", check=0)
    assert chunk.exists()
    cli("info", out, check=0)
    cli("status", out, check=0)
    got = zarr.open_array(str(out), mode="r") if bare else \
        zarr.open_group(str(out), mode="r")["embeddings"]
    np.testing.assert_allclose(got[:], tr.transform(a), rtol=1e-5, atol=1e-5)


def test_transform_that_lost_a_chunk_is_refused_and_reported(corpus):
    """The rotation chunk of a finished transform deleted (Zarr would read it as zeros):
    the fit's rerun refuses it naming the chunk (exit 2); info and status say DAMAGED
    (exit 3); an apply refuses to map with it; --overwrite fits it again. A transform
    saved before the digest was recorded loads as before."""
    tmp, s, t, a, _, _ = corpus
    out = tmp / "t5"
    fit = ["fit", s, t, "-o", out, "--center", "-q"]
    cli(*fit, check=0)
    good = bigalign.Transform.load(str(out))
    os.remove(out / "rotation" / "c" / "0" / "0")
    r = cli(*fit[:-1], check=2)
    assert "nothing to do" not in r.stderr
    assert "marked complete but is damaged" in r.stderr and "rotation/c/0/0" in r.stderr
    assert "Rerun with --overwrite" in r.stderr
    r = cli("info", out, check=3)
    assert "DAMAGED" in r.stdout and "rotation/c/0/0" in r.stdout
    assert json.loads(cli("info", out, "--json", check=3).stdout)["complete"] is False
    r = cli("status", out, check=3)
    assert "DAMAGED" in r.stdout and "rotation/c/0/0" in r.stdout
    r = cli("apply", out, s, "-o", tmp / "o5.zarr", "-q", check=2)
    assert "damaged bigalign transform" in r.stderr
    cli(*fit, "--overwrite", check=0)
    cli("info", out, check=0)
    np.testing.assert_array_equal(bigalign.Transform.load(str(out)).rotation, good.rotation)
    g = zarr.open_group(str(out), mode="r+")
    g.attrs["bigalign"] = {k: v for k, v in g.attrs["bigalign"].items() if k != "sha256"}
    np.testing.assert_array_equal(bigalign.Transform.load(str(out)).rotation, good.rotation)


def test_no_output_is_written_inside_another_zarr_node(stores, tmp_path):
    """An output nested inside an existing Zarr array or group (a user's array, an input
    store, an earlier apply output) is refused by every command, with --overwrite too:
    bigalign never writes inside another node, whose own --overwrite would later delete
    it (a transform saved inside an apply output was lost when that output was replaced)."""
    tmp, s, t, _, _, tr = stores
    mapped = tmp_path / "mapped.zarr"
    cli("apply", tmp / "t", write_zarr(tmp_path / "bare.zarr", np.ones((40, DIM), np.float32),
                                       20), "-o", mapped, "-q", check=0)
    user = zarr.open_group(str(tmp_path / "user.zarr"), mode="w")
    user.attrs["mine"] = True
    np.save(tmp_path / "v.npy", np.ones((20, DIM), np.float32))
    for parent in (mapped, tmp_path / "user.zarr"):
        before = snapshot(parent)
        for argv in (["fit", s, t, "-o", f"{parent}/sub.transform"],
                     ["invert", tmp / "t", "-o", f"{parent}/inv"],
                     ["apply", tmp / "t", s, "-o", f"{parent}/m.zarr"],
                     ["import", tmp_path / "v.npy", "-o", f"{parent}/s.store"],
                     ["export", s, "--format", "parquet", "-o", f"{parent}/ex"],
                     ["sample", s, "--pairs", "5", "-o", f"{parent}/s.parquet"]):
            quiet = [] if argv[0] == "sample" else ["-q"]  # sample prints one line anyway
            r = cli(*argv, "--overwrite", *quiet, check=2)
            assert "lies inside the Zarr array or group" in r.stderr, (argv, r.stderr)
        assert snapshot(parent) == before
    with pytest.raises(bigalign.InputError, match="lies inside the Zarr array or group"):
        tr.save(str(mapped / "c" / "t"))
