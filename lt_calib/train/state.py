"""The train state and the optimizer: what a step updates and how.

SGD with momentum and L2 weight decay (added to the gradient before momentum,
as torch.optim.SGD does), a linear warm-up, then the base rate multiplied by
each `decay_factors[k]` from epoch `decay_epochs[k]` on; or, for a second
stage, a per-epoch cosine rate on the classifier head alone.
"""

import functools
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from lt_calib.models.heads import classifier_keys


class TrainState(train_state.TrainState):
  batch_stats: Any


SCHEDULES = ("steps", "cosine")


def learning_rate_schedule(config, steps_per_epoch: int):
  """The learning rate of each step, as `optim.schedule` says.

  'steps' (default): the rate rises linearly over `warmup_epochs` (per step),
  then is multiplied by each `decay_factors[k]` from epoch `decay_epochs[k]`
  on (factors relative to the base rate: 0.01 then 0.0001 in the paper).
  'cosine': constant within an epoch e, base (1 + cos(pi e / num_epochs)) / 2,
  as MiSLAS's stage 2 sets it each epoch (train_stage2.py).

  Returns:
    fn(step) -> learning rate.
  """
  opt = config.optim
  base = base_learning_rate(config)
  if opt.get("schedule", "steps") == "cosine":
    num_epochs = config.num_epochs
    return lambda step: base * 0.5 * (1.0 + jnp.cos(jnp.pi * (step // steps_per_epoch)
                                                     / num_epochs))
  warmup = int(opt.warmup_epochs * steps_per_epoch)
  boundaries, previous = {}, 1.0
  for epoch, factor in zip(opt.decay_epochs, opt.decay_factors):
    boundaries[int(epoch * steps_per_epoch) - warmup] = factor / previous
    previous = factor
  constant = optax.piecewise_constant_schedule(base, boundaries)
  if warmup <= 0:
    return constant
  # Starts at base/warmup so the first step already learns, as the
  # reference code's epoch-wise lr = base * epoch / 5 does.
  ramp = optax.linear_schedule(base / warmup, base, warmup)
  return optax.join_schedules([ramp, constant], [warmup])


def classifier_only(config) -> bool:
  """Whether the run trains only the classifier head (a second stage)."""
  stage2 = config.get("stage2")
  return bool(stage2 and stage2.get("enabled", False))


def trainable_labels(params, classifier: bool) -> dict:
  """'train' or 'frozen' for each parameter leaf: all train, or only the head."""
  heads = classifier_keys(params) if classifier else tuple(params)
  return {key: jax.tree.map(lambda _, k=key: "train" if k in heads else "frozen", value)
          for key, value in params.items()}


def make_optimizer(config, steps_per_epoch: int):
  """SGD with momentum and L2 weight decay on the trained parameters.

  Weight decay is added to the gradient before momentum, as torch.optim.SGD
  does. In a second stage (`classifier_only`) only the classifier head has
  optimizer state and updates; every other parameter gets a zero update.

  Returns:
    (optax transformation, schedule fn of the step).
  """
  opt = config.optim
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov))
  if classifier_only(config):
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               functools.partial(trainable_labels, classifier=True))
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
