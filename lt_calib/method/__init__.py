"""The paper's method as pure JAX: the samplers R and R*, UniMix's mixing,
Bayias and the other losses."""
