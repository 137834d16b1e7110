"""Calibration: metrics, post-hoc corrections, plots and the run report."""
