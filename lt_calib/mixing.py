"""Mixing factors and virtual samples: mixup (Eq. 2) and UniMix (Eq. 6-7, 11).

A mixing method is a factor law plus a way to find partners:

| mix.name | factor xi                          | partner x_j                        |
|----------|------------------------------------|------------------------------------|
| none     | 1 (no mixing)                      | -                                  |
| mixup    | Beta(alpha, alpha)                 | random sampler R                   |
| unimix   | shifted Beta of Eq. 6 (UniMix xi*) | UniMix sampler R* (pi^tau, Eq. 9)  |

The loss of a virtual sample is xi L(z, y_i) + (1 - xi) L(z, y_j) (Eq. 11), so
the label weight handed to the loss is xi itself.
"""

from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp

FactorFn = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]


def beta_factor(key: jax.Array, prior_i: jax.Array, prior_j: jax.Array,
                alpha: float) -> jax.Array:
  """mixup's factor: xi ~ Beta(alpha, alpha) per sample (priors unused).

  Args:
    key: PRNG key.
    prior_i: [B] pi of the first samples' classes (sets the shape only).
    prior_j: [B] pi of the partners' classes (unused).
    alpha: Beta concentration, > 0.

  Returns:
    [B] float32 factors in [0, 1].
  """
  del prior_j
  return jax.random.beta(key, alpha, alpha, prior_i.shape, dtype=jnp.float32)


def unimix_factor(key: jax.Array, prior_i: jax.Array, prior_j: jax.Array,
                  alpha: float) -> jax.Array:
  """UniMix factor xi*_{i,j} of Eq. 6: a Beta draw shifted by the prior.

  The Beta(alpha, alpha) draw b is moved circularly on [0, 1] by
  s = pi_j / (pi_i + pi_j): xi* = b + s, minus 1 where above 1. Its density is
  f(xi* - s + 1) on [0, s) and f(xi* - s) on [s, 1], as in Eq. 6. For
  alpha < 1 the mass of b near 0 and 1 lands near s, so xi* is small (the
  mixed image is mostly x_j) when x_j's class is the rarer one.

  Args:
    key: PRNG key.
    prior_i: [B] pi_{y_i} of the randomly drawn samples.
    prior_j: [B] pi_{y_j} of the partners.
    alpha: Beta concentration, > 0.

  Returns:
    [B] float32 factors in [0, 1].
  """
  draw = jax.random.beta(key, alpha, alpha, prior_i.shape, dtype=jnp.float32)
  shift = (prior_j / (prior_i + prior_j)).astype(jnp.float32)
  shifted = draw + shift
  return jnp.where(shifted > 1.0, shifted - 1.0, shifted)


FACTORS: Dict[str, FactorFn] = {"beta": beta_factor, "unimix": unimix_factor}


class MixMethod(NamedTuple):
  """What `mix.name` selects: the factor law and the partner exponent tau.

  `partner_tau=None` means the method's tau comes from `mix.tau`; a number
  fixes it (mixup's random partners are R* with tau = 1).
  """
  factor: str
  partner_tau: float | None


MIX_METHODS: Dict[str, MixMethod | None] = {
    "none": None,
    "mixup": MixMethod(factor="beta", partner_tau=1.0),
    "unimix": MixMethod(factor="unimix", partner_tau=None),
}


def get_method(name: str) -> MixMethod | None:
  """Looks up `mix.name`, listing the allowed names if unknown."""
  if name not in MIX_METHODS:
    raise ValueError(f"mix.name={name!r} is unknown; allowed: {sorted(MIX_METHODS)}.")
  return MIX_METHODS[name]


def mix_images(images_i: jax.Array, images_j: jax.Array, xi: jax.Array) -> jax.Array:
  """Eq. 2 / 7 on images: xi x_i + (1 - xi) x_j, xi per sample."""
  xi = xi.reshape((-1,) + (1,) * (images_i.ndim - 1)).astype(images_i.dtype)
  return xi * images_i + (1.0 - xi) * images_j


def mixed_loss(per_example_loss: Callable[[jax.Array, jax.Array], jax.Array],
               logits: jax.Array, labels_i: jax.Array, labels_j: jax.Array,
               weight_i: jax.Array) -> jax.Array:
  """Eq. 11: w L(z, y_i) + (1 - w) L(z, y_j), per example.

  Args:
    per_example_loss: maps (logits [B, C], labels [B]) -> [B].
    logits: [B, C] logits of the mixed images.
    labels_i: [B] labels of the first samples.
    labels_j: [B] labels of the partners.
    weight_i: [B] label weight of y_i (xi for mixup and UniMix).

  Returns:
    [B] losses.
  """
  return (weight_i * per_example_loss(logits, labels_i)
          + (1.0 - weight_i) * per_example_loss(logits, labels_j))
