"""Table D3 as a grid: the paper's run, then a second stage of each kind, x seeds.

  python -m lt_calib.grid --config=configs/grids/two_stage.py[:cpu|:smoke] --workdir=DIR

Rows (App. D.5; docs/methods.md, "A second stage"):
- unimix + bayias: the first stage (the paper's method, its config's recipe);
- stage2 + las: MiSLAS's second stage after it (backbone frozen, 10 epochs,
  class-balanced batches, label-aware smoothing): the paper's "2nd-stage";
- stage2 + ce: the same with plain CE (c-RT's classifier re-training);
- stage2_random + bayias: 10 more epochs of the classifier with the first
  stage's loss and sampler (a control: what the extra epochs alone give).
Each second-stage cell starts from the first-stage cell of its seed (the
relative `stage2.first_stage` is a cell of the grid, lt_calib/train/two_stage.py),
so first stages train first; run the grid in one process (not --workers).

`arg`: a budget and options, comma-separated:
- '' (none): the paper's protocol on CIFAR-100-LT, rho 100, 3 seeds (Table
  D3: ours 47.6 / ECE 3.24 -> LAS 48.3 / 1.44); needs TFDS's cifar100.
- 'cpu': fidelity.py's reduced protocol (ResNet-8 of width 16, 10 epochs) on
  the offline CIFAR-10-LT, rho 100, 3 seeds; the second stages keep
  MiSLAS's 10 epochs (with the backbone frozen they cost far less than the
  first stage).
- 'smoke': ResNet-8 of width 4, one epoch of each stage, 1 seed: checks the
  machinery.
- 'dataset=cifar10|cifar100|tiny_imagenet': the dataset. Tiny-ImageNet-LT
  (rho 100, offline) takes its own budgets from `tiny_imagenet.py` (the
  'cpu' one: ResNet-10 of width 16, 10 epochs, evaluated every 2) and its
  config's second stage (CIFAR-100-LT's MiSLAS settings).
"""

import ml_collections

from configs import cifar100_lt, cifar10_lt, common
from configs.grids import fidelity, tiny_imagenet
from lt_calib.errors import ConfigError
from lt_calib.run_identity import flatten

# Each dataset's first-stage base config at a budget ('', 'cpu', 'smoke').
DATASETS = {
    "cifar10": lambda budget: fidelity.base_config(budget, cifar10_lt.get_config()),
    "cifar100": lambda budget: fidelity.base_config(budget, cifar100_lt.get_config()),
    "tiny_imagenet": lambda budget: tiny_imagenet.base_config(budget, rho=100.0),
}
FIRST = ("unimix", "bayias")


def stage2_preset(base: ml_collections.ConfigDict, budget: str) -> tuple:
  """`:two_stage`'s changes to `base` as (dotted field, value) pairs (loss left to the row)."""
  stage2 = common.apply_variant(base.copy_and_resolve_references(), "two_stage")
  if budget == "smoke":
    stage2.num_epochs, stage2.batch_size = 1, base.batch_size
  before, after = flatten(base.to_dict()), flatten(stage2.to_dict())
  changed = tuple((k, v) for k, v in after.items()
                  if before.get(k) != v and not k.startswith("loss.name"))
  return changed + (("stage2.first_stage", "{}__{}__seed{{seed}}".format(*FIRST)),)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the grid config (base, presets, pairs, seeds, ...)."""
  tokens = [t for t in (arg or "").split(",") if t]
  budgets = [t for t in tokens if t in fidelity.BUDGETS]
  datasets = [t.partition("=")[2] for t in tokens if t.startswith("dataset=")]
  unknown = [t for t in tokens if t not in budgets and not t.startswith("dataset=")]
  if unknown or len(budgets) > 1 or any(d not in DATASETS for d in datasets):
    raise ConfigError(f"two_stage grid: cannot read {arg!r}; use at most one of "
                      f"{fidelity.BUDGETS} and dataset= one of {sorted(DATASETS)}.")
  budget = budgets[0] if budgets else ""
  dataset = datasets[0] if datasets else ("cifar100" if not budget else "cifar10")
  base = DATASETS[dataset](budget)
  grid = ml_collections.ConfigDict()
  grid.title = (f"Table D3: the paper's run, then a second stage ({dataset}-LT, "
                f"{budget or 'paper protocol'})")
  grid.base = base
  stage2 = stage2_preset(base, budget)
  grid.mix_presets = {"stage2": stage2,
                      "stage2_random": stage2 + (("sampler.name", "random"),)}
  grid.loss_presets = {"las": (("loss.name", "las"),)}
  grid.mixes, grid.losses = ("unimix", "stage2", "stage2_random"), ("bayias", "las", "ce")
  grid.pairs = (FIRST, ("stage2", "las"), ("stage2", "ce"), ("stage2_random", "bayias"))
  grid.baseline = FIRST
  grid.seeds = (0,) if budget == "smoke" else (0, 1, 2)
  grid.seeds_in_one_program = False  # Each second stage has its own first stage.
  grid.train = True
  return grid
