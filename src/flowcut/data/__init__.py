"""Datasets built procedurally, offline."""
