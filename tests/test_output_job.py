"""The output-owned region job (bigalign.storage.output_job), through apply: one writer per
output whatever the checkpoint, markers trusted only with their data behind them, leftovers
of killed writers removed, transient errors never taken for "not this run's", and
completion only while the output is still this run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.errors import CheckpointError, TransientError, exit_code
from bigalign import faults
from bigalign.storage.job import Job, lease_home
from bigalign.storage.lease import LeaseHeldError
from bigalign.storage.output_job import OutputTakenError
from conftest import main_cli, planted, write_zarr

ROWS, DIM, CHUNK = 6000, 16, 500
BLOCK = 500 * DIM * 4 * 2  # about a chunk of input and output per task: 12 regions


def cli(*argv, faults=None, check=None, wait=True):
    """``bigalign ARGV``: in this process (conftest.main_cli), or in a real process with
    ``faults`` armed (BIGALIGN_FAULTS) or ``wait=False`` (returns the running Popen)."""
    if not faults and wait:
        return main_cli(*argv, check=check)
    env = dict(os.environ)
    env.pop("BIGALIGN_FAULTS", None)
    if faults:
        env["BIGALIGN_FAULTS"] = faults
    args = [sys.executable, "-m", "bigalign.cli", *map(str, argv)]
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outjob")
    a, b, _ = planted(ROWS, DIM, noise=0.1, offset_a=1.0, seed=5)
    s, t = write_zarr(tmp / "a.zarr", a, CHUNK), write_zarr(tmp / "b.zarr", b, CHUNK)
    bigalign.fit(s, t, center=True, output=str(tmp / "t"))
    bigalign.apply(str(tmp / "t"), s, str(tmp / "ref.zarr"), block_bytes=BLOCK)
    return tmp, s, str(tmp / "t"), zarr.open_array(str(tmp / "ref.zarr"))[:]


def fresh(tmp):
    return tmp / f"o-{uuid.uuid4().hex[:8]}"


def apply_args(t, s, out, *extra):
    return ("apply", t, s, "-o", out, "--block-mb", BLOCK / 2**20, "-q", *extra)


def markers(ck) -> list[str]:
    d = os.path.join(ck, "done")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def killed_midway(tmp, s, t, at=4):
    """An apply killed right after its ``at``-th region marker: (output, checkpoint)."""
    out = fresh(tmp)
    cli(*apply_args(t, s, out, "--threads", "1"), faults=f"kill:apply.region-done@{at}",
        check=-signal.SIGKILL)
    ck = f"{out}.checkpoint"
    assert 0 < len(markers(ck)) < ROWS // CHUNK  # the kill landed mid-run
    assert not zarr.open_array(str(out)).attrs["bigalign"]["complete"]
    return out, ck


# ---- 1. the output is the unit of exclusion --------------------------------------------------

def test_a_run_holding_the_output_excludes_runs_naming_other_checkpoints(corpus):
    """The lease lives at the output's job home: a second run naming another checkpoint,
    or none, is refused before it writes anything."""
    tmp, s, t, _ = corpus
    out = fresh(tmp)
    with Job(lease_home(out)).lease(ttl=60):
        for checkpoint in (str(tmp / "c2"), False, None):
            with pytest.raises(LeaseHeldError, match="another bigalign run holds"):
                bigalign.apply(t, s, str(out), checkpoint=checkpoint, block_bytes=BLOCK)
    assert not out.exists() and not (tmp / "c2").exists()
    bigalign.apply(t, s, str(out), checkpoint=str(tmp / "c3"), block_bytes=BLOCK)
    assert not os.path.exists(lease_home(out)) and not (tmp / "c3").exists()


def test_two_checkpoints_on_one_output_one_writer(corpus):
    """The issue's case: run 1 with --checkpoint c1 in flight, run 2 with --checkpoint c2
    --overwrite on the same output is refused (it re-created the output before), and run 1
    ends complete with every row written."""
    tmp, s, t, ref = corpus
    out = fresh(tmp)
    c1, c2 = f"{tmp}/c1-{out.name}", f"{tmp}/c2-{out.name}"
    first = cli(*apply_args(t, s, out, "--checkpoint", c1, "--threads", "1"),
                faults="delay:apply.region-done@0.3", wait=False)
    try:
        deadline = time.monotonic() + 60
        while not markers(c1):  # run 1 has written a region: it holds the output
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # mid-run while run 2 starts, whatever the load
        try:
            second = cli(*apply_args(t, s, out, "--checkpoint", c2, "--overwrite"), check=2)
            assert "another bigalign run holds this job" in second.stderr
            assert len(markers(c1)) < ROWS // CHUNK  # refused while run 1 was still running
        finally:
            first.send_signal(signal.SIGCONT)
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    arr = zarr.open_array(str(out))
    assert arr.attrs["bigalign"]["complete"] is True
    np.testing.assert_array_equal(arr[:], ref)
    assert not os.path.exists(c2)


def test_an_output_taken_over_is_not_marked_complete(corpus, monkeypatch):
    """Before the completion mark the run checks that the output still records it as its
    writer: one re-created by another run is left incomplete."""
    tmp, s, t, _ = corpus
    out = fresh(tmp)

    def point(name):
        if name == "apply.before-complete":
            node = zarr.open_array(str(out), mode="r+")
            node.attrs["bigalign"] = dict(node.attrs["bigalign"], run_id="another-run")

    monkeypatch.setattr(faults, "point", point)
    with pytest.raises(OutputTakenError, match="re-created by another run"):
        bigalign.apply(t, s, str(out), block_bytes=BLOCK)
    assert zarr.open_array(str(out)).attrs["bigalign"]["complete"] is False


def test_data_lost_before_the_completion_mark_is_not_complete(corpus, monkeypatch):
    """Verify, then complete: a chunk gone between the writes and the mark stops the run."""
    tmp, s, t, _ = corpus
    out = fresh(tmp)

    def point(name):
        if name == "apply.before-complete":
            os.remove(out / "c" / "5" / "0")

    monkeypatch.setattr(faults, "point", point)
    with pytest.raises(CheckpointError, match="1 of 12 regions .* missing or truncated"):
        bigalign.apply(t, s, str(out), block_bytes=BLOCK)
    assert zarr.open_array(str(out)).attrs["bigalign"]["complete"] is False


# ---- 2. a checkpoint folder is used only when everything in it is this job's ----------------

@pytest.mark.parametrize("name,content", [
    ("units/000000001_0123abcd_0_10_10.npz", b"a user's file named like a unit"),
    ("done/000000003_0123abcd_0_500_0", b"{}"),
    ("done/notes.txt", b"mine"),
    ("lease/000000000001.json", b"{\"mine\": true}"),
    ("manifest.json", b"{\"project\": \"mine\"}"),
    ("results.tmp-1234", b"mine"),
])
def test_a_checkpoint_folder_holding_other_files_is_refused_untouched(corpus, name, content):
    tmp, s, t, _ = corpus
    out, ck = fresh(tmp), tmp / f"ck-{uuid.uuid4().hex[:8]}"
    (ck / name).parent.mkdir(parents=True, exist_ok=True)
    (ck / name).write_bytes(content)
    with pytest.raises(CheckpointError, match="holds files bigalign did not write"):
        bigalign.apply(t, s, str(out), checkpoint=str(ck), block_bytes=BLOCK)
    assert (ck / name).read_bytes() == content
    assert sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()) == [name]
    assert not out.exists()


# ---- 3. a transient error while classifying never discards progress -------------------------

def test_a_transient_error_on_resume_keeps_the_progress(corpus, monkeypatch):
    tmp, s, t, ref = corpus
    out, ck = killed_midway(tmp, s, t)
    before = markers(ck)
    real = zarr.open_array

    def flaky(*a, mode="a", **k):  # storage drops the connection on the output's open
        if mode == "r+":
            raise ConnectionResetError("connection reset by peer")
        return real(*a, mode=mode, **k)

    with monkeypatch.context() as m:
        m.setattr(zarr, "open_array", flaky)
        with pytest.raises(TransientError, match="storage did not answer") as e:
            bigalign.apply(t, s, str(out), block_bytes=BLOCK)
    assert exit_code(e.value) == 75
    assert markers(ck) == before  # nothing believed done was changed
    report = bigalign.apply(t, s, str(out), block_bytes=BLOCK)
    assert report.units_resumed == len(before)
    np.testing.assert_array_equal(zarr.open_array(str(out))[:], ref)


# ---- 4, 5. markers trusted only with their data; leftovers of killed writers removed ---------

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_chunk_damaged_behind_its_marker_is_written_again(corpus, damage):
    tmp, s, t, ref = corpus
    out, ck = killed_midway(tmp, s, t)
    index = int(markers(ck)[0].split("_")[0])  # a region recorded as done
    chunk = out / "c" / str(index) / "0"
    if damage == "truncate":
        with open(chunk, "r+b") as f:
            f.truncate(100)
    else:
        os.remove(chunk)
    r = cli(*apply_args(t, s, out)[:-1], check=0)
    assert "1 regions recorded as done have data missing or truncated" in r.stderr
    arr = zarr.open_array(str(out))
    assert arr.attrs["bigalign"]["complete"] is True
    np.testing.assert_array_equal(arr[:], ref)


def test_a_resume_removes_the_partial_files_of_killed_writers(corpus):
    tmp, s, t, ref = corpus
    out, ck = killed_midway(tmp, s, t)
    index = int(markers(ck)[0].split("_")[0])  # a region written before the kill
    stray = out / "c" / str(index) / f"0.{uuid.uuid4().hex}.partial"  # Zarr's temporary
    stray.write_bytes(b"half a chunk")
    cli(*apply_args(t, s, out), check=0)
    assert not stray.exists()
    assert not [p for p in out.rglob("*.partial")]
    np.testing.assert_array_equal(zarr.open_array(str(out))[:], ref)


def test_an_output_that_cannot_be_read_is_not_taken_for_foreign(corpus, monkeypatch):
    """Classifying what sits at an output (absent / ours / foreign) never turns "storage did
    not answer" into an answer: a refusal ("not written by bigalign", exit 2) or a
    replacement would both be wrong."""
    from bigalign.storage.outputs import inspect

    tmp, s, t, _ = corpus
    out = fresh(tmp)
    bigalign.apply(t, s, str(out), block_bytes=BLOCK)
    real = zarr.open

    def flaky(*a, **k):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(zarr, "open", flaky)
    with pytest.raises(TransientError, match="storage did not answer") as e:
        inspect(str(out))
    assert exit_code(e.value) == 75
    monkeypatch.setattr(zarr, "open", real)
    assert inspect(str(out)).kind == "apply-output"
