"""bigalign.Procrustes: the fit as a scikit-learn style estimator."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

import bigalign


def test_fit_learns_the_planted_map_and_transforms(pair, tmp_path):
    s, t, a, b, q = pair(n=1500, dim_a=12, chunk_a=250, offset_a=2.0, offset_b=-1.0)
    est = bigalign.Procrustes(center=True, diagnostics=False)
    assert est.fit(s, t, threads=2) is est
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    oracle, _ = orthogonal_procrustes(a64 - a64.mean(0), b64 - b64.mean(0))
    np.testing.assert_allclose(est.rotation_, oracle, atol=1e-6)
    np.testing.assert_allclose(est.source_mean_, a64.mean(0), atol=1e-6)
    assert est.n_pairs_ == 1500 and est.scale_ == 1.0
    x = a[:5]
    np.testing.assert_allclose(est.transform(x), (x - a64.mean(0)) @ oracle + b64.mean(0),
                               atol=1e-4)
    report = est.apply(s, str(tmp_path / "mapped.zarr"))
    assert report.rows == 1500


def test_params_and_an_unfitted_estimator():
    assert bigalign.Procrustes().get_params()["center"] is True  # centring is the default
    est = bigalign.Procrustes(center=False, method="affine")
    assert est.get_params()["center"] is False
    assert repr(est) == "Procrustes(center=False, method='affine')"
    est.set_params(center=True, method="orthogonal")
    assert est.set_params(scale=True).options.scale is True
    with pytest.raises(ValueError, match="invalid parameters \\['centre'\\]"):
        est.set_params(centre=False)
    with pytest.raises(AttributeError, match="not fitted yet"):
        est.transform(np.zeros((1, 3)))
    with pytest.raises(bigalign.InputError, match="--precision"):
        bigalign.Procrustes(precision="half").options
