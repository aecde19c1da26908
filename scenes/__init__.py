"""Synthetic shape scenes: the data, the mask VQ-VAE and the metrics of the demo model."""
