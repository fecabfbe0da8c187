"""Compute used on the hot paths, with a NumPy reference for every kernel.

NOTE: only numpy here (and, beside it, optional GPU versions that import
their own toolkits lazily). edge/ imports this package, so no torch.
"""
