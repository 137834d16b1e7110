"""The pure functions of a training step: Algorithm 1's step and its parts.

Everything here is a function of its arguments (state, batch, key, static
config); lt_calib/train/setup.py compiles them. Layout of one step:

  batch key, mix key = RunKeys.step_keys(t)   one key per global step
  batch = the dataset's feed      lt_calib/data/batches.py: rows from
                                   `sampling.batch_indices` (R or a re-sampler,
                                   and R* partners), gathered, augmented and
                                   normalised on the device, or read and
                                   augmented by tf.data (streamed)
  state = train_step(state, batch, mix key)   xi ~ mix factor,
                                   x~ = xi x_i + (1 - xi) x_j, Eq. 11 with the
                                   chosen loss, SGD update
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lt_calib.data import augment
from lt_calib.errors import ConfigError
from lt_calib.method import mixing, sampling
from lt_calib.models.heads import classifier_keys
from lt_calib.train import state as state_lib
from lt_calib.train.state import TrainState


@flax.struct.dataclass
class StepConfig:
  """Everything the step needs besides state, batch and key (static/arrays).

  The method choices (mixing, label rule, samplers) are static, so each run
  compiles one step; what changes over training (mixing stop, DRW) is decided
  from the traced step inside it. Per-run numbers that several runs of one
  program may differ in (alpha, the partner law of tau) are array fields, so
  `jax.vmap` can give each of K stacked runs its own (lt_calib/train/population.py).
  """
  num_examples: int = flax.struct.field(pytree_node=False)
  batch_size: int = flax.struct.field(pytree_node=False)
  steps_per_epoch: int = flax.struct.field(pytree_node=False)
  padding: int = flax.struct.field(pytree_node=False)
  mean: tuple = flax.struct.field(pytree_node=False)
  std: tuple = flax.struct.field(pytree_node=False)
  mix_factor: str | None = flax.struct.field(pytree_node=False)
  pairing: str = flax.struct.field(pytree_node=False)
  mix_stop_step: int = flax.struct.field(pytree_node=False)
  label_rule: str = flax.struct.field(pytree_node=False)      # mixing.LABEL_RULES
  mix_space: str = flax.struct.field(pytree_node=False)       # 'input' | 'hidden'
  remix_kappa: float = flax.struct.field(pytree_node=False)
  remix_tau: float = flax.struct.field(pytree_node=False)
  manifold_layers: tuple = flax.struct.field(pytree_node=False)
  # A second stage trains the classifier head alone ('frozen' BatchNorm keeps
  # the first stage's statistics, 'shift' re-estimates them); 'train' is an
  # ordinary run: every parameter, BatchNorm on batch statistics.
  batchnorm: str = flax.struct.field(pytree_node=False, default="train")
  alpha: jax.Array = None             # [] Beta(alpha, alpha) of the mix factor.
  # [] in-batch pairing: batch member k is a partner with weight
  # n_{y_k}^in_batch_exponent (the batch already follows pi, so this is the
  # partner exponent minus one).
  in_batch_exponent: jax.Array = None
  prior: jax.Array = None             # [C] pi
  log_counts: jax.Array = None        # [C] log n_c
  log_class_probs: jax.Array = None   # [C] log P_inv (Eq. 9) of the partner sampler
  class_index: sampling.ClassIndex = None
  # [C] log class probabilities of a class-level main-batch sampler
  # (sampler.name != 'random'); None keeps the epoch permutation R.
  batch_log_class_probs: jax.Array | None = None

  @property
  def draws_partners(self) -> bool:
    """Whether a step draws an R* partner batch (input mixing, sampler pairing)."""
    return (self.mix_factor is not None and self.mix_space == "input"
            and self.pairing == "sampler")

  @property
  def partner_log_probs(self):
    """R*'s log class probabilities when partners are drawn, else None."""
    return self.log_class_probs if self.draws_partners else None


def epoch_steps(config, dataset) -> int:
  """Steps per epoch: whole global batches of the training set (the rest is dropped)."""
  return len(dataset.train_labels) // config.batch_size


def make_step_config(config, dataset) -> StepConfig:
  """Resolves the config and the train prior into a StepConfig.

  Args:
    config: experiment config (mix, sampler, dataset.crop_padding, batch_size).
    dataset: a loaded `sources.Dataset` or `pipeline.StreamingDataset`: its
      prior, train labels and info (mean, std) feed samplers and mixing.

  Returns:
    StepConfig.

  Raises:
    ConfigError: the batch is larger than the training set.
  """
  method = mixing.get_method(config.mix.name)
  exponent = mixing.partner_exponent(config.mix)  # Partner class ∝ pi^exponent.
  prior = dataset.prior
  num_examples = len(dataset.train_labels)
  if num_examples < config.batch_size:
    raise ConfigError(f"batch_size={config.batch_size} exceeds the {num_examples} "
                      "training images; lower batch_size.")
  steps_per_epoch = epoch_steps(config, dataset)
  sampler_tau = sampling.get_batch_sampler_tau(config.sampler.name)
  return StepConfig(
      num_examples=num_examples, batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch, padding=config.dataset.get("crop_padding", 0),
      mean=dataset.info.mean, std=dataset.info.std,
      mix_factor=None if method is None else method.factor,
      pairing=config.mix.pairing,
      # In-batch candidates already follow pi: weight them by n^(exponent - 1).
      in_batch_exponent=jnp.float32(exponent - 1.0),
      alpha=jnp.float32(mixing.resolve_alpha(config.mix)),
      mix_stop_step=int(config.mix.stop_epoch * steps_per_epoch),
      label_rule="factor" if method is None else method.label_rule,
      mix_space="input" if method is None else method.space,
      remix_kappa=float(config.mix.remix_kappa), remix_tau=float(config.mix.remix_tau),
      manifold_layers=tuple(int(k) for k in config.mix.manifold_layers),
      batchnorm=(config.stage2.batchnorm if state_lib.classifier_only(config) else "train"),
      prior=jnp.asarray(prior.prior, jnp.float32),
      log_counts=jnp.asarray(np.log(np.maximum(prior.counts, 1)), jnp.float32),
      log_class_probs=jnp.asarray(sampling.class_level_log_probs(prior.prior, exponent),
                                  jnp.float32),
      class_index=sampling.class_index(dataset.train_labels, len(prior.counts)),
      batch_log_class_probs=None if sampler_tau is None else jnp.asarray(
          sampling.class_level_log_probs(prior.prior, sampler_tau), jnp.float32))


def train_step(state: TrainState, batch: dict, key: jax.Array, cfg: StepConfig,
               loss_fn) -> tuple:
  """One SGD step on a (possibly mixed) batch: Algorithm 1, lines 5-8 / 12-13.

  Args:
    state: TrainState (params, batch_stats, optimizer state, step).
    batch: output of `prepare_batch`.
    key: the step's key (mixing factor; manifold mixup's layer).
    cfg: StepConfig.
    loss_fn: per-example loss (logits, labels, step) -> [B] (`losses.make_loss`).

  Returns:
    (new state, dict of scalar metrics).
  """
  labels_i, labels_j = batch["label"], batch["partner_label"]
  prior_i, prior_j = cfg.prior[labels_i], cfg.prior[labels_j]
  if cfg.mix_factor is None:
    xi = jnp.ones(labels_i.shape, jnp.float32)
  else:
    factor = mixing.FACTORS[cfg.mix_factor](key, prior_i, prior_j, cfg.alpha)
    # After T1 (mix.stop_epoch) xi = 1 turns the step into plain training on
    # the R batch without recompiling (Algorithm 1, lines 10-13).
    xi = jnp.where(state.step < cfg.mix_stop_step, factor, 1.0)
  label_weight = mixing.LABEL_RULES[cfg.label_rule](xi, prior_i, prior_j,
                                                    cfg.remix_kappa, cfg.remix_tau)
  model_kwargs = {}
  if cfg.mix_factor is None:
    images = batch["image"]  # No mixing: skip the 1 x + 0 x pass.
  elif cfg.mix_space == "hidden":
    images = batch["image"]
    layer = jax.random.choice(jax.random.fold_in(key, 1),
                              jnp.asarray(cfg.manifold_layers, jnp.int32))
    model_kwargs["mix"] = mixing.HiddenMix(batch["partner_position"], xi, layer)
  else:
    images = mixing.mix_images(batch["image"], batch["partner_image"], xi)

  def per_label_loss(logits, labels):
    return loss_fn(logits, labels, state.step)

  # A second stage differentiates the head alone: the backbone is a constant.
  trained, frozen = split_trained(state.params, cfg.batchnorm != "train")

  def loss_of(trained):
    params = {**frozen, **trained} if frozen else trained
    variables = {"params": params, "batch_stats": state.batch_stats}
    if cfg.batchnorm == "frozen":
      logits, batch_stats = state.apply_fn(variables, images, train=False,
                                           **model_kwargs), state.batch_stats
    else:
      logits, updates = state.apply_fn(variables, images, train=True,
                                       mutable=["batch_stats"], **model_kwargs)
      batch_stats = updates["batch_stats"]
    if cfg.mix_factor is None:  # One loss term, not 1 L(y) + 0 L(y).
      per_example = per_label_loss(logits, labels_i)
    else:
      per_example = mixing.mixed_loss(per_label_loss, logits, labels_i, labels_j,
                                      label_weight)
    return jnp.mean(per_example), batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
  if frozen:
    # The optimizer gives the frozen leaves a zero update (state.make_optimizer);
    # they are then put back as they were, bit for bit (p + 0 is not always p).
    all_grads = {**jax.tree.map(jnp.zeros_like, frozen), **grads}
    new_state = state.apply_gradients(grads=all_grads, batch_stats=batch_stats)
    new_state = new_state.replace(params={**new_state.params, **frozen})
  else:
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  stats = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           "param_norm": optax.tree.norm(state.params), "mean_xi": jnp.mean(xi),
           "mean_label_weight": jnp.mean(label_weight)}
  return new_state, stats


def split_trained(params, classifier_only: bool) -> tuple:
  """(trained, frozen) parameters: (all, {}), or (the head, the rest) in a second stage."""
  if not classifier_only:
    return params, {}
  heads = classifier_keys(params)
  return ({k: v for k, v in params.items() if k in heads},
          {k: v for k, v in params.items() if k not in heads})


def eval_step(state: TrainState, images: jax.Array, mean, std) -> jax.Array:
  """Raw logits z of uint8 test images (no Bayias offset at test time)."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        augment.normalize(images, mean, std), train=False)
