"""LARP tokenizer + NAR / raster generators for autoregressive video generation."""
