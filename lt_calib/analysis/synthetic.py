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
normal u = (1, 1)/sqrt2 (degrees, signed counter-clockwise), the offset
t = -b / (w.u), where the boundary crosses the line through the origin along
u (> 0: moved towards the positive, majority disc), and the band deviation:
the mean |displacement| along u of the learned boundary from y = -x over the
stretch |s| <= r of y = -x that lies between the discs (tilt and shift in
one number, in units of length).

  python -m lt_calib.analysis.synthetic --out=DIR [--seeds=10 --m=1000 --n=20]
"""

import csv
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import svm

from lt_calib.method import mixing
from lt_calib.data import long_tail
from lt_calib.method import sampling

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


def boundary_error(w: np.ndarray, b: float, half_width: float = 1.0) -> tuple:
  """Deviation of w.x + b = 0 from y = -x.

  Args:
    w: [2] normal of the learned boundary (pointing to the positives).
    b: its intercept.
    half_width: the band |s| <= half_width of y = -x to average over.

  Returns:
    (signed angle in degrees from (1, 1) to w, offset t along u, band
    deviation: mean over s of |d(s)|, where the boundary lies at
    s (-1, 1)/sqrt2 + d(s) u).
  """
  angle = math.degrees(math.atan2(w[1], w[0])) - 45.0
  angle = (angle + 180.0) % 360.0 - 180.0
  w_u = float(w[0] + w[1]) / math.sqrt(2)
  s = np.linspace(-half_width, half_width, 201)
  d = -(s * float(w[1] - w[0]) / math.sqrt(2) + b) / w_u
  return angle, -b / w_u, float(np.mean(np.abs(d)))


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
    angle, offset, band = boundary_error(w, b, setup.r)
    out[method] = {"points": points, "labels": labels, "virtual": virtual, "w": w, "b": b,
                   "angle": angle, "offset": offset, "band": band,
                   "virtual_negative_share": None if virtual is None else float(np.mean(virtual[1] == 0))}
  return out


def run(seeds, setup: Setup) -> tuple:
  """All seeds: (per-seed rows, per-method mean/std summary, seed 0's fits)."""
  rows, first = [], None
  for seed in seeds:
    fits = run_seed(seed, setup)
    first = first or fits
    rows += [{"seed": seed, "method": m, "angle_deg": fits[m]["angle"],
              "abs_angle_deg": abs(fits[m]["angle"]), "offset": fits[m]["offset"],
              "band_deviation": fits[m]["band"],
              "virtual_negative_share": fits[m]["virtual_negative_share"]} for m in METHODS]
  summary = {}
  for m in METHODS:
    mine = [r for r in rows if r["method"] == m]
    summary[m] = {k: (float(np.mean([r[k] for r in mine])), float(np.std([r[k] for r in mine])))
                  for k in ("abs_angle_deg", "offset", "band_deviation")}
    summary[m]["abs_offset"] = (float(np.mean([abs(r["offset"]) for r in mine])),
                                float(np.std([abs(r["offset"]) for r in mine])))
  return rows, summary, first


def plot(fits: dict, setup: Setup, path: str, max_virtual: int = 400) -> None:
  """1 x 4 panels as Fig. 3: real points, virtual points (o), boundary, y = -x."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lim = max(setup.x0, setup.y0) + setup.r + 0.4
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.9))
  colors = {0: "tab:blue", 1: "tab:green"}  # As Fig. 3: blue z-, green z+.
  grid = np.linspace(-lim, lim, 2)
  for ax, m in zip(axes, METHODS):
    fit = fits[m]
    for c in (0, 1):
      pts = fit["points"][fit["labels"] == c]
      ax.scatter(pts[:, 0], pts[:, 1], s=6 if c else 14, color=colors[c], alpha=0.6,
                 label=f"{'z+' if c else 'z-'} ({len(pts)})")
    if fit["virtual"] is not None:  # On top, so the ones inside the discs show.
      vx, vy = fit["virtual"][0][:max_virtual], fit["virtual"][1][:max_virtual]
      for c, edge in ((0, "navy"), (1, "darkgreen")):
        ax.scatter(vx[vy == c, 0], vx[vy == c, 1], s=16, facecolors="none",
                   edgecolors=edge, linewidths=0.7, label=f"virtual {'z+' if c else 'z-'}")
    ax.plot(grid, -grid, "--", color="gray", lw=1.5, label="ideal y = -x")
    w, b = fit["w"], fit["b"]
    ax.plot(grid, -(w[0] * grid + b) / w[1], "k-", lw=2, label="SVM boundary")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="x", ylabel="y")
    ax.set_title(f"{TITLES[m]}\nangle {fit['angle']:+.1f} deg, offset {fit['offset']:+.3f}",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
  fig.suptitle("Sec. 4.1 synthetic SVM (seed 0); o = virtual points labelled by xi >= 0.5",
               fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(rows, summary, fits, setup: Setup, out_dir: str) -> str:
  """synthetic.png, synthetic.csv (per seed) and synthetic.md (mean +- std)."""
  os.makedirs(out_dir, exist_ok=True)
  plot(fits, setup, os.path.join(out_dir, "synthetic.png"))
  with open(os.path.join(out_dir, "synthetic.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  seeds = len(rows) // len(METHODS)
  lines = [f"Setup: {setup}, {seeds} seeds (mean +- std).", "",
           "| method | abs angle (deg) | offset | abs offset | band deviation |",
           "|---|---|---|---|---|"]
  for m in METHODS:
    cell = lambda k: f"{summary[m][k][0]:.3f} +- {summary[m][k][1]:.3f}"  # pylint: disable=cell-var-from-loop
    lines.append(f"| {m} | {cell('abs_angle_deg')} | {cell('offset')} | {cell('abs_offset')} "
                 f"| {cell('band_deviation')} |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(out_dir, "synthetic.md"), "w") as f:
    f.write(table)
  return table


def main(argv):
  del argv
  setup = Setup(m=FLAGS.m, n=FLAGS.n, svm_c=FLAGS.svm_c)
  rows, summary, fits = run(range(FLAGS.seeds), setup)
  print(write_outputs(rows, summary, fits, setup, FLAGS.out))
  print(f"wrote {FLAGS.out}/synthetic.png, synthetic.csv, synthetic.md")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  # Defined only when run as a script (lt_calib.analysis.theory also defines --out).
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("seeds", 10, "Number of seeds (data and mixing).")
  flags.DEFINE_integer("m", Setup._field_defaults["m"], "Points per disc (positives).")
  flags.DEFINE_integer("n", Setup._field_defaults["n"], "Negatives of the imbalanced set.")
  flags.DEFINE_float("svm_c", Setup._field_defaults["svm_c"], "Soft-margin C of the linear SVM.")
  flags.mark_flag_as_required("out")
  FLAGS = flags.FLAGS
  app.run(main)
