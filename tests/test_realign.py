"""bigalign realign: the scheduled job. Publish, gate failure (exit 4, nothing published),
reruns of a finished run id (nothing new), a second realign refused while one runs, a
SIGKILL at chosen moments then a rerun (the same version), the stable held-out split, and
the configuration's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr

import bigalign
from bigalign import InputError
from bigalign.cli import main
from bigalign.commands.realign_config import load_config
from bigalign.commands.realign_pairs import holdout_mask, stable_unit
from bigalign.storage.registry import Registry
from conftest import planted

N, DIM, CHUNK = 1200, 8, 200


def store(path, emb, ids, model):
    """An embedding store: a group with embeddings, ids and a model stamp."""
    g = zarr.open_group(str(path), mode="w")
    g.create_array("embeddings", data=emb, chunks=(CHUNK, emb.shape[1]), compressors=None)
    g.create_array("ids", data=ids, chunks=(CHUNK,), compressors=None)
    g.attrs["model"] = model
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Stores paired by id (the target holds 1000 of the 1200 items, in its own order),
    a corpus, and the same pairs as bare row-aligned arrays."""
    tmp = tmp_path_factory.mktemp("realign")
    a, b, _ = planted(N, DIM, noise=0.05, offset_a=2.0, offset_b=1.0, seed=5)
    ids = np.arange(N, dtype=np.int64) * 3 + 11
    perm = np.random.default_rng(1).permutation(N)[:1000]
    store(tmp / "old.zarr", a, ids, "old-model")
    store(tmp / "new.zarr", b[perm], ids[perm], "new-model")
    zarr.create_array(str(tmp / "corpus.zarr"), data=a, chunks=(CHUNK, DIM), compressors=None)
    zarr.create_array(str(tmp / "a.zarr"), data=a, chunks=(CHUNK, DIM), compressors=None)
    zarr.create_array(str(tmp / "b.zarr"), data=b, chunks=(CHUNK, DIM), compressors=None)
    return tmp, a, b


def config(path, registry, *, source="old.zarr", target="new.zarr", gate=None, fit=None,
           apply=True, extra=""):
    """Write a realign TOML next to the data (relative paths are relative to it)."""
    gate = gate or {"min_recall_at_10": 0.9, "max_heldout_relative_residual": 0.6,
                    "not_worse_than_current": True}
    fit = fit or {"center": True}
    lines = [f'registry = "{registry}"', extra, "[pairs]", f'source = "{source}"',
             f'target = "{target}"', "holdout = 0.2", "[fit]",
             *(f"{k} = {json.dumps(v)}" for k, v in fit.items()), "[gate]",
             *(f"{k} = {json.dumps(v)}" for k, v in gate.items())]
    if apply:
        lines += ["[apply]", 'corpus = "corpus.zarr"', 'output = "out/mapped-{version}.zarr"']
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def realign(*argv):
    return main(["realign", *map(str, argv), "-q"])


def summary(path):
    with open(path) as f:
        return json.load(f)


def test_publish_then_rerun_of_the_finished_run_is_a_noop(data, capsys):
    tmp, a, _ = data
    cfg = config(tmp / "pub.toml", "reg-pub")
    reg = Registry(tmp / "reg-pub")
    assert realign(cfg, "--run-id", "week-1", "--summary", tmp / "s1.json") == 0
    s = summary(tmp / "s1.json")
    assert s["status"] == "published" and s["passed"] and s["exit_code"] == 0
    assert s["version"] == "v0001" and s["previous"] is None and s["current"] == "v0001"
    assert s["pairs"]["by"] == "ids" and s["pairs"]["pairs"] == 1000
    assert s["pairs"]["train"] + s["pairs"]["holdout"] == 1000
    assert s["candidate"]["recall@10"] >= 0.9 and s["no_alignment"]["recall@10"] < 0.5
    assert {c["name"] for c in s["gate"]["criteria"]} == {
        "min_recall_at_10", "max_heldout_relative_residual", "not_worse_than_current"}
    assert reg.versions() == ["v0001"] and reg.current() == "v0001"
    record = reg.record("v0001")
    assert record["run_id"] == "week-1" and record["models"] == {"source": "old-model",
                                                                  "target": "new-model"}
    assert record["inputs"]["source"]["content"]["sha256"]  # input fingerprints
    assert record["bigalign_version"] == bigalign.__version__
    t = bigalign.Transform.load(str(tmp / "reg-pub"))
    assert t.metadata["registry"]["version"] == "v0001"
    mapped = zarr.open_array(str(tmp / "out" / "mapped-v0001.zarr"))
    assert mapped.attrs["bigalign"]["complete"]
    np.testing.assert_allclose(mapped[:], t.transform(a), rtol=1e-5, atol=1e-5)
    # the run's scratch copies and candidate are gone; its verdict stays
    run = tmp / "reg-pub" / "runs" / "week-1"
    assert sorted(os.listdir(run)) == ["evaluation.json", "publish.json", "split.json",
                                       "verdict.json"]
    history = reg.history()
    # rerun of the finished run id: exit 0, nothing new
    assert realign(cfg, "--run-id", "week-1", "--summary", tmp / "s2.json") == 0
    again = summary(tmp / "s2.json")
    assert again["already_done"] and again["version"] == "v0001"
    assert reg.versions() == ["v0001"] and reg.history() == history
    # another run id on unchanged data and options: the current version already is that
    # fit; nothing fitted, nothing published, the corpus not mapped again (exit 0)
    mtime = os.path.getmtime(tmp / "out" / "mapped-v0001.zarr" / "zarr.json")
    assert realign(cfg, "--run-id", "week-2", "--summary", tmp / "s3.json") == 0
    s3 = summary(tmp / "s3.json")
    assert s3["status"] == "unchanged" and s3["passed"] and s3["exit_code"] == 0
    assert s3["version"] == "v0001" and s3["same_as"]["run_id"] == "week-1"
    assert reg.versions() == ["v0001"] and reg.history() == history
    assert not os.path.exists(tmp / "out" / "mapped-v0002.zarr")
    assert os.path.getmtime(tmp / "out" / "mapped-v0001.zarr" / "zarr.json") == mtime
    assert not os.path.exists(tmp / "reg-pub" / "runs" / "week-2" / "pairs")
    assert "already is this fit" in capsys.readouterr().err
    # an option that does not change the map (diagnostics): fitted, the same digest,
    # nothing published
    same_map = config(tmp / "pub-diag.toml", "reg-pub", fit={"center": True,
                                                            "diagnostics": True})
    assert realign(same_map, "--run-id", "week-2b", "--summary", tmp / "s3b.json") == 0
    s3b = summary(tmp / "s3b.json")
    assert s3b["status"] == "unchanged" and "same map" in s3b["same_as"]["reason"]
    assert reg.versions() == ["v0001"] and reg.history() == history
    # a refit that differs by rounding only (float64 products): within the tolerance of the
    # current version, published as v0002 with the paired differences and their intervals
    near = config(tmp / "pub-f32.toml", "reg-pub", fit={"center": True,
                                                       "precision": "float64"})
    assert realign(near, "--run-id", "week-3", "--summary", tmp / "s4.json") == 0
    s4 = summary(tmp / "s4.json")
    assert s4["version"] == "v0002" and s4["previous"] == "v0001"
    assert s4["current_version"]["version"] == "v0001"
    assert s4["current_version"]["recall@10"] == pytest.approx(s["candidate"]["recall@10"])
    (c,) = [c for c in s4["gate"]["criteria"] if c["name"] == "not_worse_than_current"]
    assert c["passed"] and c["tolerance"] == 0.005
    d = c["difference"]["heldout_relative_residual"]
    assert d["interval"][0] <= d["estimate"] <= d["interval"][1]
    assert abs(d["estimate"]) < 1e-4
    assert reg.current() == "v0002"
    # the same run id with other options is refused, naming what changed
    changed = config(tmp / "pub.toml", "reg-pub", gate={"min_recall_at_10": 0.5})
    capsys.readouterr()
    assert realign(changed, "--run-id", "week-2") == 2
    err = capsys.readouterr().err
    assert "already finished" in err and "min_recall_at_10" in err
    assert reg.versions() == ["v0001", "v0002"]


def test_a_failed_gate_publishes_nothing_and_exits_4(data, capsys):
    tmp, _, _ = data
    cfg = config(tmp / "fail.toml", "reg-fail", gate={"min_recall_at_10": 0.9,
                                                      "max_heldout_relative_residual": 1e-9})
    assert realign(cfg, "--run-id", "r1", "--summary", tmp / "f1.json") == 4
    assert "failed the gate (max_heldout_relative_residual)" in capsys.readouterr().err
    s = summary(tmp / "f1.json")
    assert s["status"] == "rejected" and not s["passed"] and s["exit_code"] == 4
    assert s["version"] is None and s["apply"] is None
    failed = [c for c in s["gate"]["criteria"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["max_heldout_relative_residual"]
    reg = Registry(tmp / "reg-fail")
    assert reg.versions() == [] and reg.current() is None and reg.history() == []
    assert not os.path.exists(tmp / "out" / "mapped-v0001.zarr.checkpoint")
    # the rejected candidate stays for inspection; the gathered copies are removed
    assert bigalign.Transform.load(s["candidate_transform"]).dims == (DIM, DIM)
    assert not os.path.exists(tmp / "reg-fail" / "runs" / "r1" / "pairs")
    # a rerun gives the same verdict: 4 again, nothing published
    assert realign(cfg, "--run-id", "r1", "--summary", tmp / "f2.json") == 4
    assert summary(tmp / "f2.json")["already_done"]
    assert reg.versions() == []
    assert main(["info", str(tmp / "reg-fail")]) == 2  # nothing current to describe


def test_a_candidate_worse_than_the_current_version_is_rejected(data):
    tmp, _, _ = data
    loose = {"min_recall_at_10": 0.0, "max_heldout_relative_residual": 10.0,
             "not_worse_than_current": True}
    good = config(tmp / "good.toml", "reg-worse", gate=loose, apply=False)
    assert realign(good, "--run-id", "centred") == 0
    # without centring, the offsets spoil the fit: worse than v0001 on the same pairs
    worse = config(tmp / "worse.toml", "reg-worse", gate=loose, apply=False,
                   fit={"center": False})
    assert realign(worse, "--run-id", "uncentred", "--summary", tmp / "w.json") == 4
    s = summary(tmp / "w.json")
    (c,) = [c for c in s["gate"]["criteria"] if c["name"] == "not_worse_than_current"]
    assert not c["passed"] and c["version"] == "v0001"
    assert c["value"]["heldout_relative_residual"] > c["current"]["heldout_relative_residual"]
    # worse with confidence: the paired interval lies wholly beyond the tolerance
    d = c["difference"]["heldout_relative_residual"]
    assert d["interval"][0] > c["tolerance"]
    assert Registry(tmp / "reg-worse").current() == "v0001"
    # with the comparison switched off the same candidate passes
    off = config(tmp / "off.toml", "reg-worse", apply=False, fit={"center": False},
                 gate=dict(loose, not_worse_than_current=False))
    assert realign(off, "--run-id", "uncentred-2") == 0
    assert Registry(tmp / "reg-worse").current() == "v0002"


def test_row_aligned_arrays_and_the_stable_split(data):
    tmp, a, b = data
    cfg = config(tmp / "rows.toml", "reg-rows", source="a.zarr", target="b.zarr",
                 apply=False)
    assert realign(cfg, "--run-id", "rows", "--summary", tmp / "r.json") == 0
    s = summary(tmp / "r.json")
    held = holdout_mask(np.arange(N), 0.2)
    assert s["pairs"]["by"] == "rows" and s["pairs"]["holdout"] == int(held.sum())
    # the candidate was fitted on exactly the rows not held out
    t = Registry(tmp / "reg-rows").load()
    ref = bigalign.fit(zarr.array(a[~held], chunks=(CHUNK, DIM)),
                       zarr.array(b[~held], chunks=(CHUNK, DIM)), center=True)
    np.testing.assert_allclose(t.rotation, ref.rotation, atol=1e-9)


def test_string_ids_pair_and_split_by_id(data):
    tmp, a, b = data
    names = np.array([f"pkg-{i:05d}" for i in range(N)])
    store(tmp / "s-old.zarr", a, names.astype("T"), "old-model")   # numpy StringDType
    keep = np.random.default_rng(2).permutation(N)[:900]
    store(tmp / "s-new.zarr", b[keep], names[keep].astype("T"), "new-model")
    cfg = config(tmp / "str.toml", "reg-str", source="s-old.zarr", target="s-new.zarr",
                 apply=False)
    assert realign(cfg, "--run-id", "strings", "--summary", tmp / "str.json") == 0
    s = summary(tmp / "str.json")
    assert s["pairs"]["by"] == "ids" and s["pairs"]["pairs"] == 900
    assert s["pairs"]["holdout"] == int(holdout_mask(names[keep], 0.2).sum())
    np.testing.assert_array_equal(holdout_mask(names[keep].astype("T"), 0.2),
                                  holdout_mask(names[keep].astype("S"), 0.2))


def test_stable_unit_depends_on_the_key_alone():
    keys = np.arange(100_000, dtype=np.int64) * 7919 - 5
    u = stable_unit(keys)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert abs(holdout_mask(keys, 0.1).mean() - 0.1) < 0.005
    # adding keys (in any order) does not move the existing ones
    more = np.concatenate([keys[::-1], np.arange(10**9, 10**9 + 5000)])
    np.testing.assert_array_equal(stable_unit(more)[:len(keys)][::-1], u)
    # a larger fraction only adds held-out keys; another seed is another split
    assert (holdout_mask(keys, 0.2) >= holdout_mask(keys, 0.1)).all()
    assert (holdout_mask(keys, 0.1, seed=1) != holdout_mask(keys, 0.1)).any()
    strings = np.array([f"doc-{i}" for i in range(20_000)])
    us = stable_unit(strings)
    assert abs(us.mean() - 0.5) < 0.02
    np.testing.assert_array_equal(stable_unit(strings[5:10]), us[5:10])
    # known values: the split must not change between bigalign versions
    np.testing.assert_allclose(stable_unit(np.array([0, 1, 42])),
                               [0.6524484863740322, 0.03401170130434639, 0.30315012456577295])
    np.testing.assert_allclose(stable_unit(np.array(["a", "doc-1"])),
                               [0.63765703957097, 0.031192345850460934])


@pytest.mark.parametrize("change, message", [
    ('[gate]\nmin_recall_at10 = 0.9\n', "unknown key min_recall_at10"),
    ('[pairs]\nsource = "a"\ntarget = "b"\nholdout = 1.5\n', "between 0 and 1"),
    ('[apply]\ncorpus = "c"\noutput = "mapped.zarr"\n', "must contain {version}"),
    ('[fit]\ncenter = "yes"\n', "[fit] center: expected bool"),
    ('[apply]\ncorpus = "c"\noutput = "m-{version}-{date}.zarr"\n', "only {version}"),
    ('[apply]\ncorpus = "c"\noutput = "m-{version}.zarr"\ndtype = "float8"\n', "--dtype"),
    ('registry = [1\n', "not valid TOML"),
])
def test_configuration_errors_exit_2(tmp_path, capsys, change, message):
    base = 'registry = "reg"\n' if not change.startswith("registry") else ""
    if not change.startswith("[pairs]") and not change.startswith("registry"):
        base += '[pairs]\nsource = "a"\ntarget = "b"\n'
    if not change.startswith("[gate]") and not change.startswith("registry"):
        base += '[gate]\nmin_recall_at_10 = 0.5\n'
    (tmp_path / "c.toml").write_text(base + change)
    assert realign(tmp_path / "c.toml") == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("gate, message", [
    ("", "sets no threshold"),                                 # no [gate] at all
    ("[gate]\n", "allow_ungated = true"),                       # an empty one
    ("[gate]\nnot_worse_than_current = true\ntolerance = 0.01\n", "sets no threshold"),
    ("[gate]\nmax_relative_residual = 0.6\n",
     "max_relative_residual was renamed max_heldout_relative_residual"),
    ("[gate]\nnot_worse_than_stay = true\n", "not_worse_than_stay needs queries_old"),
    ('[gate]\nmin_recall_at_10 = 0.5\nqueries_old = "q.zarr"\n', "go together"),
    ("[gate]\nmin_recall_at_10 = 0.5\ntolerance = -0.1\n", "tolerance must be 0 or more"),
])
def test_a_gate_that_checks_nothing_or_uses_the_old_key_is_refused(tmp_path, capsys, gate,
                                                                   message):
    """No threshold (nor the stay check) means every candidate, the first unchecked, would
    be published: refused (exit 2) unless allow_ungated = true; the old residual key is
    refused naming the new one (the training and held-out residuals are two numbers)."""
    (tmp_path / "c.toml").write_text('registry = "reg"\n[pairs]\nsource = "a"\n'
                                     'target = "b"\n' + gate)
    assert realign(tmp_path / "c.toml") == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "reg")


def test_config_relative_paths_and_defaults(tmp_path):
    (tmp_path / "c.toml").write_text('registry = "s3://bucket/reg"\n[pairs]\nsource = "x.zarr"\n'
                                     'target = "/abs/y.zarr"\n[gate]\nallow_ungated = true\n')
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.registry == "s3://bucket/reg" and cfg.source == str(tmp_path / "x.zarr")
    assert cfg.target == "/abs/y.zarr" and cfg.holdout == 0.1 and cfg.apply is None
    assert cfg.gate.not_worse_than_current and cfg.gate.min_recall_at_10 is None
    assert cfg.gate.tolerance == 0.005 and cfg.gate.allow_ungated
    assert not cfg.gate.not_worse_than_stay and cfg.gate.queries_old is None


def test_a_second_realign_is_refused_while_one_holds_the_registry(data, capsys, monkeypatch):
    tmp, _, _ = data
    cfg = config(tmp / "busy.toml", "reg-busy", apply=False)
    reg = Registry(tmp / "reg-busy")
    with reg.realign_lock("first"):  # what a running realign holds
        assert realign(cfg, "--run-id", "second") == 2
        err = capsys.readouterr().err
        assert "is in use" in err and "another bigalign run holds" in err
        assert "realign run 'second' is refused" in err
    assert reg.versions() == []
    # --wait: a retried pod outlasts the lease of a holder that died elsewhere
    lock = reg.realign_lock("first")
    lock.__enter__()
    threading.Timer(1.0, lambda: lock.__exit__(None, None, None)).start()
    assert realign(cfg, "--run-id", "second", "--wait", "120") == 0
    assert reg.versions() == ["v0001"]


def test_the_registry_lock_is_taken_for_the_version_write_only(data, capsys, monkeypatch):
    """The registry lock (a rollback or gc holding it) does not stop a realign's fit and
    evaluation; its version write waits for it (LOCK_WAIT, 0 here: refused at once), and
    the rerun resumes at the publish."""
    tmp, _, _ = data
    cfg = config(tmp / "short.toml", "reg-short", apply=False)
    reg = Registry(tmp / "reg-short")
    with reg.lock() as lock:
        reg.create(lock)
    monkeypatch.setattr("bigalign.commands.realign.LOCK_WAIT", 0)
    with reg.lock():  # a rollback or gc in progress
        assert realign(cfg, "--run-id", "w1") == 2
        err = capsys.readouterr().err
        assert "is in use" in err and "version write of realign run 'w1' is refused" in err
    assert reg.versions() == [] and reg.current() is None
    assert os.path.exists(tmp / "reg-short" / "runs" / "w1" / "evaluation.json")  # fitted
    assert realign(cfg, "--run-id", "w1") == 0
    assert reg.versions() == ["v0001"] and reg.current() == "v0001"


def test_a_rollback_runs_while_a_realign_maps_its_corpus(data, monkeypatch):
    """A realign holds the registry lock only to write its version and to publish: a
    rollback and a gc run (and succeed) while it is inside its corpus apply; the realign
    then publishes its own version, after the rollback."""
    from bigalign import faults

    tmp, _, _ = data
    loose = {"min_recall_at_10": 0.5, "max_heldout_relative_residual": 0.9,
             "not_worse_than_current": False}
    path = tmp / "reg-during"
    reg = Registry(path)
    plain = config(tmp / "during.toml", path.name, gate=loose, apply=False)
    other = config(tmp / "during2.toml", path.name, gate=loose, apply=False,
                   fit={"center": True, "precision": "float64"})  # another map: v0002
    assert realign(plain, "--run-id", "d1") == 0 and realign(other, "--run-id", "d2") == 0
    cfg = tmp / "during3.toml"
    config(cfg, path.name, gate=loose)
    text = cfg.read_text()
    cfg.write_text(text.replace("out/mapped-{version}", "out-during/mapped-{version}"))
    during, first = [], threading.Lock()
    real_point = faults.point

    def point(name):  # regions are written by several threads: the first one acts
        if name == "apply.region-written" and first.acquire(blocking=False):
            during.append(Registry(path).rollback())  # v0002 -> v0001, mid-apply
            during.append(Registry(path).gc(5))
            during.append(Registry(path).describe()["current"])
        real_point(name)

    monkeypatch.setattr(faults, "point", point)
    assert realign(cfg, "--run-id", "d3", "--summary", tmp / "d3.json") == 0
    rolled, collected, current = during
    assert rolled == {"from": "v0002", "to": "v0001", "changed": True}
    assert collected["deleted"] == [] and current == "v0001"
    assert [(p["action"], p["version"], p["previous"]) for p in reg.history()] == [
        ("publish", "v0001", None), ("publish", "v0002", "v0001"),
        ("rollback", "v0001", "v0002"), ("publish", "v0003", "v0001")]
    s = summary(tmp / "d3.json")
    assert s["version"] == "v0003" and s["previous"] == "v0001"
    assert zarr.open_array(str(tmp / "out-during" / "mapped-v0003.zarr")).attrs[
        "bigalign"]["complete"]
    # the record names the mapped corpus; one mapped by another transform is damage
    check = reg.verify("v0003")
    assert check["state"] == "ok" and check["mapped_corpus"]["state"] == "complete"
    out = zarr.open_array(str(tmp / "out-during" / "mapped-v0003.zarr"), mode="r+")
    out.attrs["bigalign"] = dict(out.attrs["bigalign"], transform="0" * 64)
    assert reg.verify("v0003")["state"] == "damaged"
    assert main(["registry", "show", str(path), "v0003"]) == 3


def test_a_version_edited_before_its_publish_is_not_made_current(data, monkeypatch, capsys):
    """Between the version write and the publish (the registry lock is not held then) its
    record is edited by hand: the publish refuses it (exit 2, naming what disagrees) and
    nothing becomes current."""
    from bigalign import faults

    tmp, _, _ = data
    cfg = config(tmp / "edited.toml", "reg-edited", apply=False)
    reg = Registry(tmp / "reg-edited")
    real_point = faults.point

    def point(name):
        if name == "realign.version-written":
            record = tmp / "reg-edited" / "versions" / "v0001" / "record.json"
            value = json.loads(record.read_text())
            value["pairs"]["train"] += 1
            record.write_text(json.dumps(value, indent=1))
        real_point(name)

    monkeypatch.setattr(faults, "point", point)
    capsys.readouterr()
    assert realign(cfg, "--run-id", "e1") == 2
    err = capsys.readouterr().err
    assert "v0001 is DAMAGED" in err and "record.json was changed" in err
    assert "refused to make it current" in err
    assert reg.current() is None and reg.history() == []


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "bigalign.cli"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
ENV.pop("BIGALIGN_FAULTS", None)


@pytest.mark.slow
def test_two_realigns_started_together_one_runs_one_is_refused(data):
    tmp, _, _ = data
    cfg = config(tmp / "race.toml", "reg-race", apply=False)
    env = dict(ENV, BIGALIGN_FAULTS="delay:realign.split@4")  # the holder stays in there
    procs = [subprocess.Popen([*CLI, "realign", cfg, "--run-id", f"race-{i}", "-q"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert "is in use" in results[1][1]
    assert Registry(tmp / "reg-race").versions() == ["v0001"]


@pytest.fixture(scope="module")
def reference(data):
    """An uninterrupted run: what every killed-then-resumed run must publish."""
    tmp, _, _ = data
    cfg = config(tmp / "ref.toml", "reg-ref", apply=False)
    assert realign(cfg, "--run-id", "ref") == 0
    return Registry(tmp / "reg-ref").load("v0001")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["fit.block@2", "realign.evaluated",
                                   "realign.version-written", "apply.region-done@2",
                                   "realign.published"])
def test_killed_mid_run_the_rerun_publishes_the_same_version(data, reference, fault):
    tmp, a, _ = data
    name = fault.split("@")[0].replace(".", "-")
    reg_path = tmp / f"reg-kill-{name}"
    cfg = config(tmp / f"kill-{name}.toml", reg_path.name, apply=True)
    text = (tmp / f"kill-{name}.toml").read_text()
    (tmp / f"kill-{name}.toml").write_text(
        text.replace("out/mapped-{version}", f"out-{name}/mapped-{{version}}"))
    killed = subprocess.run([*CLI, "realign", cfg, "--run-id", "nightly", "-q"],
                            env=dict(ENV, BIGALIGN_FAULTS=f"kill:{fault}"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    reg = Registry(reg_path)
    assert reg.verdict("nightly") is None
    # the rerun (in this process: the dead holder's lease is taken over at once)
    assert realign(cfg, "--run-id", "nightly", "--summary", tmp / f"k-{name}.json") == 0
    s = summary(tmp / f"k-{name}.json")
    assert s["version"] == "v0001" and not s["already_done"]
    assert reg.versions() == ["v0001"] and reg.current() == "v0001"
    assert [p["version"] for p in reg.history()] == ["v0001"]  # the pointer moved once
    t = reg.load()
    np.testing.assert_array_equal(t.rotation, reference.rotation)
    mapped = zarr.open_array(str(tmp / f"out-{name}" / "mapped-v0001.zarr"))
    assert mapped.attrs["bigalign"]["complete"]
    np.testing.assert_allclose(mapped[:], t.transform(a), rtol=1e-5, atol=1e-5)
    assert not os.path.exists(reg_path / "runs" / "nightly" / "pairs")
    assert not os.path.exists(reg_path / "runs" / "nightly" / "job")


def test_first_publish_says_first_version(data, capsys):
    """The log line of a first publish says so, not '(was None)'."""
    tmp, _, _ = data
    cfg = config(tmp / "first.toml", "reg-first", apply=False)
    assert main(["realign", cfg, "--run-id", "r1"]) == 0
    err = capsys.readouterr().err
    assert "published v0001 (the first version)" in err and "None" not in err


def test_a_taken_apply_output_is_refused_before_the_version_is_written(data, capsys):
    """[apply] runs after the version is written: an output already taken (here a user's
    array) is refused first, so nothing is written or published and no version is left
    that this run id could never make current. A rerun with other options says so in
    realign's terms (no --restart); the original rerun, once the path is free, publishes."""
    tmp, _, _ = data
    text = open(config(tmp / "taken.toml", "reg-taken")).read()
    cfg = tmp / "taken.toml"
    cfg.write_text(text.replace("out/mapped-{version}", "taken/mapped-{version}"))
    zarr.create_array(str(tmp / "taken" / "mapped-v0001.zarr"), data=np.ones((4, DIM)))
    assert realign(cfg, "--run-id", "t1") == 2
    err = capsys.readouterr().err
    assert "for the next version v0001 already holds something bigalign did not write" in err
    assert "nothing was written or published" in err
    reg = Registry(tmp / "reg-taken")
    assert reg.versions() == [] and reg.current() is None
    assert zarr.open_array(str(tmp / "taken" / "mapped-v0001.zarr"))[:].tolist() == \
        np.ones((4, DIM)).tolist()
    other = tmp / "taken2.toml"
    other.write_text(text.replace("out/mapped-{version}", "taken2/mapped-{version}"))
    assert realign(other, "--run-id", "t1") == 2
    err = capsys.readouterr().err
    assert "was started with other inputs or options and has not finished" in err
    assert "use another --run-id" in err and "--restart" not in err
    import shutil
    shutil.rmtree(tmp / "taken")
    assert realign(cfg, "--run-id", "t1") == 0
    assert reg.versions() == ["v0001"] and reg.current() == "v0001"


def test_the_evaluation_inside_realign_logs_as_realign(data, caplog):
    """realign's held-out evaluation logs under its own name, not 'evaluate:'."""
    import logging

    tmp, _, _ = data
    cfg = config(tmp / "label.toml", "reg-label", apply=False)
    from bigalign.commands.realign import realign as run_realign

    with caplog.at_level(logging.INFO, logger="bigalign"):
        assert run_realign(cfg, run_id="l1")["status"] == "published"
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("realign: ") for m in lines), lines
    assert not any(m.startswith("evaluate: ") for m in lines), lines


@pytest.mark.parametrize("key", sorted(__import__("bigalign.commands.realign_config",
                                                  fromlist=["GATED"]).GATED))
def test_every_gated_metric_is_parsed_and_judged(tmp_path, key):
    """The gate is table-driven (realign_config.GATED): each gated metric is read from [gate],
    checked in its direction, and NaN never passes."""
    from bigalign.commands.realign import gate
    from bigalign.commands.realign_config import GATED

    figure, direction = GATED[key]
    cfg = load_config(config(tmp_path / "g.toml", "reg",
                             gate={key: 0.5, "not_worse_than_current": False}))
    assert getattr(cfg.gate, key) == 0.5
    good, bad = (0.6, 0.4) if direction == "min" else (0.4, 0.6)
    for value, passed in ((good, True), (bad, False), (float("nan"), False)):
        verdict = gate(cfg.gate, {"methods": {"candidate": {figure: value}}})
        assert verdict["passed"] is passed
        assert verdict["criteria"] == [{"name": key, "value": value if value == value else
                                        verdict["criteria"][0]["value"], "threshold": 0.5,
                                        "passed": passed}]


def _recall10(queries, docs):
    """Oracle: share of queries whose own document (same row) is in the top 10 by cosine
    (ties counted for the query), float64 in memory."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    s = q @ d.T
    own = np.diag(s)
    return float(np.mean((s > own[:, None]).sum(axis=1) < 10))


@pytest.mark.parametrize("noise, passed", [(3.0, False), (0.01, True)])
def test_a_map_worse_than_staying_on_the_old_model_is_rejected(tmp_path, noise, passed):
    """Stay (old queries -> old documents) vs bridge (new queries -> mapped old documents)
    on the held-out items, recall@10 with a paired bootstrap: a new model only loosely
    related to the old one makes a bridge far worse than staying (exit 4, nothing
    published); a close one passes. The figures equal an in-memory numpy search."""
    rng = np.random.default_rng(7)
    n, d = 1200, 16
    a = rng.standard_normal((n, d))
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    b = a @ rot + noise * rng.standard_normal((n, d))
    qa = a + 0.3 * rng.standard_normal((n, d))
    qb = b + 0.3 * rng.standard_normal((n, d))
    for name, x in (("a", a), ("b", b), ("qa", qa), ("qb", qb)):
        zarr.create_array(str(tmp_path / f"{name}.zarr"), data=x, chunks=(CHUNK, d),
                          compressors=None)
    cfg = config(tmp_path / "stay.toml", "reg", source="a.zarr", target="b.zarr",
                 apply=False, gate={"not_worse_than_stay": True, "queries_old": "qa.zarr",
                                    "queries_new": "qb.zarr"})
    assert realign(cfg, "--run-id", "s", "--summary", tmp_path / "s.json") == (
        0 if passed else 4)
    s = summary(tmp_path / "s.json")
    held = holdout_mask(np.arange(n), 0.2)
    stay = s["stay"]
    assert stay["queries"] == stay["documents"] == int(held.sum())
    assert stay["stay"]["recall@10"] == pytest.approx(_recall10(qa[held], a[held]))
    assert stay["reembed"]["recall@10"] == pytest.approx(_recall10(qb[held], b[held]))
    t = bigalign.Transform.load(s["candidate_transform"]) if not passed else \
        Registry(tmp_path / "reg").load()
    assert stay["bridge"]["recall@10"] == pytest.approx(
        _recall10(qb[held], t.transform(a[held])), abs=1.5 / held.sum())  # float32 ties
    for k in ("stay", "bridge", "reembed"):
        lo, hi = stay[k]["interval"]
        assert lo <= stay[k]["recall@10"] <= hi
    (c,) = [c for c in s["gate"]["criteria"] if c["name"] == "not_worse_than_stay"]
    assert c["passed"] is passed and c["value"] == stay["bridge"]["recall@10"]
    lo, hi = c["difference"]["recall@10"]["interval"]
    assert lo <= c["difference"]["recall@10"]["estimate"] <= hi
    assert (hi < -0.005) is (not passed)
    assert Registry(tmp_path / "reg").versions() == ([] if not passed else ["v0001"])
    # the three-way verdict of evaluate-retrieval, on the same hits: a loosely related new
    # model is worth re-embedding for (its own search beats staying) but not bridging to
    v = stay["verdict"]
    assert v["decision"] in ("bridge", "re-embed", "stay") and v["reason"]
    assert v["figures"]["stay"]["estimate"] == pytest.approx(stay["stay"]["recall@10"])
    if not passed:
        assert v["decision"] != "bridge"


def test_every_gated_figure_has_an_interval_holding_its_estimate(data, capsys):
    """Recall@1/@10 and the held-out relative residual of every evaluated map come with a
    bootstrap interval that holds the point estimate; the residual equals one computed in
    numpy on the held-out rows; the printed verdict shows the intervals and 6 digits."""
    tmp, a, b = data
    cfg = config(tmp / "iv.toml", "reg-iv", source="a.zarr", target="b.zarr", apply=False)
    assert main(["realign", cfg, "--run-id", "iv", "--summary", str(tmp / "iv.json")]) == 0
    out = capsys.readouterr().out
    s = summary(tmp / "iv.json")
    assert s["bootstrap"]["resamples"] == 1000 and s["bootstrap"]["level"] == 0.95
    for fig in (s["candidate"], s["no_alignment"]):
        for key in ("recall@1", "recall@10", "heldout_relative_residual"):
            lo, hi = fig["intervals"][key]
            assert lo <= fig[key] <= hi  # (a recall of 1.0 on every resample: lo == hi)
        lo, hi = fig["intervals"]["heldout_relative_residual"]
        assert lo < fig["heldout_relative_residual"] < hi
    held = holdout_mask(np.arange(N), 0.2)
    t = Registry(tmp / "reg-iv").load()
    y, tb = t.transform(a[held]), b[held]
    ref = ((y - tb) ** 2).sum() / ((tb - tb.mean(axis=0)) ** 2).sum()
    assert s["candidate"]["heldout_relative_residual"] == pytest.approx(ref, rel=1e-4)
    assert s["train_relative_residual"] == t.metadata["relative_residual"]
    assert "[" in out and "train relative residual" in out
    assert "staying on the old model not checked" in out
    assert "held-out residual" in out


def test_fit_method_auto_in_the_config_publishes_the_chosen_family(data):
    """``[fit] method = "auto"``: realign fits every family from its one pass, the
    published version records the family chosen and its candidates, and the corpus is
    mapped by that map (apply of the registry's current transform equals transform())."""
    tmp, a, _ = data
    cfg = config(tmp / "auto.toml", "reg-auto", fit={"method": "auto", "max_holdout": 100},
                 apply=False)
    with open(cfg, "a") as f:  # its own output: the fixture's folder is shared
        f.write('[apply]\ncorpus = "corpus.zarr"\noutput = "out-auto/mapped-{version}.zarr"\n')
    assert realign(cfg, "--run-id", "auto-1", "--summary", tmp / "auto.json") == 0
    assert summary(tmp / "auto.json")["status"] == "published"
    t = bigalign.Transform.load(str(tmp / "reg-auto"))
    sel = t.metadata["selection"]
    assert t.options["method"] == "auto" and t.options["family"] == sel["chosen"]
    assert len(sel["candidates"]) == 5 and sel["holdout"]["rows"] <= 100
    mapped = zarr.open_array(str(tmp / "out-auto" / "mapped-v0001.zarr"))
    np.testing.assert_allclose(mapped[:], t.transform(a), atol=1e-5)
    with pytest.raises(InputError, match=r"\[fit\].*--method"):
        load_config(config(tmp / "bad.toml", "reg-bad", fit={"method": "lasso"}))
