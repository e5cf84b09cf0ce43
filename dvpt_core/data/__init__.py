"""Datasets: on-disk format readers, the synthetic dataset, the manifest and the cached tensors."""
