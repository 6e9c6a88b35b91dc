"""The fit as a scikit-learn style estimator, over inputs of any size.

    >>> est = bigalign.Procrustes(center=True).fit("old.zarr", "new.zarr", workers=4)
    >>> est.transform(queries)                      # (n, dA) -> (n, dB), in memory
    >>> est.apply("corpus_old.zarr", "corpus_new.zarr")   # a whole corpus, out of core
    >>> est.transform_.save("old2new.transform")    # the fitted artefact

As scikit-learn separates an estimator's parameters from ``n_jobs``, the constructor takes
what the fit computes (:class:`bigalign.options.FitOptions`' fields), and
:meth:`Procrustes.fit` takes the inputs and how to run (pairing, the job protocol,
execution: as :func:`bigalign.fit`). Learned attributes end in an underscore.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Optional

from .options import FitOptions

__all__ = ["Procrustes"]


class Procrustes:
    """Orthogonal Procrustes: Q minimising ||(A - mu_a) s Q - (B - mu_b)||_F over paired rows.

    Parameters (:class:`FitOptions`): ``center`` (default True), ``normalize``, ``scale``,
    ``reflection``, ``diagnostics``, ``precision``, ``method`` (the map family: "orthogonal"
    by default, "similarity", "affine", "ridge", "reduced-rank" or "auto"), ``ridge``,
    ``rank``, ``holdout``, ``max_holdout``; see :func:`bigalign.fit`.

    Attributes after :meth:`fit`: ``transform_`` (the :class:`bigalign.Transform`),
    ``rotation_`` (dA, dB) float64, ``source_mean_`` (dA,) and ``target_mean_`` (dB,)
    float64 (zeros when not centred), ``scale_`` (float), ``n_pairs_`` (int)."""

    def __init__(self, center: bool = True, normalize: bool = False, scale: bool = False,
                 reflection: bool = True, diagnostics: bool = True, precision: str = "auto",
                 method: str = "orthogonal", ridge: Optional[float] = None,
                 rank: Optional[int] = None, holdout: float = 0.2, max_holdout: int = 10_000,
                 select: str = "mapped-queries", select_search: str = "raw"):
        self.center, self.normalize, self.scale = center, normalize, scale
        self.reflection, self.diagnostics, self.precision = reflection, diagnostics, precision
        self.method, self.ridge, self.rank = method, ridge, rank
        self.holdout, self.max_holdout = holdout, max_holdout
        self.select, self.select_search = select, select_search

    @property
    def options(self) -> FitOptions:
        """The parameters as the validated :class:`FitOptions` the fit runs with."""
        return FitOptions(**self.get_params())

    def get_params(self, deep: bool = True) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(FitOptions)}

    def set_params(self, **params) -> "Procrustes":
        known = set(self.get_params())
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"invalid parameters {unknown} for Procrustes; valid: "
                             f"{sorted(known)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def fit(self, source, target, **run) -> "Procrustes":
        """Fit from paired rows of ``source`` (N, dA) and ``target`` (N, dB): paths or URLs
        of Zarr arrays or embedding stores, or open zarr.Arrays. ``run``: what
        :func:`bigalign.fit` takes besides the options (pairing, job, execution objects or
        their keywords, ``output``, ``storage_options``, ...). Returns self."""
        from .commands.fit import fit

        t = fit(source, target, self.options, **run)
        self.transform_ = t
        self.rotation_, self.source_mean_, self.target_mean_ = (t.rotation, t.source_mean,
                                                                t.target_mean)
        self.scale_ = t.scale
        self.n_pairs_ = int(t.metadata.get("n_pairs", 0))
        return self

    def _fitted(self):
        t = getattr(self, "transform_", None)
        if t is None:
            raise AttributeError("this Procrustes is not fitted yet: call fit(source, target) "
                                 "first")
        return t

    def transform(self, x, **kwargs):
        """Map in-memory rows ``x`` (n, dA) or (dA,) (:meth:`bigalign.Transform.transform`)."""
        return self._fitted().transform(x, **kwargs)

    def apply(self, source, output, **kwargs):
        """Map a whole corpus out of core (:func:`bigalign.apply`); returns its RunReport."""
        from .commands.apply import apply

        return apply(self._fitted(), source, output, **kwargs)

    def __repr__(self) -> str:
        default = asdict(FitOptions())
        changed = {k: v for k, v in self.get_params().items() if default[k] != v}
        return f"Procrustes({', '.join(f'{k}={v!r}' for k, v in changed.items())})"
