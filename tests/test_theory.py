"""Tests of lt_calib.analysis.theory against hand derivations, scipy quadrature and chi-square.

Reference values are derived here independently of the module: the paper's
formulas are transcribed literally (`paper_*`), integrals come from
scipy.integrate.quad, and the exact xi-Aug law of the UniMix factor at
alpha = 1/2 uses the arcsine CDF of Beta(1/2, 1/2), F(x) = 2/pi asin(sqrt x).
"""

import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from lt_calib.analysis import theory
from lt_calib.data import long_tail

C, RHO = 100, 200.0
# n_max = 5000 keeps the int() truncation of the tail counts small enough
# that the discrete prior matches Eq. 4 at the integers within MC noise.
COUNTS = long_tail.long_tail_counts(5000, C, RHO)
PI = COUNTS / COUNTS.sum()
PAIRS = 250_000
GRID = [(10, 10.0), (10, 100.0), (10, 200.0), (100, 10.0), (100, 100.0), (100, 200.0)]


def lam(c, rho):
  return math.log(rho) / (c - 1)


def paper_eq4(y, c, rho):
  l = lam(c, rho)
  return l / (math.exp(-l) - math.exp(-l * c)) * math.exp(-l * y)


def paper_eq8(y, c, rho):
  l = lam(c, rho)
  return l / (math.exp(-l) - math.exp(-c * l)) ** 2 * (
      math.exp(-l * (y + 1)) - math.exp(-2 * l * y))


def paper_eq10(y, c, rho, tau):
  l = lam(c, rho)
  return l / ((math.exp(-l) - math.exp(-c * l)) * (math.exp(-c * tau * l) - math.exp(-tau * l))) * (
      math.exp(-l * y * (tau + 1)) - math.exp(-l * (tau + y)))


def paper_inv(y, c, rho, tau):
  l = lam(c, rho)
  return l * tau * math.exp(-l * tau * y) / (math.exp(-l * tau) - math.exp(-l * tau * c))


def quad(f, c):
  return integrate.quad(f, 1, c, limit=200)[0]


# ------------------------------------------------------------- closed forms


@pytest.mark.parametrize("c,rho", GRID)
def test_eq4_and_eq5_are_densities(c, rho):
  assert quad(lambda y: theory.prior_density(y, c, rho), c) == pytest.approx(1.0, abs=1e-9)
  assert quad(lambda y: theory.mixup_density(y, c, rho), c) == pytest.approx(1.0, abs=1e-9)
  assert theory.prior_density(1, c, rho) / theory.prior_density(c, c, rho) == pytest.approx(rho)
  assert theory.prior_density(3.7, c, rho) == pytest.approx(paper_eq4(3.7, c, rho))


@pytest.mark.parametrize("c,rho", GRID)
def test_eq8_integrates_to_one_half_and_peaks_at_1_plus_ln2_over_lambda(c, rho):
  for y in (1.0, 2.5, c / 2, c):
    assert theory.unimix_factor_density(y, c, rho) == pytest.approx(paper_eq8(y, c, rho), abs=1e-15)
  assert quad(lambda y: paper_eq8(y, c, rho), c) == pytest.approx(0.5, abs=1e-9)
  # d/dy [e^{-l(y+1)} - e^{-2ly}] = 0  <=>  e^{-ly} = e^{-l} / 2.
  peak = optimize.minimize_scalar(lambda y: -paper_eq8(y, c, rho), bounds=(1, c),
                                  method="bounded", options={"xatol": 1e-8}).x
  expected = 1 + math.log(2) / lam(c, rho)
  assert peak == pytest.approx(min(expected, c), abs=1e-4)


@pytest.mark.parametrize("tau", [-1.0, -0.5, 0.5, 2.0])
def test_eq10_is_the_literal_formula_and_integrates_to_p_yj_below_yi(tau):
  for y in (1.0, 7.3, 50.0, 100.0):
    assert theory.unimix_density(y, C, RHO, tau) == pytest.approx(paper_eq10(y, C, RHO, tau), rel=1e-9, abs=1e-15)
  # Mass of Eq. 10 = P(Y_j < Y_i), Y_i ~ Eq. 4, Y_j ~ Eq. 9, by a double integral.
  p_below = integrate.dblquad(lambda yj, yi: paper_eq4(yi, C, RHO) * paper_inv(yj, C, RHO, tau),
                              1, C, 1, lambda yi: yi)[0]
  assert quad(lambda y: paper_eq10(y, C, RHO, tau), C) == pytest.approx(p_below, rel=1e-6)


def test_eq10_mass_at_tau_minus_one_by_hand():
  # tau = -1: integral = [e^l - l (C - 1) / Z] / (e^l - e^{lC}), Z = e^-l - e^-lC.
  l = lam(C, RHO)
  z = math.exp(-l) - math.exp(-l * C)
  by_hand = (math.exp(l) - l * (C - 1) / z) / (math.exp(l) - math.exp(l * C))
  assert quad(lambda y: theory.unimix_density(y, C, RHO, -1.0), C) == pytest.approx(by_hand, rel=1e-7)
  assert 0.02 < by_hand < 0.023  # far from 1: Eq. 10 is not a density.
  # tau = 1 turns Eq. 10 into Eq. 8.
  assert theory.unimix_density(13.0, C, RHO, 1.0) == pytest.approx(paper_eq8(13.0, C, RHO))


@pytest.mark.parametrize("tau", [-1.0, 0.0, 0.5, 1.0])
def test_inverse_law_and_two_sided_completion_are_densities(tau):
  assert quad(lambda y: theory.inverse_density(y, C, RHO, tau), C) == pytest.approx(1.0, abs=1e-9)
  assert quad(lambda y: theory.unimix_two_sided(y, C, RHO, tau), C) == pytest.approx(1.0, abs=1e-8)
  if tau == 0.0:
    assert theory.inverse_density(5.0, C, RHO, 0.0) == pytest.approx(1 / (C - 1))
  if tau == 1.0:
    assert theory.unimix_two_sided(20.0, C, RHO, 1.0) == pytest.approx(2 * paper_eq8(20.0, C, RHO))


def test_eq10_increases_over_the_classes_for_tau_minus_one():
  values = theory.unimix_density(np.linspace(1, C, 2000), C, RHO, -1.0)
  assert np.all(np.diff(values) > 0)


# ------------------------------------------------- exact law of the factor


def arcsine_cdf(x):
  return 2 / math.pi * math.asin(math.sqrt(min(max(x, 0.0), 1.0)))


def ref_keep(pi_i, pi_j):
  """P(xi* >= 1/2) for alpha = 1/2 from Eq. 6's density, by quadrature."""
  s = pi_j / (pi_i + pi_j)
  pdf = lambda x: stats.beta.pdf(x - s + 1 if x < s else x - s, 0.5, 0.5)
  return integrate.quad(pdf, 0.5, 1, points=[s] if s > 0.5 else None, limit=200)[0]


@pytest.mark.parametrize("pi_i,pi_j", [(3.0, 1.0), (1.0, 3.0), (200.0, 1.0), (1.0, 1.0), (0.3, 0.7)])
def test_xi_aug_probability_matches_eq6_quadrature(pi_i, pi_j):
  got = theory.xi_aug_probability(np.array(pi_i), np.array(pi_j), "unimix", 0.5)
  assert float(got) == pytest.approx(ref_keep(pi_i, pi_j), abs=1e-6)
  assert float(theory.xi_aug_probability(np.array(pi_i), np.array(pi_j), "beta", 0.7)) == pytest.approx(0.5)
  if (pi_i, pi_j) == (3.0, 1.0):  # s = 1/4: F(3/4) - F(1/4) = 2/3 - 1/3.
    assert float(got) == pytest.approx(1 / 3)


def ref_law(partner):
  """xi-Aug law of UniMix at alpha = 1/2, y_i ~ PI, y_j ~ partner (loops)."""
  law = np.zeros(C)
  for i in range(C):
    for j in range(C):
      s = PI[j] / (PI[i] + PI[j])
      keep = arcsine_cdf(1 - s) - arcsine_cdf(0.5 - s) + 1 - arcsine_cdf(1.5 - s)
      law[i] += PI[i] * partner[j] * keep
      law[j] += PI[i] * partner[j] * (1 - keep)
  return law


def chi2_pvalue(observed, expected_law):
  return stats.chisquare(observed, expected_law / expected_law.sum() * observed.sum()).pvalue


# ------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_corollary1_mixup_keeps_the_prior(alpha):
  mc = theory.monte_carlo(COUNTS, "beta", "random", alpha=alpha, num_pairs=PAIRS, seed=1)
  assert chi2_pvalue(mc.xi_aug, PI) > 1e-3
  eq4 = np.array([paper_eq4(y, C, RHO) for y in range(1, C + 1)])
  assert chi2_pvalue(mc.xi_aug, eq4) > 1e-3


@pytest.mark.parametrize("pairing,tau", [("random", 1.0), ("sampler", -1.0)])
def test_unimix_mc_matches_exact_law_at_paper_alpha(pairing, tau):
  partner = PI if pairing == "random" else PI ** tau / np.sum(PI ** tau)
  mc = theory.monte_carlo(COUNTS, "unimix", pairing, tau=tau, alpha=0.5, num_pairs=PAIRS, seed=2)
  assert chi2_pvalue(mc.partner, partner) > 1e-3
  expected = ref_law(partner)
  assert chi2_pvalue(mc.xi_aug, expected) > 1e-3
  np.testing.assert_allclose(
      theory.exact_distribution(COUNTS, "unimix", 0.5, theory.partner_law(COUNTS, pairing, tau)),
      expected, rtol=1e-6)


@pytest.mark.slow
def test_corollary2_middle_majority_holds_only_in_the_small_alpha_limit():
  ideal_peak = math.log(2) / lam(C, RHO)  # 1 + ln2/lambda in 1-based classes.
  small = theory.monte_carlo(COUNTS, "unimix", "random", alpha=0.01, num_pairs=PAIRS, seed=3)
  assert abs(np.argmax(small.xi_aug) - ideal_peak) <= 3
  assert small.xi_aug[0] < small.xi_aug.max() / 3
  # At the paper's alpha = 0.5 the head stays the mode (see docs/theory.md),
  # although the factor does take mass from the head.
  paper = theory.monte_carlo(COUNTS, "unimix", "random", alpha=0.5, num_pairs=PAIRS, seed=4)
  assert np.argmax(paper.xi_aug) == 0
  assert paper.xi_aug[0] / paper.xi_aug.sum() < 0.8 * PI[0]


@pytest.mark.slow
def test_corollary3_tail_majority_for_tau_minus_one():
  small = theory.monte_carlo(COUNTS, "unimix", "sampler", tau=-1.0, alpha=0.01,
                             num_pairs=PAIRS, seed=5).xi_aug
  assert stats.spearmanr(np.arange(C), small).statistic > 0.95
  p = small / small.sum()
  y = np.arange(1, C + 1)
  tv_paper = 0.5 * np.abs(p - theory.on_classes(paper_eq10_vec(y))).sum()
  tv_two_sided = 0.5 * np.abs(p - theory.on_classes(theory.unimix_two_sided(y, C, RHO, -1.0))).sum()
  assert tv_two_sided < 0.1 < 0.3 < tv_paper
  # alpha = 0.5: increasing over the tail half, but with a bump at the head.
  paper = theory.monte_carlo(COUNTS, "unimix", "sampler", tau=-1.0, alpha=0.5,
                             num_pairs=PAIRS, seed=6).xi_aug
  assert stats.spearmanr(np.arange(C // 2, C), paper[C // 2:]).statistic > 0.9
  assert paper[-10:].mean() > paper[:10].mean() > paper[40:60].mean()
  assert paper[C // 2:].sum() > 4 * (PI[C // 2:].sum() * paper.sum())


def paper_eq10_vec(y):
  return np.array([paper_eq10(v, C, RHO, -1.0) for v in y])


@pytest.mark.slow
def test_in_batch_partner_class_follows_n_to_the_1_plus_tau():
  exact = theory.monte_carlo(COUNTS, "unimix", "in_batch", tau=0.0, num_pairs=PAIRS, seed=7)
  assert chi2_pvalue(exact.partner, PI) > 1e-3  # n^(1+0) = pi exactly.
  flat = theory.monte_carlo(COUNTS, "unimix", "in_batch", tau=-1.0, num_pairs=PAIRS, seed=8)
  freq = flat.partner / flat.partner.sum()
  # n^0: uniform in the large-batch limit; batches of 128 miss some tail classes.
  assert 0.5 * np.abs(freq - 1 / C).sum() < 0.05


def test_write_outputs_csv_and_png(tmp_path):
  forms = theory.closed_forms(10, 10.0, -1.0)
  res = {name: {"paper": forms[name], "exact": forms[name], "mc": forms[name]}
         for name, _, _ in theory.CURVES}
  res["unimix"]["two_sided"] = forms["unimix_two_sided"]
  summary = theory.write_outputs({(10, 10.0): res}, -1.0, 0.5, str(tmp_path))
  assert (tmp_path / "theory.png").stat().st_size > 10_000
  assert len((tmp_path / "theory.csv").read_text().splitlines()) == 1 + 4 * 10
  assert all(s["tv_mc_vs_paper"] == 0.0 for s in summary)
