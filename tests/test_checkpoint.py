import json
import os
import socket
import time

import numpy as np
import pytest

from bigalign.checkpoint import Progress, describe_changes
from bigalign.errors import CheckpointError
from bigalign.stats import block_moments


def test_units_roundtrip_bit_for_bit(tmp_path):
    p = Progress(str(tmp_path / "ck"))
    r = np.random.default_rng(0)
    m = block_moments(r.standard_normal((50, 4)), r.standard_normal((50, 3)), gram=True)
    p.save_unit(7, m)
    assert p.done_units() == {7}
    assert p.load_unit(7).equals(m)
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "ck" / "units"))


def test_unreadable_unit_is_recomputed(tmp_path):
    p = Progress(str(tmp_path / "ck"))
    os.makedirs(tmp_path / "ck" / "units")
    (tmp_path / "ck" / "units" / "000000003.npz").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unit 3 is unreadable"):
        assert p.done_units() == set()


def test_manifest_refuses_changes_and_names_them(tmp_path):
    p = Progress(str(tmp_path / "ck"))
    fp = {"source": {"shape": [10, 4], "dtype": "float32"}, "options": {"normalize": False}}
    assert p.begin("fit", fp, {"step": 5}) == {"step": 5}
    # resuming returns the stored plan even when the caller would plan differently
    assert p.begin("fit", fp, {"step": 99}) == {"step": 5}
    changed = {"source": {"shape": [12, 4], "dtype": "float32"}, "options": {"normalize": True}}
    with pytest.raises(CheckpointError, match=r"source.shape: \[10, 4\] -> \[12, 4\]") as e:
        p.begin("fit", changed, {"step": 5})
    assert "options.normalize: False -> True" in str(e.value) and "--restart" in str(e.value)
    with pytest.raises(CheckpointError, match="another kind"):
        p.begin("apply", fp, {})
    assert p.begin("fit", changed, {"step": 6}, restart=True) == {"step": 6}


def test_describe_changes_nested():
    assert describe_changes({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == \
        ["a.c: 2 -> 3", "d: None -> 4"]


def test_lease_refuses_second_run_and_releases(tmp_path):
    p = Progress(str(tmp_path / "ck"))
    with p.lease(ttl=60):
        with pytest.raises(CheckpointError, match="another bigalign run holds this job"):
            with Progress(str(tmp_path / "ck")).lease(ttl=60):
                pass
    assert not (tmp_path / "ck" / "lock.json").exists()
    with p.lease(ttl=60):  # free again
        pass


def test_crashed_owner_does_not_hold_forever(tmp_path):
    p = Progress(str(tmp_path / "ck"))
    os.makedirs(tmp_path / "ck")
    lock = tmp_path / "ck" / "lock.json"
    # same host, dead process: taken over at once
    dead = {"owner": "x", "host": socket.gethostname(), "pid": 2**22 + 12345,
            "renewed": time.time(), "expires": time.time() + 600}
    lock.write_text(json.dumps(dead))
    with p.lease(ttl=60):
        pass
    # another host, fresh lease: refused; expired: taken over
    other = dict(dead, host="elsewhere", pid=1)
    lock.write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="host elsewhere"):
        with p.lease(ttl=60):
            pass
    lock.write_text(json.dumps(dict(other, expires=time.time() - 1)))
    with p.lease(ttl=60):
        pass
    # same host, our own pid, but another process's start time: a restarted container
    reused = dict(dead, pid=os.getpid(), pid_started=1)
    lock.write_text(json.dumps(reused))
    with p.lease(ttl=60):
        pass


def test_lease_is_renewed_while_alive(tmp_path):
    p = Progress(str(tmp_path / "ck"))
    with p.lease(ttl=0.4):
        first = json.loads((tmp_path / "ck" / "lock.json").read_text())["renewed"]
        time.sleep(0.35)
        later = json.loads((tmp_path / "ck" / "lock.json").read_text())["renewed"]
    assert later > first


def test_regions_and_clear(tmp_path):
    p = Progress(str(tmp_path / "ck"))
    p.begin("apply", {"source": {"shape": [10, 2]}}, {"step": 5, "rows_per_block": 5})
    p.mark_done(1, {"start": 5, "stop": 10, "t": time.time()})
    assert p.done_regions() == {1}
    s = p.summary()
    assert s["units_done"] == 1 and s["units_total"] == 2 and s["rows_done"] == 5
    p.clear()
    assert not (tmp_path / "ck").exists() and p.summary() is None
