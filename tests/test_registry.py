"""The registry: immutable numbered versions, the current pointer (numbered files created
by a conditional create; readers take the newest), rollback, gc, a registry standing for
its current version in Transform.load / apply / info, lazily loaded training statistics,
and the same on moto's S3 server."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.cli import main
from bigalign.errors import CheckpointError, InputError
from bigalign.storage.registry import Registry, is_registry
from bigalign.transform import Transform
from conftest import planted, moto_s3


def fitted(seed: int, n: int = 400, dim: int = 6) -> Transform:
    a, b, _ = planted(n, dim, noise=0.05, offset_a=1.0, seed=seed)
    return bigalign.fit(zarr.array(a, chunks=(100, dim)), zarr.array(b, chunks=(100, dim)),
                        center=True)


def publish(reg: Registry, t: Transform, run_id: str) -> str:
    """What realign's publish step does: a version, then the pointer."""
    with reg.lock() as lock:
        reg.create(lock)
        version = reg.next_version()
        reg.write_version(lock, version, t, {"run_id": run_id, "created": "now"})
        reg.set_current(lock, version, action="publish", run_id=run_id)
    return version


@pytest.fixture(scope="module")
def transforms():
    return [fitted(seed) for seed in (1, 2, 3, 4)]


def test_versions_are_immutable_and_the_pointer_names_the_current_one(tmp_path, transforms):
    reg = Registry(tmp_path / "reg")
    assert not reg.exists() and not is_registry(tmp_path / "reg")
    with pytest.raises(InputError, match="no bigalign registry"):
        reg.check()
    assert [publish(reg, t, f"run-{i}") for i, t in enumerate(transforms[:2])] == \
        ["v0001", "v0002"]
    assert reg.versions() == ["v0001", "v0002"] and reg.current() == "v0002"
    assert is_registry(str(tmp_path / "reg"))
    assert [p["generation"] for p in reg.history()] == [1, 2]
    assert reg.history()[1]["previous"] == "v0001"
    # a registry stands for its current version
    t = Transform.load(str(tmp_path / "reg"))
    np.testing.assert_array_equal(t.rotation, transforms[1].rotation)
    assert t.metadata["registry"] == {"url": str(tmp_path / "reg"), "version": "v0002"}
    np.testing.assert_array_equal(reg.load("v0001").rotation, transforms[0].rotation)
    # a version is never rewritten by another run (the same run finds it done)
    with reg.lock() as lock:
        with pytest.raises(CheckpointError, match="immutable"):
            reg.write_version(lock, "v0001", transforms[2], {"run_id": "other"})
        reg.write_version(lock, "v0001", transforms[2], {"run_id": "run-0"})
    np.testing.assert_array_equal(reg.load("v0001").rotation, transforms[0].rotation)
    with pytest.raises(InputError, match="no version v0009"):
        reg.load("v0009")
    # the pointer is files of its own: numbered, never rewritten, the newest wins
    names = sorted(os.listdir(tmp_path / "reg" / "current"))
    assert names == ["000000000001.json", "000000000002.json"]


def test_a_registry_refuses_a_folder_of_other_files(tmp_path, transforms):
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and not a bigalign registry"):
        publish(Registry(tmp_path / "reg"), transforms[0], "r")


def test_statistics_are_read_only_when_used(tmp_path, transforms, monkeypatch):
    import bigalign.transform as transform_module

    reg = Registry(tmp_path / "reg")
    publish(reg, transforms[0], "r")
    reads = []
    real = transform_module._read_statistics
    monkeypatch.setattr(transform_module, "_read_statistics",
                        lambda group: reads.append(1) or real(group))
    t = Transform.load(str(tmp_path / "reg"))
    x = np.ones((3, 6), dtype=np.float32)
    np.testing.assert_allclose(t.transform(x), transforms[0].transform(x))
    assert reads == []  # loading and mapping never read the d x d statistics
    assert t.statistics.equals(transforms[0].statistics)  # read on first access
    assert t.statistics is t.statistics and reads == [1]  # and kept
    # unreadable statistics fail when used, not when loaded
    chunk = tmp_path / "reg" / "versions" / "v0001" / "transform" / "statistics" / "cross"
    for root, _, names in os.walk(chunk / "c"):
        for name in names:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"truncated")
    t2 = Transform.load(str(tmp_path / "reg"))
    with pytest.raises(InputError, match="training statistics"):
        t2.statistics
    t2.statistics = None  # set by hand: kept as given
    assert t2.statistics is None


def test_rollback_goes_back_one_version_or_to_any(tmp_path, transforms, capsys):
    reg = Registry(tmp_path / "reg")
    for i, t in enumerate(transforms[:3]):
        publish(reg, t, f"run-{i}")
    path = str(tmp_path / "reg")
    assert main(["registry", "rollback", path]) == 0
    assert reg.current() == "v0002"
    assert main(["registry", "rollback", path, "--json"]) == 0
    assert reg.current() == "v0001"
    capsys.readouterr()
    assert main(["registry", "rollback", path]) == 2  # nothing older
    assert "no version older than the current v0001" in capsys.readouterr().err
    assert main(["registry", "rollback", path, "--to", "v0003"]) == 0  # forward, too
    assert reg.current() == "v0003"
    assert main(["registry", "rollback", path, "--to", "v0003"]) == 0
    assert "already current" in capsys.readouterr().out
    assert main(["registry", "rollback", path, "--to", "v0007"]) == 2
    assert [(p["action"], p["version"]) for p in reg.history()] == [
        ("publish", "v0001"), ("publish", "v0002"), ("publish", "v0003"),
        ("rollback", "v0002"), ("rollback", "v0001"), ("rollback", "v0003")]
    np.testing.assert_array_equal(Transform.load(path).rotation, transforms[2].rotation)


def test_gc_keeps_the_newest_and_never_the_current(tmp_path, transforms, capsys):
    reg = Registry(tmp_path / "reg")
    for i, t in enumerate(transforms):
        publish(reg, t, f"run-{i}")
    path = str(tmp_path / "reg")
    assert main(["registry", "rollback", path, "--to", "v0001"]) == 0
    assert main(["registry", "gc", path, "--keep", "2", "--dry-run"]) == 0
    assert reg.versions() == ["v0001", "v0002", "v0003", "v0004"]
    capsys.readouterr()
    assert main(["registry", "gc", path, "--keep", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deleted"] == ["v0002"] and out["kept"] == ["v0001", "v0003", "v0004"]
    assert reg.versions() == ["v0001", "v0003", "v0004"] and reg.current() == "v0001"
    assert not os.path.exists(tmp_path / "reg" / "versions" / "v0002")
    assert main(["registry", "gc", path, "--keep", "1"]) == 0
    assert reg.versions() == ["v0001", "v0004"]  # v0004 newest, v0001 current
    np.testing.assert_array_equal(Transform.load(path).rotation, transforms[0].rotation)
    # numbers are not reused: the next version comes after the highest ever seen
    assert reg.next_version() == "v0005"
    # an unfinished publish (a folder without record) is left for its realign
    (tmp_path / "reg" / "versions" / "v0005").mkdir()
    assert reg.gc(1)["incomplete"] == ["v0005"]
    assert main(["registry", "gc", path, "--keep", "0"]) == 2


def test_gc_mapped_deletes_only_the_corpora_bigalign_mapped_with_those_versions(
        tmp_path, transforms, capsys):
    """``gc --mapped`` deletes the corpus a deleted version's record names only when it is
    a complete bigalign apply output of that version's transform; one mapped by another
    transform, and a user's array at the named path, are listed and left. Without --mapped,
    and with --dry-run, nothing is deleted; the listing gives each corpus's size."""
    reg = Registry(tmp_path / "reg")
    a, _, _ = planted(300, 6, seed=9)
    corpus = str(tmp_path / "corpus.zarr")
    zarr.create_array(corpus, data=a, chunks=(100, 6))
    outs = [str(tmp_path / f"mapped-{i}.zarr") for i in range(1, 5)]
    with reg.lock() as lock:
        reg.create(lock)
        for i, t in enumerate(transforms):
            v = reg.next_version()
            reg.write_version(lock, v, t, {"run_id": f"run-{i}", "created": "now",
                                           "mapped_corpus": {"corpus": corpus,
                                                             "output": outs[i]}})
            reg.set_current(lock, v, action="publish", run_id=f"run-{i}")
    bigalign.apply(reg.transform_url("v0001"), corpus, outs[0])  # ours: v0001's transform
    bigalign.apply(reg.transform_url("v0003"), corpus, outs[1])  # v0002's path, v0003's map
    zarr.create_array(outs[2], data=a, chunks=(100, 6))  # a user's array at v0003's path
    bigalign.apply(reg.transform_url("v0004"), corpus, outs[3])  # the kept version's
    size = sum(f.stat().st_size for f in (tmp_path / "mapped-1.zarr").rglob("*") if f.is_file())
    path = str(tmp_path / "reg")

    capsys.readouterr()
    assert main(["registry", "gc", path, "--keep", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "would delete 3 versions (v0001, v0002, v0003)" in text
    assert f"mapped corpus of v0001: {outs[0]} ({size / 2**30:,.2f} GiB): left (pass " \
           "--mapped to delete it as well)" in text
    assert main(["registry", "gc", path, "--keep", "1", "--mapped", "--dry-run", "--json"]) == 0
    listing = {c["version"]: c for c in json.loads(capsys.readouterr().out)["mapped"]}
    assert sorted(listing) == ["v0001", "v0002", "v0003"]
    assert listing["v0001"]["ours"] and listing["v0001"]["bytes"] == size
    assert not listing["v0001"]["deleted"] and reg.versions() == ["v0001", "v0002", "v0003",
                                                                   "v0004"]
    assert "mapped by another transform" in listing["v0002"]["why"]
    assert listing["v0003"]["why"] == "not a bigalign apply output (foreign)"

    assert main(["registry", "gc", path, "--keep", "1", "--mapped"]) == 0
    text = capsys.readouterr().out
    assert f"mapped corpus of v0001: {outs[0]} ({size / 2**30:,.2f} GiB): deleted" in text
    assert f"mapped corpus of v0002: {outs[1]}: left (mapped by another transform" in text
    assert not os.path.exists(outs[0]) and reg.versions() == ["v0004"]
    np.testing.assert_array_equal(zarr.open_array(outs[2])[:], a)  # never touched
    assert bigalign.output_status(outs[1])["complete"] and bigalign.output_status(outs[3])[
        "complete"]
    assert main(["registry", "gc", path, "--keep", "1", "--mapped"]) == 0  # nothing left to do
    assert "deleted 0 versions" in capsys.readouterr().out
    assert main(["registry", "list", path]) == 0
    assert f"registry {path}: 1 version, current v0004" in capsys.readouterr().out


def test_apply_into_a_registry_says_it_is_a_registry(tmp_path, transforms, capsys):
    """``apply -o REGISTRY`` (a registry where the output belongs) is refused naming it a
    registry (it said "was not written by bigalign"), and the registry is untouched."""
    reg = Registry(tmp_path / "reg")
    publish(reg, transforms[0], "run-a")
    a, _, _ = planted(200, 6, seed=3)
    corpus = str(tmp_path / "c.zarr")
    zarr.create_array(corpus, data=a, chunks=(100, 6))
    transforms[1].save(str(tmp_path / "t"))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*"))
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert main(["apply", str(tmp_path / "t"), corpus, "-o", str(tmp_path / "reg"),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert f"output {str(tmp_path / 'reg')!r} is a bigalign registry, not an apply " \
               "output: no command writes over a registry, even with --overwrite" in err
        assert "was not written by bigalign" not in err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*")) == before


def test_cli_list_show_info_and_apply_take_a_registry(tmp_path, transforms, capsys):
    reg = Registry(tmp_path / "reg")
    publish(reg, transforms[0], "run-a")
    publish(reg, transforms[1], "run-b")
    path = str(tmp_path / "reg")
    capsys.readouterr()
    assert main(["registry", "list", path, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["current"] == "v0002" and [v["version"] for v in listing["versions"]] == \
        ["v0001", "v0002"]
    assert main(["registry", "list", path]) == 0
    text = capsys.readouterr().out
    assert "* v0002" in text and "  v0001" in text and "run-b" in text
    assert main(["registry", "show", path, "v0001", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["record"]["run_id"] == "run-a" and not shown["current"]
    assert main(["registry", "show", path]) == 0
    assert "version v0002" in capsys.readouterr().out
    assert main(["info", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["registry"]["version"] == "v0002"
    x = planted(300, 6, seed=9)[0]
    zarr.create_array(str(tmp_path / "corpus.zarr"), data=x, chunks=(100, 6))
    assert main(["apply", path, str(tmp_path / "corpus.zarr"), "-o",
                 str(tmp_path / "out.zarr"), "-q"]) == 0
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out.zarr"))[:],
                               transforms[1].transform(x), rtol=1e-5, atol=1e-5)
    # an output inside the registry is refused (it would overlap the transform)
    assert main(["apply", path, str(tmp_path / "corpus.zarr"), "-o",
                 path + "/versions/v0002/transform/x.zarr", "-q"]) == 2
    assert main(["registry", "list", str(tmp_path / "nothing")]) == 2
    assert main(["info", str(tmp_path / "nothing")]) == 2


def test_writers_wait_for_no_one_they_are_refused(tmp_path, transforms, capsys):
    reg = Registry(tmp_path / "reg")
    publish(reg, transforms[0], "r")
    publish(reg, transforms[1], "r2")
    with reg.lock():
        capsys.readouterr()
        assert main(["registry", "gc", str(tmp_path / "reg"), "--keep", "1"]) == 2
        assert "is in use" in capsys.readouterr().err
        assert main(["registry", "list", str(tmp_path / "reg")]) == 0  # readers take no lock
    assert reg.versions() == ["v0001", "v0002"]


def test_an_edited_record_or_a_swapped_transform_is_damaged(tmp_path, transforms, capsys):
    """Each record carries the transform's SHA-256 and its own: show and list say DAMAGED
    (exit 3) when a record was edited or another transform (or changed arrays) sits in a
    version, and rollback refuses to make such a version current (exit 2)."""
    import shutil

    reg = Registry(tmp_path / "reg")
    for i, t in enumerate(transforms):
        publish(reg, t, f"run-{i}")
    path, versions = str(tmp_path / "reg"), tmp_path / "reg" / "versions"
    record = reg.record("v0001")
    assert record["transform_sha256"] == transforms[0].digest() and record["record_sha256"]
    assert [reg.verify(v)["state"] for v in reg.versions()] == ["ok"] * 4
    capsys.readouterr()
    assert main(["registry", "show", path, "v0001"]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["registry", "list", path]) == 0
    # v0001: its record edited by hand (a re-indented record is not an edit)
    edited = dict(record, run_id="someone-else")
    (versions / "v0001" / "record.json").write_text(json.dumps(edited, indent=4))
    # v0002: another version's transform copied into it
    shutil.rmtree(versions / "v0002" / "transform")
    shutil.copytree(versions / "v0004" / "transform", versions / "v0002" / "transform")
    # v0003: its rotation's chunk replaced by v0004's (the transform's attributes unchanged)
    for root, _, names in os.walk(versions / "v0003" / "transform" / "rotation" / "c"):
        for name in names:
            shutil.copy(os.path.join(root, name).replace("v0003", "v0004"),
                        os.path.join(root, name))
    capsys.readouterr()
    assert main(["registry", "show", path, "v0001"]) == 3
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "record.json was changed after it was written" in out
    assert main(["registry", "show", path, "v0002", "--json"]) == 3
    shown = json.loads(capsys.readouterr().out)
    assert shown["integrity"]["state"] == "damaged"
    assert "not the transform its record names" in shown["damaged"]
    assert transforms[3].digest() in shown["damaged"]
    assert main(["registry", "show", path, "v0003"]) == 3
    assert "do not match the SHA-256" in capsys.readouterr().out
    # list reads the digests only (not the d x d arrays): v0001 and v0002
    assert main(["registry", "list", path]) == 3
    out = capsys.readouterr().out
    assert "v0001 DAMAGED" in out and "v0002 DAMAGED" in out and "v0004" in out
    assert main(["registry", "list", path, "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["damaged"] == ["v0001", "v0002"]
    # a damaged version is never made current
    for version, what in (("v0001", "record.json was changed"),
                          ("v0002", "not the transform its record names"),
                          ("v0003", "do not match the SHA-256")):
        assert main(["registry", "rollback", path, "--to", version]) == 2
        err = capsys.readouterr().err
        assert f"version {version} is DAMAGED" in err and what in err
        assert "refused to make it current (rollback)" in err
    assert reg.current() == "v0004" and len(reg.history()) == 4
    with pytest.raises(bigalign.DamagedOutputError), reg.lock() as lock:
        reg.set_current(lock, "v0002", action="publish")
    assert reg.current() == "v0004"


def test_records_without_digests_are_unverified_not_damaged(tmp_path, transforms, capsys):
    """A record written before records carried digests: show and list say unverified and
    exit 0, and rollback still works."""
    reg = Registry(tmp_path / "reg")
    publish(reg, transforms[0], "old")
    publish(reg, transforms[1], "new")
    record = tmp_path / "reg" / "versions" / "v0001" / "record.json"
    old = {k: v for k, v in json.loads(record.read_text()).items()
           if k not in ("record_sha256", "transform_sha256")}
    record.write_text(json.dumps(old, indent=1))
    check = reg.verify("v0001", deep=True)
    assert check["state"] == "unverified" and not check["problems"] and check["notes"]
    path = str(tmp_path / "reg")
    capsys.readouterr()
    assert main(["registry", "show", path, "v0001"]) == 0
    assert "unverified" in capsys.readouterr().out
    assert main(["registry", "list", path]) == 0
    assert "unverified" in capsys.readouterr().out
    assert main(["registry", "rollback", path]) == 0 and reg.current() == "v0001"


# ---- on an object store: moto's S3 server -----------------------------------------------

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    with moto_s3("registry-test") as opts:
        yield opts


def test_registry_and_realign_on_s3(s3, tmp_path, transforms):
    url = "s3://registry-test/align/registry"
    reg = Registry(url, s3)
    # a whole realign with the registry (and its run folder) on the object store
    a, b, _ = planted(600, 6, noise=0.05, offset_a=1.0, seed=7)
    zarr.create_array("s3://registry-test/pairs/a.zarr", data=a, chunks=(100, 6),
                      storage_options=s3)
    zarr.create_array("s3://registry-test/pairs/b.zarr", data=b, chunks=(100, 6),
                      storage_options=s3)
    (tmp_path / "r.toml").write_text(
        f'registry = "{url}"\n[pairs]\nsource = "s3://registry-test/pairs/a.zarr"\n'
        'target = "s3://registry-test/pairs/b.zarr"\n'
        'holdout = 0.2\n[fit]\ncenter = true\n[gate]\nmin_recall_at_10 = 0.9\n'
        f'[storage_options]\nendpoint_url = "{s3["endpoint_url"]}"\nkey = "testing"\n'
        'secret = "testing"\n')
    assert main(["realign", str(tmp_path / "r.toml"), "--run-id", "s3-run", "-q"]) == 0
    assert reg.versions() == ["v0001"] and reg.current() == "v0001"
    assert reg.verdict("s3-run")["status"] == "published"
    assert main(["realign", str(tmp_path / "r.toml"), "--run-id", "s3-run", "-q"]) == 0
    assert reg.versions() == ["v0001"] and len(reg.history()) == 1
    publish(reg, transforms[1], "by-hand")
    t = Transform.load(url, storage_options=s3)
    assert t.metadata["registry"]["version"] == "v0002"
    np.testing.assert_array_equal(t.rotation, transforms[1].rotation)
    assert t.statistics.equals(transforms[1].statistics)
    assert reg.rollback()["to"] == "v0001" and reg.current() == "v0001"
    publish(reg, transforms[2], "third")
    assert reg.rollback(to="v0001")["changed"]
    assert reg.gc(1)["deleted"] == ["v0002"]  # the newest and the current one stay
    assert reg.versions() == ["v0001", "v0003"] and reg.current() == "v0001"
    fs = s3fs.S3FileSystem(**s3)
    assert not fs.exists("registry-test/align/registry/versions/v0002/record.json")
    assert not fs.find("registry-test/align/registry/versions/v0002")


def test_pointer_generations_are_a_conditional_create_on_s3(s3, transforms, monkeypatch):
    """Eight writers that all read the same newest generation race to create the next
    one (If-None-Match: *): exactly one moves the pointer, the others are refused."""
    url = "s3://registry-test/race/registry"
    reg = Registry(url, s3)
    publish(reg, transforms[0], "first")
    publish(reg, transforms[1], "second")
    gens = reg._generations()
    monkeypatch.setattr(Registry, "_generations", lambda self: list(gens))

    class NoFence:  # each writer believes it holds the lock
        def check_fence(self):
            pass

    barrier, results = threading.Barrier(8), []

    def move(i):
        barrier.wait()
        try:
            Registry(url, s3).set_current(NoFence(), "v0001", action="rollback",
                                          run_id=f"w{i}")
            results.append("moved")
        except CheckpointError as e:
            results.append(str(e))

    threads = [threading.Thread(target=move, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results.count("moved") == 1, results
    assert all("moved at the same moment" in r for r in results if r != "moved")
    monkeypatch.undo()
    assert reg.current() == "v0001" and len(reg.history()) == 3
