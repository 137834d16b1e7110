"""The pure functions of a training run: Algorithm 1's step and its parts.

Everything here is a function of its arguments (state, batch, key, static
config); `lt_calib/train.py` compiles and drives them. Layout of one step:

  key_t = fold_in(key, t)              one key per global step
  batch = prepare_batch(data, t, ..)   in-memory data: R and R* (or in-batch)
                                       indices, gather, crop/flip/normalise on
                                       the device; streamed data:
                                       `streamed_batch` (normalise, partners)
  state = train_step(state, batch, ..) xi ~ mix factor, x~ = xi x_i + (1-xi) x_j,
                                       Eq. 11 with the chosen loss, SGD update
"""

import functools
from typing import Any

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lt_calib import mixing
from lt_calib.data import augment, sampling
from lt_calib.errors import ConfigError


class TrainState(train_state.TrainState):
  batch_stats: Any


@flax.struct.dataclass
class StepConfig:
  """Everything the step needs besides state, batch and key (static/arrays).

  The method choices (mixing, label rule, samplers) are static, so each run
  compiles one step; what changes over training (mixing stop, DRW) is decided
  from the traced step inside it. Per-run numbers that several runs of one
  program may differ in (alpha, the partner law of tau) are array fields, so
  `jax.vmap` can give each of K stacked runs its own (lt_calib/population.py).
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
  alpha: jax.Array = None             # [] Beta(alpha, alpha) of the mix factor.
  in_batch_tau: jax.Array = None      # [] in-batch member weight n^in_batch_tau.
  prior: jax.Array = None             # [C] pi
  log_counts: jax.Array = None        # [C] log n_c
  log_class_probs: jax.Array = None   # [C] log P_inv (Eq. 9) of the partner sampler
  class_index: sampling.ClassIndex = None
  # [C] log class probabilities of a class-level main-batch sampler
  # (sampler.name != 'random'); None keeps the epoch permutation R.
  batch_log_class_probs: jax.Array | None = None


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
  steps_per_epoch = num_examples // config.batch_size
  sampler_tau = sampling.get_batch_sampler_tau(config.sampler.name)
  return StepConfig(
      num_examples=num_examples, batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch, padding=config.dataset.get("crop_padding", 0),
      mean=dataset.info.mean, std=dataset.info.std,
      mix_factor=None if method is None else method.factor,
      pairing=config.mix.pairing,
      # In-batch candidates already follow pi: weight them by n^(exponent - 1).
      in_batch_tau=jnp.float32(exponent - 1.0),
      alpha=jnp.float32(mixing.resolve_alpha(config.mix)),
      mix_stop_step=int(config.mix.stop_epoch * steps_per_epoch),
      label_rule="factor" if method is None else method.label_rule,
      mix_space="input" if method is None else method.space,
      remix_kappa=float(config.mix.remix_kappa), remix_tau=float(config.mix.remix_tau),
      manifold_layers=tuple(int(k) for k in config.mix.manifold_layers),
      prior=jnp.asarray(prior.prior, jnp.float32),
      log_counts=jnp.asarray(np.log(np.maximum(prior.counts, 1)), jnp.float32),
      log_class_probs=jnp.asarray(sampling.class_level_log_probs(prior.prior, exponent),
                                  jnp.float32),
      class_index=sampling.class_index(dataset.train_labels, len(prior.counts)),
      batch_log_class_probs=None if sampler_tau is None else jnp.asarray(
          sampling.class_level_log_probs(prior.prior, sampler_tau), jnp.float32))


def make_optimizer(config, steps_per_epoch: int):
  """SGD with momentum, L2 weight decay on all parameters, warm-up + steps.

  Weight decay is added to the gradient before momentum, as torch.optim.SGD
  does. The learning rate rises linearly over `warmup_epochs` (per step), then
  is multiplied by each `decay_factors[k]` from epoch `decay_epochs[k]` on
  (factors relative to the base rate: 0.01 then 0.0001 in the paper).

  Returns:
    (optax transformation, schedule fn of the step).
  """
  opt = config.optim
  base = base_learning_rate(config)
  warmup = int(opt.warmup_epochs * steps_per_epoch)
  boundaries, previous = {}, 1.0
  for epoch, factor in zip(opt.decay_epochs, opt.decay_factors):
    boundaries[int(epoch * steps_per_epoch) - warmup] = factor / previous
    previous = factor
  constant = optax.piecewise_constant_schedule(base, boundaries)
  if warmup > 0:
    # Starts at base/warmup so the first step already learns, as the
    # reference code's epoch-wise lr = base * epoch / 5 does.
    ramp = optax.linear_schedule(base / warmup, base, warmup)
    schedule = optax.join_schedules([ramp, constant], [warmup])
  else:
    schedule = constant
  tx = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  return tx, schedule


LR_SCALING = ("none", "linear")


def base_learning_rate(config) -> float:
  """`optim.learning_rate`, scaled with the global batch if `optim.lr_scaling` says.

  'linear' (Goyal et al. 2017): lr = learning_rate * batch_size /
  reference_batch_size, the learning rate being the one a paper gives for
  its reference batch (App. C.2: 0.2 at 512 for ResNet-10). 'none' (or no
  field, as in configs saved before it existed) keeps learning_rate.
  """
  opt = config.optim
  if opt.get("lr_scaling", "none") == "linear":
    return opt.learning_rate * config.batch_size / opt.reference_batch_size
  return opt.learning_rate


def create_train_state(key, model, image_shape, tx) -> TrainState:
  """Initialises parameters and BatchNorm statistics."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=tx)


def prepare_batch(train_images, train_labels, step, key, permutation,
                  cfg: StepConfig) -> dict:
  """Samples (R or a re-sampler, and partners) and augments one global batch.

  Args:
    train_images: uint8 [N, H, W, 3], replicated on every device.
    train_labels: int32 [N].
    step: global step (traced).
    key: the step's key (partners, augmentation, class-level main sampler).
    permutation: R's permutation of the step's epoch
      (`sampling.epoch_permutation` of the run's data key and the epoch
      alone: the same for every step of the epoch and after a resume).
    cfg: StepConfig.

  Returns:
    dict with 'image', 'label' (the main batch), 'partner_label', and
    'partner_image' (input mixing) or 'partner_position' (positions in the
    batch, manifold mixup).
  """
  partner_key, aug_key, partner_aug_key = jax.random.split(key, 3)
  if cfg.batch_log_class_probs is None:
    index = sampling.permutation_slice(permutation, step, cfg.batch_size,
                                       cfg.steps_per_epoch)
  else:
    # A fourth key beside the split, so the default sampler's stream is kept.
    index = sampling.class_level_sample(jax.random.fold_in(key, 3), cfg.class_index,
                                        cfg.batch_log_class_probs, cfg.batch_size)
  labels = train_labels[index]
  images = augment.random_crop_flip(aug_key, train_images[index], cfg.padding)
  batch = {"image": augment.normalize(images, cfg.mean, cfg.std), "label": labels}
  if cfg.mix_factor is None:
    batch["partner_image"], batch["partner_label"] = batch["image"], labels
  elif cfg.mix_space == "hidden":
    # Manifold mixup: the partner's hidden state must come from the same
    # forward pass, so partners are a random permutation of the batch.
    position = jax.random.permutation(partner_key, cfg.batch_size).astype(jnp.int32)
    batch["partner_position"], batch["partner_label"] = position, labels[position]
  elif cfg.pairing == "in_batch":
    # Partners are (already augmented) members of the batch, as in the
    # official code.
    position = sampling.in_batch_partners(partner_key, labels, cfg.log_counts,
                                          cfg.in_batch_tau)
    batch["partner_image"] = batch["image"][position]
    batch["partner_label"] = labels[position]
  else:
    partner = sampling.class_level_sample(partner_key, cfg.class_index,
                                          cfg.log_class_probs, cfg.batch_size)
    partner_images = augment.random_crop_flip(
        partner_aug_key, train_images[partner], cfg.padding)
    batch["partner_image"] = augment.normalize(partner_images, cfg.mean, cfg.std)
    batch["partner_label"] = train_labels[partner]
  return batch


def streamed_batch(batch: dict, key: jax.Array, cfg: StepConfig) -> dict:
  """The `prepare_batch` dict of a batch the tf.data pipeline augmented.

  Args:
    batch: 'image' uint8 [B, S, S, 3] and 'label' int32 [B] of the main batch,
      and 'partner_image' / 'partner_label' when the pipeline drew the R*
      partner batch (`mix.pairing='sampler'`, before `mix_stop_step`).
    key: the step's key (in-batch partners, manifold mixup's permutation).
    cfg: StepConfig.

  Returns:
    dict as from `prepare_batch`, images normalised on the device.
  """
  labels = batch["label"]
  images = augment.normalize(batch["image"], cfg.mean, cfg.std)
  out = {"image": images, "label": labels}
  if cfg.mix_factor is None or (cfg.mix_space == "input" and "partner_image" not in batch):
    # No mixing, or past T1, where the pipeline stops decoding partners and
    # xi = 1 makes any partner drop out exactly (1 x + 0 x' = x).
    out["partner_image"], out["partner_label"] = images, labels
  elif cfg.mix_space == "hidden":
    position = jax.random.permutation(key, cfg.batch_size).astype(jnp.int32)
    out["partner_position"], out["partner_label"] = position, labels[position]
  elif cfg.pairing == "in_batch":
    position = sampling.in_batch_partners(key, labels, cfg.log_counts, cfg.in_batch_tau)
    out["partner_image"], out["partner_label"] = images[position], labels[position]
  else:
    out["partner_image"] = augment.normalize(batch["partner_image"], cfg.mean, cfg.std)
    out["partner_label"] = batch["partner_label"]
  return out


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

  def loss_of(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], **model_kwargs)
    if cfg.mix_factor is None:  # One loss term, not 1 L(y) + 0 L(y).
      per_example = per_label_loss(logits, labels_i)
    else:
      per_example = mixing.mixed_loss(per_label_loss, logits, labels_i, labels_j,
                                      label_weight)
    return jnp.mean(per_example), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  stats = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           "param_norm": optax.tree.norm(state.params), "mean_xi": jnp.mean(xi),
           "mean_label_weight": jnp.mean(label_weight)}
  return new_state, stats


def eval_step(state: TrainState, images: jax.Array, mean, std) -> jax.Array:
  """Raw logits z of uint8 test images (no Bayias offset at test time)."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        augment.normalize(images, mean, std), train=False)
