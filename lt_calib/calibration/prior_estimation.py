"""Estimating an unknown test label distribution pi' from unlabelled test predictions.

Under label shift the class likelihood p(x|y) is shared and only the prior
moves, so a model's posteriors on the unlabelled test set carry pi'. Three
classical estimators (issue 19), each returning an `Estimate`:

* `em_prior` (Saerens, Latinne & Decaestecker 2002): EM on the posteriors.
  With q the running estimate of pi' and pi_s the prior the posteriors are
  calibrated to (the source prior), the E-step reweights every posterior by
  q / pi_s and renormalises, the M-step sets q to their mean. It is a
  maximum-likelihood estimate, exact when the posteriors are.
* `bbse_prior` (Lipton, Wang & Smola 2018, black-box shift estimation): with
  C[i, j] = P_s(yhat = i, y = j) from a labelled held-out split and
  mu[i] = P_t(yhat = i) on the test set, mu = C w solves for the importance
  weights w_j = pi'_j / pi_s_j; hard (argmax) or soft (probability) counts.
  Needs no calibration, only an invertible confusion matrix.
* `bcts_em_prior` (Alexandari, Kundaje & Shrikumar 2020): bias-corrected
  temperature scaling, softmax(z / T + b) fitted on the labelled held-out
  split, then EM with that split's label distribution as the source prior.

All work on NumPy arrays in float64. Where they fail (uncalibrated posteriors
for EM, a near-singular confusion matrix for BBSE, classes absent from the
held-out split) is in docs/calibration.md.
"""

from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.special


class Estimate(NamedTuple):
  """An estimate of the test prior."""
  prior: np.ndarray   # [C] pi', non-negative, sums to 1.
  iterations: int     # EM iterations (BBSE: 0, a closed form).
  converged: bool


def _distribution(values, name: str) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0) \
      or values.sum() <= 0:
    raise ValueError(f"{name} must be a vector of non-negative finite weights, "
                     f"got {values!r}.")
  return values / values.sum()


def _probabilities(probs, name: str) -> np.ndarray:
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or not np.all(np.isfinite(probs)) or np.any(probs < 0):
    raise ValueError(f"{name} must be [N, C] non-negative finite probabilities.")
  return probs / probs.sum(axis=1, keepdims=True)


def em_prior(probs, source_prior, tol: float = 1e-10, max_iter: int = 10_000) -> Estimate:
  """Saerens et al.'s EM estimate of the test prior.

  Args:
    probs: [N, C] test posteriors, calibrated to `source_prior`.
    source_prior: [C] the prior the posteriors assume (the training prior
      of a CE model, the uniform prior of a Bayias model:
      `posthoc.reference_log_prior`).
    tol: stop when no class's estimate moves by more than this in an
      iteration.
    max_iter: the iteration cap.

  Returns:
    Estimate; `converged` is False when the cap was reached.
  """
  probs = _probabilities(probs, "probs")
  source = _distribution(source_prior, "source_prior")
  if probs.shape[1] != len(source):
    raise ValueError(f"probs has {probs.shape[1]} classes, source_prior {len(source)}.")
  if np.any(source == 0):
    raise ValueError("source_prior has a zero entry: the posteriors of that class "
                     "cannot be reweighted; give every class a positive prior.")
  estimate = source
  for iteration in range(1, max_iter + 1):
    weighted = probs * (estimate / source)
    weighted /= weighted.sum(axis=1, keepdims=True)
    updated = weighted.mean(axis=0)
    if np.max(np.abs(updated - estimate)) < tol:
      return Estimate(updated, iteration, True)
    estimate = updated
  return Estimate(estimate, max_iter, False)


def confusion_joint(val_probs, val_labels, soft: bool) -> np.ndarray:
  """C[i, j] = P(yhat = i, y = j) on a labelled split (hard or soft counts)."""
  val_probs = _probabilities(val_probs, "val_probs")
  num_classes = val_probs.shape[1]
  labels = np.asarray(val_labels)
  onehot_true = np.eye(num_classes)[labels]
  predicted = val_probs if soft else np.eye(num_classes)[np.argmax(val_probs, axis=1)]
  return predicted.T @ onehot_true / len(labels)


def bbse_prior(test_probs, val_probs, val_labels, soft: bool = False) -> Estimate:
  """Lipton et al.'s black-box shift estimate of the test prior.

  Args:
    test_probs: [M, C] the model's probabilities on the unlabelled test set.
    val_probs: [N, C] its probabilities on a labelled held-out split drawn
      from the source distribution.
    val_labels: [N] that split's labels.
    soft: soft counts (probabilities) instead of argmax predictions.

  Returns:
    Estimate (iterations 0): w = C^+ mu by least squares, negative weights
    clipped to 0, pi' = w * pi_val normalised.

  Raises:
    ValueError: a class has no example in the labelled split (its column of
      C is zero, so its weight is undetermined).
  """
  test_probs = _probabilities(test_probs, "test_probs")
  joint = confusion_joint(val_probs, val_labels, soft)
  num_classes = joint.shape[0]
  val_prior = np.bincount(np.asarray(val_labels), minlength=num_classes) / len(val_labels)
  if np.any(val_prior == 0):
    missing = np.flatnonzero(val_prior == 0).tolist()
    raise ValueError(f"classes {missing} have no example in the labelled split: BBSE "
                     "cannot weigh them; use a split with every class.")
  if soft:
    mu = test_probs.mean(axis=0)
  else:
    mu = np.bincount(np.argmax(test_probs, axis=1), minlength=num_classes) / len(test_probs)
  weights = np.clip(np.linalg.lstsq(joint, mu, rcond=None)[0], 0.0, None)
  prior = weights * val_prior
  return Estimate(prior / prior.sum(), 0, True)


def _bcts_loss(params, logits, onehot):
  """NLL of softmax(z / T + b), T = exp(params[0]), and its gradient."""
  log_t, bias = params[0], params[1:]
  scaled = logits / np.exp(log_t) + bias
  log_probs = scaled - scipy.special.logsumexp(scaled, axis=1, keepdims=True)
  n = len(logits)
  loss = -np.sum(onehot * log_probs) / n
  residual = (np.exp(log_probs) - onehot) / n  # d loss / d scaled.
  grad_bias = residual.sum(axis=0)
  grad_log_t = -np.sum(residual * logits) / np.exp(log_t)
  return loss, np.concatenate([[grad_log_t], grad_bias])


def fit_bcts(logits, labels) -> tuple:
  """Bias-corrected temperature scaling: (T, b) minimising NLL of softmax(z / T + b).

  b is defined up to a constant (softmax ignores it); it is returned with
  mean 0.

  Args:
    logits: [N, C] logits of a labelled held-out split.
    labels: [N] its labels.

  Returns:
    (T > 0, b [C]).
  """
  logits = np.asarray(logits, np.float64)
  onehot = np.eye(logits.shape[1])[np.asarray(labels)]
  start = np.zeros(logits.shape[1] + 1)
  result = scipy.optimize.minimize(_bcts_loss, start, args=(logits, onehot), jac=True,
                                   method="L-BFGS-B")
  bias = result.x[1:] - result.x[1:].mean()
  return float(np.exp(result.x[0])), bias


def bcts_em_prior(test_logits, val_logits, val_labels, tol: float = 1e-10,
                  max_iter: int = 10_000) -> Estimate:
  """Alexandari et al.'s BCTS + EM estimate of the test prior.

  Args:
    test_logits: [M, C] the model's logits on the unlabelled test set.
    val_logits: [N, C] its logits on a labelled held-out split.
    val_labels: [N] that split's labels; their distribution is the source
      prior the calibrated posteriors refer to.
    tol: EM's tolerance.
    max_iter: EM's iteration cap.

  Returns:
    Estimate.
  """
  temperature, bias = fit_bcts(val_logits, val_labels)
  test_logits = np.asarray(test_logits, np.float64)
  probs = scipy.special.softmax(test_logits / temperature + bias, axis=1)
  source = np.bincount(np.asarray(val_labels), minlength=test_logits.shape[1])
  return em_prior(probs, source, tol=tol, max_iter=max_iter)


def prior_errors(estimate, true_prior) -> dict:
  """L1 distance and KL(true || estimate) between two priors."""
  estimate = _distribution(estimate, "estimate")
  true_prior = _distribution(true_prior, "true_prior")
  support = true_prior > 0
  kl = float(np.sum(true_prior[support] * (np.log(true_prior[support])
                                           - np.log(np.maximum(estimate[support], 1e-300)))))
  return {"l1": float(np.abs(estimate - true_prior).sum()), "kl": kl}
