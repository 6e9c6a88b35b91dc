"""Storage: Zarr arrays and embedding stores, output kinds, locations, the checkpoint
job protocol and the transform registry. No Dask.
"""
