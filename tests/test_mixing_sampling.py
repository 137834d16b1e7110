"""Mixing factors and samplers against the laws they are meant to follow."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lt_calib.method import mixing
from lt_calib.method import sampling


def test_unimix_factor_follows_shifted_beta_eq6():
  alpha, n = 0.5, 20000
  prior_i = jnp.full((n,), 0.3)
  prior_j = jnp.full((n,), 0.05)
  draws = np.asarray(mixing.unimix_factor(jax.random.key(0), prior_i, prior_j, alpha))
  # Independent sampler of Eq. 6: scipy Beta draw moved circularly by s.
  shift = 0.05 / 0.35
  reference = (stats.beta.rvs(alpha, alpha, size=n, random_state=1) + shift) % 1.0
  assert stats.ks_2samp(draws, reference).pvalue > 1e-3
  # And against the CDF of Eq. 6 directly: F(x) = Fb(x + 1 - s) - Fb(1 - s)
  # on [0, s), and Fb(s' ) shifted on [s, 1].
  def cdf(x):
    below = stats.beta.cdf(x + 1 - shift, alpha, alpha) - stats.beta.cdf(1 - shift, alpha, alpha)
    above = 1 - stats.beta.cdf(1 - shift, alpha, alpha) + stats.beta.cdf(x - shift, alpha, alpha)
    return np.where(x < shift, below, above)
  assert stats.kstest(draws, cdf).pvalue > 1e-3
  # Mass concentrates near s: most virtual samples favour the rarer class j.
  assert np.mean(draws < 0.5) > 0.6


def test_mixup_factor_mean_is_half():
  draws = mixing.beta_factor(jax.random.key(3), jnp.zeros(50000), None, 1.0)
  assert abs(float(jnp.mean(draws)) - 0.5) < 0.01  # sd of mean ~ 0.0013.
  assert stats.kstest(np.asarray(draws), stats.beta(1.0, 1.0).cdf).pvalue > 1e-3


def test_mixed_images_and_loss_weights():
  xi = jnp.array([1.0, 0.25])
  a, b = jnp.ones((2, 2, 2, 3)), jnp.zeros((2, 2, 2, 3))
  np.testing.assert_allclose(mixing.mix_images(a, b, xi)[:, 0, 0, 0], [1.0, 0.25])
  loss = lambda logits, labels: labels.astype(jnp.float32)  # L(y) = y.
  out = mixing.mixed_loss(loss, None, jnp.array([2, 2]), jnp.array([6, 6]), xi)
  np.testing.assert_allclose(out, [2.0, 0.25 * 2 + 0.75 * 6])


COUNTS = np.array([400, 120, 40, 12, 4])
LABELS = np.repeat(np.arange(5), COUNTS)


def test_class_level_sampler_follows_pi_to_the_tau():
  tau, draws = -1.0, 20000
  prior = COUNTS / COUNTS.sum()
  index = sampling.class_index(LABELS, 5)
  idx = sampling.class_level_sample(
      jax.random.key(0), index, jnp.asarray(sampling.class_level_log_probs(prior, tau)), draws)
  observed = np.bincount(LABELS[np.asarray(idx)], minlength=5)
  expected = prior ** tau / np.sum(prior ** tau) * draws
  assert stats.chisquare(observed, expected).pvalue > 1e-3
  # Members of a class are drawn uniformly: class 4 has 4 images.
  members = np.asarray(idx)[LABELS[np.asarray(idx)] == 4]
  assert set(members.tolist()) == set(np.where(LABELS == 4)[0].tolist())


def test_class_level_sampler_skips_classes_without_images():
  labels = np.array([0, 0, 0, 2, 2])
  index = sampling.class_index(labels, 3)
  uniform = jnp.log(jnp.full(3, 1 / 3))
  idx = np.asarray(sampling.class_level_sample(jax.random.key(2), index, uniform, 3000))
  drawn = np.bincount(labels[idx], minlength=3)
  assert drawn[1] == 0 and abs(drawn[0] - 1500) < 150  # Class 1 has no image.


def test_in_batch_pairing_follows_n_to_the_one_plus_tau():
  tau, batch, rounds = -0.5, 128, 200
  log_counts = jnp.log(jnp.asarray(COUNTS, jnp.float32))
  keys = jax.random.split(jax.random.key(1), rounds)

  def partner_classes(key):
    batch_key, pair_key = jax.random.split(key)
    labels = jnp.asarray(LABELS)[jax.random.randint(batch_key, (batch,), 0, len(LABELS))]
    return labels[sampling.in_batch_partners(pair_key, labels, log_counts, tau)]

  classes = np.asarray(jax.vmap(partner_classes)(keys)).ravel()
  observed = np.bincount(classes, minlength=5)
  # Batch member of class c appears w.p. n_c/N and is picked w.p. ~ n_c^tau.
  weights = COUNTS ** (1 + tau)
  expected = weights / weights.sum() * classes.size
  # The finite batch makes this an approximation; at B = 128 the bias is far
  # below what a chi-square at this sample size can see, except for class 4
  # (n=4) whose presence in a batch fluctuates most; test with all classes.
  assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_random_sampler_is_a_permutation_per_epoch():
  key = jax.random.key(5)
  steps_per_epoch, batch = 10, 7
  epoch0 = np.concatenate([np.asarray(sampling.epoch_permutation_slice(
      key, jnp.int32(s), 73, batch, steps_per_epoch)) for s in range(steps_per_epoch)])
  assert len(set(epoch0.tolist())) == 70  # Without replacement in an epoch.
  again = np.asarray(sampling.epoch_permutation_slice(key, jnp.int32(3), 73, batch, 10))
  np.testing.assert_array_equal(again, epoch0[21:28])  # Reproducible per step.
  epoch1 = np.asarray(sampling.epoch_permutation_slice(key, jnp.int32(10), 73, batch, 10))
  assert not np.array_equal(epoch1, epoch0[:7])
