"""Codebook features: sparse, discrete bottlenecks inside any transformer."""
