"""The bottom layer: errors, atomic file writes, devices and dtypes, process ranks, checkpoint files, image grids."""
