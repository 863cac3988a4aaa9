"""Experiments run through the library as a user would: the study harness (``experiments/study``)."""
