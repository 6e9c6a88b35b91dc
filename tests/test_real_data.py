"""Real embeddings of real text by two different real models (../shared/data): a streamed
fit on a training split must give held-out cross-model retrieval far above chance, and
centring must matter where the data says it does. Margins below are ~0.05-0.1 under what
was measured (e5-small -> MiniLM, 1,000 train / 500 held out: recall@1 0.22 uncentred,
0.80 centred among raw MiniLM vectors, 0.96 centred with means removed)."""

import numpy as np
import pytest
import zarr

import bigalign
from conftest import load_shared, write_zarr


def recall_at_1(queries, docs):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    return float(np.mean(np.argmax(q @ d.T, axis=1) == np.arange(len(q))))


@pytest.fixture(scope="module")
def e5_minilm(tmp_path_factory):
    a = load_shared("e5small_docs.npy")
    b = load_shared("minilm_docs.npy")[: len(a)]
    tmp = tmp_path_factory.mktemp("real")
    return write_zarr(tmp / "e5.zarr", a, 256), write_zarr(tmp / "minilm.zarr", b, 256), a, b, tmp


def test_e5_to_minilm_held_out_recall(e5_minilm, caplog):
    s, t, a, b, tmp = e5_minilm
    held = slice(1000, 1500)
    truth = b[held].astype(np.float32)
    assert recall_at_1(a[held, :384].astype(np.float32), truth) < 0.02  # unaligned: chance

    plain = bigalign.fit(s, t, rows="0:1000", center=False)
    assert "the means carry" in caplog.text  # an uncentred fit says what it costs
    assert recall_at_1(plain.transform(a[held]), truth) < 0.35

    centred = bigalign.fit(s, t, rows="0:1000", output=str(tmp / "t"))  # centred by default
    assert centred.options["center"] is True
    bigalign.apply(str(tmp / "t"), s, str(tmp / "aligned.zarr"))
    mapped = zarr.open_array(str(tmp / "aligned.zarr"))[held]
    r_raw = recall_at_1(mapped, truth)
    r_centred = recall_at_1(mapped - centred.target_mean, truth - centred.target_mean)
    assert r_raw > 0.70
    assert r_centred > 0.90
    d = centred.metadata["discrepancy"]
    assert d["achieved_residual"] <= d["bound_residual"]


def test_dimension_mismatch_static64_to_minilm(tmp_path):
    a = load_shared("static64_docs.npy")
    b = load_shared("minilm_docs.npy")
    s, t = write_zarr(tmp_path / "s.zarr", a, 1000), write_zarr(tmp_path / "m.zarr", b, 1000)
    tr = bigalign.fit(s, t, rows="0:8000", center=True)
    assert tr.rotation.shape == (64, 384)
    np.testing.assert_allclose(tr.rotation @ tr.rotation.T, np.eye(64), atol=1e-10)
    held = slice(8000, 10000)
    y = tr.transform(a[held])
    truth = b[held].astype(np.float32)
    # measured 0.39 (the 64-d static model is weak on its own); chance is 0.0005
    assert recall_at_1(y - tr.target_mean, truth - tr.target_mean) > 0.30


def test_real_data_folder_comes_from_the_environment_and_skips_say_where(tmp_path):
    """BIGALIGN_SHARED_DATA names the samples' folder; a test whose sample is absent skips
    with a reason that names the folder looked in and the variable (pytest -ra prints it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    np.save(tmp_path / "e5small_docs.npy", np.arange(6.0).reshape(2, 3))
    tests = Path(__file__).resolve().parent
    code = ("import conftest, pytest\n"
            "print(conftest.SHARED_DATA)\n"
            "print(conftest.load_shared('e5small_docs.npy').tolist())\n"
            "try:\n    conftest.load_shared('absent.npy')\n"
            "except pytest.skip.Exception as e:\n    print('SKIP', e.msg)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, BIGALIGN_SHARED_DATA=str(tmp_path)))
    assert p.returncode == 0, p.stderr
    folder, loaded, skipped = p.stdout.splitlines()
    assert folder == str(tmp_path)
    assert loaded == str(np.arange(6.0).reshape(2, 3).tolist())
    assert skipped.startswith("SKIP real embedding sample absent.npy not in ")
    assert str(tmp_path) in skipped and "BIGALIGN_SHARED_DATA=FOLDER" in skipped
