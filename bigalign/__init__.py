"""bigalign: streaming, out-of-core orthogonal Procrustes alignment of embedding models.

    import bigalign
    t = bigalign.fit("old.zarr", "new.zarr", center=True, output="old2new.transform")
    bigalign.apply(t, "corpus_old.zarr", "corpus_in_new.zarr")
    t = bigalign.Transform.load("old2new.transform"); t.transform(query_vectors)
"""

__version__ = "0.1.0"

from .errors import (BigalignError, CheckpointError, ChunkReadError, DamagedOutputError,  # noqa: E402
                     InputError, NonFiniteError)
from .transform import Transform  # noqa: E402
from .commands.api import apply, fit, output_damage, output_status, run_status, RunReport  # noqa: E402

__all__ = ["fit", "apply", "Transform", "RunReport", "output_status", "output_damage", "run_status",
           "BigalignError", "InputError", "NonFiniteError", "DamagedOutputError",
           "ChunkReadError", "CheckpointError", "__version__"]
