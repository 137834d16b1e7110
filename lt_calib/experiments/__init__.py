"""Experiments: grids of runs (presets, the runner) and their comparison tables."""
