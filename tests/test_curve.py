"""bigalign.commands.curve: training sizes, saturation, every size equal to a separate fit, and the
curve by ids equal to the curve of the explicitly joined arrays."""

from __future__ import annotations

import numpy as np
import pytest

from bigalign import InputError
from bigalign.commands.curve import default_sizes, learning_curve
from bigalign.commands.evaluate import evaluate_maps
from bigalign.maths.metrics import AffineMap, Method
from bigalign.maths.solve import procrustes
from bigalign.maths.stats import block_moments
from conftest import make_store, reference_join
from evaluation_reference import pairs

# the 4-bit e5 vectors are numerically rank 381 of 384: expected, and said by the fit
pytestmark = pytest.mark.filterwarnings("ignore::bigalign.maths.solve.NotUniqueWarning")


def test_default_sizes():
    assert default_sizes(50) == [50]
    assert default_sizes(1000) == [100, 300, 1000]
    assert default_sizes(45_000) == [100, 300, 1000, 3000, 10_000, 30_000, 45_000]


def test_learning_curve_saturates_on_easy_data_and_matches_separate_fits(caplog):
    import logging

    a, b = pairs(3000, 8, 8, noise=0.05, seed=14)
    with caplog.at_level(logging.INFO, logger="bigalign"):
        res = learning_curve(a, b, (0, 2500), (2500, 3000), sizes=[20, 100, 500, 2500],
                             center=True, dtype="float64", block_rows=128)
    # its log lines name the command that runs ('bigalign: curve: ...', not 'evaluate:')
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("curve: 500 held-out pairs (rows 2500:3000)") for m in said), said
    assert not any(m.startswith("evaluate:") for m in said), said
    orth = [p for p in res["points"] if p["name"] == "orthogonal"]
    assert [p["pairs"] for p in orth] == [20, 100, 500, 2500]
    assert res["saturation"]["pairs"] is not None and res["saturation"]["pairs"] <= 500
    # each size equals a separate fit on that prefix
    m = block_moments(a[:100], b[:100], gram=True, dtype=np.float64)
    single = evaluate_maps([Method("x", AffineMap(procrustes(m, center=True).rotation,
                                                   m.mean_a, m.mean_b))],
                           a, b, (2500, 3000), dtype="float64")
    assert single["methods"][0]["retrieval"] == orth[1]["retrieval"]
    assert all(p["diagnostics"]["bound_holds"] for p in orth)
    with pytest.raises(InputError, match="overlap"):
        learning_curve(a, b, (0, 2500), (2000, 3000))
    with pytest.raises(InputError, match="sizes"):
        learning_curve(a, b, (0, 2500), (2500, 3000), sizes=[5000])


def test_curve_by_ids_equals_the_curve_of_the_joined_arrays(tmp_path):
    """Shuffled target, ids missing on both sides and a duplicate: the curve by ids on
    positions of the matched pairs equals the curve on the arrays joined in plain Python."""
    a, b = pairs(1600, 8, 8, noise=0.2, seed=15)
    a, b = a.astype(np.float32), b.astype(np.float32)
    rng = np.random.default_rng(15)
    ids_a = rng.choice(10**9, 1600, replace=False)                  # int ids
    keep = rng.permutation(1600)[:1300]
    ids_b = np.concatenate([ids_a[keep], rng.choice(10**6, 25, replace=False) - 10**6])
    vec_b = np.concatenate([b[keep], rng.standard_normal((25, 8)).astype(np.float32)])
    ids_b = np.concatenate([ids_b, ids_b[:1]])                      # an id twice
    vec_b = np.concatenate([vec_b, vec_b[5:6]])
    order = rng.permutation(len(ids_b))
    s = make_store(tmp_path / "a.store", a, ids_a, chunk=128)
    t = make_store(tmp_path / "b.store", vec_b[order], ids_b[order], chunk=96)
    kw = dict(sizes=[20, 200, 800], center=True, dtype="float64", block_rows=128)
    with pytest.raises(InputError, match="occur more than once"):
        learning_curve(s, t, "0:800", "900:1200", **kw)
    got = learning_curve(s, t, "0:800", "900:1200", duplicates="last", **kw)
    ref = np.array(reference_join(ids_a, ids_b[order], "last"))
    x, y = a[ref[:, 0]], vec_b[order][ref[:, 1]]
    want = learning_curve(np.concatenate([x[:800], x[900:1200]]),
                          np.concatenate([y[:800], y[900:1200]]), (0, 800), (800, 1100), **kw)
    assert got["pairing"] == {"by": "ids", "duplicates": "last", "matched": len(ref),
                              "source_only": 1600 - len(ref), "target_only": 25,
                              "duplicates_dropped": {"target": 1}}
    assert got["train_rows"] == [0, 800] and got["rows"] == [900, 1200]
    assert got["saturation"] == want["saturation"]
    for p, q in zip(got["points"], want["points"]):
        assert (p["name"], p["pairs"]) == (q["name"], q["pairs"])
        assert p["retrieval"] == q["retrieval"]
        assert p["relative_residual"] == pytest.approx(q["relative_residual"], rel=1e-9)
    # --pair-by rows: row i with row i, refused here (the stores differ in length)
    with pytest.raises(InputError, match="must match"):
        learning_curve(s, t, "0:800", "900:1200", pair_by="rows", **kw)
    with pytest.raises(InputError, match="overlap"):
        learning_curve(s, t, "0:800", "700:1200", duplicates="last", **kw)
