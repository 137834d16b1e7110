"""Peer methods (Tables 1, 3, 4): each against an independent computation, and
a short training run of each on a separable synthetic set."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats
from scipy.special import log_softmax

import optax

from lt_calib import config_checks, models, parallel
from lt_calib.data import batches
from lt_calib.train import setup as setup_lib
from lt_calib.train import state as state_lib
from lt_calib.train import step as step_lib

from lt_calib.method import losses, mixing
from lt_calib.data import long_tail
from lt_calib.models import heads
from tests.helpers import COUNTS, synthetic_config, synthetic_dataset, tiny_config


def nll_rows(logits, labels):
  """-log softmax(logits)_y per row, in float64 NumPy."""
  logits = np.asarray(logits, np.float64)
  return -log_softmax(logits, axis=1)[np.arange(len(labels)), labels]


def loss_cfg(name, **fields):
  cfg = tiny_config().loss
  cfg.name = name
  for key, value in fields.items():
    cfg[key] = value
  return cfg


def prior_of(counts):
  return long_tail.class_prior(np.repeat(np.arange(len(counts)), counts), len(counts))


def evaluate_loss(cfg, counts, logits, labels, step=0, steps_per_epoch=1, logit_scale=1.0):
  loss_fn = losses.make_loss(cfg, prior_of(counts), steps_per_epoch, logit_scale)
  return np.asarray(loss_fn(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                            jnp.int32(step)))


RNG = np.random.RandomState(0)
LOGITS = RNG.randn(6, 4) * 2
LABELS = np.array([0, 1, 2, 3, 3, 1])


# --- Mixing -------------------------------------------------------------------

def test_remix_label_rule_hand_worked():
  # (pi_i, pi_j, xi) -> weight of y_i, with kappa = 3 and tau = 0.5.
  cases = [
      (0.6, 0.1, 0.3, 0.0),    # n_i/n_j = 6 >= 3 and xi < 0.5: all to the minority y_j.
      (0.6, 0.1, 0.7, 0.7),    # Image mostly the majority x_i: plain mixup label.
      (0.3, 0.1, 0.49, 0.0),   # Ratio exactly kappa counts as imbalanced.
      (0.1, 0.6, 0.8, 1.0),    # n_i/n_j = 1/6 and 1 - xi = 0.2 < 0.5: all to y_i.
      (0.1, 0.6, 0.4, 0.4),    # Image mostly the majority x_j: plain label.
      (0.3, 0.2, 0.1, 0.1),    # Ratio 1.5 < kappa: plain label.
  ]
  prior_i, prior_j, xi, expected = (jnp.array(c) for c in zip(*cases))
  weight = mixing.remix_label_weight(xi, prior_i, prior_j, 3.0, 0.5)
  np.testing.assert_allclose(weight, expected, atol=1e-7)
  # mixup and UniMix keep the image factor as the label weight.
  np.testing.assert_allclose(mixing.factor_label_weight(xi, prior_i, prior_j, 3.0, 0.5), xi)


@pytest.mark.parametrize("name,factor,partner_tau,alpha,rule,space", [
    ("mixup", "beta", 1.0, 1.0, "factor", "input"),
    ("remix", "beta", 1.0, 1.0, "remix", "input"),
    ("manifold_mixup", "beta", 1.0, 2.0, "factor", "hidden"),
    ("unimix", "unimix", None, 0.5, "factor", "input"),
    ("unimix_factor", "unimix", 1.0, 0.5, "factor", "input"),   # Corollary 2.
    ("unimix_sampler", "beta", None, 0.5, "factor", "input"),   # Sampler of Eq. 9 alone.
])
def test_mix_methods_and_default_alphas(name, factor, partner_tau, alpha, rule, space):
  assert mixing.get_method(name) == (factor, partner_tau, alpha, rule, space)
  mix = tiny_config(mix__name=name).mix
  assert mix.alpha is None and mixing.resolve_alpha(mix) == alpha
  mix.alpha = 0.3
  assert mixing.resolve_alpha(mix) == 0.3


def tiny_resnet(head="linear"):
  cfg = ml_collections.ConfigDict(dict(name="resnet_cifar", depth=8, width=4,
                                       dtype="float32", head=head, head_scale=30.0))
  return models.create_model(cfg, 4)


def optax_sgd():
  return optax.sgd(0.1)


def test_manifold_mixup_mixes_the_chosen_layer_only():
  model = tiny_resnet()
  x = jnp.asarray(np.random.RandomState(1).randn(4, 8, 8, 3), jnp.float32)
  # The training code's initialiser (its compiled form is shared with the runs below).
  variables = state_lib.create_train_state(jax.random.key(0), model, (8, 8, 3), optax_sgd())
  variables = {"params": variables.params, "batch_stats": variables.batch_stats}
  partner = jnp.array([1, 2, 3, 0])
  apply_plain = jax.jit(lambda images: model.apply(variables, images, train=False))
  apply_mixed = jax.jit(lambda images, mix: model.apply(
      variables, images, train=False, mix=mix, mutable=["intermediates"]))

  def run(images, weight, layer):
    return apply_mixed(images, mixing.HiddenMix(partner, jnp.full((4,), weight),
                                                jnp.int32(layer)))

  plain, seen = run(x, 1.0, 0)  # Weight 1 mixes nothing.
  np.testing.assert_allclose(plain, apply_plain(x), rtol=1e-5, atol=1e-6)
  hidden = {k: v[0] for k, v in seen["intermediates"].items()}
  # Layer 0 is input mixup: the same as mixing the images first (eval-mode BN
  # treats examples one by one).
  mixed_input = 0.3 * x + 0.7 * x[partner]
  np.testing.assert_allclose(run(x, 0.3, 0)[0], apply_plain(mixed_input), rtol=1e-5,
                             atol=1e-6)
  for layer in (1, 2, 3):
    logits, seen = run(x, 0.0, layer)  # Weight 0: the partner's state replaces it.
    for stage in range(1, 4):
      state = seen["intermediates"][f"stage{stage}_input_to_mix"][0]
      # Before (and at) the chosen layer each example keeps its own state;
      # after it, each carries its partner's.
      expected = hidden[f"stage{stage}_input_to_mix"]
      expected = expected if stage <= layer else expected[partner]
      np.testing.assert_allclose(state, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, plain[partner], rtol=1e-5, atol=1e-6)
  # After the last stage only pooling and the linear head follow, which are
  # linear: logits of xi h + (1 - xi) h' are xi z + (1 - xi) z'.
  np.testing.assert_allclose(run(x, 0.25, 3)[0], 0.25 * plain + 0.75 * plain[partner],
                             rtol=1e-5, atol=1e-5)


# --- Losses -------------------------------------------------------------------

def test_logit_adjusted_is_ce_on_shifted_logits():
  counts = [60, 30, 8, 2]
  log_pi = np.log(np.array(counts) / 100.0)
  for tau in (1.0, 0.5):
    got = evaluate_loss(loss_cfg("logit_adjusted", la_tau=tau), counts, LOGITS, LABELS)
    np.testing.assert_allclose(got, nll_rows(LOGITS + tau * log_pi, LABELS), rtol=1e-5)


def test_focal_against_its_formula():
  p_y = np.exp(-nll_rows(LOGITS, LABELS))
  for gamma in (0.0, 1.0, 2.0):
    got = evaluate_loss(loss_cfg("focal", focal_gamma=gamma), [5, 5, 5, 5], LOGITS, LABELS)
    np.testing.assert_allclose(got, -(1 - p_y) ** gamma * np.log(p_y), rtol=1e-5)


def test_effective_number_weights_hand_worked():
  # beta = 0.9, n = 1, 2, 4: (1 - beta)/(1 - beta^n) = 1, 0.1/0.19, 0.1/0.3439.
  raw = np.array([1.0, 0.1 / 0.19, 0.1 / 0.3439])
  np.testing.assert_allclose(losses.effective_number_weights([1, 2, 4], 0.9),
                             raw / raw.sum() * 3, rtol=1e-12)
  # beta -> 0 gives equal weights; large beta approaches 1 / n_c.
  np.testing.assert_allclose(losses.effective_number_weights([1, 2, 4], 0.0), 1.0)
  w = losses.effective_number_weights([10, 20, 40], 1 - 1e-9)
  np.testing.assert_allclose(w / w[0], [1, 0.5, 0.25], rtol=1e-6)


@pytest.mark.parametrize("base", ["ce", "focal"])
def test_class_balanced_weights_each_label(base):
  counts = [500, 60, 7, 1]
  w = losses.effective_number_weights(counts, 0.9999)
  p_y = np.exp(-nll_rows(LOGITS, LABELS))
  unweighted = -np.log(p_y) * ((1 - p_y) if base == "focal" else 1.0)  # gamma = 1.
  got = evaluate_loss(loss_cfg("class_balanced", base=base), counts, LOGITS, LABELS)
  np.testing.assert_allclose(got, w[LABELS] * unweighted, rtol=1e-5)


def test_cdt_divides_logits_by_class_temperatures():
  counts = [100, 25, 4, 1]  # gamma = 0.5: a = (100/n)^0.5 = 1, 2, 5, 10.
  got = evaluate_loss(loss_cfg("cdt", cdt_gamma=0.5), counts, LOGITS, LABELS)
  np.testing.assert_allclose(got, nll_rows(LOGITS / np.array([1, 2, 5, 10.0]), LABELS),
                             rtol=1e-5)


def test_ldam_margins_and_loss():
  counts = [625, 81, 16, 1]  # n^(1/4) = 5, 3, 2, 1: margins ~ 1/5, 1/3, 1/2, 1.
  margins = np.array([0.1, 1 / 6, 0.25, 0.5])  # Scaled so the largest is 0.5.
  np.testing.assert_allclose(losses.ldam_margins(counts, 0.5), margins, rtol=1e-12)
  cosines = np.tanh(LOGITS)  # Stand-ins for cos(theta) in [-1, 1].
  expected = []
  for z, y in zip(30 * cosines, LABELS):
    z = z.copy()
    z[y] -= 30 * margins[y]  # s (cos theta_y - m_y): the margin only on the label.
    expected.append(nll_rows(z[None], [y])[0])
  got = evaluate_loss(loss_cfg("ldam"), counts, 30 * cosines, LABELS, logit_scale=30.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_drw_switches_on_at_its_epoch():
  counts = [1, 2, 3]
  raw = np.array([1.0, 0.5 / 0.75, 0.5 / 0.875])  # beta = 0.5.
  w = raw / raw.sum() * 3
  logits, labels = LOGITS[:, :3], np.array([0, 1, 2, 2, 0, 1])
  cfg = loss_cfg("ce", schedule="drw", drw_epoch=2, cb_beta=0.5)
  ce = nll_rows(logits, labels)
  # 5 steps an epoch: epoch 2 starts at step 10.
  np.testing.assert_allclose(evaluate_loss(cfg, counts, logits, labels, 9, 5), ce, rtol=1e-5)
  np.testing.assert_allclose(evaluate_loss(cfg, counts, logits, labels, 10, 5),
                             w[labels] * ce, rtol=1e-5)
  # And on any other loss, e.g. Bayias.
  bayias = nll_rows(logits + np.log(np.array(counts) / 6) + np.log(3), labels)
  np.testing.assert_allclose(
      evaluate_loss(loss_cfg("bayias", schedule="drw", drw_epoch=0, cb_beta=0.5),
                    counts, logits, labels, 0, 5), w[labels] * bayias, rtol=1e-5)


def test_normalized_head_gives_scaled_cosines():
  head = heads.NormalizedLinear(num_classes=3, scale=30.0)
  x = np.random.RandomState(2).randn(5, 7).astype(np.float32)
  params = head.init(jax.random.key(1), x)
  w = np.asarray(params["params"]["kernel"], np.float64)
  assert w.min() >= -1 and w.max() <= 1  # LDAM-DRW's U(-1, 1) init.
  cosine = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
  np.testing.assert_allclose(head.apply(params, x), 30 * cosine, rtol=1e-5, atol=1e-5)
  shapes = jax.eval_shape(lambda: tiny_resnet("normalized").init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
  assert shapes["params"]["NormalizedLinear_0"]["kernel"].shape == (16, 4)  # No bias.


# --- Samplers and config ---------------------------------------------------------

@pytest.mark.parametrize("sampler,tau", [("class_balanced", 0.0), ("square_root", 0.5)])
def test_resamplers_follow_pi_to_the_tau(sampler, tau):
  dataset = synthetic_dataset()
  cfg = step_lib.make_step_config(synthetic_config(sampler__name=sampler, mix__name="none"),
                               dataset)
  labels = jnp.asarray(dataset.train_labels)

  def batch_labels(key):
    return batches.prepare_batch(jnp.asarray(dataset.train_images), labels, jnp.int32(0),
                               key, jnp.arange(len(labels)), cfg)["label"]

  drawn = np.asarray(jax.jit(jax.vmap(batch_labels))(jax.random.split(jax.random.key(3), 100)))
  observed = np.bincount(drawn.ravel(), minlength=4)
  expected = np.power(COUNTS, tau) / np.sum(np.power(COUNTS, tau)) * drawn.size
  assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_in_batch_pairing_keeps_random_partners_random():
  dataset = synthetic_dataset()
  make = lambda name: step_lib.make_step_config(
      synthetic_config(mix__name=name, mix__pairing="in_batch", mix__tau=-0.5), dataset)
  assert make("mixup").in_batch_exponent == 0.0   # Uniform over the batch, like R.
  assert make("remix").in_batch_exponent == 0.0
  # tau = -0.5 in the paper's units: partner class ∝ pi^-0.5 = n^-1.5 n.
  assert make("unimix").in_batch_exponent == -1.5
  assert make("unimix_sampler").in_batch_exponent == -1.5
  counts = lambda name: step_lib.make_step_config(synthetic_config(
      mix__name=name, mix__pairing="in_batch", mix__tau=-0.5, mix__tau_units="counts"),
      dataset)
  assert counts("unimix").in_batch_exponent == -0.5  # The official code's n^tau.
  assert counts("mixup").in_batch_exponent == 0.0


@pytest.mark.parametrize("tau,units,exponent", [
    (-1.0, "prior", -1.0), (-1.0, "counts", 0.0), (-0.5, "counts", 0.5), (0.0, "counts", 1.0)])
def test_tau_units_set_the_partner_class_law(tau, units, exponent):
  """R*'s class probabilities are pi^exponent, normalised (checked by hand)."""
  dataset = synthetic_dataset()
  cfg = step_lib.make_step_config(
      synthetic_config(mix__name="unimix", mix__tau=tau, mix__tau_units=units), dataset)
  expected = np.power(COUNTS, exponent) / np.sum(np.power(COUNTS, exponent))
  np.testing.assert_allclose(np.exp(np.asarray(cfg.log_class_probs)), expected, rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (dict(loss__name="ldam"), "needs the normalised cosine head"),
    (dict(loss__schedule="drw", loss__drw_epoch=2), r"drw_epoch=2 must be in \[0, num_epochs=2\)"),
    (dict(loss__name="class_balanced", loss__schedule="drw"), "weights twice"),
    (dict(loss__schedule="later"), "loss.schedule='later' is unknown"),
    (dict(loss__base="hinge"), "loss.base='hinge' is unknown"),
    (dict(loss__cb_beta=1.0), r"cb_beta must be in \[0, 1\)"),
    (dict(sampler__name="oversample"), "sampler.name='oversample' is unknown"),
    (dict(model__head="mlp"), "model.head='mlp' is unknown"),
    (dict(mix__remix_kappa=0.5), "remix_kappa must be >= 1"),
    (dict(mix__manifold_layers=(0, 4)), "manifold_layers must be a non-empty subset"),
    (dict(mix__tau_units="log"), "mix.tau_units=.log. is unknown"),
])
def test_method_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(tiny_config(**overrides))


# --- One short training run per method ----------------------------------------------

SMOKE_RUNS = {
    # Each method at least once; combinations show any mix goes with any loss.
    "remix+focal+square_root": dict(mix__name="remix", loss__name="focal",
                                    sampler__name="square_root"),
    "manifold_mixup+ldam+drw": dict(mix__name="manifold_mixup", loss__name="ldam",
                                    loss__schedule="drw", model__head="normalized"),
    "unimix_factor+class_balanced": dict(mix__name="unimix_factor",
                                         loss__name="class_balanced"),
    "unimix_sampler+cdt+class_balanced_sampler": dict(
        mix__name="unimix_sampler", loss__name="cdt", sampler__name="class_balanced"),
    "mixup+logit_adjusted": dict(mix__name="mixup", loss__name="logit_adjusted"),
}


@pytest.fixture(scope="module")
def separable():
  return synthetic_dataset()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE_RUNS))
def test_method_trains_on_a_separable_set(name, separable):
  config = synthetic_config(**SMOKE_RUNS[name])
  config_checks.check_config(config)
  setup = setup_lib.build_for([config], separable, parallel.make_mesh())
  state, losses_seen = setup.state, []
  for step in range(config.num_epochs * setup.step_cfg.steps_per_epoch):
    fed = setup.feed.fed(step, setup.run_keys)
    state, step_stats = setup.update(state, fed, *setup.arrays)
    losses_seen.append(float(step_stats["loss"]))
  assert np.all(np.isfinite(losses_seen))
  assert np.mean(losses_seen[-5:]) < np.mean(losses_seen[:5])
  test = len(separable.test_labels)
  stats, logits = setup.eval_step(state, jnp.asarray(separable.test_images),
                                  jnp.asarray(separable.test_labels), jnp.arange(test))
  accuracy = np.mean(np.asarray(logits).argmax(1) == separable.test_labels)
  assert int(stats["top1_correct"]) == round(accuracy * test)
  assert accuracy > 0.5, accuracy  # Chance is 0.25 on the balanced test set.
