import json
import os
import socket
import time

import numpy as np
import pytest

from bigalign.storage.job import Job, checkpointed, describe_changes
from bigalign.storage.lease import Lease, LeaseLostError, _process_start
from bigalign.errors import CheckpointError
from bigalign.maths.stats import block_moments
from conftest import race_for_lease


def moments(n=50, seed=0):
    r = np.random.default_rng(seed)
    return block_moments(r.standard_normal((n, 4)), r.standard_normal((n, 3)), gram=True)


def started(path, kind="fit", fp=None, plan=None):
    """A job with its lease taken and begun; returns (job, lease)."""
    job = Job(str(path))
    lease = job.lease(ttl=60).__enter__()
    job.begin(kind, fp or {"x": 1}, plan or {"step": 5})
    return job, lease


def test_units_roundtrip_bit_for_bit_and_stamped(tmp_path):
    job, lease = started(tmp_path / "ck")
    m = moments()
    job.save_unit(7, m, 100, 150)
    assert job.done_units({7: (100, 150)}) == {7}
    assert job.load_unit(7, 100, 150).equals(m)
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "ck" / "units"))
    lease.__exit__(None, None, None)


def test_stale_units_are_never_trusted(tmp_path):
    """A unit of another run, another row range or another pair count is recomputed."""
    job, lease = started(tmp_path / "ck")
    job.save_unit(1, moments(50), 0, 50)
    job.save_unit(2, moments(50), 50, 100)
    job.save_unit(3, moments(40), 100, 150)  # 40 pairs for 50 rows
    with pytest.warns(UserWarning) as w:
        done = job.done_units({1: (0, 50), 2: (50, 120), 3: (100, 150)})
    assert done == {1}
    text = " ".join(str(x.message) for x in w)
    assert "covers rows [50, 100], not [50, 120]" in text and "40 pairs for 50 rows" in text
    other = Job(str(tmp_path / "ck"), run_id="another-run")
    with pytest.warns(UserWarning, match="belongs to run"):
        assert other.done_units({1: (0, 50)}) == set()
    with pytest.raises(CheckpointError, match="belongs to run"):
        other.load_unit(1, 0, 50)
    lease.__exit__(None, None, None)


def test_unstamped_or_unreadable_units(tmp_path):
    """A unit named the older way is not trusted; one whose name is right but whose file
    is unreadable is found done by the listing and refused when loaded (the engine then
    recomputes it: test_resume)."""
    job, lease = started(tmp_path / "ck")
    os.makedirs(tmp_path / "ck" / "units", exist_ok=True)
    (tmp_path / "ck" / "units" / "000000003.npz").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unit 3 has no run stamp in its name"):
        assert job.done_units({3: (0, 10)}) == set()
    name = f"000000004_{job.run_id}_10_20_10.npz"
    (tmp_path / "ck" / "units" / name).write_bytes(b"truncated")
    assert job.done_units({4: (10, 20)}) == {4}
    with pytest.raises(CheckpointError, match="unit 4 is unreadable"):
        job.load_unit(4, 10, 20)
    lease.__exit__(None, None, None)


def test_progress_is_read_from_one_listing(tmp_path, monkeypatch):
    """Resume, verify and status list units/ and done/ once and read no file (a marker's
    body only when its name says it lists bad rows)."""
    job, lease = started(tmp_path / "ck", kind="apply",
                         plan={"rows": 40, "step": 5, "rows_per_block": 5, "aligned": True})
    for i in range(8):
        job.mark_done(i, 5 * i, 5 * i + 5, bad=[5 * i + 1] if i == 3 else None)
    Job(str(tmp_path / "ck"), run_id="stale").mark_done(0, 0, 5)  # another run's: ignored
    names = sorted(os.listdir(tmp_path / "ck" / "done"))
    assert f"000000003_{job.run_id}_15_20_1" in names
    reads = []
    original = Job.get_file
    monkeypatch.setattr(Job, "get_file", lambda self, path: (reads.append(path), original(self, path))[1])
    expected = {i: (5 * i, 5 * i + 5) for i in range(8)}
    assert job.done_regions(expected) == set(range(8))
    assert not [p for p in reads if "/done/" in p]
    markers = job.region_markers(expected)
    assert markers[3]["bad_rows"] == [16] and markers[2]["bad_rows"] == []
    assert [p for p in reads if "/done/" in p] == [
        str(tmp_path / "ck" / "done" / f"000000003_{job.run_id}_15_20_1")]
    reads.clear()
    s = Job(str(tmp_path / "ck")).summary()
    assert s["units_done"] == 8 and s["rows_done"] == 40
    assert not [p for p in reads if "/done/" in p or "/units/" in p]
    lease.__exit__(None, None, None)


def test_manifest_refuses_changes_and_names_them(tmp_path):
    job, lease = started(tmp_path / "ck", fp={"source": {"shape": [10, 4]},
                                              "options": {"normalize": False}})
    run_id = job.run_id
    fp = {"source": {"shape": [10, 4]}, "options": {"normalize": False}}
    # resuming returns the stored plan and run id even when the caller would plan differently
    m = job.begin("fit", fp, {"step": 99})
    assert m["plan"] == {"step": 5} and m["run_id"] == run_id
    changed = {"source": {"shape": [12, 4]}, "options": {"normalize": True}}
    with pytest.raises(CheckpointError, match=r"source.shape: \[10, 4\] -> \[12, 4\]") as e:
        job.begin("fit", changed, {"step": 5})
    assert "options.normalize: False -> True" in str(e.value) and "pass --restart to discard" in str(e.value)
    with pytest.raises(CheckpointError, match="another kind.*; pass --restart to discard it$"):
        job.begin("apply", fp, {})
    # --overwrite (replace) discards progress of other inputs, resumes the same ones
    assert job.begin("fit", fp, {"step": 7}, replace=True)["run_id"] == run_id
    new = job.begin("fit", changed, {"step": 6}, replace=True)
    assert new["plan"] == {"step": 6} and new["run_id"] != run_id
    assert job.begin("fit", changed, {"step": 8}, restart=True)["plan"] == {"step": 8}
    lease.__exit__(None, None, None)


def test_describe_changes_nested():
    assert describe_changes({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == \
        ["a.c: 2 -> 3", "d: None -> 4"]


def test_lease_refuses_second_run_and_releases(tmp_path):
    job = Job(str(tmp_path / "ck"))
    with job.lease(ttl=60):
        with pytest.raises(CheckpointError, match="another bigalign run holds this job"):
            with Job(str(tmp_path / "ck")).lease(ttl=60):
                pass
    newest = Lease.newest(job)
    assert newest is not None and newest[1]["released"] is True
    with Job(str(tmp_path / "ck")).lease(ttl=60) as lease:  # free again, next generation
        assert lease.generation == newest[0] + 1


def test_simultaneous_starters_exactly_one_wins(tmp_path):
    """Conditional create: of 8 runs starting at the same instant, one gets the lease
    (local files here; S3 in test_s3)."""
    won, refused = race_for_lease(str(tmp_path / "ck"))
    assert len(won) == 1 and len(refused) == 7
    won[0].__exit__(None, None, None)


def test_backends_without_conditional_create_say_so(caplog):
    """Only local files and S3 are known to create a file only-if-absent atomically; on
    another backend (in-memory here) the lease is taken by check-then-write, which is said
    once, and an existing lease file still refuses a second starter."""
    import fsspec

    from bigalign.storage import lease
    from bigalign.storage.lease import LeaseHeldError, conditional_create

    assert conditional_create(fsspec.filesystem("file"))
    assert not conditional_create(fsspec.filesystem("memory"))
    lease._warned_protocols.discard("memory")
    url = f"memory://no-cas-{time.time_ns()}"
    with caplog.at_level("WARNING", logger="bigalign"):
        with Job(url).lease(ttl=60):
            with pytest.raises(LeaseHeldError):
                Job(url).lease(ttl=60).__enter__()
        with Job(url).lease(ttl=60):
            pass
    said = [r for r in caplog.records if "no conditional create" in r.getMessage()]
    assert len(said) == 1 and "'memory'" in said[0].getMessage()


def test_lost_lease_stops_every_write(tmp_path):
    """A run whose lease was taken over (it stalled past its expiry) cannot write a unit,
    a marker, the manifest or clean up."""
    job, lease = started(tmp_path / "ck", kind="apply")
    lease._stop.set()  # stalled: no more renewals
    gen = lease.generation
    record = json.loads((tmp_path / "ck" / "lease" / f"{gen:012d}.json").read_text())
    record["expires"] = time.time() - 1
    record["machine"] = "elsewhere"
    (tmp_path / "ck" / "lease" / f"{gen:012d}.json").write_text(json.dumps(record))
    with Job(str(tmp_path / "ck")).lease(ttl=60) as other:
        assert other.generation == gen + 1
        for write in (lambda: job.mark_done(0, 0, 10),
                      lambda: job.save_unit(0, moments(), 0, 50),
                      lambda: job.begin("apply", {"y": 2}, {}, restart=True),
                      job.clear):
            with pytest.raises(LeaseLostError, match="lost its lease"):
                write()
        assert not (tmp_path / "ck" / "done").exists()
    # the loser's exit does not release the winner's generation
    lease.__exit__(None, None, None)
    assert Lease.newest(job)[0] == gen + 1


def test_crashed_owner_does_not_hold_forever(tmp_path):
    job = Job(str(tmp_path / "ck"))
    lock = tmp_path / "ck" / "lease" / "000000000004.json"
    os.makedirs(lock.parent)
    here = json.loads(Lease(job, 60)._record())["machine"]
    dead = {"owner": "x", "host": socket.gethostname(), "machine": here,
            "pid": 2**22 + 12345, "renewed": time.time(), "expires": time.time() + 600}
    lock.write_text(json.dumps(dead))
    with job.lease(ttl=60) as lease:  # same machine, dead process: taken over at once
        assert lease.generation == 5
    assert not lock.exists()  # older generations are removed by the new holder
    # another machine (or the same hostname in another pid namespace: host networking),
    # fresh lease: refused even though the pid is not visible here; expired: taken over
    for gen, other in ((9, dict(dead, host="elsewhere", machine="elsewhere", pid=1)),
                       (15, dict(dead, machine=socket.gethostname() + "|boot|pid:[1]"))):
        lock = tmp_path / "ck" / "lease" / f"{gen:012d}.json"
        lock.write_text(json.dumps(other))
        with pytest.raises(CheckpointError, match="another bigalign run holds this job"):
            with job.lease(ttl=60):
                pass
        lock.write_text(json.dumps(dict(other, expires=time.time() - 1)))
        with job.lease(ttl=60):
            pass
    # same machine, our own pid, but another process's start time: a restarted container
    lock = tmp_path / "ck" / "lease" / "000000000020.json"
    lock.write_text(json.dumps(dict(dead, pid=os.getpid(), pid_started=1)))
    with job.lease(ttl=60) as lease:
        assert lease.generation == 21


def test_a_killed_owner_not_yet_reaped_does_not_hold(tmp_path):
    """A run killed on this machine whose parent has not reaped it yet (a zombie: right
    after SIGKILL, or for good under a container init that never reaps) has exited: its
    lease is taken over at once, not after the lease's time to live."""
    import subprocess
    import sys

    job = Job(str(tmp_path / "ck"))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while time.time() < deadline:  # exited, not reaped: state Z
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        here = json.loads(Lease(job, 60)._record())
        holder = dict(here, pid=child.pid, pid_started=_process_start(child.pid),
                      renewed=time.time(), expires=time.time() + 600)
        os.makedirs(tmp_path / "ck" / "lease")
        (tmp_path / "ck" / "lease" / "000000000003.json").write_text(json.dumps(holder))
        assert not Lease.alive(holder)
        with job.lease(ttl=60) as lease:
            assert lease.generation == 4
    finally:
        child.wait()


def test_lease_is_renewed_while_alive(tmp_path):
    job = Job(str(tmp_path / "ck"))
    with job.lease(ttl=0.4) as lease:
        path = tmp_path / "ck" / "lease" / f"{lease.generation:012d}.json"
        first = json.loads(path.read_text())["renewed"]
        time.sleep(0.35)
        later = json.loads(path.read_text())["renewed"]
    assert later > first


def test_regions_summary_and_clear(tmp_path):
    job, lease = started(tmp_path / "ck", kind="apply",
                         plan={"rows": 10, "step": 5, "rows_per_block": 5, "aligned": True})
    job.mark_done(1, 5, 10)
    assert job.done_regions({0: (0, 5), 1: (5, 10)}) == {1}
    assert job.done_regions({1: (5, 9)}) == set()  # another range: not this region
    assert Job(str(tmp_path / "ck"), run_id="other").done_regions({1: (5, 10)}) == set()
    s = Job(str(tmp_path / "ck")).summary()
    assert s["units_done"] == 1 and s["units_total"] == 2 and s["rows_done"] == 5
    assert s["running"] is True
    job.clear()
    lease.__exit__(None, None, None)
    assert not (tmp_path / "ck").exists() and Job(str(tmp_path / "ck")).summary() is None


def test_clear_removes_only_what_bigalign_wrote(tmp_path):
    """A user's file that appears inside the checkpoint folder survives the clean-up, and
    so does the folder."""
    job, lease = started(tmp_path / "ck")
    job.save_unit(0, moments(), 0, 50)
    (tmp_path / "ck" / "units" / "notes.txt").write_text("mine")
    job.clear()
    lease.__exit__(None, None, None)
    assert (tmp_path / "ck" / "units" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path / "ck")) == ["units"]


def test_foreign_checkpoint_folder_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "other-job-progress.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds files bigalign did not write"):
        with checkpointed(str(shared), "fit", {"x": 1}, {"step": 1}):
            pass
    assert (shared / "other-job-progress.json").exists()
    assert sorted(os.listdir(shared)) == ["other-job-progress.json"]


def test_checkpointed_cleans_before_release(tmp_path):
    """The clean-up runs while the lease is held: no window in which a new run could
    start and have its manifest removed by the old run's clean-up."""
    seen = {}
    with checkpointed(str(tmp_path / "ck"), "fit", {"x": 1}, {"step": 1}) as (job, m):
        seen["run"] = m["run_id"]
        original = job.clear

        def clear():
            newest = Lease.newest(job)
            seen["held"] = newest is not None and newest[1].get("released") is False
            original()
        job.clear = clear
    assert seen["held"] is True and not (tmp_path / "ck").exists()
