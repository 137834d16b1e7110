"""Per-example classification losses, chosen by `loss.name`, and DRW.

`make_loss` returns a pure function (logits [B, C], labels [B], step) -> [B].
Mixed samples combine two such calls (Eq. 11, see `mixing.mixed_loss`); every
per-class weight or margin below depends on the label only, so it applies to
each label term of Eq. 11 alike.

| loss.name      | per example (z: logits, y: label)                    | from              |
|----------------|------------------------------------------------------|-------------------|
| ce             | CE(z, y)                                             | ERM               |
| bayias         | CE(z + log pi - log pi', y) (Eq. 14-15)              | this paper        |
| logit_adjusted | CE(z + tau log pi, y)                                | Menon et al. 2021 |
| focal          | -(1 - p_y)^gamma log p_y                             | Lin et al. 2017   |
| class_balanced | w_y CE or w_y focal, w_c ~ (1-beta)/(1-beta^n_c)     | Cui et al. 2019   |
| cdt            | CE(z / a, y), a_c = (n_max / n_c)^gamma              | Ye et al. 2020    |
| ldam           | CE(z - s m_y e_y, y), m_c ~ n_c^(-1/4), max 0.5      | Cao et al. 2019   |
| las            | (1 - e_y) CE(z, y) + e_y mean_c -log p_c, e_y from n_y | Zhong et al. 2021 |

`loss.schedule='drw'` (deferred re-weighting, Cao et al. 2019) multiplies any
of them by the effective-number weights w_y from epoch `loss.drw_epoch` on.
Weights are a per-sample coefficient averaged over the batch (Cui et al.'s
Eq. B.13 form), not PyTorch's weighted mean `sum w l / sum w`, which would
couple the samples of a batch and has no per-example form for Eq. 11.
Counts n_c below are floored at 1 (a class with no image never is a label).
"""

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lt_calib.data import long_tail
from lt_calib.errors import ConfigError

BaseLossFn = Callable[[jax.Array, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

SCHEDULES = ("none", "drw")
FOCAL_BASES = ("ce", "focal")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels, per example."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float) -> jax.Array:
  """Focal loss (Lin et al. 2017): -(1 - p_y)^gamma log p_y, per example."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  log_p_y = jnp.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]
  # 1 - p_y as -expm1(log p_y) keeps precision when p_y is near 1; the floor
  # keeps the gradient of x^gamma finite at x = 0 when gamma < 1.
  one_minus_p = jnp.maximum(-jnp.expm1(log_p_y), 1e-30)
  return -(one_minus_p ** gamma) * log_p_y


def _counts(prior: long_tail.ClassPrior) -> np.ndarray:
  return np.maximum(np.asarray(prior.counts, np.float64), 1.0)


def effective_number_weights(counts: np.ndarray, beta: float) -> np.ndarray:
  """Class-balanced weights of Cui et al. 2019: (1 - beta) / (1 - beta^n_c).

  1 / effective number of samples, normalised to sum to C (so a balanced set
  gets weight 1 everywhere).

  Args:
    counts: [C] images per class (>= 1).
    beta: in [0, 1); 0.9999 in Cui et al. and LDAM-DRW on CIFAR.

  Returns:
    float64 [C] weights.
  """
  counts = np.asarray(counts, np.float64)
  weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
  return weights / weights.sum() * len(counts)


def ldam_margins(counts: np.ndarray, max_margin: float) -> np.ndarray:
  """LDAM margins m_c = C / n_c^(1/4) with C so that max_c m_c = max_margin."""
  raw = 1.0 / np.power(np.asarray(counts, np.float64), 0.25)
  return raw * (max_margin / raw.max())


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
  if not isinstance(spec, str):
    raise ConfigError(f"loss.test_prior={spec!r}: expected 'uniform' or "
                      f"{num_classes} comma-separated numbers.")
  try:
    weights = np.array([float(w) for w in spec.split(",")])
  except ValueError as e:
    raise ConfigError(f"loss.test_prior={spec!r}: expected 'uniform' or "
                      f"{num_classes} comma-separated numbers.") from e
  if weights.shape != (num_classes,):
    raise ConfigError(f"loss.test_prior needs {num_classes} positive finite weights "
                      f"(one per class), got {weights.size}: {spec!r}.")
  if not np.all(np.isfinite(weights) & (weights > 0)):
    bad = weights[~(np.isfinite(weights) & (weights > 0))].tolist()
    raise ConfigError(f"loss.test_prior needs {num_classes} positive finite weights, "
                      f"but {spec!r} has {bad}.")
  return weights / weights.sum()


def bayias_offset(log_prior: np.ndarray, test_prior: np.ndarray) -> np.ndarray:
  """Bayias B_y of Eq. 14: log pi_y - log pi'_y (= log pi_y + log C if uniform)."""
  return log_prior - np.log(test_prior)


def _offset_ce(offset: np.ndarray) -> BaseLossFn:
  offset = jnp.asarray(offset, jnp.float32)

  def loss(logits, labels):
    return cross_entropy(logits + offset, labels)
  return loss


def make_bayias(cfg, prior: long_tail.ClassPrior, logit_scale: float) -> BaseLossFn:
  """Bayias-compensated CE (Eq. 15): CE on z + B, in training only.

  Adding B_y to every logit is the pairwise form of Eq. 15:
  -log softmax(z + B)_y = log(1 + sum_{k != y} exp(B_k - B_y + z_k - z_y)).
  Predictions at test time use the raw logits z.
  """
  del logit_scale
  return _offset_ce(bayias_offset(
      prior.log_prior, parse_test_prior(cfg.get("test_prior", "uniform"),
                                        len(prior.counts))))


def make_logit_adjusted(cfg, prior: long_tail.ClassPrior, logit_scale: float) -> BaseLossFn:
  """Logit-adjusted loss (Menon et al. 2021, Eq. 10): CE(z + tau log pi).

  tau = `loss.la_tau` (1 in their paper). With tau = 1 it differs from
  Bayias only by the constant log C, which softmax ignores.
  """
  del logit_scale
  return _offset_ce(cfg.la_tau * prior.log_prior)


def make_ce(cfg, prior, logit_scale) -> BaseLossFn:
  """Plain softmax cross-entropy (ERM)."""
  del cfg, prior, logit_scale
  return cross_entropy


def make_focal(cfg, prior, logit_scale) -> BaseLossFn:
  """Focal loss, gamma = `loss.focal_gamma` (1.0 as in LDAM-DRW's code).

  Lin et al. 2017 use gamma = 2 for detection; LDAM-DRW's CIFAR-LT focal
  baseline, the source of Table 1's Focal row, uses gamma = 1.
  """
  del prior, logit_scale
  gamma = float(cfg.focal_gamma)
  return lambda logits, labels: focal_loss(logits, labels, gamma)


def make_class_balanced(cfg, prior, logit_scale) -> BaseLossFn:
  """Class-balanced loss (Cui et al. 2019): w_y times CE or focal.

  w from `effective_number_weights` with beta = `loss.cb_beta` (0.9999, the
  CIFAR-LT setting of Cui et al.); `loss.base` picks CE ('ce', Table 3's
  CB-CE) or focal ('focal', Table 1's CB-Focal, gamma = `loss.focal_gamma`).
  """
  del logit_scale
  if cfg.base not in FOCAL_BASES:
    raise ConfigError(f"loss.base={cfg.base!r} is unknown; allowed: {FOCAL_BASES}.")
  base = cross_entropy if cfg.base == "ce" else make_focal(cfg, prior, 1.0)
  weights = jnp.asarray(effective_number_weights(_counts(prior), cfg.cb_beta), jnp.float32)
  return lambda logits, labels: weights[labels] * base(logits, labels)


def make_cdt(cfg, prior, logit_scale) -> BaseLossFn:
  """Class-dependent temperatures (Ye et al. 2020): CE(z / a), a_c = (n_max/n_c)^gamma.

  Training only: predictions use the raw logits, as in CDT. gamma =
  `loss.cdt_gamma`, 0.2: Ye et al. pick it on a grid in [0, 0.4] for
  CIFAR-10-LT and [0, 0.2] for CIFAR-100-LT.
  """
  del logit_scale
  counts = _counts(prior)
  temperatures = jnp.asarray((counts.max() / counts) ** cfg.cdt_gamma, jnp.float32)
  return lambda logits, labels: cross_entropy(logits / temperatures, labels)


def make_ldam(cfg, prior, logit_scale) -> BaseLossFn:
  """LDAM (Cao et al. 2019): CE(z - s m_y e_y) on a normalised head's logits.

  The head gives z = s cos(theta) (`model.head='normalized'`, s =
  `model.head_scale`, 30 as in LDAM-DRW); margins m_c = C / n_c^(1/4) with the
  largest `loss.ldam_max_margin` (0.5) are in cosine units, hence times s.
  """
  margins = jnp.asarray(logit_scale * ldam_margins(_counts(prior), cfg.ldam_max_margin),
                        jnp.float32)

  def loss(logits, labels):
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return cross_entropy(logits - margins[labels][:, None] * onehot, labels)
  return loss


LAS_SHAPES = ("concave", "linear", "convex")


def las_smoothing(counts: np.ndarray, head: float, tail: float, shape: str) -> np.ndarray:
  """Label-aware smoothing e_c of MiSLAS (Zhong et al. 2021, Sec. 4; `LabelAwareSmoothing`).

  e_c runs from `tail` at the rarest class (n_K) to `head` at the most
  frequent (n_1) along the chosen curve of u = (n_c - n_K) / (n_1 - n_K):
  concave tail + (head - tail) sin(pi u / 2) (their default), linear
  tail + (head - tail) u, convex head + (head - tail) sin(3 pi / 2 + pi u / 2).

  Args:
    counts: [C] images per class.
    head: e_1 (MiSLAS stage 2: 0.3 on CIFAR-10-LT, 0.4 on CIFAR-100-LT).
    tail: e_K (0.0 on CIFAR-10-LT, 0.1 on CIFAR-100-LT).
    shape: one of LAS_SHAPES.

  Returns:
    float64 [C]; all `head` when every class has the same count.
  """
  if shape not in LAS_SHAPES:
    raise ConfigError(f"loss.las_shape={shape!r} is unknown; allowed: {LAS_SHAPES}.")
  counts = np.asarray(counts, np.float64)
  spread = counts.max() - counts.min()
  u = (counts - counts.min()) / spread if spread > 0 else np.ones_like(counts)
  if shape == "concave":
    return tail + (head - tail) * np.sin(np.pi * u / 2)
  if shape == "linear":
    return tail + (head - tail) * u
  return head + (head - tail) * np.sin(1.5 * np.pi + np.pi * u / 2)


def make_las(cfg, prior, logit_scale) -> BaseLossFn:
  """Label-aware smoothing (MiSLAS's stage-2 loss): CE smoothed by e_y of the label's class.

  Per example (1 - e_y) (-log p_y) + e_y mean_c (-log p_c), with e from
  `las_smoothing(counts, loss.las_head, loss.las_tail, loss.las_shape)`.
  """
  del logit_scale
  smoothing = jnp.asarray(las_smoothing(np.asarray(prior.counts), cfg.las_head,
                                        cfg.las_tail, cfg.las_shape), jnp.float32)

  def loss(logits, labels):
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]
    e = smoothing[labels]
    return (1.0 - e) * nll + e * -jnp.mean(log_p, axis=-1)
  return loss


LOSSES: Dict[str, Callable] = {
    "ce": make_ce, "bayias": make_bayias, "logit_adjusted": make_logit_adjusted,
    "focal": make_focal, "class_balanced": make_class_balanced, "cdt": make_cdt,
    "ldam": make_ldam, "las": make_las,
}


def make_loss(cfg, prior: long_tail.ClassPrior, steps_per_epoch: int = 1,
              logit_scale: float = 1.0) -> LossFn:
  """Builds the per-example loss named by `cfg.name`, with its schedule.

  Args:
    cfg: `config.loss`.
    prior: training ClassPrior (counts and pi).
    steps_per_epoch: converts `cfg.drw_epoch` into a step.
    logit_scale: s of a normalised head (its logits are s cos theta); LDAM's
      margins are in cosine units and are multiplied by it.

  Returns:
    fn(logits [B, C], labels [B], step) -> [B]. `step` is the traced global
    step, so DRW switches on without recompiling.
  """
  if cfg.name not in LOSSES:
    raise ConfigError(f"loss.name={cfg.name!r} is unknown; allowed: {sorted(LOSSES)}.")
  base = LOSSES[cfg.name](cfg, prior, logit_scale)
  schedule = cfg.get("schedule", "none")
  if schedule not in SCHEDULES:
    raise ConfigError(f"loss.schedule={schedule!r} is unknown; allowed: {SCHEDULES}.")
  if schedule == "none":
    return lambda logits, labels, step: base(logits, labels)
  # DRW (Cao et al. 2019, Sec. 3.3): plain loss until drw_epoch, then the
  # effective-number weights (beta = cb_beta; their code's 0.9999).
  weights = jnp.asarray(effective_number_weights(_counts(prior), cfg.cb_beta), jnp.float32)
  drw_step = int(cfg.drw_epoch * steps_per_epoch)

  def deferred(logits, labels, step):
    class_weights = jnp.where(step >= drw_step, weights, 1.0)
    return class_weights[labels] * base(logits, labels)
  return deferred
