"""Datasets: file loaders and the built-in synthetic subset-sum task."""

from rloop.data.loaders import DataError, Example, load_examples

__all__ = ["DataError", "Example", "load_examples"]
