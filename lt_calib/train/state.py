"""The train state and the optimizer: what a step updates and how.

SGD with momentum and L2 weight decay (added to the gradient before momentum,
as torch.optim.SGD does), a linear warm-up, then the base rate multiplied by
each `decay_factors[k]` from epoch `decay_epochs[k]` on.
"""

import functools
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax


class TrainState(train_state.TrainState):
  batch_stats: Any


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
