"""Per-example classification losses, chosen by `loss.name`.

Each factory takes the loss config and the training prior and returns a pure
function (logits [B, C], labels [B]) -> [B]. Mixed samples combine two such
calls (Eq. 11, see `mixing.mixed_loss`).
"""

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lt_calib import long_tail

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels, per example."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def parse_test_prior(spec: str, num_classes: int) -> np.ndarray:
  """Parses `loss.test_prior`: 'uniform' or C comma-separated weights.

  Args:
    spec: 'uniform' (the balanced test set of the paper) or e.g. '5,3,2'
      (normalised here; parsed as floats, never evaluated).
    num_classes: C.

  Returns:
    float64 [C] test prior pi'.
  """
  if spec in ("", "uniform"):
    return np.full(num_classes, 1.0 / num_classes)
  try:
    weights = np.array([float(w) for w in spec.split(",")])
  except ValueError as e:
    raise ValueError(f"loss.test_prior={spec!r}: expected 'uniform' or "
                     f"{num_classes} comma-separated numbers.") from e
  if weights.shape != (num_classes,) or np.any(weights <= 0) or not np.all(np.isfinite(weights)):
    raise ValueError(f"loss.test_prior needs {num_classes} positive finite "
                     f"weights, got {weights.size}: {spec!r}.")
  return weights / weights.sum()


def bayias_offset(log_prior: np.ndarray, test_prior: np.ndarray) -> np.ndarray:
  """Bayias B_y of Eq. 14: log pi_y - log pi'_y (= log pi_y + log C if uniform)."""
  return log_prior - np.log(test_prior)


def make_bayias(cfg, prior: long_tail.ClassPrior) -> LossFn:
  """Bayias-compensated CE (Eq. 15): CE on z + B, in training only.

  Adding B_y to every logit is the pairwise form of Eq. 15:
  -log softmax(z + B)_y = log(1 + sum_{k != y} exp(B_k - B_y + z_k - z_y)).
  Predictions at test time use the raw logits z.
  """
  offset = jnp.asarray(bayias_offset(
      prior.log_prior, parse_test_prior(cfg.get("test_prior", "uniform"),
                                        len(prior.counts))), jnp.float32)

  def loss(logits, labels):
    return cross_entropy(logits + offset, labels)
  return loss


def make_ce(cfg, prior) -> LossFn:
  """Plain softmax cross-entropy (ERM)."""
  del cfg, prior
  return cross_entropy


LOSSES: Dict[str, Callable] = {"ce": make_ce, "bayias": make_bayias}


def make_loss(cfg, prior: long_tail.ClassPrior) -> LossFn:
  """Builds the per-example loss named by `cfg.name`."""
  if cfg.name not in LOSSES:
    raise ValueError(f"loss.name={cfg.name!r} is unknown; allowed: {sorted(LOSSES)}.")
  return LOSSES[cfg.name](cfg, prior)
