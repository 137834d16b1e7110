"""Tests of lt_calib.analysis.synthetic: geometry, virtual labels and the Sec. 4.1 ordering.

Expected values are derived by hand: boundary angles/offsets of chosen lines,
and the share of virtual points labelled negative, which for the UniMix
factor at alpha = 1/2 follows from the arcsine CDF F(x) = 2/pi asin(sqrt x)
of Beta(1/2, 1/2).
"""

import math

import jax
import numpy as np
import pytest

from lt_calib.analysis import synthetic

SETUP = synthetic.Setup()  # m = 1000, n = 20, discs at +-(1, 1), r = 1.


def test_discs_are_disjoint_and_filled():
  data = synthetic.make_data(0, SETUP)
  x, y = data["balanced"]
  assert (y == 1).sum() == (y == 0).sum() == SETUP.m
  assert len(data["imbalanced"][1]) == SETUP.m + SETUP.n
  centre = np.where(y[:, None] == 1, 1.0, -1.0) * np.array([SETUP.x0, SETUP.y0])
  dist = np.linalg.norm(x - centre, axis=1)
  assert dist.max() <= SETUP.r
  # Uniform in area: half the points within r / sqrt2 (4-sigma binomial band).
  assert abs(np.mean(dist < SETUP.r / math.sqrt(2)) - 0.5) < 4 * math.sqrt(0.25 / len(dist))
  assert math.hypot(2 * SETUP.x0, 2 * SETUP.y0) > 2 * SETUP.r  # Disjoint.


@pytest.mark.parametrize("w,b,angle,offset,band", [
    ((1.0, 1.0), 0.0, 0.0, 0.0, 0.0),                  # The ideal y = -x.
    ((2.0, 2.0), -2 * math.sqrt(2) * 0.3, 0.0, 0.3, 0.3),  # Shifted by 0.3 along u.
    ((0.0, 1.0), 0.0, 45.0, 0.0, None),                # Horizontal line y = 0.
    ((math.cos(math.radians(35)), math.sin(math.radians(35))), 0.0, -10.0, 0.0,
     math.tan(math.radians(10)) * 101 / 201),          # mean |s| on the 201-point grid.
])
def test_boundary_error_of_hand_picked_lines(w, b, angle, offset, band):
  got = synthetic.boundary_error(np.array(w), b, 1.0)
  assert got[0] == pytest.approx(angle, abs=1e-9)
  assert got[1] == pytest.approx(offset, abs=1e-9)
  if band is not None:
    assert got[2] == pytest.approx(band, rel=1e-6)


def arcsine_cdf(x):
  return 2 / math.pi * math.asin(math.sqrt(min(max(x, 0.0), 1.0)))


def test_virtual_label_shares_match_hand_derivation():
  points, labels = synthetic.make_data(1, SETUP)["imbalanced"]
  p_neg = SETUP.n / (SETUP.m + SETUP.n)
  p_pos = 1 - p_neg

  def share(factor, alpha, tau, draws=8):
    hard = [synthetic.virtual_points(jax.random.key(k), points, labels, factor, alpha, tau)[1]
            for k in range(draws)]
    return np.mean(np.concatenate(hard) == 0), draws * len(labels)

  # mixup: P(xi >= 1/2) = 1/2 for both orders, so the negative share is p_neg.
  got, total = share("beta", 1.0, 1.0)
  assert abs(got - p_neg) < 4 * math.sqrt(p_neg * p_pos / total)
  # UniMix, tau = -1: partner is negative w.p. p_pos (P_inv ~ 1/pi); a mixed
  # (pos i, neg j) pair keeps y_i w.p. K(s) = F(1 - s) - F(1/2 - s), s = p_neg.
  keep_pos = arcsine_cdf(1 - p_neg) - arcsine_cdf(0.5 - p_neg)
  keep_neg = arcsine_cdf(1 - p_pos) + 1 - arcsine_cdf(1.5 - p_pos)  # s = p_pos > 1/2.
  expected = (p_neg * (p_pos * 1 + p_neg * keep_neg)   # i negative.
              + p_pos * p_pos * (1 - keep_pos))        # i positive, j negative.
  got, total = share("unimix", 0.5, -1.0)
  assert abs(got - expected) < 4 * math.sqrt(expected * (1 - expected) / total)
  assert expected > 0.5  # UniMix turns the 2% minority into the majority label.


def test_unimix_moves_the_boundary_back_towards_the_ideal():
  rows, summary, _ = synthetic.run(range(10), SETUP)
  mean = {m: {k: v[0] for k, v in s.items()} for m, s in summary.items()}
  # Shift (and shift + tilt over the band): UniMix < imbalanced, mixup.
  assert mean["unimix"]["abs_offset"] < 0.5 * mean["imbalanced"]["abs_offset"]
  assert mean["unimix"]["band_deviation"] < 0.6 * mean["imbalanced"]["band_deviation"]
  assert mean["unimix"]["band_deviation"] < mean["mixup"]["band_deviation"]
  assert mean["unimix"]["abs_offset"] < mean["mixup"]["abs_offset"]
  # Imbalance shifts the boundary into the minority (negative) side.
  assert all(r["offset"] < 0 for r in rows if r["method"] == "imbalanced")
  # Tilt: every imbalanced variant is worse than the balanced set. The
  # UniMix tilt is NOT smaller than the imbalanced one (see docs/theory.md).
  for m in ("imbalanced", "mixup", "unimix"):
    assert mean["balanced"]["abs_angle_deg"] < mean[m]["abs_angle_deg"]
    assert mean["balanced"]["band_deviation"] < mean[m]["band_deviation"]


@pytest.mark.slow  # Runs the experiment and draws its figure.
def test_write_outputs(tmp_path):
  setup = synthetic.Setup(m=200, n=10)
  rows, summary, fits = synthetic.run(range(2), setup)
  table = synthetic.write_outputs(rows, summary, fits, setup, str(tmp_path))
  assert (tmp_path / "synthetic.png").stat().st_size > 20_000
  assert len((tmp_path / "synthetic.csv").read_text().splitlines()) == 1 + 2 * 4
  assert all(f"\n| {m} | " in table for m in synthetic.METHODS)
