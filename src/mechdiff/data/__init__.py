"""Data: corpora, splits, fairness, the zarr activation store and extraction into it."""
