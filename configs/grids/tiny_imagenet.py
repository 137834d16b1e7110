"""Tiny-ImageNet-LT (200 classes, 64 px): CE, Bayias and UniMix + Bayias.

  python -m lt_calib.grid --config=configs/grids/tiny_imagenet.py[:cpu][,rho=100] --workdir=DIR

The paper has no Tiny-ImageNet-LT table; these are the three cells of its
Table 4 that matter most (none + CE, none + Bayias, UniMix + Bayias), on the
real many-class data that runs offline here. Budgets:

- '' (none): `configs/tiny_imagenet_lt.py` as it is (ResNet-18, 200 epochs,
  the paper's small-scale protocol), seeds 0-2 (GPU).
- 'cpu': the reduced protocol of `table4.py:cpu` carried over: ResNet-10 of
  width 16, 10 epochs of batch 128, the schedule scaled by 10/200 (warm-up 1
  epoch, decays at 8 and 9, mixing stops after 6), the full 10,000-image test
  set, evaluated every 2 epochs; one seed.
- 'smoke': one epoch of a width-4 model on 512-image batches, 200 test
  images: checks the grid in minutes; its numbers mean nothing.

rho=<float> picks the imbalance (10, the default, or 100; any rho >= 10 is
exact on the stored pool).
"""

import ml_collections

from configs import tiny_imagenet_lt
from lt_calib.errors import ConfigError

BUDGETS = ("cpu", "smoke")


def base_config(budget: str, rho: float = 10.0) -> ml_collections.ConfigDict:
  """`configs/tiny_imagenet_lt.py` at imbalance `rho`, shrunk to `budget` ('', 'cpu', 'smoke')."""
  base = tiny_imagenet_lt.get_config()
  base.dataset.imbalance_ratio = rho
  base.tensorboard = False
  if budget == "cpu":
    base.model.depth, base.model.width = 10, 16
    base.num_epochs = 10
    base.optim.warmup_epochs = 1
    base.optim.decay_epochs = (8, 9)
    base.mix.stop_epoch = 6
    base.loss.drw_epoch = 8
    base.eval_every_epochs = base.checkpoint_every_epochs = 2
    base.log_every_steps = 100
  elif budget == "smoke":
    base.model.depth, base.model.width = 10, 4
    base.batch_size, base.num_epochs = 512, 1
    base.optim.warmup_epochs = 1
    base.optim.decay_epochs, base.optim.decay_factors = (), ()
    base.mix.stop_epoch = 1
    base.dataset.test_subset = 200
    base.eval_every_epochs = base.checkpoint_every_epochs = 1
    base.log_every_steps = 10
  return base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the grid config for `arg` = '[budget][,rho=<float>]'."""
  budget, rho = "", 10.0
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, _, value = token.partition("=")
    if not value and key in BUDGETS and not budget:
      budget = key
    elif key == "rho" and value:
      rho = float(value)
    else:
      raise ConfigError(f"tiny_imagenet grid arg {token!r} not understood; expected "
                        f"one budget {BUDGETS} and rho=<float>.")
  base = base_config(budget, rho)
  grid = ml_collections.ConfigDict()
  # The GPU protocol has 3 seeds; the CPU budgets 1 (more: --config.seeds).
  grid.seeds = (0,) if budget else (0, 1, 2)
  grid.seeds_in_one_program = False  # Selectable; measured slower (lt_calib/grid.py).
  grid.title = (f"Tiny-ImageNet-LT, rho = {rho:g}: CE, Bayias, UniMix + Bayias "
                f"({budget or 'paper protocol'})")
  grid.mixes, grid.losses = ("none", "unimix"), ("ce", "bayias")
  grid.pairs = (("none", "ce"), ("none", "bayias"), ("unimix", "bayias"))
  grid.baseline = ("none", "ce")
  grid.base = base
  return grid
