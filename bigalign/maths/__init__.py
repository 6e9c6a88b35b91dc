"""The maths: sufficient statistics, their merge, the Procrustes solve, the paper's
diagnostics and the apply kernel. Pure array code: no Dask, no Zarr, no storage; the two
kernels (stats.Accumulator, mapping.map_rows) run on any array-API namespace (arrays.py:
NumPy on the host, CuPy on a GPU), the rest is numpy.
"""
