"""bigalign: streaming, out-of-core orthogonal Procrustes alignment of embedding models.

    import bigalign
    t = bigalign.fit("old.zarr", "new.zarr", center=True, output="old2new.transform")
    bigalign.apply(t, "corpus_old.zarr", "corpus_in_new.zarr")
    t = bigalign.Transform.load("old2new.transform"); t.transform(query_vectors)
    est = bigalign.Procrustes(center=True).fit("old.zarr", "new.zarr")  # as an estimator

The API names are loaded on first use (module ``__getattr__``): ``import bigalign`` alone
imports no numpy, Dask or Zarr, so the command line can install its SIGTERM handler before
those load (a scheduler's SIGTERM in the first seconds then exits 130, not by signal), and
``bigalign --version`` answers at once.
"""

__version__ = "0.1.0"

from .errors import (BigalignError, CheckpointError, ChunkReadError, DamagedOutputError,  # noqa: E402
                     InputError, NonFiniteError)

#: name -> submodule that defines it, imported on first access
_LAZY = {"Transform": ".transform", "apply": ".commands.apply", "fit": ".commands.fit",
         "output_damage": ".commands.status", "output_status": ".commands.status",
         "run_status": ".commands.status", "RunReport": ".commands.runs",
         "Procrustes": ".estimator", "FitOptions": ".options",
         "ApplyOptions": ".options", "Pairing": ".options",
         "JobOptions": ".options", "Execution": ".options",
         "import_vectors": ".commands.ingest", "export": ".commands.export",
         "evaluate": ".commands.evaluate", "evaluate_retrieval": ".commands.retrieval",
         "evaluate_verdict": ".commands.retrieval_verdict",
         "learning_curve": ".commands.curve"}

__all__ = ["fit", "apply", "import_vectors", "export", "evaluate", "evaluate_retrieval",
           "evaluate_verdict", "learning_curve", "Transform", "RunReport", "output_status", "output_damage", "run_status",
           "Procrustes", "FitOptions", "ApplyOptions", "Pairing", "JobOptions", "Execution",
           "BigalignError", "InputError", "NonFiniteError", "DamagedOutputError",
           "ChunkReadError", "CheckpointError", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
