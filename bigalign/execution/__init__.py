"""Execution: Dask task graphs and the task functions they run (CPU and GPU), the
Dask session, pairing by id with its gather, fault points for tests.
"""
