"""The maths: sufficient statistics, their merge, the Procrustes solve, the paper's
diagnostics and the apply kernel. Pure numpy: no Dask, no Zarr, no storage.
"""
