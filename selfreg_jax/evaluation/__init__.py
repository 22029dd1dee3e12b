"""Evaluation: slice-wise inference, metrics, evaluation of a split and its
files, images."""
