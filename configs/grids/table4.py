"""Table 4 of the paper as a grid: feature-wise x loss-wise methods x seeds.

  python -m lt_calib.grid --config=configs/grids/table4.py --workdir=DIR

{none, mixup, remix, unimix} x {ce, ldam_drw, bayias} x seeds {0, 1, 2} on
CIFAR-10-LT, rho = 100, with the paper's protocol (ResNet-32, 200 epochs).
`arg` is a comma-separated list of: a variant, 'dataset=cifar10|cifar100',
'rho=<float>'; e.g. `table4.py:cpu,rho=50`. Variants:

- 'smoke': every cell, one seed, one epoch (12 steps of 1,024 images) of a
  ResNet-8 of width 4, 200 test images: checks the whole grid end to end on
  a CPU in minutes. The numbers mean nothing.
- 'cpu': the reduced budget of docs/methods.md: {none, unimix} x {ce, bayias}
  x seeds {0, 1}, ResNet-8 of width 16, 10 epochs of batch 128, the paper's
  schedule scaled by 10/200 (warm-up 1 epoch, decays at 8 and 9, mixing
  stops after 6, DRW from 8), the full test set.

The paper's Table 4 rows named LDAM match its Table 1 row of plain LDAM
(74.47 on CIFAR-10-LT-100), not LDAM+DRW (77.03); set
`--config.losses="('ce','ldam','bayias')"` for that reading.
"""

import ml_collections

from configs import cifar100_lt, cifar10_lt

DATASET_CONFIGS = {"cifar10": cifar10_lt.get_config, "cifar100": cifar100_lt.get_config}
VARIANTS = ("", "smoke", "cpu")


def parse_arg(arg: str) -> dict:
  """'cpu,dataset=cifar100,rho=50' -> {'variant': 'cpu', 'dataset': ..., 'rho': ...}."""
  options = {"variant": "", "dataset": "cifar10", "rho": 100.0}
  for token in filter(None, (arg or "").split(",")):
    key, _, value = token.partition("=")
    if not value and key in VARIANTS:
      options["variant"] = key
    elif key == "dataset" and value in DATASET_CONFIGS:
      options["dataset"] = value
    elif key == "rho" and value:
      options["rho"] = float(value)
    else:
      raise ValueError(f"grid config arg {token!r} not understood; expected a variant "
                       f"{VARIANTS[1:]}, dataset={sorted(DATASET_CONFIGS)} or rho=<float>.")
  return options


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the grid config (base, mixes, losses, seeds, baseline, title)."""
  options = parse_arg(arg)
  base = DATASET_CONFIGS[options["dataset"]]()
  base.dataset.imbalance_ratio = options["rho"]
  grid = ml_collections.ConfigDict()
  grid.title = f"Table 4 grid ({options['variant'] or 'paper protocol'})"
  grid.mixes = ("none", "mixup", "remix", "unimix")
  grid.losses = ("ce", "ldam_drw", "bayias")
  grid.seeds = (0, 1, 2)
  grid.seeds_in_one_program = False  # Selectable; measured slower (lt_calib/grid.py).
  grid.baseline = ("none", "ce")
  if options["variant"] == "smoke":
    base.model.depth, base.model.width = 8, 4
    base.batch_size, base.num_epochs = 1024, 1
    base.optim.warmup_epochs = 1
    base.optim.decay_epochs, base.optim.decay_factors = (), ()
    base.mix.stop_epoch = 1
    base.loss.drw_epoch = 0  # The weighted branch is the one to exercise.
    base.dataset.test_subset = 200
    base.eval_every_epochs = base.checkpoint_every_epochs = 1
    base.log_every_steps = 4
    base.tensorboard = False
    grid.seeds = (0,)
  elif options["variant"] == "cpu":
    grid.mixes, grid.losses, grid.seeds = ("none", "unimix"), ("ce", "bayias"), (0, 1)
    base.model.depth, base.model.width = 8, 16
    base.num_epochs = 10
    base.optim.warmup_epochs = 1
    base.optim.decay_epochs = (8, 9)
    base.mix.stop_epoch = 6
    base.loss.drw_epoch = 8
    base.eval_every_epochs = base.checkpoint_every_epochs = 2
    base.log_every_steps = 48
    base.tensorboard = False
  grid.base = base
  return grid
