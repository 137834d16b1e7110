"""Test-prior estimators against independent references and known answers."""

import numpy as np
import pytest
import scipy.special
import scipy.stats

from lt_calib.calibration import prior_estimation as pe
from lt_calib.errors import ConfigError


def test_em_equals_quapys_emq_on_the_same_posteriors():
  quapy_emq = pytest.importorskip("quapy.method.aggregative").EMQ
  rng = np.random.RandomState(0)
  probs = rng.dirichlet([0.6] * 5, size=800)
  source = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
  ours = pe.em_prior(probs, source, tol=1e-13)
  theirs, _ = quapy_emq.EM(source, probs, epsilon=1e-13)  # Saerens et al.'s EM, as quapy has it.
  assert ours.converged and ours.iterations > 1
  np.testing.assert_allclose(ours.prior, theirs, atol=1e-6)


def gaussian_posteriors(labels, source, means, rng):
  """Exact posteriors p_s(y|x) of 1-D unit Gaussians with `means`, under `source`."""
  x = rng.randn(len(labels)) + means[labels]
  log_joint = np.log(source) + scipy.stats.norm.logpdf(x[:, None], loc=means[None, :])
  return scipy.special.softmax(log_joint, axis=1)


def test_em_recovers_a_shifted_prior_from_exact_posteriors():
  rng = np.random.RandomState(1)
  means = np.array([0.0, 2.0, 4.0, 6.0])
  source, target = np.full(4, 0.25), np.array([0.05, 0.15, 0.3, 0.5])
  labels = rng.choice(4, size=20_000, p=target)
  estimate = pe.em_prior(gaussian_posteriors(labels, source, means, rng), source)
  truth = np.bincount(labels, minlength=4) / len(labels)
  # The MLE from 20,000 draws: a few thousandths off the sample's frequencies.
  np.testing.assert_allclose(estimate.prior, truth, atol=0.02)
  assert pe.prior_errors(estimate.prior, truth)["l1"] < 0.04
  # Without EM, the mean posterior is pulled towards the source prior.
  assert np.abs(gaussian_posteriors(labels, source, means, rng).mean(0) - truth).sum() > 0.05


def predictions_with_confusion(class_counts, confusion, num_classes):
  """Labels and one-hot-ish probabilities whose argmax follows P(yhat | y) exactly."""
  labels, predicted = [], []
  for y, count in enumerate(class_counts):
    per_prediction = np.round(confusion[:, y] * count).astype(int)
    assert per_prediction.sum() == count
    for yhat, k in enumerate(per_prediction):
      labels += [y] * k
      predicted += [yhat] * k
  probs = np.full((len(labels), num_classes), 0.1 / (num_classes - 1))
  probs[np.arange(len(labels)), predicted] = 0.9
  return np.array(labels), probs


def test_bbse_recovers_a_known_prior_through_a_known_confusion_matrix():
  # P(yhat = i | y = j): 70-80 % right, the rest spread over the others.
  confusion = np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.1], [0.1, 0.2, 0.8]])
  val_labels, val_probs = predictions_with_confusion([500, 300, 200], confusion, 3)
  target = np.array([0.1, 0.3, 0.6])
  _, test_probs = predictions_with_confusion((target * 2000).astype(int), confusion, 3)
  # By hand: mu = M q = [0.17, 0.26, 0.57]; C = M diag(p), so C^-1 mu = q / p.
  estimate = pe.bbse_prior(test_probs, val_probs, val_labels)
  np.testing.assert_allclose(estimate.prior, target, atol=1e-9)
  soft = pe.bbse_prior(test_probs, val_probs, val_labels, soft=True)
  np.testing.assert_allclose(soft.prior, target, atol=1e-9)  # Soft counts mix linearly too.


def test_bcts_recovers_temperature_and_biases():
  rng = np.random.RandomState(2)
  logits = 3.0 * rng.randn(30_000, 4)
  bias = np.array([0.6, -0.6, 0.3, -0.3])
  probs = scipy.special.softmax(logits / 2.0 + bias, axis=1)
  labels = (probs.cumsum(1) > rng.rand(len(probs), 1)).argmax(1)
  temperature, fitted = pe.fit_bcts(logits, labels)
  assert temperature == pytest.approx(2.0, rel=0.05)
  np.testing.assert_allclose(fitted, bias, atol=0.06)


def test_bcts_em_undoes_a_miscalibrated_models_shift():
  # Posteriors too confident (T = 3 too cold) and biased: EM on them is off,
  # BCTS + EM on the held-out split's calibration recovers the shift.
  rng = np.random.RandomState(3)
  means = np.array([0.0, 1.5, 3.0])
  val_labels = np.repeat(np.arange(3), 3000)
  target = np.array([0.6, 0.3, 0.1])
  test_labels = rng.choice(3, size=20_000, p=target)

  def logits_of(labels):
    exact = np.log(gaussian_posteriors(labels, np.full(3, 1 / 3), means, rng))
    return 3.0 * exact + np.array([0.0, 1.0, -1.0])

  val_logits, test_logits = logits_of(val_labels), logits_of(test_labels)
  truth = np.bincount(test_labels, minlength=3) / len(test_labels)
  naive = pe.em_prior(scipy.special.softmax(test_logits, axis=1), np.full(3, 1 / 3))
  fixed = pe.bcts_em_prior(test_logits, val_logits, val_labels)
  assert fixed.converged
  assert pe.prior_errors(fixed.prior, truth)["l1"] < 0.05
  assert pe.prior_errors(naive.prior, truth)["l1"] > 2 * pe.prior_errors(fixed.prior,
                                                                          truth)["l1"]


def test_prior_errors_by_hand():
  errors = pe.prior_errors([0.5, 0.5], [0.25, 0.75])
  assert errors["l1"] == pytest.approx(0.5)
  assert errors["kl"] == pytest.approx(0.25 * np.log(0.5) + 0.75 * np.log(1.5))


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="source_prior has a zero entry"):
    pe.em_prior(np.full((3, 2), 0.5), [1.0, 0.0])
  with pytest.raises(ValueError, match=r"classes \[2\] have no example"):
    pe.bbse_prior(np.full((4, 3), 1 / 3), np.full((4, 3), 1 / 3), [0, 1, 1, 0])
  with pytest.raises(ValueError, match="probs has 3 classes, source_prior 2"):
    pe.em_prior(np.full((2, 3), 1 / 3), [0.5, 0.5])


def exact_model(per_class_test=600, seed=4):
  """A model whose logits are exact log posteriors under a uniform prior (as Bayias')."""
  from lt_calib.calibration import prior_table  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  means, uniform = np.array([0.0, 3.0, 6.0]), np.full(3, 1 / 3)
  test_labels = np.repeat(np.arange(3), per_class_test)
  val_labels = np.repeat(np.arange(3), 400)
  logits = lambda y: np.log(gaussian_posteriors(y, uniform, means, rng))
  return prior_table.Model(logits(test_labels), test_labels, np.array([600, 200, 50]),
                           np.log(uniform), (logits(val_labels), val_labels))


def test_prior_table_rows_by_construction():
  from lt_calib.calibration import prior_table  # pylint: disable=g-import-not-at-top
  rows = prior_table.rows(exact_model(), [10.0, 1.0, 0.1], prior_table.PRIORS)
  cell = {(r["prior"], r["test_rho"]): r for r in rows}
  for rho in (10.0, 1.0, 0.1):
    assert cell[("oracle", rho)]["l1"] == 0.0
    assert cell[("em", rho)]["l1"] < 0.06 and cell[("bcts_em", rho)]["l1"] < 0.08
    assert cell[("bbse", rho)]["l1"] < 0.1
    # EM's prior predicts almost as well as the true one.
    assert cell[("em", rho)]["top1"] >= cell[("oracle", rho)]["top1"] - 0.02
  # rho' = 1 keeps the balanced set: uniform is the truth, and scores as it.
  assert cell[("uniform", 1.0)]["l1"] == pytest.approx(0.0, abs=1e-12)
  assert cell[("uniform", 1.0)]["top1"] == cell[("oracle", 1.0)]["top1"]
  # A skewed test set: knowing its prior beats assuming a uniform one, and
  # the training prior on the reversed set costs the most.
  assert cell[("oracle", 10.0)]["top1"] > cell[("uniform", 10.0)]["top1"]
  assert cell[("oracle", 0.1)]["top1"] > cell[("train", 0.1)]["top1"] + 0.05
  # 'train' is pi_train = (600, 200, 50) / 850 whatever the test set.
  # The rho' = 10 set keeps int(600 x 10^(-c/2)) = 600, 189, 60 images a class.
  truth = np.array([600, 189, 60]) / 849
  assert cell[("train", 10.0)]["l1"] == pytest.approx(
      np.abs(np.array([600, 200, 50]) / 850 - truth).sum(), abs=1e-9)
  text = prior_table.markdown(rows)
  assert text.count("| bcts_em |") == 4 and "L1 error of the prior" in text


def test_unknown_or_unusable_priors_are_refused():
  from lt_calib.calibration import prior_table  # pylint: disable=g-import-not-at-top
  from lt_calib.errors import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"unknown entries \['median'\]"):
    prior_table.check_priors(["em", "median"], has_held_out=True)
  with pytest.raises(ConfigError, match="bbse needs a labelled held-out split"):
    prior_table.check_priors(["em", "bbse"], has_held_out=False)
  assert prior_table.check_priors(["oracle", "em"], has_held_out=False) == ["oracle", "em"]


def test_held_out_split_missing_a_class_is_refused_for_bbse():
  from lt_calib.calibration import prior_table  # pylint: disable=g-import-not-at-top
  from lt_calib.errors import ConfigError  # pylint: disable=g-import-not-at-top
  model = exact_model()
  val_logits, val_labels = model.validation
  keep = val_labels != 0  # As CIFAR-10-LT's head class, which uses all 5,000 images.
  model = model._replace(validation=(val_logits[keep], val_labels[keep]))
  with pytest.raises(ConfigError, match=r"classes \[0\] have none"):
    prior_table.rows(model, [1.0], ["em", "bbse"])
  assert len(prior_table.rows(model, [1.0], ["em"])) == 1  # EM needs no held-out split.


def test_mean_over_runs_gives_mean_and_sample_std(tmp_path):
  from lt_calib.calibration import prior_table  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  def run(top1, l1):
    return [{"prior": "em", "test_rho": 10.0, "num_images": 500, "top1": top1,
             "mean_class_acc": top1, "ece": 0.1, "nll": 1.0, "l1": l1, "kl": 0.0,
             "em_iterations": 7}]
  # top-1 0.5, 0.6, 0.7: mean 0.6, sample std 0.1; l1 0.2, 0.2, 0.5: 0.3, sqrt(0.03).
  for k, (top1, l1) in enumerate(((0.5, 0.2), (0.6, 0.2), (0.7, 0.5))):
    (tmp_path / f"s{k}").mkdir()
    (tmp_path / f"s{k}" / "evaluation.json").write_text(
        json.dumps({"prior_estimation": run(top1, l1)}))
  rows = prior_table.write_mean_table([tmp_path / f"s{k}" for k in range(3)], tmp_path / "mean")
  assert rows[0]["runs"] == 3
  assert rows[0]["top1"] == pytest.approx(0.6) and rows[0]["top1_std"] == pytest.approx(0.1)
  assert rows[0]["l1"] == pytest.approx(0.3) and rows[0]["l1_std"] == pytest.approx(0.03 ** 0.5)
  text = (tmp_path / "mean" / "prior_estimation_mean.md").read_text()
  assert "| em | 60.00 ± 10.00 |" in text and "| em | 0.300 ± 0.173 |" in text
  with pytest.raises(ConfigError, match="holds no prior_estimation table"):
    prior_table.write_mean_table([tmp_path], tmp_path / "mean")
