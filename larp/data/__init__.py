"""Video I/O, datasets, CSV builders, the synthetic video set and its oracle."""
