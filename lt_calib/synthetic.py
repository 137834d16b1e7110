"""The synthetic SVM experiment of Sec. 4.1 (Eq. 16, Fig. 3).

Two disjoint discs z+ (centre (x0, y0)) and z- (centre (-x0, -y0)), radius
r, so the ideal boundary is y = -x. A balanced set holds m points of each
disc, an imbalanced one m positives and n << m negatives. A linear SVM is
trained on: balanced, imbalanced, imbalanced + mixup, imbalanced + UniMix.

Virtual points come from the library's own training pieces: x_i from one
epoch of the random sampler R (`sampling.epoch_permutation_slice`), x_j from
R* (`sampling.class_level_sample`, tau = 1 for mixup, tau = -1 for UniMix),
xi from `mixing.beta_factor` / `mixing.unimix_factor` with the imbalanced
set's prior, points from `mixing.mix_images`, and a hard label by
Definition 1 (y_i iff xi >= 0.5). One virtual point per real point (one
epoch of R); the SVM sees the real points and the virtual ones together.

Boundary w.x + b = 0 versus the ideal: the angle between w and the ideal
normal u = (1, 1)/sqrt2 (degrees, signed counter-clockwise), and the offset
t = -b / (w.u), where the boundary crosses the line through the origin along
u (> 0: moved towards the positive, majority disc).

  python -m lt_calib.synthetic --out=DIR [--seeds=10 --m=1000 --n=20]
"""

import csv
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import svm

from lt_calib import long_tail, mixing, sampling

METHODS = ("imbalanced", "mixup", "unimix", "balanced")  # Fig. 3 (a)-(d).
TITLES = {"imbalanced": "(a) imbalanced", "mixup": "(b) imbalanced + mixup",
          "unimix": "(c) imbalanced + UniMix", "balanced": "(d) balanced"}


class Setup(NamedTuple):
  """Geometry, sizes and hyper-parameters (defaults: see docs/theory.md)."""
  x0: float = 1.0        # Disc centres (x0, y0) and (-x0, -y0): 2.83 apart,
  y0: float = 1.0        # so with r = 1 the discs are disjoint (gap 0.83).
  r: float = 1.0
  m: int = 1000          # Points per disc in the balanced set; positives.
  n: int = 20            # Negatives in the imbalanced set (rho = m / n = 50).
  mixup_alpha: float = 1.0   # Appendix C.1: 1.0 for mixup,
  unimix_alpha: float = 0.5  # 0.5 for UniMix.
  unimix_tau: float = -1.0   # UniMix sampler exponent (Eq. 9).
  svm_c: float = 1.0         # Soft-margin C of the linear SVM.


def sample_disc(rng: np.random.Generator, centre, radius: float, k: int) -> np.ndarray:
  """k points uniform in a disc (sqrt of a uniform radius: uniform in area)."""
  rad = radius * np.sqrt(rng.uniform(size=k))
  ang = rng.uniform(0, 2 * np.pi, size=k)
  return np.asarray(centre) + np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


def make_data(seed: int, setup: Setup) -> dict:
  """Balanced and imbalanced sets: (points [N, 2], labels [N], 1 = z+)."""
  rng = np.random.default_rng(seed)
  pos = sample_disc(rng, (setup.x0, setup.y0), setup.r, setup.m)
  neg = sample_disc(rng, (-setup.x0, -setup.y0), setup.r, setup.m)
  # The imbalanced set's negatives are n of the balanced set's m.
  sets = {"balanced": (pos, neg), "imbalanced": (pos, neg[:setup.n])}
  return {name: (np.concatenate([p, q]), np.concatenate(
      [np.ones(len(p), np.int32), np.zeros(len(q), np.int32)])) for name, (p, q) in sets.items()}


def virtual_points(key: jax.Array, points: np.ndarray, labels: np.ndarray,
                   factor: str, alpha: float, tau: float):
  """One epoch of virtual points made with the training samplers and factors.

  Args:
    key: PRNG key.
    points: float [N, 2] real points.
    labels: int [N] in {0, 1}.
    factor: 'beta' (mixup) or 'unimix'.
    alpha: Beta concentration.
    tau: exponent of R* for the partner (1 = random partner).

  Returns:
    (points [N, 2], hard labels [N], xi [N]) of the virtual samples.
  """
  r_key, j_key, xi_key = jax.random.split(key, 3)
  prior = long_tail.class_prior(labels, 2)
  n = len(labels)
  first = sampling.epoch_permutation_slice(r_key, jnp.int32(0), n, n, 1)
  partner = sampling.class_level_sample(
      j_key, sampling.class_index(labels, 2),
      jnp.asarray(sampling.class_level_log_probs(prior.prior, tau), jnp.float32), n)
  lab = jnp.asarray(labels)
  pri = jnp.asarray(prior.prior, jnp.float32)
  xi = mixing.FACTORS[factor](xi_key, pri[lab[first]], pri[lab[partner]], alpha)
  pts = jnp.asarray(points, jnp.float32)
  mixed = mixing.mix_images(pts[first], pts[partner], xi)
  hard = jnp.where(xi >= 0.5, lab[first], lab[partner])  # Definition 1.
  return np.asarray(mixed), np.asarray(hard), np.asarray(xi)


def boundary_error(w: np.ndarray, b: float) -> tuple:
  """(signed angle in degrees between w and (1, 1), offset along (1, 1)/sqrt2)."""
  angle = math.degrees(math.atan2(w[1], w[0])) - 45.0
  angle = (angle + 180.0) % 360.0 - 180.0
  return angle, -b / (float(w[0] + w[1]) / math.sqrt(2))


def run_seed(seed: int, setup: Setup) -> dict:
  """Fits the four SVMs of one seed; returns per method its data and boundary."""
  data = make_data(seed, setup)
  key = jax.random.key(seed)
  out = {}
  for k, method in enumerate(METHODS):
    points, labels = data["balanced" if method == "balanced" else "imbalanced"]
    virtual = None
    if method in ("mixup", "unimix"):
      factor, alpha, tau = (("beta", setup.mixup_alpha, 1.0) if method == "mixup"
                            else ("unimix", setup.unimix_alpha, setup.unimix_tau))
      virtual = virtual_points(jax.random.fold_in(key, k), points, labels, factor, alpha, tau)
      train_x = np.concatenate([points, virtual[0]])
      train_y = np.concatenate([labels, virtual[1]])
    else:
      train_x, train_y = points, labels
    model = svm.SVC(kernel="linear", C=setup.svm_c).fit(train_x, train_y)
    w, b = model.coef_[0], float(model.intercept_[0])
    angle, offset = boundary_error(w, b)
    out[method] = {"points": points, "labels": labels, "virtual": virtual, "w": w, "b": b,
                   "angle": angle, "offset": offset,
                   "virtual_negative_share": None if virtual is None else float(np.mean(virtual[1] == 0))}
  return out
