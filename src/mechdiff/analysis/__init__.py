"""Analyses of a pair: similarity (CKA), transport maps, patching, feature statistics."""
