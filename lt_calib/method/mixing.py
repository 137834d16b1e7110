"""Mixing methods: factors, partners, label weights and where the mix happens.

A mixing method is a factor law, a way to find partners, a rule that turns the
factor into the weight of y_i in the loss, and the place of the mix (the input
or a hidden layer):

| mix.name       | factor xi          | partner x_j               | label weight | mixed at     |
|----------------|--------------------|---------------------------|--------------|--------------|
| none           | 1 (no mixing)      | -                         | 1            | -            |
| mixup          | Beta(alpha, alpha) | random (R*, tau = 1)      | xi           | input        |
| remix          | Beta(alpha, alpha) | random (R*, tau = 1)      | Remix rule   | input        |
| manifold_mixup | Beta(alpha, alpha) | random, in the batch      | xi           | random layer |
| unimix         | UniMix xi* (Eq. 6) | UniMix R* (pi^tau, Eq. 9) | xi           | input        |
| unimix_factor  | UniMix xi* (Eq. 6) | random (R*, tau = 1)      | xi           | input        |
| unimix_sampler | Beta(alpha, alpha) | UniMix R* (pi^tau, Eq. 9) | xi           | input        |

`unimix_factor` and `unimix_sampler` are the two halves of UniMix, for the
ablation of Fig. 2 (Corollary 2: factor with random pairs; Corollary 3 needs
both). The loss of a virtual sample is w L(z, y_i) + (1 - w) L(z, y_j)
(Eq. 11), w the label weight.
"""

from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp

from lt_calib.errors import ConfigError

FactorFn = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]


def beta_factor(key: jax.Array, prior_i: jax.Array, prior_j: jax.Array,
                alpha: float) -> jax.Array:
  """mixup's factor: xi ~ Beta(alpha, alpha) per sample (priors unused).

  Args:
    key: PRNG key.
    prior_i: [B] pi of the first samples' classes (sets the shape only).
    prior_j: [B] pi of the partners' classes (unused).
    alpha: Beta concentration, > 0.

  Returns:
    [B] float32 factors in [0, 1].
  """
  del prior_j
  return jax.random.beta(key, alpha, alpha, prior_i.shape, dtype=jnp.float32)


def unimix_factor(key: jax.Array, prior_i: jax.Array, prior_j: jax.Array,
                  alpha: float) -> jax.Array:
  """UniMix factor xi*_{i,j} of Eq. 6: a Beta draw shifted by the prior.

  The Beta(alpha, alpha) draw b is moved circularly on [0, 1] by
  s = pi_j / (pi_i + pi_j): xi* = b + s, minus 1 where above 1. Its density is
  f(xi* - s + 1) on [0, s) and f(xi* - s) on [s, 1], as in Eq. 6. For
  alpha < 1 the mass of b near 0 and 1 lands near s, so xi* is small (the
  mixed image is mostly x_j) when x_j's class is the rarer one.

  Args:
    key: PRNG key.
    prior_i: [B] pi_{y_i} of the randomly drawn samples.
    prior_j: [B] pi_{y_j} of the partners.
    alpha: Beta concentration, > 0.

  Returns:
    [B] float32 factors in [0, 1].
  """
  draw = jax.random.beta(key, alpha, alpha, prior_i.shape, dtype=jnp.float32)
  shift = (prior_j / (prior_i + prior_j)).astype(jnp.float32)
  shifted = draw + shift
  return jnp.where(shifted > 1.0, shifted - 1.0, shifted)


FACTORS: Dict[str, FactorFn] = {"beta": beta_factor, "unimix": unimix_factor}


def factor_label_weight(xi: jax.Array, prior_i: jax.Array, prior_j: jax.Array,
                        kappa: float, tau: float) -> jax.Array:
  """mixup's and UniMix's label weight: the image factor itself (Eq. 2, 7)."""
  del prior_i, prior_j, kappa, tau
  return xi


def remix_label_weight(xi: jax.Array, prior_i: jax.Array, prior_j: jax.Array,
                       kappa: float, tau: float) -> jax.Array:
  """Remix's label weight (Chou et al. 2020, "Remix: Rebalanced Mixup", Eq. 3).

  The image is xi x_i + (1 - xi) x_j as in mixup, but the label is pushed
  entirely to the minority class when the pair is imbalanced enough and the
  image is mostly the minority one:
    0   if n_i / n_j >= kappa and xi < tau        (x_i majority, image mostly x_j),
    1   if n_i / n_j <= 1 / kappa and 1 - xi < tau (x_j majority, image mostly x_i),
    xi  otherwise.
  n_i / n_j is taken as pi_i / pi_j (the same ratio).

  Args:
    xi: [B] image factors (weight of x_i).
    prior_i: [B] pi_{y_i}.
    prior_j: [B] pi_{y_j}.
    kappa: imbalance threshold, >= 1 (3 in the Remix paper).
    tau: factor threshold in [0, 1] (0.5 in the Remix paper).

  Returns:
    [B] weights of y_i.
  """
  ratio = prior_i / prior_j
  weight = jnp.where((ratio >= kappa) & (xi < tau), 0.0, xi)
  return jnp.where((ratio <= 1.0 / kappa) & (1.0 - xi < tau), 1.0, weight)


LABEL_RULES = {"factor": factor_label_weight, "remix": remix_label_weight}


class MixMethod(NamedTuple):
  """What `mix.name` selects.

  Attributes:
    factor: key of FACTORS.
    partner_tau: tau of the partner sampler R*; None takes `mix.tau` (UniMix's
      sampler), a number fixes it (1 = random partners, as in mixup).
    alpha: the method's Beta concentration, used when `mix.alpha` is None.
    label_rule: key of LABEL_RULES.
    space: 'input' (images are mixed) or 'hidden' (manifold mixup: the hidden
      states of a random layer are mixed, partners taken within the batch).
  """
  factor: str
  partner_tau: float | None
  alpha: float
  label_rule: str = "factor"
  space: str = "input"


# Default alphas: Appendix C.1 of the paper (0.5 for UniMix, 1.0 for mixup and
# Remix, as in Zhang et al. 2018 and Chou et al. 2020 on CIFAR); 2.0 for
# manifold mixup (Verma et al. 2019, their CIFAR setting). The UniMix halves
# keep UniMix's 0.5 so that the ablation changes one thing at a time.
MIX_METHODS: Dict[str, MixMethod | None] = {
    "none": None,
    "mixup": MixMethod(factor="beta", partner_tau=1.0, alpha=1.0),
    "remix": MixMethod(factor="beta", partner_tau=1.0, alpha=1.0, label_rule="remix"),
    "manifold_mixup": MixMethod(factor="beta", partner_tau=1.0, alpha=2.0,
                                space="hidden"),
    "unimix": MixMethod(factor="unimix", partner_tau=None, alpha=0.5),
    "unimix_factor": MixMethod(factor="unimix", partner_tau=1.0, alpha=0.5),
    "unimix_sampler": MixMethod(factor="beta", partner_tau=None, alpha=0.5),
}


def get_method(name: str) -> MixMethod | None:
  """Looks up `mix.name`, listing the allowed names if unknown."""
  if name not in MIX_METHODS:
    raise ConfigError(f"mix.name={name!r} is unknown; allowed: {sorted(MIX_METHODS)}.")
  return MIX_METHODS[name]


def resolve_alpha(mix_cfg) -> float:
  """`mix.alpha`, or the method's own default where it is None."""
  method = get_method(mix_cfg.name)
  if mix_cfg.get("alpha") is not None:
    return float(mix_cfg.alpha)
  return 1.0 if method is None else method.alpha


TAU_UNITS = ("prior", "counts")


def partner_exponent(mix_cfg) -> float:
  """e such that a partner's class c is drawn with probability ∝ pi_c ** e.

  `mix.tau` is read in `mix.tau_units`:
  - 'prior' (the paper's Eq. 9): P_inv(c) ∝ pi_c ** tau, so e = tau
    (tau = -1 gives the rarest class the most partners);
  - 'counts' (the official code): batch members weighted by n ** tau, and the
    batch already follows pi, so the partner class follows n ** (1 + tau):
    e = 1 + tau (tau = -1 is class-balanced, tau = 0 is plain mixup).
  Methods with a fixed partner law (mixup's random partners) ignore `tau`.

  Args:
    mix_cfg: `config.mix` (name, tau, tau_units).

  Returns:
    The exponent e, for R* (`sampling.class_level_log_probs(prior, e)`) and
    for in-batch pairing (member weight n ** (e - 1)).
  """
  method = get_method(mix_cfg.name)
  if method is not None and method.partner_tau is not None:
    return float(method.partner_tau)
  units = mix_cfg.get("tau_units", "prior")
  if units not in TAU_UNITS:
    raise ConfigError(f"mix.tau_units={units!r} is unknown; allowed: {TAU_UNITS}.")
  return float(mix_cfg.tau) + (1.0 if units == "counts" else 0.0)


def mix_images(images_i: jax.Array, images_j: jax.Array, xi: jax.Array) -> jax.Array:
  """Eq. 2 / 7 on images: xi x_i + (1 - xi) x_j, xi per sample."""
  xi = xi.reshape((-1,) + (1,) * (images_i.ndim - 1)).astype(images_i.dtype)
  return xi * images_i + (1.0 - xi) * images_j


class HiddenMix(NamedTuple):
  """Manifold mixup's instruction to the model (Verma et al. 2019).

  Attributes:
    partner: int32 [B] position in the batch of each sample's partner.
    weight: [B] factor xi of each sample's own hidden state.
    layer: int32 scalar; 0 mixes the input, k >= 1 the output of stage k.
  """
  partner: jax.Array
  weight: jax.Array
  layer: jax.Array


def mix_hidden(hidden: jax.Array, mix: HiddenMix | None, layer: int) -> jax.Array:
  """xi h + (1 - xi) h[partner] if `layer` is the chosen one, else h.

  Called by the model at every eligible layer; the choice is a traced value,
  so one compiled step serves every layer.
  """
  if mix is None:
    return hidden
  mixed = mix_images(hidden, hidden[mix.partner], mix.weight)
  return jnp.where(mix.layer == layer, mixed, hidden)


def mix_after_stage(module, hidden: jax.Array, mix: HiddenMix | None, stage: int):
  """What stage `stage` (0-based) of a ResNet hands on: its output, maybe mixed.

  With manifold mixup the output is also sown (`intermediates`) so tests can
  see the state each layer hands on.
  """
  if mix is not None:
    module.sow("intermediates", f"stage{stage + 1}_input_to_mix", hidden)
  return mix_hidden(hidden, mix, stage + 1)


def mixed_loss(per_example_loss: Callable[[jax.Array, jax.Array], jax.Array],
               logits: jax.Array, labels_i: jax.Array, labels_j: jax.Array,
               weight_i: jax.Array) -> jax.Array:
  """Eq. 11: w L(z, y_i) + (1 - w) L(z, y_j), per example.

  Args:
    per_example_loss: maps (logits [B, C], labels [B]) -> [B].
    logits: [B, C] logits of the mixed images.
    labels_i: [B] labels of the first samples.
    labels_j: [B] labels of the partners.
    weight_i: [B] label weight of y_i (xi for mixup and UniMix).

  Returns:
    [B] losses.
  """
  return (weight_i * per_example_loss(logits, labels_i)
          + (1.0 - weight_i) * per_example_loss(logits, labels_j))
