"""lt_calib: calibrated long-tailed recognition (UniMix + Bayias) in JAX/Flax."""
