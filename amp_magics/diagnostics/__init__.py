"""Measurements on a model: where its memory goes, which module overflows."""
