"""Training and evaluation loop: Algorithm 1 (UniMix + Bayias), data-parallel.

Layout of one step (compiled once, over global arrays sharded on the mesh's
'data' axis; the in-memory training set is replicated on every device):

  key_t = fold_in(key, t)             one key per global step
  batch = prepare_batch(data, t, ..)  R and R* (or in-batch) indices, gather,
                                      crop/flip/normalise -- on the device
  state = train_step(state, batch, key_t)
                                      xi ~ mix factor, x~ = xi x_i + (1-xi) x_j,
                                      Eq. 11 with the chosen loss, SGD update

BatchNorm statistics are over the global batch, because the mean inside the
jitted step is a mean over the whole (sharded) batch axis.
"""

import functools
import json
import logging
import pathlib
import time
from typing import Any, NamedTuple

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from lt_calib import (augment, config_checks, datasets, losses, metrics, mixing,
                      models, report, reporting, sampling)


class TrainState(train_state.TrainState):
  batch_stats: Any


@flax.struct.dataclass
class StepConfig:
  """Everything the step needs besides state, batch and key (static/arrays).

  The method choices (mixing, label rule, samplers) are static, so each run
  compiles one step; what changes over training (mixing stop, DRW) is decided
  from the traced step inside it.
  """
  num_examples: int = flax.struct.field(pytree_node=False)
  batch_size: int = flax.struct.field(pytree_node=False)
  steps_per_epoch: int = flax.struct.field(pytree_node=False)
  padding: int = flax.struct.field(pytree_node=False)
  mean: tuple = flax.struct.field(pytree_node=False)
  std: tuple = flax.struct.field(pytree_node=False)
  mix_factor: str | None = flax.struct.field(pytree_node=False)
  pairing: str = flax.struct.field(pytree_node=False)
  in_batch_tau: float = flax.struct.field(pytree_node=False)
  alpha: float = flax.struct.field(pytree_node=False)
  mix_stop_step: int = flax.struct.field(pytree_node=False)
  label_rule: str = flax.struct.field(pytree_node=False)      # mixing.LABEL_RULES
  mix_space: str = flax.struct.field(pytree_node=False)       # 'input' | 'hidden'
  remix_kappa: float = flax.struct.field(pytree_node=False)
  remix_tau: float = flax.struct.field(pytree_node=False)
  manifold_layers: tuple = flax.struct.field(pytree_node=False)
  prior: jax.Array = None             # [C] pi
  log_counts: jax.Array = None        # [C] log n_c
  log_class_probs: jax.Array = None   # [C] log P_inv (Eq. 9) of the partner sampler
  class_index: sampling.ClassIndex = None
  # [C] log class probabilities of a class-level main-batch sampler
  # (sampler.name != 'random'); None keeps the epoch permutation R.
  batch_log_class_probs: jax.Array | None = None


def make_step_config(config, dataset: datasets.Dataset) -> StepConfig:
  """Resolves the config and the train prior into a StepConfig.

  Args:
    config: experiment config (mix, sampler, dataset.crop_padding, batch_size).
    dataset: loaded Dataset (its prior feeds samplers and mixing).

  Returns:
    StepConfig.
  """
  method = mixing.get_method(config.mix.name)
  tau = config.mix.tau if method is None or method.partner_tau is None else method.partner_tau
  in_batch_tau = float(tau)
  if method is not None and method.partner_tau is not None:
    # A fixed tau is R*'s (1 = random partners). In-batch candidates already
    # follow pi, so the same partner law there is n^(tau - 1): uniform.
    in_batch_tau = method.partner_tau - 1.0
  prior = dataset.prior
  num_examples = len(dataset.train_labels)
  if num_examples < config.batch_size:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {num_examples} "
                     "training images.")
  steps_per_epoch = num_examples // config.batch_size
  sampler_tau = sampling.get_batch_sampler_tau(config.sampler.name)
  return StepConfig(
      num_examples=num_examples, batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch, padding=config.dataset.crop_padding,
      mean=dataset.info.mean, std=dataset.info.std,
      mix_factor=None if method is None else method.factor,
      pairing=config.mix.pairing, in_batch_tau=in_batch_tau,
      alpha=mixing.resolve_alpha(config.mix),
      mix_stop_step=int(config.mix.stop_epoch * steps_per_epoch),
      label_rule="factor" if method is None else method.label_rule,
      mix_space="input" if method is None else method.space,
      remix_kappa=float(config.mix.remix_kappa), remix_tau=float(config.mix.remix_tau),
      manifold_layers=tuple(int(k) for k in config.mix.manifold_layers),
      prior=jnp.asarray(prior.prior, jnp.float32),
      log_counts=jnp.asarray(np.log(np.maximum(prior.counts, 1)), jnp.float32),
      log_class_probs=jnp.asarray(sampling.class_level_log_probs(prior.prior, tau),
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
  warmup = int(opt.warmup_epochs * steps_per_epoch)
  boundaries, previous = {}, 1.0
  for epoch, factor in zip(opt.decay_epochs, opt.decay_factors):
    boundaries[int(epoch * steps_per_epoch) - warmup] = factor / previous
    previous = factor
  constant = optax.piecewise_constant_schedule(opt.learning_rate, boundaries)
  if warmup > 0:
    # Starts at base/warmup so the first step already learns, as the
    # reference code's epoch-wise lr = base * epoch / 5 does.
    ramp = optax.linear_schedule(opt.learning_rate / warmup, opt.learning_rate, warmup)
    schedule = optax.join_schedules([ramp, constant], [warmup])
  else:
    schedule = constant
  tx = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  return tx, schedule


def create_train_state(key, model, image_shape, tx) -> TrainState:
  """Initialises parameters and BatchNorm statistics."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"], tx=tx)


def prepare_batch(train_images, train_labels, step, key, data_key,
                  cfg: StepConfig) -> dict:
  """Samples (R or a re-sampler, and partners) and augments one global batch.

  Args:
    train_images: uint8 [N, H, W, 3], replicated on every device.
    train_labels: int32 [N].
    step: global step (traced).
    key: the step's key (partners, augmentation, class-level main sampler).
    data_key: the run's sampler key; R's permutation of each epoch is drawn
      from it and the epoch number alone, so it is the same for every step
      of the epoch and after a resume.
    cfg: StepConfig.

  Returns:
    dict with 'image', 'label' (the main batch), 'partner_label', and
    'partner_image' (input mixing) or 'partner_position' (positions in the
    batch, manifold mixup).
  """
  partner_key, aug_key, partner_aug_key = jax.random.split(key, 3)
  if cfg.batch_log_class_probs is None:
    index = sampling.epoch_permutation_slice(
        data_key, step, cfg.num_examples, cfg.batch_size, cfg.steps_per_epoch)
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
  stats = {"loss": loss, "grad_norm": optax.global_norm(grads),
           "param_norm": optax.global_norm(state.params), "mean_xi": jnp.mean(xi),
           "mean_label_weight": jnp.mean(label_weight)}
  return new_state, stats


def eval_step(state: TrainState, images: jax.Array, mean, std) -> jax.Array:
  """Raw logits z of uint8 test images (no Bayias offset at test time)."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        augment.normalize(images, mean, std), train=False)


def evaluate(eval_fn, state, images, labels, batch_size, sharding) -> tuple:
  """Logits of the whole test set, in fixed-size padded batches.

  Padding keeps one compiled shape; padded rows are dropped before metrics,
  so the counts are exact.
  """
  outputs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.zeros((batch_size,) + chunk.shape[1:], chunk.dtype)
    padded[:len(chunk)] = chunk
    logits = eval_fn(state, jax.device_put(padded, sharding))
    outputs.append(np.asarray(logits)[:len(chunk)])
  return np.concatenate(outputs), labels


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss becomes NaN or infinite."""


def _check_finite(history, last_checkpoint):
  for step, stats in history:
    if not np.isfinite(stats["loss"]):
      raise NonFiniteLossError(
          f"training loss is {stats['loss']} at step {step}; stopping. The last "
          f"good checkpoint (step {last_checkpoint}) is kept in the workdir. Lower "
          "optim.learning_rate or check the data and the loss settings.")


def _checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                         create=True)
  return ocp.CheckpointManager((workdir / "checkpoints").resolve(), options=options)


def _evaluate_and_record(eval_fn, state, dataset, config, sharding, epoch, step):
  logits, labels = evaluate(eval_fn, state, dataset.test_images, dataset.test_labels,
                            config.eval_batch_size, sharding)
  record = metrics.summarize(logits, labels, dataset.prior.counts,
                             num_bins=config.calibration_bins)
  record.update(epoch=epoch, step=step)
  return record, logits


class Setup(NamedTuple):
  """A run's compiled functions, initial state and device-resident data."""
  update: Any      # (state, *arrays) -> (state, stats), jitted, state donated.
  eval_fn: Any     # (state, uint8 images) -> logits, jitted.
  state: TrainState
  arrays: tuple    # (train_images, train_labels, step_cfg, run_keys) on the devices.
  step_cfg: StepConfig


def build(config, dataset: datasets.Dataset, mesh) -> Setup:
  """Builds the model, optimizer, initial state and the compiled step.

  Args:
    config: experiment config.
    dataset: loaded Dataset (its prior feeds sampler, mixing and loss).
    mesh: device mesh with a 'data' axis.

  Returns:
    Setup.
  """
  replicated, data_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step_cfg = make_step_config(config, dataset)
  loss_fn = losses.make_loss(config.loss, dataset.prior, step_cfg.steps_per_epoch,
                             models.logit_scale(config.model))
  tx, schedule = make_optimizer(config, step_cfg.steps_per_epoch)
  model = models.create_model(config.model, dataset.info.num_classes)
  # One key for the run: init, the sampler's epoch permutations, and a root
  # folded with the global step, so a resumed run draws the same numbers.
  # They enter the step as an argument, not as constants, so runs that differ
  # only in the seed compile to the same program (and share a compilation
  # cache entry).
  run_keys = jax.random.split(jax.random.key(config.seed), 3)
  state = create_train_state(run_keys[0], model, dataset.train_images.shape[1:], tx)

  @functools.partial(jax.jit, donate_argnums=(0,), out_shardings=(replicated, replicated))
  def update(state, train_images, train_labels, step_cfg, run_keys):
    data_key, step_root = run_keys[1], run_keys[2]
    step_key = jax.random.fold_in(step_root, state.step)
    batch_key, mix_key = jax.random.split(step_key)
    batch = prepare_batch(train_images, train_labels, state.step, batch_key,
                          data_key, step_cfg)
    batch = jax.lax.with_sharding_constraint(batch, data_sharded)
    new_state, stats = train_step(state, batch, mix_key, step_cfg, loss_fn)
    stats["learning_rate"] = schedule(state.step)
    return new_state, stats

  eval_fn = jax.jit(functools.partial(eval_step, mean=dataset.info.mean,
                                      std=dataset.info.std), out_shardings=replicated)
  arrays = jax.device_put(
      (dataset.train_images, dataset.train_labels, step_cfg, run_keys), replicated)
  return Setup(update, eval_fn, jax.device_put(state, replicated), arrays, step_cfg)


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device, axis 'data'.

  Auto axis type: the compiler propagates the data sharding from the batch
  constraint (explicit-sharding mode would make every op spell it out).
  """
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints; resumes from `workdir` if possible.

  Args:
    config: experiment config (see configs/).
    workdir: output directory: checkpoints/, metrics.jsonl, summary.json,
      config.json and TensorBoard events.

  Returns:
    The summary dict written to summary.json.
  """
  wall_start = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  config_checks.check_config(config, jax.device_count())

  dataset = datasets.load_dataset(config.dataset)
  logging.info("data: %s; %d train images, counts %s; %d test images",
               dataset.source, len(dataset.train_labels), dataset.prior.counts.tolist(),
               len(dataset.test_labels))
  setup = build(config, dataset, mesh)
  state, step_cfg, eval_fn = setup.state, setup.step_cfg, setup.eval_fn
  total_steps = config.num_epochs * step_cfg.steps_per_epoch
  manager = _checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.StandardRestore(state))
    logging.info("resumed from checkpoint at step %d", int(state.step))
  start_step = int(state.step)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  writer = reporting.create_writer(str(workdir), config.tensorboard)
  progress = reporting.Progress(total_steps, config.batch_size, start_step)
  history, last_checkpoint, best = [], manager.latest_step(), None
  spe = step_cfg.steps_per_epoch
  evaluations = []
  try:
    for step in range(start_step, total_steps):
      state, stats = setup.update(state, *setup.arrays)
      history.append((step, stats))
      done = step + 1
      epoch_done = done % spe == 0
      if done % config.log_every_steps == 0 or epoch_done or done == total_steps:
        history = [(s, jax.device_get(m)) for s, m in history]
        _check_finite(history, last_checkpoint)
        images_per_s, eta = progress.update(done)
        last = history[-1][1]
        logging.info("epoch %d step %d/%d loss %.4f lr %.5f %.0f img/s ETA %.0fs",
                     step // spe + 1, done, total_steps, last["loss"],
                     last["learning_rate"], images_per_s, eta)
        writer.write_scalars(done, {**{k: float(v) for k, v in last.items()},
                                    "images_per_second": images_per_s})
        history = []
      if not epoch_done and done != total_steps:
        continue
      epoch = done // spe
      if epoch % config.eval_every_epochs == 0 or done == total_steps:
        record, logits = _evaluate_and_record(eval_fn, state, dataset, config,
                                              replicated, epoch, done)
        evaluations.append(record)
        reporting.append_jsonl(workdir / "metrics.jsonl", record)
        writer.write_scalars(done, {f"test/{k}": v for k, v in record.items()
                                    if isinstance(v, float)})
        logging.info("eval epoch %d: top1 %.4f ece %.4f nll %.4f", epoch,
                     record["top1"], record["ece"], record["nll"])
        if best is None or record["top1"] > best["top1"]:
          best = {"top1": record["top1"], "epoch": epoch, "step": done}
      if epoch % config.checkpoint_every_epochs == 0 or done == total_steps:
        manager.save(done, args=ocp.args.StandardSave(state))
        last_checkpoint = done
  finally:
    manager.wait_until_finished()
    writer.flush()

  if evaluations and evaluations[-1]["step"] == total_steps:
    final = evaluations[-1]
  else:  # A resumed run whose last evaluation happened before the restart.
    final, logits = _evaluate_and_record(eval_fn, state, dataset, config, replicated,
                                         total_steps // spe, total_steps)
  summary = {
      "final": final,
      "best_epoch_top1": None if best is None else {
          **best, "note": "selected on the test set; for comparison with papers "
                          "that report it, not an unbiased estimate"},
      "train_class_counts": dataset.prior.counts.tolist(),
      "num_train_images": int(len(dataset.train_labels)),
      "num_test_images": int(len(dataset.test_labels)),
      "data_source": dataset.source,
      "config": json.loads(config.to_json_best_effort()),
      "seed": config.seed,
      "steps": total_steps,
      "steps_this_run": total_steps - start_step,
      "resumed_from_step": start_step or None,
      "wall_time_s": time.time() - wall_start,
      "train_images_per_s": progress.images_per_second(),
      "devices": [str(d) for d in jax.devices()],
      "jax_version": jax.__version__,
  }
  reporting.write_json(workdir / "summary.json", summary)
  # Pictures and report.md; a temperature is fitted when dataset.val_per_class > 0.
  report.write_training_report(
      workdir, config, logits, dataset.test_labels, dataset.prior.counts,
      logits_fn=lambda images: evaluate(eval_fn, state, images, None,
                                        config.eval_batch_size, replicated)[0])
  writer.close()
  return summary
