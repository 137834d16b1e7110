"""A run's compiled functions: the step, the compiled chunk, the evaluation.

The step is compiled once over global arrays sharded on the mesh's 'data'
axis, on every device of every process. It is a function of (state, fed,
resident, step_cfg, run_keys): `fed` is what the host hands over per dispatch
and `resident` what stays on the devices (the dataset's feed says which,
lt_calib/data/__init__.py), so one step serves in-memory and streamed data.
BatchNorm statistics are over the global batch: the mean inside the jitted
step is a mean over the whole (sharded) batch axis.

Where the feed allows it (data on the devices), a compiled chunk runs many
steps in one dispatch: a `lax.scan` of a length fixed when it is traced, so
XLA runs the loop without asking the host after each step.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lt_calib import evaluation, models, parallel
from lt_calib.method import losses
from lt_calib.method.sampling import RunKeys
from lt_calib.train import state as state_lib
from lt_calib.train import step as step_lib


class Setup(NamedTuple):
  """A run's compiled functions, initial state and device-resident inputs.

  `update` and `run_chunk` take (state, fed, *arrays) and return (state,
  statistics) (`run_chunk`'s stacked [chunk_steps, ...]).
  """
  update: Callable
  run_chunk: Callable | None  # None: one step per dispatch.
  chunk_steps: int            # Static trip count of run_chunk (1: no chunk).
  feed: Any                   # The dataset's feed (make_feed).
  eval_step: Callable         # evaluation.make_step: (state, images, labels, index).
  state: Any
  resident: tuple             # On every device for the whole run.
  step_cfg: step_lib.StepConfig
  run_keys: RunKeys

  @property
  def arrays(self) -> tuple:
    """What every step takes after (state, fed)."""
    return (self.resident, self.step_cfg, self.run_keys)


def chunk_runner(one_step: Callable, num_steps: int) -> Callable:
  """`num_steps` (static) applications of `one_step` in one program.

  Args:
    one_step: (state, *args) -> (state, dict of scalar statistics).
    num_steps: the trip count, fixed when the program is traced.

  Returns:
    (state, *args) -> (state, statistics stacked [num_steps, ...]); the body
    is `one_step` itself.
  """

  def run(state, *args):
    def body(carry, _):
      return one_step(carry, *args)
    return jax.lax.scan(body, state, None, length=num_steps)

  return run


def make_one_step(loss_fn, schedule, mesh, batch_fn: Callable) -> Callable:
  """The un-jitted global step: (state, fed, resident, step_cfg, run_keys).

  Args:
    loss_fn: per-example loss (`losses.make_loss`).
    schedule: learning rate of the step (for the statistics).
    mesh: the mesh; the batch is constrained to its 'data' axis.
    batch_fn: the feed's (resident, fed, step, key, step_cfg) -> batch dict.
  """
  data_sharded = parallel.data_sharding(mesh)

  def one_step(state, fed, resident, step_cfg, run_keys):
    batch_key, mix_key = run_keys.step_keys(state.step)
    batch = jax.lax.with_sharding_constraint(
        batch_fn(resident, fed, state.step, batch_key, step_cfg), data_sharded)
    new_state, stats = step_lib.train_step(state, batch, mix_key, step_cfg, loss_fn)
    stats["learning_rate"] = schedule(state.step)
    return new_state, stats

  return one_step


def steps_per_dispatch(config, steps_per_epoch: int) -> int:
  """Steps of one compiled chunk (`config.steps_per_dispatch`), at most an epoch's.

  1 is the step loop (one jitted step per dispatch); more runs
  `chunk_runner`'s compiled loop of that many steps, and what is left of an
  epoch one step at a time. 0 picks what is faster on the backend: a whole
  epoch on accelerators, the step loop on CPUs, where XLA (jaxlib 0.10)
  leaves the weight-gradient convolutions inside a loop in a layout its fast
  convolution kernels do not take and runs them ~15x slower (measured: 16
  vs 250 images/s, docs/benchmarks.md).
  """
  requested = int(config.get("steps_per_dispatch", 0))
  if requested <= 0:
    return 1 if jax.default_backend() == "cpu" else steps_per_epoch
  return min(requested, steps_per_epoch)


def eval_logits_fn(dataset) -> Callable:
  """(state, uint8 images) -> raw logits, with the dataset's normalisation."""
  return functools.partial(step_lib.eval_step, mean=dataset.info.mean, std=dataset.info.std)


def stack(trees: list):
  """Pytrees stacked leaf by leaf along a new leading (member) axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def build(configs: list, dataset, mesh, feed, step_cfgs: list) -> Setup:
  """Builds the model, optimizer, initial state and the compiled functions.

  Args:
    configs: one experiment config, or K that differ only in their seed (and
      mix.alpha / mix.tau): K runs in one program (`jax.vmap` over the state,
      the run keys and the step config; lt_calib/train/population.py).
    dataset: the dataset (lt_calib/data/__init__.py's interface).
    mesh: device mesh with a 'data' axis.
    feed: the dataset's feed for this run (`dataset.make_feed`).
    step_cfgs: `step.make_step_config` of each config.

  Returns:
    Setup (with a leading member axis for K runs).
  """
  config, members = configs[0], len(configs) > 1
  replicated = parallel.replicated(mesh)
  step_cfg = stack(step_cfgs) if members else step_cfgs[0]
  loss_fn = losses.make_loss(config.loss, dataset.prior, step_cfgs[0].steps_per_epoch,
                             models.logit_scale(config.model))
  tx, schedule = state_lib.make_optimizer(config, step_cfgs[0].steps_per_epoch)
  model = models.create_model(config.model, dataset.info.num_classes)
  keys = [RunKeys.from_seed(c.seed) for c in configs]
  states = [state_lib.create_train_state(k.init, model, dataset.image_shape, tx) for k in keys]
  one_step = make_one_step(loss_fn, schedule, mesh, feed.batch)
  logits_fn = eval_logits_fn(dataset)
  if members:
    one_step = jax.vmap(one_step, in_axes=(0, 0, None, 0, 0))
    logits_fn = jax.vmap(logits_fn, in_axes=(0, None))
  jit = functools.partial(jax.jit, donate_argnums=(0,),
                          out_shardings=(replicated, replicated))
  chunk = steps_per_dispatch(config, step_cfgs[0].steps_per_epoch) if feed.on_device else 1
  eval_step = evaluation.make_step(logits_fn, dataset.info.num_classes,
                                   config.calibration_bins, mesh, members=members)
  state, run_keys = (stack(states), stack(keys)) if members else (states[0], keys[0])
  resident, step_cfg, run_keys = parallel.replicate((feed.resident, step_cfg, run_keys), mesh)
  return Setup(jit(one_step), None if chunk == 1 else jit(chunk_runner(one_step, chunk)),
               chunk, feed, eval_step, parallel.replicate(state, mesh), resident, step_cfg,
               run_keys)


def build_for(configs: list, dataset, mesh, start_step: int = 0) -> Setup:
  """`build` with each config's step config and the dataset's feed from `start_step`.

  Args:
    configs: one config, or K for K runs in one program (see `build`).
    dataset: the dataset.
    mesh: the mesh.
    start_step: the step training starts (or resumes) at.
  """
  step_cfgs = [step_lib.make_step_config(c, dataset) for c in configs]
  feed = dataset.make_feed(mesh=mesh, step_cfg=step_cfgs[0], seed=int(configs[0].seed),
                           start_step=start_step, global_batch=configs[0].batch_size,
                           members=len(configs) > 1)
  return build(configs, dataset, mesh, feed, step_cfgs)
