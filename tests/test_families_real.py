"""examples/families.py --quick on the real samples (../shared/data): every map family and
``method="auto"`` fitted through ``bigalign.fit``, next to scipy's Procrustes and a numpy
ridge, measured on held-out items.

The script runs in a subprocess, as a user would; the checks are properties that hold
whatever the figures are, against independent references: bigalign's orthogonal map
equals scipy's, auto's choice is one of the families and its map is that family's refit,
every fit retrieves far above chance. No figure is hard-coded and nothing is timed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("orthogonal", "similarity", "affine", "ridge", "reduced-rank")
VIEWS = ("raw", "centred")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    names = ["e5small_docs.npy", "minilm_docs.npy", "minilm_queries.npy",
             "static64_docs.npy"]
    missing = [n for n in names if not (SHARED_DATA / n).exists()]
    if missing:
        reason = f"real embedding samples not available in {SHARED_DATA} (missing {missing})"
        print(reason)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("families")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "families.py"), "--quick",
                           "--data", str(SHARED_DATA), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "families.md").read_text()
    assert "auto" in md and "scipy" in md
    return json.loads((out / "families.json").read_text())


def _fit(pair, tool, method, center):
    (row,) = [r for r in pair["fits"] if r["tool"] == tool and r["method"] == method
              and r["center"] == center]
    return row


def test_quick_mode_covers_a_dimension_mismatch(result):
    pairs = {(p["source"], p["target"]) for p in result["pairs"]}
    assert ("e5small", "minilm") in pairs
    assert any(p["dims"][0] != p["dims"][1] for p in result["pairs"])
    for p in result["pairs"]:
        # train and held-out items do not overlap
        assert p["train"][1] <= p["held_out"][0]
        assert {(r["tool"], r["method"], r["center"]) for r in p["fits"]} >= {
            ("bigalign", m, c) for m in FAMILIES + ("auto",) for c in (True, False)}


def test_every_fit_retrieves_far_above_chance(result):
    for p in result["pairs"]:
        for r in p["fits"]:
            for v in VIEWS:
                f = r["figures"][v]
                what = f"{p['source']}->{p['target']} {r['tool']} {r['method']} {v}"
                assert f["r1"] > 5 * p["chance_r1"], what
                assert f["r1_back"] > 5 * p["chance_r1"], what
                # ARR: recall@10 against mapped documents over the full re-embed's
                assert 0 < f["arr"] == pytest.approx(f["bridge_r10"] / p["native_r10"][v])


def test_bigalign_orthogonal_equals_scipy(result):
    for p in result["pairs"]:
        c = p["checks"]
        # float64 block products: the same rotation as scipy's float64 SVD
        assert c["orthogonal_float64_vs_scipy_max_abs_centred"] < 1e-9
        for center in (True, False):
            name = "centred" if center else "uncentred"
            if c[f"cross_covariance_sv_ratio_{name}"] > 1e-6:  # a well-determined rotation
                assert c[f"orthogonal_vs_scipy_max_abs_{name}"] < 1e-5, (p["source"], name)
            ours = _fit(p, "bigalign", "orthogonal", center)["figures"]
            theirs = _fit(p, "scipy", "orthogonal_procrustes", center)["figures"]
            for v in VIEWS:
                for k in ("r1", "r1_back", "arr"):
                    assert ours[v][k] == pytest.approx(theirs[v][k], abs=1e-3), (
                        p["source"], p["target"], name, v, k)


def test_auto_is_the_refit_of_one_family(result):
    for p in result["pairs"]:
        for center in (True, False):
            auto = _fit(p, "bigalign", "auto", center)
            assert auto["family"] in FAMILIES
            chosen = [c for c in auto["selection"]["candidates"] if c["chosen"]]
            assert [c["family"] for c in chosen] == [auto["family"]]
            # the chosen candidate has the best criterion on auto's own held-out windows
            best = max(c["score"] for c in auto["selection"]["candidates"])
            assert chosen[0]["score"] == best
            same = _fit(p, "bigalign", auto["family"], center)
            for k in ("ridge", "rank"):
                assert auto["params"].get(k) == same["params"].get(k)
            for v in VIEWS:
                for k in ("r1", "r1_back", "arr", "criterion"):
                    assert auto["figures"][v][k] == pytest.approx(same["figures"][v][k],
                                                                  abs=1e-9)
            # the holdout came from the training rows only
            for w0, w1 in auto["selection"]["holdout"]["windows"]:
                assert p["train"][0] <= w0 < w1 <= p["train"][1]


def test_auto_versus_best_is_consistent(result):
    for p in result["pairs"]:
        for center in ("True", "False"):
            s = p["auto_vs_best"][center]
            auto = _fit(p, "bigalign", "auto", center == "True")
            assert s["chosen"] == auto["family"]
            for metric in ("r1", "arr"):
                for v in VIEWS:
                    e = s[f"{metric}_{v}"]
                    assert e["best_family"] in FAMILIES
                    assert e["best"] >= e["auto"]
                    assert e["difference"] == pytest.approx(e["auto"] - e["best"], abs=1e-9)
                    lo, hi = e["interval"]
                    assert lo <= e["difference"] <= hi
                    assert e["verdict"] == ("best" if e["difference"] >= 0 else
                                            "tie" if hi >= 0 else "loses")
