"""Transforms at query time (bigalign/commands/compose.py and map_export.py; bigalign/cli/compose.py and export.py): compose, invert,
export. The reference everywhere is Transform.transform (what apply computes): compose must
equal applying twice, invert must undo T where an inverse exists, and an export read back
with plain numpy -- never with bigalign -- must equal it in both directions."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bigalign
from bigalign import Transform
from bigalign.commands import compose as C, map_export as T
from bigalign.cli import main
from bigalign.errors import InputError
from conftest import planted, write_zarr

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "transforms.md"


def make(dim_a, dim_b, *, normalize=False, source_model=None, target_model=None, seed=0,
         scale=None):
    """A random transform with non-zero means and a scale != 1 (Q: orthonormal rows or
    columns, as a fit gives)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((max(dim_a, dim_b),) * 2))
    meta = {"n_pairs": 100}
    if source_model is not None:
        meta["source_model"] = source_model
    if target_model is not None:
        meta["target_model"] = target_model
    return Transform(q[:dim_a, :dim_b], rng.standard_normal(dim_a) * 3,
                     rng.standard_normal(dim_b) * 2,
                     float(rng.uniform(0.5, 2.0)) if scale is None else scale,
                     {"center": True, "normalize": normalize, "scale": True}, meta)


def rows(n, d, seed=1, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


@pytest.fixture
def logs():
    """Records of the 'bigalign' logger (main() stops it propagating to caplog's root)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("bigalign")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield lambda: "\n".join(r.getMessage() for r in records)
    logger.removeHandler(handler)
    logger.setLevel(old)


# ---- compose ------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [(6, 6, 6), (4, 6, 9), (9, 6, 4), (4, 9, 5), (5, 3, 5)])
@pytest.mark.parametrize("normalize", [False, True])
def test_compose_equals_applying_twice(dims, normalize):
    d_a, d_b, d_c = dims
    t1 = make(d_a, d_b, normalize=normalize, seed=1)
    t2 = make(d_b, d_c, seed=2)
    t12 = C.compose(t1, t2)
    x = rows(40, d_a)
    np.testing.assert_allclose(t12.transform(x), t2.transform(t1.transform(x)), atol=1e-12)
    np.testing.assert_allclose(t12.transform(x[0]), t2.transform(t1.transform(x))[0], atol=1e-12)
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(t12.transform(x32), t2.transform(t1.transform(x)),
                               rtol=1e-4, atol=1e-4)
    assert t12.dims == (d_a, d_c) and t12.normalize == normalize
    assert t12.scale == pytest.approx(t1.scale * t2.scale)
    monotone = d_a <= d_b <= d_c or d_a >= d_b >= d_c
    assert t12.metadata["orthonormal"] is monotone  # 4->9->5 and 5->3->5 are not isometries
    assert t1.then(t2).transform(x) == pytest.approx(t12.transform(x))


def test_compose_of_fitted_transforms(tmp_path):
    """Real fits (centred, scaled, with statistics): the composition of saved transforms
    equals applying both, drops the statistics and records both inputs."""
    a, b, _ = planted(1500, 8, 12, offset_a=2.0, offset_b=-1.0, seed=3)
    _, c, _ = planted(1500, 12, 6, offset_a=0.0, offset_b=4.0, seed=4)
    c = (b @ np.linalg.qr(np.random.default_rng(5).standard_normal((12, 12)))[0][:, :6] + 4.0)
    paths = {n: write_zarr(tmp_path / f"{n}.zarr", v, 500) for n, v in
             (("a", a), ("b", b), ("c", c.astype(np.float32)))}
    bigalign.fit(paths["a"], paths["b"], center=True, scale=True, output=str(tmp_path / "ab"))
    bigalign.fit(paths["b"], paths["c"], center=True, output=str(tmp_path / "bc"))
    t1, t2 = Transform.load(tmp_path / "ab"), Transform.load(tmp_path / "bc")
    assert t1.statistics is not None
    t13 = C.compose(tmp_path / "ab", tmp_path / "bc", output=tmp_path / "ac")
    x = a[:100].astype(np.float64)
    np.testing.assert_allclose(t13.transform(x), t2.transform(t1.transform(x)), atol=1e-10)
    saved = Transform.load(tmp_path / "ac")
    assert saved.statistics is None and "neither fit" in saved.metadata["statistics"]
    first, second = saved.metadata["composed_of"]
    assert first["path"] == str(tmp_path / "ab") and second["path"] == str(tmp_path / "bc")
    assert (first["digest"], second["digest"]) == (C.digest(t1), C.digest(t2))
    assert first["n_pairs"] == 1500 and saved.metadata["kind"] == "composed"
    np.testing.assert_allclose(saved.transform(x), t13.transform(x), atol=1e-12)


def test_compose_refusals_and_model_stamps(logs):
    ab = make(4, 6, source_model="A", target_model="B")
    bc = make(6, 5, source_model="B", target_model="C", seed=2)
    t = C.compose(ab, bc)
    assert (t.metadata["source_model"], t.metadata["target_model"]) == ("A", "C")

    with pytest.raises(InputError, match=r"maps 6 -> 5 dims but the second takes 4-dim"):
        C.compose(bc, ab)
    with pytest.raises(InputError, match="fitted with --normalize, so"):
        C.compose(ab, make(6, 5, normalize=True))
    xc = make(6, 5, source_model="X", target_model="C")
    with pytest.raises(InputError, match="'B'.*'X'.*pass --allow-model-mismatch if they"):
        C.compose(ab, xc)
    t = C.compose(ab, xc, allow_model_mismatch=True)
    assert t.metadata["model_mismatch"] == {"first_target_model": "B",
                                            "second_source_model": "X"}
    assert "different model stamps" in logs()
    # one side unstamped: not checkable, not refused; the known stamps still carried
    t = C.compose(ab, make(6, 5, target_model="C"))
    assert (t.metadata["source_model"], t.metadata["target_model"]) == ("A", "C")
    assert "cannot check" in logs()
    # structured stamps compare by value
    d1 = make(4, 6, target_model={"name": "m", "revision": "1"})
    d2 = make(6, 5, source_model={"name": "m", "revision": "2"})
    with pytest.raises(InputError, match="revision"):
        C.compose(d1, d2)
    with pytest.raises(InputError, match="NaN"):
        bad = make(4, 6)
        bad.source_mean[0] = np.nan
        C.compose(bad, bc)


# ---- invert -------------------------------------------------------------------------

def test_invert_exact_for_equal_dims():
    t = make(7, 7, source_model="old", target_model="new")
    inv = C.invert(t)
    x, y = rows(30, 7), rows(30, 7, seed=2)
    np.testing.assert_allclose(inv.transform(t.transform(x)), x, atol=1e-12)
    np.testing.assert_allclose(t.transform(inv.transform(y)), y, atol=1e-12)
    assert inv.scale == pytest.approx(1 / t.scale) and inv.dims == (7, 7)
    assert (inv.metadata["source_model"], inv.metadata["target_model"]) == ("new", "old")
    assert inv.metadata["inverse"]["kind"] == "exact"
    assert inv.metadata["inverse_of"]["digest"] == C.digest(t)
    assert inv.options["inverted"] is True and inv.metadata["n_pairs"] == 100
    back = C.invert(inv)
    np.testing.assert_allclose(back.transform(x), t.transform(x), atol=1e-12)
    assert back.options["inverted"] is False
    assert (back.metadata["source_model"], back.metadata["target_model"]) == ("old", "new")
    np.testing.assert_allclose(t.inverse().transform(t.transform(x)), x, atol=1e-12)


def test_invert_smaller_source_is_a_left_inverse():
    t = make(4, 9)
    inv = C.invert(t)
    assert inv.metadata["inverse"]["kind"] == "left-inverse"
    assert "projected" in inv.metadata["inverse"]["meaning"]
    x, y = rows(30, 4), rows(30, 9, seed=2)
    np.testing.assert_allclose(inv.transform(t.transform(x)), x, atol=1e-12)
    p = t.transform(inv.transform(y))  # y projected onto T's 4-dim affine image
    np.testing.assert_allclose(t.transform(inv.transform(p)), p, atol=1e-12)   # idempotent
    np.testing.assert_allclose((y - p) @ t.rotation.T, 0, atol=1e-12)         # orthogonal
    assert not np.allclose(p, y)


def test_invert_lossy_refused_unless_allowed():
    t = make(9, 4)
    with pytest.raises(InputError, match=r"keeps only 4 of the source's 9 dims.*Pass --allow-lossy to write"):
        C.invert(t)
    with pytest.raises(InputError, match="allow-lossy"):
        t.inverse()
    inv = C.invert(t, allow_lossy=True)
    assert inv.metadata["inverse"]["kind"] == "pseudo-inverse"
    y, x = rows(20, 4), rows(20, 9, seed=2)
    np.testing.assert_allclose(t.transform(inv.transform(y)), y, atol=1e-12)  # right inverse
    proj = inv.transform(t.transform(x))
    assert not np.allclose(proj, x)
    np.testing.assert_allclose(inv.transform(t.transform(proj)), proj, atol=1e-12)

    n = make(6, 6, normalize=True)
    with pytest.raises(InputError, match=r"x / \|\|x\|\|"):
        C.invert(n)
    inv = C.invert(n, allow_lossy=True)
    assert not inv.normalize and inv.metadata["inverse"]["kind"] == "inverse-up-to-norm"
    x = rows(20, 6) * 5
    np.testing.assert_allclose(inv.transform(n.transform(x)),
                               x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-12)


def test_invert_non_orthonormal_composition_uses_the_pseudo_inverse():
    t = C.compose(make(4, 9, seed=1), make(9, 5, seed=2))     # 4 -> 9 -> 5: not orthonormal
    assert not t.metadata["orthonormal"]
    inv = C.invert(t)                                          # rank 4 = dA: left inverse
    assert inv.metadata["inverse"]["kind"] == "left-inverse"
    x = rows(20, 4)
    np.testing.assert_allclose(inv.transform(t.transform(x)), x, atol=1e-9)


def test_invert_of_a_fit_keeps_its_statistics_swapped(pair):
    s, tg, *_ = pair(n=800, dim_a=5, dim_b=8)
    t = bigalign.fit(s, tg, center=True)
    inv = C.invert(t)
    m, w = t.statistics, inv.statistics
    np.testing.assert_array_equal(w.mean_a, m.mean_b)
    np.testing.assert_array_equal(w.cross, m.cross.T)
    assert (w.sq_a, w.sq_b, w.n) == (m.sq_b, m.sq_a, m.n)
    assert inv.metadata["inputs"]["source"] == t.metadata["inputs"]["target"]


def test_dual_read_rankings_match():
    """Old documents searched with inverse(q) rank as q among forward-mapped documents: by
    L2 distance, and by dot product once both sides are centred (docs/transforms.md)."""
    t = make(6, 9)
    inv = C.invert(t)
    docs, queries = rows(50, 6) + 3, rows(7, 9, seed=2) - 1
    fwd, back = t.transform(docs), inv.transform(queries)
    l2_new = ((queries[:, None, :] - fwd[None]) ** 2).sum(-1)
    l2_old = ((back[:, None, :] - docs[None]) ** 2).sum(-1)
    diff = l2_new - t.scale ** 2 * l2_old      # a constant per query: the same ranking
    np.testing.assert_allclose(diff, diff[:, :1].repeat(50, 1), atol=1e-9)
    dot_new = (queries - t.target_mean) @ (fwd - t.target_mean).T
    dot_old = (back - t.source_mean) @ (docs - t.source_mean).T
    np.testing.assert_allclose(dot_new, t.scale ** 2 * dot_old, atol=1e-9)


# ---- export: read back by hand, applied with plain numpy -----------------------------

def read_by_hand(path: Path, fmt: str) -> dict:
    """{direction: {matrix, source_mean, target_mean, normalize}} and the metadata, parsed
    without bigalign (safetensors from its documented byte layout)."""
    out = {}
    if fmt == "npz":
        with np.load(path) as z:          # allow_pickle=False: no pickles in the file
            assert str(z["format"]) == "bigalign.export/1"
            meta = json.loads(str(z["metadata"]))
            for d in ("forward", "inverse"):
                if f"{d}_matrix" in z.files:
                    out[d] = {k: z[f"{d}_{k}"] for k in
                              ("matrix", "source_mean", "target_mean", "normalize")}
    elif fmt == "json":
        doc = json.loads(path.read_text())
        assert doc["format"] == "bigalign.export/1" and doc["version"] == 1
        meta = doc["metadata"]
        for d in ("forward", "inverse"):
            if doc[d] is not None:
                out[d] = {k: np.array(doc[d][k], dtype=bool if k == "normalize" else
                                      meta["dtype"]) for k in
                          ("matrix", "source_mean", "target_mean", "normalize")}
                assert list(out[d]["matrix"].shape) == doc[d]["dims"]
    else:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        data = raw[8 + n:]
        assert (8 + n) % 8 == 0                                   # data 8-byte aligned
        spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and spans[-1][1] == len(data)      # no holes, no tail
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        types = {"F64": "<f8", "F32": "<f4", "BOOL": "?"}
        tensors = {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]],
                                    dtype=types[v["dtype"]]).reshape(v["shape"])
                   for k, v in header.items() if k != "__metadata__"}
        md = header["__metadata__"]
        assert md["format"] == "bigalign.export/1" and all(isinstance(v, str) for v in md.values())
        meta = json.loads(md["bigalign"])
        for d in ("forward", "inverse"):
            if f"{d}.matrix" in tensors:
                out[d] = {k: tensors[f"{d}.{k}"] for k in
                          ("matrix", "source_mean", "target_mean", "normalize")}
    return out, meta


def numpy_apply(arrays: dict, x: np.ndarray) -> np.ndarray:
    if arrays["normalize"]:
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return (x - arrays["source_mean"]) @ arrays["matrix"] + arrays["target_mean"]


@pytest.mark.parametrize("fmt", ["npz", "json", "safetensors"])
@pytest.mark.parametrize("dims", [(6, 6), (4, 7)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_export_applied_with_numpy_equals_transform(tmp_path, fmt, dims, dtype):
    t = make(*dims, source_model="old", target_model="new")
    path = tmp_path / f"t.{fmt}"
    r = T.export(t, path, dtype=dtype)
    assert r.format == fmt and r.bytes == path.stat().st_size and not r.nothing_to_do
    arrays, meta = read_by_hand(path, fmt)
    assert set(arrays) == {"forward", "inverse"}
    assert meta["dims"] == list(dims) and meta["dtype"] == dtype
    assert (meta["source_model"], meta["target_model"]) == ("old", "new")
    assert meta["inverse"]["kind"] == ("exact" if dims[0] == dims[1] else "left-inverse")
    inv = C.invert(t)
    x, y = rows(25, dims[0]), rows(25, dims[1], seed=2)
    if dtype == "float64":
        assert arrays["forward"]["matrix"].dtype == np.float64
        np.testing.assert_allclose(numpy_apply(arrays["forward"], x), t.transform(x),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(numpy_apply(arrays["inverse"], y), inv.transform(y),
                                   rtol=0, atol=1e-12)
    else:  # float32 arrays on float32 rows: apply's float32 arithmetic
        assert arrays["forward"]["matrix"].dtype == np.float32
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        np.testing.assert_allclose(numpy_apply(arrays["forward"], x32), t.transform(x32),
                                   rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(numpy_apply(arrays["inverse"], y32), inv.transform(y32),
                                   rtol=1e-6, atol=1e-5)
    assert T.export_metadata(path)["job"]["fingerprint"]["transform"] == C.digest(t)


@pytest.mark.parametrize("fmt", ["npz", "json", "safetensors"])
def test_export_lossy_inverse_left_out_unless_allowed(tmp_path, fmt):
    t = make(9, 4)
    r = T.export(t, tmp_path / f"a.{fmt}")
    arrays, meta = read_by_hand(tmp_path / f"a.{fmt}", fmt)
    assert set(arrays) == {"forward"} and r.inverse is None
    assert "--allow-lossy" in meta["inverse"]["omitted"] and "keeps only 4" in r.inverse_omitted
    r = T.export(t, tmp_path / f"b.{fmt}", allow_lossy=True)
    arrays, meta = read_by_hand(tmp_path / f"b.{fmt}", fmt)
    assert r.inverse == meta["inverse"]["kind"] == "pseudo-inverse"
    y = rows(10, 4)
    np.testing.assert_allclose(t.transform(numpy_apply(arrays["inverse"], y)), y, atol=1e-12)
    T.export(make(6, 6), tmp_path / f"c.{fmt}", inverse=False)
    arrays, meta = read_by_hand(tmp_path / f"c.{fmt}", fmt)
    assert set(arrays) == {"forward"} and "not requested" in meta["inverse"]["omitted"]
    # normalize=True: forward normalises, the inverse (up to the norm) only with allow_lossy
    n = make(5, 5, normalize=True)
    T.export(n, tmp_path / f"d.{fmt}", allow_lossy=True)
    arrays, _ = read_by_hand(tmp_path / f"d.{fmt}", fmt)
    x = rows(10, 5) * 4
    assert bool(arrays["forward"]["normalize"]) and not bool(arrays["inverse"]["normalize"])
    np.testing.assert_allclose(numpy_apply(arrays["forward"], x), n.transform(x), atol=1e-12)
    np.testing.assert_allclose(numpy_apply(arrays["inverse"], n.transform(x)),
                               x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-12)


def _run_snippet(snippet: str, x: np.ndarray) -> np.ndarray:
    ns = {"x": x}
    exec(compile(snippet, "<snippet>", "exec"), ns)
    return ns["y"]


def test_docs_snippets_run_verbatim(tmp_path, monkeypatch):
    """The numpy lines of docs/transforms.md, run exactly as written, equal
    Transform.transform -- both directions, normalised input, optional renormalise."""
    text = DOCS.read_text()
    for snippet in (T.NUMPY_SNIPPET, T.JSON_SNIPPET, T.SAFETENSORS_SNIPPET):
        assert snippet in text
    readme = (ROOT / "README.md").read_text()
    if "Transforms at query time" in readme:   # once the section is pasted into the README
        assert T.NUMPY_SNIPPET in readme
    monkeypatch.chdir(tmp_path)
    for t in (make(6, 8, seed=3), make(6, 6, normalize=True, seed=4)):
        T.export(t, "old2new.npz", allow_lossy=True, overwrite=True)
        T.export(t, "old2new.json", allow_lossy=True, overwrite=True)
        x = rows(20, 6) * 3
        y = t.transform(x)
        inv = C.invert(t, allow_lossy=True)
        np.testing.assert_allclose(_run_snippet(T.NUMPY_SNIPPET, x), y, atol=1e-12)
        np.testing.assert_allclose(_run_snippet(T.NUMPY_SNIPPET, x[0]), y[0], atol=1e-12)
        np.testing.assert_allclose(_run_snippet(T.JSON_SNIPPET, x), y, atol=1e-12)
        back = T.NUMPY_SNIPPET.replace('d = "forward"', 'd = "inverse"')
        np.testing.assert_allclose(_run_snippet(back, y), inv.transform(y), atol=1e-12)
        back = T.JSON_SNIPPET.replace('["forward"]', '["inverse"]')
        np.testing.assert_allclose(_run_snippet(back, y), inv.transform(y), atol=1e-12)
        renorm = T.NUMPY_SNIPPET.replace("# y = y /", "y = y /")
        assert renorm != T.NUMPY_SNIPPET
        np.testing.assert_allclose(_run_snippet(renorm, x), t.transform(x, renormalize=True),
                                   atol=1e-12)


def test_safetensors_package_reads_the_export(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    from safetensors.numpy import load_file

    t = make(5, 8, source_model="old", target_model={"name": "new", "dim": 8})
    T.export(t, tmp_path / "t.safetensors")
    loaded = load_file(str(tmp_path / "t.safetensors"))
    arrays, _ = read_by_hand(tmp_path / "t.safetensors", "safetensors")
    for d, values in arrays.items():
        for k, v in values.items():
            np.testing.assert_array_equal(loaded[f"{d}.{k}"], v)
    with safe_open(str(tmp_path / "t.safetensors"), "np") as f:
        md = f.metadata()
    assert md["source_model"] == "old" and json.loads(md["target_model"])["dim"] == 8
    monkeypatch.chdir(tmp_path)
    T.export(t, "old2new.safetensors")
    x = rows(10, 5)
    np.testing.assert_allclose(_run_snippet(T.SAFETENSORS_SNIPPET, x), t.transform(x),
                               atol=1e-12)


# ---- outputs: never a foreign file, never an input, atomic ---------------------------

def test_export_output_safety(tmp_path):
    t = make(4, 4)
    t.save(tmp_path / "t.transform")
    foreign = tmp_path / "mine.npz"
    foreign.write_bytes(b"user data")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not written by bigalign"):
            T.export(tmp_path / "t.transform", foreign, overwrite=overwrite)
    assert foreign.read_bytes() == b"user data"
    np.savez(tmp_path / "user.npz", matrix=np.eye(3))          # a real npz, not ours
    with pytest.raises(InputError, match="not written by bigalign"):
        T.export(t, tmp_path / "user.npz", overwrite=True)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        T.export(t, tmp_path / "folder.json", overwrite=True)
    with pytest.raises(InputError, match="same or nested"):
        T.export(tmp_path / "t.transform", tmp_path / "t.transform" / "x.npz")
    with pytest.raises(InputError, match="ends in .json but the format is npz"):
        T.export(t, tmp_path / "x.json", "npz")
    with pytest.raises(InputError, match=r"cannot tell the export format.*\(or \.npy"):
        T.export(t, tmp_path / "x.bin")
    with pytest.raises(InputError, match="ends in .npy but the format is json"):
        T.export(t, tmp_path / "x.npy", "json")
    # float16 is an export dtype of vectors (Parquet), not of a transform: said so
    with pytest.raises(InputError, match=r"float16.*Parquet, not for a transform"):
        T.export(t, tmp_path / "x.npz", dtype="float16")
    with pytest.raises(InputError, match="unknown export format"):
        T.export(t, tmp_path / "x.bin", "csv")

    out = tmp_path / "t.safetensors"
    T.export(tmp_path / "t.transform", out)
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    r = T.export(tmp_path / "t.transform", out)                 # same job: a no-op
    assert r.nothing_to_do and (out.read_bytes(), out.stat().st_mtime_ns) == before
    with pytest.raises(InputError, match="pass --overwrite to replace it"):
        T.export(tmp_path / "t.transform", out, dtype="float32")
    r = T.export(tmp_path / "t.transform", out, dtype="float32", overwrite=True)
    assert not r.nothing_to_do and read_by_hand(out, "safetensors")[1]["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "folder.json", "mine.npz", "t.safetensors", "t.transform", "user.npz"]


def test_compose_invert_output_safety(tmp_path):
    make(4, 6).save(tmp_path / "ab")
    make(6, 5, seed=2).save(tmp_path / "bc")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not written by bigalign"):
        C.compose(tmp_path / "ab", tmp_path / "bc", output=tmp_path / "user", overwrite=True)
    with pytest.raises(InputError, match="not written by bigalign"):
        C.invert(tmp_path / "ab", output=tmp_path / "user", overwrite=True)
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep"
    with pytest.raises(InputError, match="same or nested"):
        C.compose(tmp_path / "ab", tmp_path / "bc", output=tmp_path / "bc")
    with pytest.raises(InputError, match="same or nested"):
        C.invert(str(tmp_path / "ab") + "/", output=tmp_path / "ab")
    C.compose(tmp_path / "ab", tmp_path / "bc", output=tmp_path / "ac")
    C.compose(tmp_path / "ab", tmp_path / "bc", output=tmp_path / "ac")   # no-op rerun
    with pytest.raises(InputError, match="other inputs.*--overwrite"):
        C.invert(tmp_path / "ab", output=tmp_path / "ac")
    C.invert(tmp_path / "ab", output=tmp_path / "ac", overwrite=True)
    assert Transform.load(tmp_path / "ac").metadata["kind"] == "inverse"


def test_export_crash_leaves_no_file_under_the_name(tmp_path, monkeypatch):
    t = make(6, 6)
    out = tmp_path / "t.npz"

    def broken(f, meta, directions):
        f.write(b"PK\x03\x04 half a file")
        raise RuntimeError("disk full")

    monkeypatch.setitem(T.__dict__, "_write_npz", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        T.export(t, out)
    assert list(tmp_path.iterdir()) == []                      # nothing, not even a temp
    monkeypatch.undo()
    T.export(t, out)
    good = out.read_bytes()
    monkeypatch.setitem(T.__dict__, "_write_npz", broken)
    with pytest.raises(RuntimeError):
        T.export(make(6, 6, seed=9), out, overwrite=True)
    assert out.read_bytes() == good                            # the old export intact


@pytest.mark.slow
def test_export_killed_midway(tmp_path):
    """SIGKILL while writing: no file under the name (only a hidden temporary), and the
    rerun writes the export."""
    make(6, 6).save(tmp_path / "t.transform")
    code = textwrap.dedent(f"""
        import os, signal, sys
        from bigalign.commands import map_export as T
        def dying(f, meta, directions):
            f.write(b"{{\\"format\\": half")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        T._write_json = dying
        T.export({str(tmp_path / "t.transform")!r}, {str(tmp_path / "t.json")!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "t.json" not in names
    assert any(re.fullmatch(r"\.t\.json\..*\.bigalign-tmp", n) for n in names), names
    assert main(["export", str(tmp_path / "t.transform"), "-o", str(tmp_path / "t.json"),
                 "-q"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["forward"]["dims"] == [6, 6]


def test_export_to_an_fsspec_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    t = make(4, 6)
    r = T.export(t, "memory://bigalign-export-test/t.npz")
    try:
        with fs.open("/bigalign-export-test/t.npz", "rb") as f:
            with np.load(f) as z:
                x = rows(5, 4)
                np.testing.assert_allclose(
                    numpy_apply({k: z[f"forward_{k}"] for k in
                                 ("matrix", "source_mean", "target_mean", "normalize")}, x),
                    t.transform(x), atol=1e-12)
        assert fs.ls("/bigalign-export-test", detail=False) == ["/bigalign-export-test/t.npz"]
        assert T.export(t, "memory://bigalign-export-test/t.npz").nothing_to_do
        assert r.bytes == fs.size("/bigalign-export-test/t.npz")
    finally:
        fs.rm("/bigalign-export-test", recursive=True)


def test_json_size_warning(tmp_path, monkeypatch, logs):
    monkeypatch.setattr(T, "JSON_WARN_BYTES", 1000)
    T.export(make(8, 8), tmp_path / "t.json")
    assert "JSON export will be about" in logs()
    T.export(make(8, 8), tmp_path / "t.npz")
    assert logs().count("JSON export") == 1


def test_a_saved_composition_that_lost_a_chunk_is_not_a_noop(tmp_path):
    """compose/invert rerun over their finished output: a no-op only while it is intact; a
    deleted chunk is refused (DamagedOutputError naming it), --overwrite writes it again."""
    ab, bc = make(5, 5, seed=1), make(5, 8, seed=2)
    out = tmp_path / "ac"
    C.compose(ab, bc, output=out)
    os.remove(out / "rotation" / "c" / "0" / "0")
    with pytest.raises(bigalign.DamagedOutputError, match="rotation/c/0/0.*--overwrite"):
        C.compose(ab, bc, output=out)
    with pytest.raises(bigalign.DamagedOutputError, match="damaged bigalign transform"):
        Transform.load(out)
    C.compose(ab, bc, output=out, overwrite=True)
    np.testing.assert_array_equal(Transform.load(out).rotation, C.compose(ab, bc).rotation)


# ---- command line -------------------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_round_trip(tmp_path, capsys, monkeypatch, logs):
    ab = make(5, 5, source_model="A", target_model="B", seed=1)
    bc = make(5, 8, source_model="B", target_model="C", seed=2)
    ab.save(tmp_path / "ab")
    bc.save(tmp_path / "bc")
    x = rows(20, 5)

    code, out, err = run(capsys, "compose", tmp_path / "ab", tmp_path / "bc", "-o",
                         tmp_path / "ac")
    assert code == 0, err
    assert "5 -> 5 -> 8 as one 5 -> 8 map, models A -> C" in out and "neither fit" in out
    ac = Transform.load(tmp_path / "ac")
    np.testing.assert_allclose(ac.transform(x), bc.transform(ab.transform(x)), atol=1e-12)
    code, _, err = run(capsys, "compose", tmp_path / "ab", tmp_path / "bc", "-o", tmp_path / "ac")
    assert code == 0 and "nothing to do" in logs()

    code, out, err = run(capsys, "invert", tmp_path / "ab", "-o", tmp_path / "ba")
    assert code == 0 and "exact" in out and "models B -> A" in out, err
    np.testing.assert_allclose(Transform.load(tmp_path / "ba").transform(ab.transform(x)), x,
                               atol=1e-12)
    code, out, _ = run(capsys, "invert", tmp_path / "ac", "-o", tmp_path / "ca")
    assert code == 0 and "left inverse on the fitted subspace" in out

    monkeypatch.chdir(tmp_path)
    for fmt in ("npz", "json", "safetensors"):
        code, out, err = run(capsys, "export", "ac", "-o", f"ac.{fmt}")
        assert code == 0, err
        assert f"wrote ac.{fmt} ({fmt}, float64" in out and "models A -> C" in out
        assert "inverse: 8 -> 5 (new -> old: queries), left inverse on the fitted subspace" in out
        arrays, meta = read_by_hand(tmp_path / f"ac.{fmt}", fmt)
        np.testing.assert_allclose(numpy_apply(arrays["forward"], x), ac.transform(x),
                                   atol=1e-12)
        if fmt != "safetensors" or _has_safetensors():   # the printed lines, run as printed
            printed = out.split("plain numpy (x: rows of the source model):\n")[1]
            np.testing.assert_allclose(_run_snippet(textwrap.dedent(printed), x),
                                       ac.transform(x), atol=1e-12)
    code, out, _ = run(capsys, "export", "ac", "-o", "ac.npz", "-q")  # a rerun: a warning
    assert code == 0 and out == "" and "ac.npz is already an export" in logs()
    code, _, _ = run(capsys, "export", "ac", "-o", "ac.bin", "--format", "npy", "--dtype",
                     "float32", "--no-inverse")
    assert code == 0 and read_by_hand(tmp_path / "ac.bin", "npz")[1]["inverse"]["omitted"]
    # a .npy name is the npz archive (the alias npy), with or without --format npy
    for extra in ((), ("--format", "npy")):
        code, out, err = run(capsys, "export", "ac", "-o", "ac.npy", *extra)  # 2nd: no-op
        assert code == 0 and "ac.npy (npz, float64" in out, err
        arrays, _ = read_by_hand(tmp_path / "ac.npy", "npz")
        np.testing.assert_allclose(numpy_apply(arrays["forward"], x), ac.transform(x),
                                   atol=1e-12)


def _has_safetensors() -> bool:
    import importlib.util

    return importlib.util.find_spec("safetensors") is not None


def test_cli_refusals_exit_2(tmp_path, capsys):
    make(9, 4).save(tmp_path / "big")
    make(6, 6, normalize=True).save(tmp_path / "norm")
    (tmp_path / "mine.json").write_text("{}")
    cases = [
        (("compose", tmp_path / "big", tmp_path / "norm", "-o", tmp_path / "x"),
         "maps 9 -> 4 dims but the second takes 6-dim"),
        (("compose", tmp_path / "norm", tmp_path / "norm", "-o", tmp_path / "x"),
         "fitted with --normalize"),
        (("invert", tmp_path / "big", "-o", tmp_path / "x"), "--allow-lossy"),
        (("invert", tmp_path / "norm", "-o", tmp_path / "x"), "only the direction"),
        (("invert", tmp_path / "nothing", "-o", tmp_path / "x"), "no transform at"),
        (("export", tmp_path / "big", "-o", tmp_path / "mine.json", "--overwrite"),
         "not written by bigalign"),
        (("export", tmp_path / "big", "-o", tmp_path / "big" / "x.npz"), "same or nested"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists() and (tmp_path / "mine.json").read_text() == "{}"
    code, out, err = run(capsys, "invert", tmp_path / "big", "-o", tmp_path / "x",
                         "--allow-lossy")
    assert code == 0 and "pseudo-inverse" in out


@pytest.mark.parametrize("command", ["export", "compose", "invert"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--overwrite" in out and "docs/transforms.md" in out
    assert {"export": "--allow-lossy", "compose": "--allow-model-mismatch",
            "invert": "--allow-lossy"}[command] in out


def test_info_describes_a_composed_transform(tmp_path, capsys):
    make(4, 6).save(tmp_path / "ab")
    make(6, 5, seed=2).save(tmp_path / "bc")
    C.compose(tmp_path / "ab", tmp_path / "bc", output=tmp_path / "ac")
    assert main(["info", str(tmp_path / "ac")]) == 0
