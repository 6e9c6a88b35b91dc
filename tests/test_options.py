"""Options as the API (bigalign.options): validated request objects, the one place
where flat keywords become them, and fit/apply taking either."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.errors import InputError
from bigalign.options import (ApplyOptions, Execution, FitOptions, JobOptions, Pairing,
                                       keywords_of, requests)


def test_flat_keywords_become_the_options_objects():
    kinds = {"options": keywords_of(FitOptions), "pairing": keywords_of(Pairing, pair_by="by"),
             "execution": keywords_of(Execution)}
    got = requests("fit", {}, {"center": True, "pair_by": "rows", "threads": 2}, kinds)
    assert got["options"] == FitOptions(center=True)
    assert got["pairing"] == Pairing(by="rows") and got["execution"] == Execution(threads=2)
    with pytest.raises(TypeError, match="unexpected keyword arguments: by"):
        requests("fit", {}, {"by": "rows"}, kinds)  # the field's name is not the flag's
    with pytest.raises(TypeError, match="options= and its keywords \\(center\\)"):
        requests("fit", {"options": FitOptions()}, {"center": True}, kinds)
    with pytest.raises(TypeError, match="must be a FitOptions"):
        requests("fit", {"options": {"center": True}}, {}, kinds)


@pytest.mark.parametrize("build,flag", [
    (lambda: FitOptions(precision="float8"), "--precision"),
    (lambda: Pairing(by="names"), "--pair-by"),
    (lambda: Pairing(duplicates="any"), "--duplicates"),
    (lambda: Pairing(sample=0), "--sample"),
    (lambda: ApplyOptions(dtype="int8"), "--dtype"),
    (lambda: ApplyOptions(bad_rows="skip"), "--bad-rows"),
    (lambda: ApplyOptions(chunk_rows=0), "--chunk-rows"),
    (lambda: ApplyOptions(compression="gzip"), "--compression"),
    (lambda: Execution(threads=-3), "--threads"),
])
def test_options_are_validated_when_built_naming_the_flag(build, flag):
    with pytest.raises(InputError, match=flag):
        build()


def test_fit_and_apply_take_the_objects_or_their_keywords(pair, tmp_path):
    s, t, a, b, q = pair(n=1200, dim_a=8, chunk_a=200, offset_a=1.0)
    flat = bigalign.fit(s, t, center=True, threads=2, diagnostics=False)
    objs = bigalign.fit(s, t, FitOptions(center=True, diagnostics=False),
                        execution=Execution(threads=2))
    np.testing.assert_array_equal(flat.rotation, objs.rotation)
    np.testing.assert_allclose(objs.rotation, q, atol=1e-2)
    r1 = bigalign.apply(objs, s, str(tmp_path / "o1"), dtype="float64")
    r2 = bigalign.apply(objs, s, str(tmp_path / "o2"), ApplyOptions(dtype="float64"),
                        job=JobOptions(checkpoint=False))
    assert r1.rows == r2.rows == 1200
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o1"))[:],
                                  zarr.open_array(str(tmp_path / "o2"))[:])
    with pytest.raises(TypeError, match="unexpected keyword arguments: centre"):
        bigalign.fit(s, t, centre=True)
