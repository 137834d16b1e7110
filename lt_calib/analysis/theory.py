"""xi-Aug class distributions of Section 2 / Appendix A, closed form and simulated.

A virtual sample x~ = xi x_i + (1 - xi) x_j is a xi-Aug sample of class y_i
iff xi >= 0.5, else of y_j (Definition 1). The paper derives the class law of
xi-Aug samples for a continuous exponential long tail over y in [1, C] with
lambda = ln(rho) / (C - 1):

  Eq. 4 (A.4)  prior                p(y) = lambda / Z * exp(-lambda y),
               Z = exp(-lambda) - exp(-lambda C); integrates to 1.
  Eq. 5 (A.5)  mixup                = p(y); integrates to 1.
  Eq. 8 (A.8)  UniMix factor only   p(y) * F(y), F the CDF of p. NOT a density:
               it integrates to 1/2 (only the pairs whose random partner is
               the more frequent class are counted; the mirror term p(y) F(y)
               of pairs where x_j is the rarer one is missing).
  Eq. 10 (A.12) full UniMix         p(y) * G_tau(y), G_tau the CDF of P_inv
               (Eq. 9). NOT a density: it integrates to P(Y_j < Y_i), 1/2 at
               tau = 1 but only ~0.022 at C = 100, rho = 200, tau = -1,
               because it drops the term p_inv(y) F(y) of pairs where the
               inversely drawn x_j is the rarer one, the dominant case.
               `unimix_two_sided` adds it back (the law of max(Y_i, Y_j)).

All four rest on the idealisation that xi is ">= 0.5 iff x_j is the more
frequent class", i.e. xi* = pi_j / (pi_i + pi_j) exactly. The library's
factor draws xi*; `xi_aug_probability` gives the exact P(xi >= 0.5) it
implies and `exact_distribution` the resulting discrete class law.
`monte_carlo` draws pairs with the training code's own samplers and factors.

Classes: the paper's y = 1..C is the library's class y - 1 (class 0 = head).
Densities are compared with discrete frequencies by evaluating them at the
integers 1..C and normalising over those C values (`on_classes`).

  python -m lt_calib.analysis.theory --out=DIR [--classes=100 --rho=200] [--tau=-1]
"""

import csv
import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from lt_calib.method import mixing
from lt_calib.data import long_tail
from lt_calib.method import sampling

# --------------------------------------------------------------- closed forms


def decay_rate(num_classes: int, rho: float) -> float:
  """lambda = ln(rho) / (C - 1) of Eq. A.2."""
  return math.log(rho) / (num_classes - 1)


def prior_density(y, num_classes: int, rho: float):
  """Eq. 4 / A.4: lambda / (e^-lambda - e^-lambda C) e^(-lambda y) on [1, C]."""
  lam = decay_rate(num_classes, rho)
  return lam / (math.exp(-lam) - math.exp(-lam * num_classes)) * np.exp(-lam * np.asarray(y))


def prior_cdf(y, num_classes: int, rho: float):
  """F(y) = integral_1^y of Eq. 4."""
  lam = decay_rate(num_classes, rho)
  z = math.exp(-lam) - math.exp(-lam * num_classes)
  return (math.exp(-lam) - np.exp(-lam * np.asarray(y))) / z


def mixup_density(y, num_classes: int, rho: float):
  """Eq. 5 / A.5: mixup's xi-Aug law equals the prior (Corollary 1)."""
  return prior_density(y, num_classes, rho)


def inverse_density(y, num_classes: int, rho: float, tau: float):
  """Eq. 9 / A.14: P_inv(y) proportional to p(y)^tau (uniform at tau = 0)."""
  y = np.asarray(y, dtype=float)
  k = decay_rate(num_classes, rho) * tau
  if abs(k) < 1e-12:  # tau = 0: the paper's form is 0/0; its limit is uniform.
    return np.full_like(y, 1.0 / (num_classes - 1))
  return k * np.exp(-k * y) / (math.exp(-k) - math.exp(-k * num_classes))


def inverse_cdf(y, num_classes: int, rho: float, tau: float):
  """G_tau(y) = integral_1^y P_inv (the bracket of Eq. A.15)."""
  y = np.asarray(y, dtype=float)
  k = decay_rate(num_classes, rho) * tau
  if abs(k) < 1e-12:
    return (y - 1.0) / (num_classes - 1)
  return (math.exp(-k) - np.exp(-k * y)) / (math.exp(-k) - math.exp(-k * num_classes))


def unimix_factor_density(y, num_classes: int, rho: float):
  """Eq. 8 / A.8 (UniMix factor, random pairs): p(y) F(y); integrates to 1/2."""
  return prior_density(y, num_classes, rho) * prior_cdf(y, num_classes, rho)


def unimix_density(y, num_classes: int, rho: float, tau: float):
  """Eq. 10 / A.12 (factor + R*): p(y) G_tau(y); integrates to P(Y_j < Y_i).

  Written as p * G_tau, which equals the paper's closed form for tau != 0
  (both its numerator and denominator flip sign for tau < 0, so it stays
  positive) and is its limit at tau = 0.
  """
  return prior_density(y, num_classes, rho) * inverse_cdf(y, num_classes, rho, tau)


def unimix_two_sided(y, num_classes: int, rho: float, tau: float):
  """Eq. 10 plus its missing term p_inv(y) F(y): the density of max(Y_i, Y_j).

  Not in the paper. Under the same idealisation (the rarer class of a pair
  gets the sample) this is the full law, and it integrates to 1. At tau = 1
  it is 2 x Eq. 8.
  """
  return (unimix_density(y, num_classes, rho, tau)
          + inverse_density(y, num_classes, rho, tau) * prior_cdf(y, num_classes, rho))


def on_classes(values: np.ndarray) -> np.ndarray:
  """Normalises a density evaluated at y = 1..C into a law over the C classes."""
  values = np.asarray(values, dtype=float)
  return values / values.sum()


def closed_forms(num_classes: int, rho: float, tau: float) -> dict:
  """The paper's curves at y = 1..C, each normalised over the C classes."""
  y = np.arange(1, num_classes + 1)
  return {
      "prior": on_classes(prior_density(y, num_classes, rho)),
      "mixup": on_classes(mixup_density(y, num_classes, rho)),
      "unimix_factor": on_classes(unimix_factor_density(y, num_classes, rho)),
      "unimix": on_classes(unimix_density(y, num_classes, rho, tau)),
      "unimix_two_sided": on_classes(unimix_two_sided(y, num_classes, rho, tau)),
  }

# ------------------------------------------------ exact law of the real factor


def xi_aug_probability(prior_i, prior_j, factor: str, alpha: float) -> np.ndarray:
  """P(xi >= 0.5) for the library's factor (probability the sample is y_i's).

  beta: 1/2 for any alpha (Beta(alpha, alpha) is symmetric about 1/2).
  unimix: xi* = (b + s) mod 1, s = pi_j / (pi_i + pi_j), b ~ Beta; so
  xi* >= 0.5 iff b in [0.5 - s, 1 - s) or b >= 1.5 - s.
  """
  cdf = functools.partial(stats.beta.cdf, a=alpha, b=alpha)
  if factor == "beta":
    return np.broadcast_to(1.0 - cdf(0.5), np.broadcast(prior_i, prior_j).shape).copy()
  s = np.asarray(prior_j) / (np.asarray(prior_i) + np.asarray(prior_j))
  return cdf(1 - s) - cdf(np.clip(0.5 - s, 0, 1)) + 1.0 - cdf(np.clip(1.5 - s, 0, 1))


def partner_law(counts: np.ndarray, pairing: str, tau: float) -> np.ndarray:
  """Class law of x_j: 'random' = pi, 'sampler' = Eq. 9, 'in_batch' ~ n^(1+tau).

  For 'in_batch' this is the large-batch limit; a finite batch only offers
  the classes it holds.
  """
  prior = counts / counts.sum()
  if pairing == "random":
    return prior
  if pairing == "sampler":
    return np.exp(sampling.class_level_log_probs(prior, tau))
  weights = prior * counts.astype(float) ** tau
  return weights / weights.sum()


def exact_distribution(counts: np.ndarray, factor: str | None, alpha: float,
                       partner: np.ndarray) -> np.ndarray:
  """Discrete xi-Aug class law for independent y_i ~ pi, y_j ~ `partner`.

  P(c) = pi_c sum_j q_j P(xi>=.5 | c, j) + q_c sum_i pi_i P(xi<.5 | i, c).
  """
  prior = counts / counts.sum()
  if factor is None:
    return prior
  keep = xi_aug_probability(prior[:, None], prior[None, :], factor, alpha)
  return (prior * (keep * partner[None, :]).sum(1)
          + partner * (prior[:, None] * (1.0 - keep)).sum(0))

# ----------------------------------------------------------------- Monte Carlo


class MonteCarlo(NamedTuple):
  """Class counts over all simulated pairs."""
  first: np.ndarray    # [C] classes of x_i (drawn by R).
  partner: np.ndarray  # [C] classes of x_j.
  xi_aug: np.ndarray   # [C] class each virtual sample is a xi-Aug sample of.


FACTOR_IDS = {None: 0, "beta": 1, "unimix": 2}


def _no_mixing(key, prior_i, prior_j, alpha):
  """xi = 1, as training's mix.name = none: every sample stays y_i's."""
  del key, prior_j, alpha
  return jnp.ones(prior_i.shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("in_batch", "num_epochs", "batch_size",
                                             "steps_per_epoch"))
def _simulate(key, labels, prior, log_counts, log_class_probs, index, factor_id, alpha,
              tau, *, in_batch, num_epochs, batch_size, steps_per_epoch):
  r_key, j_key, xi_key = jax.random.split(key, 3)
  num_classes = prior.shape[0]
  per_epoch = batch_size * steps_per_epoch
  # R exactly as training draws it: epoch e is the permutation from
  # fold_in(key, e); asking for all its full batches at once (one step of
  # size per_epoch) returns the same slices training would take one by one.
  first = jax.vmap(lambda e: sampling.epoch_permutation_slice(
      r_key, e, labels.shape[0], per_epoch, 1))(jnp.arange(num_epochs))
  y_i = labels[first.reshape(-1, batch_size)]
  if in_batch:
    keys = jax.random.split(j_key, y_i.shape[0])
    pos = jax.vmap(lambda k, l: sampling.in_batch_partners(k, l, log_counts, tau))(keys, y_i)
    y_j = jnp.take_along_axis(y_i, pos, axis=1)
  else:  # R* with log_class_probs (tau = 1 there is mixup's random partner).
    y_j = labels[sampling.class_level_sample(j_key, index, log_class_probs, y_i.size)]
  y_i, y_j = y_i.reshape(-1), y_j.reshape(-1)
  # The factor is a traced switch so that one compilation serves all curves.
  xi = jax.lax.switch(factor_id, [_no_mixing, mixing.beta_factor, mixing.unimix_factor],
                      xi_key, prior[y_i], prior[y_j], alpha)
  y_aug = jnp.where(xi >= 0.5, y_i, y_j)  # Definition 1.
  count = functools.partial(jnp.bincount, length=num_classes)
  return count(y_i), count(y_j), count(y_aug)


def monte_carlo(counts: np.ndarray, factor: str | None, pairing: str, tau: float = 1.0,
                alpha: float = 0.5, num_pairs: int = 500_000, seed: int = 0,
                batch_size: int = 128) -> MonteCarlo:
  """Simulates xi-Aug classes with the training samplers and factors.

  Args:
    counts: int [C] images per class (e.g. `long_tail.long_tail_counts`).
    factor: 'beta' (mixup), 'unimix' (Eq. 6) or None (no mixing).
    pairing: partner of x_i: 'random' (R* at tau = 1, mixup's partner),
      'sampler' (R* at `tau`, Eq. 9) or 'in_batch' (official code; partner
      class then follows n^(1 + tau), not pi^tau).
    tau: exponent of 'sampler' / 'in_batch'.
    alpha: Beta concentration of the factor.
    num_pairs: pairs to draw (rounded up to whole epochs of full batches).
    seed: seed of the typed PRNG key.
    batch_size: batch size of R (matters for 'in_batch' only).

  Returns:
    MonteCarlo of int64 [C] counts.
  """
  num_classes = len(counts)
  labels = np.repeat(np.arange(num_classes), counts).astype(np.int32)
  prior = long_tail.class_prior(labels, num_classes)
  steps_per_epoch = len(labels) // batch_size
  log_probs = sampling.class_level_log_probs(prior.prior, 1.0 if pairing == "random" else tau)
  out = _simulate(
      jax.random.key(seed), jnp.asarray(labels), jnp.asarray(prior.prior, jnp.float32),
      jnp.asarray(np.log(np.maximum(prior.counts, 1)), jnp.float32),
      jnp.asarray(log_probs, jnp.float32), sampling.class_index(labels, num_classes),
      jnp.int32(FACTOR_IDS[factor]), jnp.float32(alpha), jnp.float32(tau),
      in_batch=pairing == "in_batch",
      num_epochs=-(-num_pairs // (steps_per_epoch * batch_size)),
      batch_size=batch_size, steps_per_epoch=steps_per_epoch)
  return MonteCarlo(*(np.asarray(o, dtype=np.int64) for o in out))


# (name, factor, pairing): the four curves of Fig. 2 / A1.
CURVES = (("prior", None, "random"), ("mixup", "beta", "random"),
          ("unimix_factor", "unimix", "random"), ("unimix", "unimix", "sampler"))


def default_n_max(num_classes: int) -> int:
  """CIFAR-10/100-LT sizes: 5000 images in the head for C <= 10, else 500."""
  return 5000 if num_classes <= 10 else 500


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
  """0.5 * sum |p - q| of two laws over the classes."""
  return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def panel(num_classes: int, rho: float, tau: float, alpha: float, num_pairs: int,
          seed: int = 0, pairing: str = "sampler") -> dict:
  """Closed form, exact law and Monte Carlo of the four curves for one (C, rho)."""
  counts = long_tail.long_tail_counts(default_n_max(num_classes), num_classes, rho)
  forms = closed_forms(num_classes, rho, tau)
  result = {}
  for k, (name, factor, pair) in enumerate(CURVES):
    pair = pairing if name == "unimix" else pair
    mc = monte_carlo(counts, factor, pair, tau, alpha, num_pairs, seed + k).xi_aug
    exact = exact_distribution(counts, factor, alpha, partner_law(counts, pair, tau))
    result[name] = {"paper": forms[name], "exact": exact, "mc": mc / mc.sum()}
  result["unimix"]["two_sided"] = forms["unimix_two_sided"]
  return result

# ------------------------------------------------------------------------ CLI

COLORS = {"prior": "tab:purple", "mixup": "tab:blue", "unimix_factor": "tab:green",
          "unimix": "tab:red"}
LABELS = {"prior": "origin (Eq. 4)", "mixup": "mixup (Eq. 5)",
          "unimix_factor": r"UniMix factor $\xi^*$ (Eq. 8)",
          "unimix": r"UniMix, $\tau$={tau:g} (Eq. 10)"}
MARKERS = {"prior": "o", "mixup": "x", "unimix_factor": "s", "unimix": "^"}


def write_outputs(panels: dict, tau: float, alpha: float, out_dir: str,
                  pairing: str = "sampler") -> list:
  """Writes theory.png, theory.csv (per class) and theory_summary.csv (TV)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  keys = sorted(panels)
  cs, rhos = sorted({c for c, _ in keys}), sorted({r for _, r in keys})
  fig, axes = plt.subplots(len(cs), len(rhos), squeeze=False,
                           figsize=(max(5.2 * len(rhos), 7.0), 4.0 * len(cs) + 0.6))
  summary, rows = [], []
  for (c, rho), res in panels.items():
    ax = axes[cs.index(c)][rhos.index(rho)]
    x = np.arange(c)
    for name, curves in res.items():
      label = LABELS[name].format(tau=tau)
      ax.plot(x, curves["paper"], color=COLORS[name], lw=1.6,
              ls="--" if name == "mixup" else "-", label=label)
      ax.plot(x, curves["mc"], MARKERS[name], color=COLORS[name], ms=3.5 if c > 10 else 6,
              mfc="none", alpha=0.8, label="_")
      if "two_sided" in curves:
        ax.plot(x, curves["two_sided"], color=COLORS[name], lw=1.2, ls=":",
                label="Eq. 10 + missing term (not in paper)")
      summary.append({"C": c, "rho": rho, "tau": tau, "alpha": alpha, "curve": name,
                      "tv_mc_vs_paper": total_variation(curves["mc"], curves["paper"]),
                      "tv_mc_vs_exact": total_variation(curves["mc"], curves["exact"]),
                      "tv_mc_vs_two_sided": total_variation(
                          curves["mc"], curves.get("two_sided", curves["paper"])),
                      "mc_argmax_class": int(np.argmax(curves["mc"])),
                      "paper_argmax_class": int(np.argmax(curves["paper"]))})
      for k in range(c):
        rows.append({"C": c, "rho": rho, "tau": tau, "alpha": alpha, "curve": name,
                     "class": k, "paper_closed_form": curves["paper"][k],
                     "two_sided": curves.get("two_sided", curves["paper"])[k],
                     "exact_library_factor": curves["exact"][k],
                     "monte_carlo": curves["mc"][k]})
    ax.set_title(f"C = {c}, rho = {rho:g}")
    ax.set_xlabel("class index (0 = head)")
    ax.set_ylabel("probability of xi-Aug class")
    ax.grid(alpha=0.3)
  axes[0][0].plot([], [], "ko", mfc="none", label=f"markers: Monte Carlo (alpha = {alpha:g}, {pairing})")
  axes[0][0].legend(fontsize=8, loc="upper center")
  fig.suptitle("xi-Aug class distributions. Lines: paper closed forms, normalised over\n"
               "the classes; markers: Monte Carlo with the library's samplers and factors",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "theory.png"), dpi=120)
  plt.close(fig)
  for name, table in (("theory.csv", rows), ("theory_summary.csv", summary)):
    with open(os.path.join(out_dir, name), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(table[0]))
      writer.writeheader()
      writer.writerows(table)
  return summary


def main(argv):
  del argv
  flags_ = FLAGS
  cs = [flags_.classes] if flags_.classes else [10, 100]
  rhos = [flags_.rho] if flags_.rho else [10.0, 100.0, 200.0]
  panels = {(c, r): panel(c, r, flags_.tau, flags_.alpha, flags_.num_pairs, flags_.seed,
                          flags_.pairing) for c in cs for r in rhos}
  summary = write_outputs(panels, flags_.tau, flags_.alpha, flags_.out, flags_.pairing)
  print(f"{'C':>4} {'rho':>5} {'curve':>14} {'TV(mc,paper)':>13} {'TV(mc,exact)':>13} "
        f"{'TV(mc,2-sided)':>15} {'argmax mc/paper':>16}")
  for s in summary:
    print(f"{s['C']:>4} {s['rho']:>5g} {s['curve']:>14} {s['tv_mc_vs_paper']:>13.4f} "
          f"{s['tv_mc_vs_exact']:>13.4f} {s['tv_mc_vs_two_sided']:>15.4f} "
          f"{s['mc_argmax_class']:>8}/{s['paper_argmax_class']}")
  print(f"wrote {flags_.out}/theory.png, theory.csv, theory_summary.csv")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  # Flags are defined only when run as a script, so importing this module
  # next to lt_calib.analysis.synthetic (which also has --out) cannot clash.
  flags.DEFINE_integer("classes", None, "C; default: the grid C in {10, 100}.")
  flags.DEFINE_float("rho", None, "Imbalance ratio; default: the grid {10, 100, 200}.")
  flags.DEFINE_float("tau", -1.0, "tau of the UniMix sampler (Eq. 9).")
  flags.DEFINE_float("alpha", 0.5, "Beta(alpha, alpha) of both factors (paper: 0.5).")
  flags.DEFINE_enum("pairing", "sampler", ["sampler", "in_batch"], "Full UniMix pairing.")
  flags.DEFINE_integer("num_pairs", 300_000, "Monte Carlo pairs per curve.")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.mark_flag_as_required("out")
  FLAGS = flags.FLAGS
  app.run(main)
