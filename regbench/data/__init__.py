"""Datasets: the prepared layout read as tensors, checksummed downloads, a second contrast made from labels."""
