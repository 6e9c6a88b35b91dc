"""Provenance of mapped vectors (issue 17, item 7): what an apply writes is recorded as
"mapped from A into B's space by transform DIGEST (family, centred, target-centred)", in the
output, through the Parquet and Lance exports and back through import; ``info`` says so;
mixing mapped vectors with native ones where that is wrong is refused or warned.

Oracles: the transform's digest recomputed here with hashlib from its arrays (as its
docstring defines it), the mapped rows recomputed in numpy float64, the record compared as
a dict and as canonical JSON text (bit for bit)."""

from __future__ import annotations

import glob
import hashlib
import json

import numpy as np
import pytest
import zarr

from conftest import cli, write_zarr

ROWS, DA, DB, CHUNK = 600, 16, 16, 100


def _sha256(t) -> str:
    """Transform.digest()'s definition, recomputed: rotation, means (float64), then
    repr((scale, normalize))."""
    h = hashlib.sha256()
    for a in (t.rotation, t.source_mean, t.target_mean):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    h.update(repr((t.scale, t.normalize)).encode())
    return h.hexdigest()


def _store(path, x, model):
    from bigalign.storage.embedding_store import create_store

    g = create_store(str(path), rows=len(x), dim=x.shape[1], dtype=x.dtype, chunk_rows=CHUNK,
                     ids_kind="string", model=model)
    g["embeddings"][:] = x
    g["ids"][:] = np.asarray([f"doc-{i}" for i in range(len(x))])
    g.attrs["bigalign"] = dict(g.attrs["bigalign"], complete=True)
    return str(path)


@pytest.fixture
def world(tmp_path):
    """Model A and model B (16-d) stores of the same 600 texts, B a planted
    rotation of A plus a large common offset and noise; a centred transform fitted A -> B."""
    import bigalign

    rng = np.random.default_rng(7)
    a = rng.standard_normal((ROWS, DA)) + 0.5
    q = np.linalg.qr(rng.standard_normal((DB, DB)))[0][:DA]  # (DA, DB) orthonormal rows
    b = a @ q + 3.0 + 0.05 * rng.standard_normal((ROWS, DB))
    src = _store(tmp_path / "a.store", a.astype(np.float32), "model-a")
    tgt = _store(tmp_path / "b.store", b.astype(np.float32), "model-b")
    t = bigalign.fit(src, tgt, center=True)
    t.save(str(tmp_path / "ab.transform"))
    return {"tmp": tmp_path, "src": src, "tgt": tgt, "t": t, "a": a.astype(np.float32),
            "T": str(tmp_path / "ab.transform")}


def _expected(w, target_centred=True, renormalized=False) -> dict:
    t = w["t"]
    return {"from_model": "model-a", "to_model": "model-b", "transform_sha256": _sha256(t),
            "family": t.options.get("family") or "orthogonal", "centred": True,
            "target_centred": target_centred, "renormalized": renormalized,
            "normalize": False}


def _apply(w, name="mapped.store", *extra, check=0):
    out = str(w["tmp"] / name)
    p = cli("apply", w["T"], w["src"], "-o", out, *extra, check=check)
    return out, p


def _sentence(w, centred_word="target-centred") -> str:
    t = w["t"]
    return (f"mapped from model-a into model-b's space by transform {_sha256(t)[:12]} "
            f"({t.options.get('family') or 'orthogonal'}, centred, {centred_word})")


# ---- the record in the output, and info ---------------------------------------------------

def test_apply_records_target_centred_provenance_and_info_says_so(world):
    w = world
    out, _ = _apply(w, "mapped.store", "--target-centred")
    attrs = zarr.open_group(out, mode="r").attrs["bigalign"]
    assert attrs["mapped"] == _expected(w)
    # the record tells the truth: the rows are in B's centred space (no target mean)
    t = w["t"]
    want = (w["a"].astype(np.float64) - t.source_mean) * t.scale @ t.rotation
    got = zarr.open_group(out, mode="r")["embeddings"][:]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(t.target_mean).max() > 1  # a large offset left out: it matters here
    text = cli("info", out, check=0).stdout
    assert f"mapped vectors: {_sentence(w)}" in text
    assert "model-b's centred space" in text and "minus that mean" in text
    info = json.loads(cli("info", out, "--json", check=0).stdout)
    assert info["mapped"] == _expected(w)


def test_apply_without_target_centring_and_to_a_bare_array(world):
    import bigalign

    w = world
    out, _ = _apply(w, "plain.store", "--renormalize")
    assert zarr.open_group(out, mode="r").attrs["bigalign"]["mapped"] == \
        _expected(w, target_centred=False, renormalized=True)
    text = cli("info", out, check=0).stdout
    assert _sentence(w, "renormalised") in text and "centred space" not in text
    # a bare array in, a bare array out (no models anywhere): the record is on the array
    bare_in = write_zarr(w["tmp"] / "a.zarr", w["a"], CHUNK)
    t = bigalign.Transform(w["t"].rotation, w["t"].source_mean, w["t"].target_mean,
                           options={"center": True, "family": "orthogonal"})
    bigalign.apply(t, bare_in, str(w["tmp"] / "o.zarr"), target_centred=True)
    rec = zarr.open_array(str(w["tmp"] / "o.zarr"), mode="r").attrs["bigalign"]["mapped"]
    assert rec["from_model"] is None and rec["to_model"] is None and rec["target_centred"]
    assert rec["transform_sha256"] == _sha256(t)
    text = cli("info", w["tmp"] / "o.zarr", check=0).stdout
    assert "mapped from an unrecorded model into the target model's space" in text
    # an uncentred map has no target mean to leave out: not recorded as target-centred
    flat = bigalign.Transform(w["t"].rotation, np.zeros(DA), np.zeros(DB))
    bigalign.apply(flat, bare_in, str(w["tmp"] / "f.zarr"), target_centred=True)
    rec = zarr.open_array(str(w["tmp"] / "f.zarr"), mode="r").attrs["bigalign"]["mapped"]
    assert rec["target_centred"] is False and rec["centred"] is False


# ---- through the exports and back ---------------------------------------------------------

def _parquet_meta(path) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_metadata(path).metadata[b"bigalign"])


def test_parquet_export_and_import_keep_the_record_bit_for_bit(world):
    import bigalign
    from bigalign.storage.embedding_store import open_store

    w = world
    out, _ = _apply(w, "mapped.store", "--target-centred")
    record = zarr.open_group(out, mode="r").attrs["bigalign"]["mapped"]
    folder = w["tmp"] / "mapped.parquet"
    p = cli("export", out, "--format", "parquet", "-o", folder, "--rows-per-file", "200",
            check=0)
    assert "centred space" in p.stderr  # exporting target-centred vectors: warned
    parts = sorted(glob.glob(str(folder / "*.parquet")))
    assert len(parts) == 3
    for part in parts:
        assert json.dumps(_parquet_meta(part)["mapped"], sort_keys=True) == \
            json.dumps(record, sort_keys=True)
    assert f"mapped vectors: {_sentence(w)}" in cli("info", folder, check=0).stdout
    assert json.loads(cli("info", folder, "--json", check=0).stdout)["mapped"] == record
    back = str(w["tmp"] / "back.store")
    cli("import", str(folder / "*.parquet"), "-o", back, "--ids-column", "id", check=0)
    got = zarr.open_group(back, mode="r").attrs["bigalign"]["mapped"]
    assert got == record and json.dumps(got, sort_keys=True) == json.dumps(record,
                                                                          sort_keys=True)
    assert f"mapped vectors: {_sentence(w)}" in cli("info", back, check=0).stdout
    emb, _, model = open_store(back)
    assert model == "model-b"
    src = zarr.open_group(out, mode="r")["embeddings"][:]
    assert np.array_equal(emb[:].view(np.uint8), src.view(np.uint8))
    # a re-import is still mapped: applying the transform to it again is refused, and so
    # is a B -> C map (the stamp says model-b, but they are not model-b's own vectors)
    p = cli("apply", w["T"], back, "-o", w["tmp"] / "again.store", check=2)
    assert "this very transform mapped them already" in p.stderr
    bc = bigalign.Transform(np.eye(DB), np.full(DB, 0.1), np.zeros(DB),
                            metadata={"source_model": "model-b", "target_model": "model-c"})
    bc.save(str(w["tmp"] / "bc.transform"))
    p = cli("apply", w["tmp"] / "bc.transform", back, "-o", w["tmp"] / "c.store", check=2)
    assert "they are in model-b's centred space" in p.stderr
    assert "--allow-model-mismatch" in p.stderr


def test_lance_export_and_import_keep_the_record(world):
    lance = pytest.importorskip("lance", reason="pylance is not installed")
    w = world
    out, _ = _apply(w, "mapped.store", "--target-centred")
    record = zarr.open_group(out, mode="r").attrs["bigalign"]["mapped"]
    ds_path = w["tmp"] / "mapped.lance"
    cli("export", out, "--format", "lance", "-o", ds_path, check=0)
    meta = json.loads(lance.dataset(str(ds_path)).schema.metadata[b"bigalign"])
    assert json.dumps(meta["mapped"], sort_keys=True) == json.dumps(record, sort_keys=True)
    text = cli("info", ds_path, check=0).stdout
    assert text.startswith("Lance export") and f"mapped vectors: {_sentence(w)}" in text
    back = str(w["tmp"] / "back.store")
    cli("import", ds_path, "-o", back, "--ids-column", "id", check=0)
    assert zarr.open_group(back, mode="r").attrs["bigalign"]["mapped"] == record


def test_import_mixing_mapped_and_native_files_warns_and_records_nothing(world):
    w = world
    out, _ = _apply(w, "mapped.store", "--target-centred")
    cli("export", out, "--format", "parquet", "-o", w["tmp"] / "m.parquet", check=0)
    cli("export", w["tgt"], "--format", "parquet", "-o", w["tmp"] / "n.parquet", check=0)
    files = glob.glob(str(w["tmp"] / "m.parquet" / "*.parquet")) + \
        glob.glob(str(w["tmp"] / "n.parquet" / "*.parquet"))
    p = cli("import", *files, "-o", w["tmp"] / "mixed.store", check=0)
    assert "mix vectors mapped from model-a" in p.stderr and "native vectors" in p.stderr
    assert "centred space" in p.stderr
    assert zarr.open_group(str(w["tmp"] / "mixed.store"), mode="r") \
        .attrs["bigalign"]["mapped"] is None
    # native files alone: nothing recorded, nothing said
    p = cli("import", *files[-1:], "-o", w["tmp"] / "native.store", check=0)
    assert "mapped" not in p.stderr
    assert "mapped vectors" not in cli("info", w["tmp"] / "native.store", check=0).stdout


# ---- refusals and warnings ---------------------------------------------------------------

def test_apply_to_mapped_vectors_is_refused_unless_allowed(world):
    import bigalign

    w = world
    out, _ = _apply(w, "mapped.store")
    p = cli("apply", w["T"], out, "-o", w["tmp"] / "twice.store", check=2)
    assert "this very transform mapped them already" in p.stderr
    assert "--allow-model-mismatch" in p.stderr
    # the same through STORE/embeddings (a bare array path inside the store)
    p = cli("apply", w["T"], out + "/embeddings", "-o", w["tmp"] / "twice.zarr", check=2)
    assert "mapped them already" in p.stderr
    p = cli("apply", w["T"], out, "-o", w["tmp"] / "twice.store", "--allow-model-mismatch",
            check=0)
    assert "mapped them already" in p.stderr  # still said, as a warning
    rec = zarr.open_group(str(w["tmp"] / "twice.store"), mode="r").attrs["bigalign"]["mapped"]
    assert rec["chained_from"] == _expected(w, target_centred=False)
    assert "after being mapped from model-a" in cli("info", w["tmp"] / "twice.store",
                                                    check=0).stdout
    # a transform with no models recorded: cannot tell a chain from a mistake, refused
    anon = bigalign.Transform(np.eye(DB), np.zeros(DB), np.zeros(DB))
    anon.save(str(w["tmp"] / "anon.transform"))
    p = cli("apply", w["tmp"] / "anon.transform", out, "-o", w["tmp"] / "x.store", check=2)
    assert "chains two maps" in p.stderr and "bigalign compose" in p.stderr
    # the inverse (recorded as mapping model-b's space): a deliberate chain, only warned
    w["t"].inverse().save(str(w["tmp"] / "ba.transform"))
    p = cli("apply", w["tmp"] / "ba.transform", out, "-o", w["tmp"] / "back.store", check=0)
    assert "chains two maps" in p.stderr
    rec = zarr.open_group(str(w["tmp"] / "back.store"), mode="r").attrs["bigalign"]["mapped"]
    assert (rec["from_model"], rec["to_model"]) == ("model-b", "model-a")
    assert rec["chained_from"] == _expected(w, target_centred=False)
    np.testing.assert_allclose(zarr.open_group(str(w["tmp"] / "back.store"), mode="r")
                               ["embeddings"][:], w["a"], atol=1e-4)


def test_fit_warns_when_a_side_holds_mapped_vectors(world):
    w = world
    out, _ = _apply(w, "mapped.store", "--target-centred")
    p = cli("fit", w["src"], out, "-o", w["tmp"] / "imitate.transform", check=0)
    assert f"target {out!r} holds vectors {_sentence(w)}" in p.stderr
    assert "not vectors embedded with model-b" in p.stderr and "imitate" in p.stderr
    assert "centred space" in p.stderr
    p = cli("fit", w["src"], w["tgt"], "-o", w["tmp"] / "native.transform", check=0)
    assert "holds vectors mapped" not in p.stderr


def test_evaluate_retrieval_warns_on_a_mapped_native(world, tmp_path, caplog):
    import polars as pl

    from bigalign.commands.retrieval import evaluate_retrieval

    w = world
    out, _ = _apply(w, "mapped.store", "--target-centred")
    qrels = pl.DataFrame({"query_id": list(range(50)), "doc_id": list(range(50))})
    with caplog.at_level("WARNING", logger="bigalign"):
        evaluate_retrieval(w["T"], w["src"], w["tgt"], qrels, native=out, pair_by="rows",
                           max_queries=50)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"native queries {out!r} holds vectors mapped from model-a" in said
    assert "model-b's centred space" in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="bigalign"):
        evaluate_retrieval(w["T"], w["src"], w["tgt"], qrels, native=w["tgt"],
                           pair_by="rows", max_queries=50)
    assert "holds vectors mapped" not in " ".join(r.getMessage() for r in caplog.records)


def test_sentence_of_a_partial_record_from_an_older_apply():
    from bigalign.storage.provenance import record_of, sentence

    old = {"kind": "embedding-store", "made_by": "apply", "transform": "ab" * 32,
           "target_centred": True, "source_rows": [0, 5]}
    rec = record_of(dict(old, model="model-b"))
    assert rec["transform_sha256"] == "ab" * 32 and rec["target_centred"] is True
    assert rec["from_model"] is None and rec["family"] is None
    assert sentence(rec) == ("mapped from an unrecorded model into model-b's space by "
                             "transform abababababab (family not recorded, target-centred)")
    assert record_of({"kind": "embedding-store", "made_by": "import"}) is None
