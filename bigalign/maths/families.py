"""The names of the map families (:mod:`bigalign.maths.adapters` solves them), in one place
that imports nothing: the command line's parser reads them without loading numpy.

``FAMILIES`` is also the order ``fit --method auto`` tries them in, simplest first (a tie
goes to the earlier); ``ORTHOGONAL`` are those whose map is s·Q with Q orthonormal: they
keep distances up to the scale, carry the paper's bound and invert exactly.
"""

FAMILIES = ("orthogonal", "similarity", "affine", "ridge", "reduced-rank")
ORTHOGONAL = ("orthogonal", "similarity")

__all__ = ["FAMILIES", "ORTHOGONAL"]
