"""bigalign.curve: training sizes, saturation, and every size equal to a separate fit."""

from __future__ import annotations

import numpy as np
import pytest

from bigalign import InputError
from bigalign.curve import default_sizes, learning_curve
from bigalign.evaluate import evaluate_maps
from bigalign.metrics import AffineMap, Method
from bigalign.solve import procrustes
from bigalign.stats import block_moments
from evaluation_reference import pairs

# the 4-bit e5 vectors are numerically rank 381 of 384: expected, and said by the fit
pytestmark = pytest.mark.filterwarnings("ignore::bigalign.solve.NotUniqueWarning")


def test_default_sizes():
    assert default_sizes(50) == [50]
    assert default_sizes(1000) == [100, 300, 1000]
    assert default_sizes(45_000) == [100, 300, 1000, 3000, 10_000, 30_000, 45_000]


def test_learning_curve_saturates_on_easy_data_and_matches_separate_fits():
    a, b = pairs(3000, 8, 8, noise=0.05, seed=14)
    res = learning_curve(a, b, (0, 2500), (2500, 3000), sizes=[20, 100, 500, 2500],
                         center=True, dtype="float64", block_rows=128)
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
