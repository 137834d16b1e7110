"""One compiled training step's loss against a NumPy reference of the paper's formulas.

The step under test is the real one (`setup.update`, as the loop runs it).
The reference takes the same batch (the feed's sampling is tested elsewhere,
against its laws) and the same Beta draws (`jax.random.beta` of the step's
mixing key: a library draw, not code under test), and computes the rest
itself in float64 NumPy: the UniMix shift of Eq. 6, the mixed images, Eq. 11,
and each loss from its paper. Only the network's forward pass is borrowed
(`apply_fn`, as the step calls it), on the images the reference mixed.
A flipped Bayias sign, a mixed-up partner label, a factor applied to the
wrong image or a margin on the wrong logit each change the loss beyond the
tolerance.
"""

import jax
import numpy as np
import pytest
from scipy.special import log_softmax

from lt_calib import parallel
from lt_calib.train import setup as setup_lib
from tests.helpers import COUNTS, synthetic_config, synthetic_dataset

pytestmark = pytest.mark.slow  # Each case compiles a step.

PI = np.asarray(COUNTS, np.float64) / np.sum(COUNTS)
C = len(COUNTS)


def cross_entropy(logits, labels):
  return -log_softmax(logits, axis=1)[np.arange(len(labels)), labels]


def ldam_reference(logits, labels):
  # Cao et al. 2019: m_c = K / n_c^(1/4), K such that the largest is 0.5;
  # the head's logits are s cos(theta), s = 30, so the margin is s m_y.
  margins = np.asarray(COUNTS, np.float64) ** -0.25
  margins *= 0.5 / margins.max()
  shifted = logits.copy()
  shifted[np.arange(len(labels)), labels] -= 30.0 * margins[labels]
  return cross_entropy(shifted, labels)


REFERENCES = {
    "ce": cross_entropy,
    # Eq. 14-15 with a uniform test prior: B_y = log pi_y - log(1 / C).
    "bayias": lambda z, y: cross_entropy(z + np.log(PI) + np.log(C), y),
    # Menon et al. 2021, tau = 1: z + log pi.
    "logit_adjusted": lambda z, y: cross_entropy(z + np.log(PI), y),
    "ldam": ldam_reference,
}


def unimix_shift(draw, label_i, label_j):
  """Eq. 6: the Beta draw moved circularly by pi_j / (pi_i + pi_j)."""
  shifted = draw + PI[label_j] / (PI[label_i] + PI[label_j])
  return np.where(shifted > 1.0, shifted - 1.0, shifted)


def step_and_reference(mix, loss, **overrides):
  """Step 0 of a tiny run: (the compiled step's loss, reference(per-label loss), xi)."""
  dataset = synthetic_dataset()
  config = synthetic_config(mix__name=mix, loss__name=loss, mix__alpha=0.5,
                            **overrides)
  mesh = parallel.make_mesh()
  setup = setup_lib.build_for([config], dataset, mesh)
  state, cfg, keys = setup.state, setup.step_cfg, setup.run_keys
  fed = setup.feed.fed(0, keys)
  batch_key, mix_key = keys.step_keys(state.step)
  batch = jax.device_get(setup.feed.batch(setup.resident, fed, state.step, batch_key, cfg))
  label_i, label_j = batch["label"], batch["partner_label"]
  if mix == "none":
    xi = np.ones(len(label_i))
  else:
    draw = np.asarray(jax.random.beta(mix_key, 0.5, 0.5, label_i.shape), np.float64)
    xi = unimix_shift(draw, label_i, label_j) if mix == "unimix" else draw
  images = (xi[:, None, None, None] * batch["image"]
            + (1.0 - xi[:, None, None, None]) * batch["partner_image"])
  logits, _ = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                             images.astype(np.float32), train=True, mutable=["batch_stats"])
  logits = np.asarray(logits, np.float64)

  def reference(per_label):  # Eq. 11, averaged over the batch.
    return float(np.mean(xi * per_label(logits, label_i)
                         + (1 - xi) * per_label(logits, label_j)))

  _, stats = setup.update(state, fed, *setup.arrays)
  return float(stats["loss"]), reference, xi


@pytest.mark.parametrize("mix,loss,overrides", [
    ("unimix", "bayias", {}),
    ("mixup", "ce", {}),
    ("none", "ce", {}),
    ("none", "logit_adjusted", {}),
    ("none", "ldam", {"model__head": "normalized"}),
])
def test_one_step_loss_matches_numpy_reference(mix, loss, overrides):
  got, reference, xi = step_and_reference(mix, loss, **overrides)
  if mix != "none":
    assert 0.05 < np.mean(xi) < 0.95 and np.std(xi) > 0.1  # Really mixed.
  np.testing.assert_allclose(got, reference(REFERENCES[loss]), rtol=2e-5)
  if loss == "bayias":  # The tolerance is far below what a flipped offset changes.
    flipped = reference(lambda z, y: cross_entropy(z - np.log(PI) - np.log(C), y))
    assert abs(got - flipped) > 1e-3 * got
