"""Thin IPython adapters: parse flags, find the notebook's objects, hand over, show the result."""
