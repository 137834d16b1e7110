"""Bayias (Eq. 14-15) against its pairwise form, written out with NumPy loops."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import log_softmax

from lt_calib.method import losses
from lt_calib.data import long_tail


def pairwise_bayias(logits, label, offset):
  # Eq. 15 literally: log[1 + sum_{k != y} exp(B_k - B_y) exp(z_k - z_y)].
  total = 1.0
  for k in range(len(logits)):
    if k != label:
      total += np.exp(offset[k] - offset[label]) * np.exp(logits[k] - logits[label])
  return np.log(total)


def make(name, labels, num_classes, test_prior="uniform"):
  prior = long_tail.class_prior(np.asarray(labels), num_classes)
  cfg = ml_collections.ConfigDict({"name": name, "test_prior": test_prior})
  loss_fn = losses.make_loss(cfg, prior)
  return (lambda logits, labels: loss_fn(logits, labels, 0)), prior  # At step 0.


def test_bayias_equals_pairwise_eq15():
  rng = np.random.RandomState(0)
  train_labels = np.repeat(np.arange(5), [50, 20, 10, 5, 2])
  loss_fn, prior = make("bayias", train_labels, 5)
  logits = rng.randn(8, 5).astype(np.float32)
  labels = rng.randint(0, 5, size=8)
  offset = np.log(prior.counts / prior.counts.sum()) + np.log(5)  # Eq. 14.
  expected = [pairwise_bayias(logits[i].astype(np.float64), labels[i], offset)
              for i in range(8)]
  np.testing.assert_allclose(loss_fn(jnp.asarray(logits), jnp.asarray(labels)),
                             expected, rtol=1e-5)


def test_bayias_reduces_to_ce_for_uniform_prior():
  rng = np.random.RandomState(1)
  loss_fn, _ = make("bayias", np.repeat(np.arange(4), 10), 4)
  logits, labels = rng.randn(6, 4), rng.randint(0, 4, size=6)
  expected = -log_softmax(logits, axis=1)[np.arange(6), labels]
  np.testing.assert_allclose(loss_fn(jnp.asarray(logits), jnp.asarray(labels)),
                             expected, rtol=1e-5)


def test_bayias_with_a_known_test_prior():
  rng = np.random.RandomState(2)
  train_labels = np.repeat(np.arange(3), [60, 30, 10])
  loss_fn, _ = make("bayias", train_labels, 3, test_prior="1,1,2")
  logits, labels = rng.randn(5, 3), rng.randint(0, 3, size=5)
  offset = np.log([0.6, 0.3, 0.1]) - np.log([0.25, 0.25, 0.5])  # log pi - log pi'.
  expected = [pairwise_bayias(logits[i], labels[i], offset) for i in range(5)]
  np.testing.assert_allclose(loss_fn(jnp.asarray(logits), jnp.asarray(labels)),
                             expected, rtol=1e-5)


def test_bad_loss_settings():
  with pytest.raises(ValueError, match="loss.name='lsq' is unknown"):
    make("lsq", [0, 1], 2)
  with pytest.raises(ValueError, match="needs 3 positive finite weights"):
    make("bayias", [0, 1, 2], 3, test_prior="1,2")
  with pytest.raises(ValueError, match="comma-separated"):
    make("bayias", [0, 1, 2], 3, test_prior="__import__('os')")
