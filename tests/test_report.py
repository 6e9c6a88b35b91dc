"""bigalign.commands.report: each kind of result becomes a readable PNG, also from its JSON form."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bigalign.commands.curve import learning_curve
from bigalign.commands.evaluate import evaluate_maps
from bigalign.maths.metrics import AffineMap, Method, baseline_methods
from bigalign.commands.report import curve_png, evaluation_png, retrieval_png, write_png
from bigalign.commands.retrieval import evaluate_retrieval
from bigalign.maths.stats import block_moments

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pairs(n=400, d=8, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d)) + 1.0
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return a, a @ q + 0.3 * rng.standard_normal((n, d)) - 0.5


def _png_size(path):
    from PIL import Image  # installed with matplotlib

    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def results():
    a, b = _pairs()
    m = block_moments(a[:300], b[:300], gram=True, dtype=np.float64)
    methods = baseline_methods(m, center=True, ridge=1.0)
    methods[-1].this = True
    ev = evaluate_maps(methods, a, b, (300, 400), ks=(1, 10))
    ev.update(kind="evaluate", training={"diagnostics": {"epsilon": 1.0, "delta": 0.01,
                                                         "bound_residual": 2.0,
                                                         "achieved_residual": 1.0,
                                                         "bound_holds": True, "n": 300}})
    cu = learning_curve(a, b, (0, 300), (300, 400), sizes=[20, 100, 300], center=True)
    qrels = {"query_id": list(range(50)), "doc_id": list(range(50))}
    import polars as pl
    re = evaluate_retrieval(_transform(m), a[300:350], b[300:400],
                            pl.DataFrame(qrels), native=b[300:350], statistics=m, ks=(1, 10))
    return {"evaluate": ev, "curve": cu, "retrieval": re}


def _transform(m):
    from bigalign import Transform
    from bigalign.maths.solve import procrustes

    sol = procrustes(m, center=True)
    return Transform(sol.rotation, m.mean_a, m.mean_b, 1.0, {"center": True, "rows": [0, 300]},
                     {"residual": sol.residual})


@pytest.mark.parametrize("kind,fn", [("evaluate", evaluation_png), ("curve", curve_png),
                                     ("retrieval", retrieval_png)])
def test_png_written_and_sized(results, tmp_path, kind, fn):
    path = tmp_path / f"{kind}.png"
    assert fn(results[kind], str(path)) == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    width, height = _png_size(path)
    assert width >= 1000 and height >= 450          # large enough to read
    assert path.stat().st_size > 20_000             # not an empty canvas


def test_png_from_json_round_trip(results, tmp_path):
    """The CLI's --json output (NaN -> null) is enough to draw the report later."""
    from bigalign.cli.evaluate import _plain

    for kind, res in results.items():
        back = json.loads(json.dumps(_plain(res)))
        out = write_png(back, str(tmp_path / f"{kind}-json.png"))
        assert (tmp_path / f"{kind}-json.png").read_bytes()[:8] == PNG_MAGIC, out


def test_png_without_baselines_or_diagnostics(tmp_path):
    a, b = _pairs(seed=1)
    res = evaluate_maps([Method("none", AffineMap.identity(8)),
                         Method("orthogonal", AffineMap.identity(8), this=True)],
                        a, b, (0, 100))
    res["kind"] = "evaluate"
    evaluation_png(res, str(tmp_path / "bare.png"))
    assert (tmp_path / "bare.png").exists()


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no PNG report"):
        write_png({"kind": "other"}, str(tmp_path / "x.png"))

