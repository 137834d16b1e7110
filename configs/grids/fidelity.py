"""Results-fidelity grids: where do the ~5 points to the paper go?

  python -m lt_calib.grid --config=configs/grids/fidelity.py:PART[,BUDGET][,OPTION...] \
      --workdir=DIR

On one H200, 200 epochs, one seed, every CIFAR-10-LT (rho = 100) cell was
about 5 points under the paper, and UniMix as the paper's text specifies it
added nothing while the official code's variant added +4.0 (docs/results.md).
The parts, in order of importance:

- 'decomposition': CIFAR-10-LT, rho = 100. UniMix from the paper's text
  (`paper_text`: R* partners with class probability ∝ pi^-1, alpha 0.5,
  mixing stopped at epoch 120 of 200) changed ONE factor at a time towards the
  official code (config/cifar10_100.py, core.py): `tau_counts` (tau -1 read in
  count units: partner class ∝ n^0, i.e. uniform), `tau_official` (the code's
  tau -0.5 in count units: partner class ∝ n^0.5), `stop_never`, `alpha_08`
  (alpha 0.8), `in_batch` (partners drawn within the batch), `batch_64`; and
  `official`, the code's recipe as a whole (all of these at once, plus its
  per-epoch warm-up staircase at 200 epochs). Every row with Bayias; CE for
  the two ends (paper_text, official) and the no-mixing baselines none + CE,
  none + Bayias. Δ is measured from paper_text + Bayias.
- 'second_generation': CIFAR-10-LT (rho = 100), none + CE, on the stored
  images ('stored') and on a copy one JPEG generation further ('gen2',
  `python -m lt_calib.data.degrade`: quality 35 on a grid shifted by 4 px,
  whose PSNR against the stored images, 28.2 dB, matches a fresh quality-75
  encode's against near-clean images): the drop estimates what one lossy
  generation costs on long-tailed data. Needs data/cifar10_jpeg_gen2.npz.
- 'data_effect': balanced CIFAR-10 (rho = 1, all 50,000 training images),
  ResNet-32, CE, no mixing, the same schedule: is the offline JPEG copy of
  CIFAR-10 worth fewer points than the original? He et al. 2016, "Deep
  Residual Learning for Image Recognition", Table 6: ResNet-32 7.51 % test
  error, i.e. 92.49 % accuracy (their schedule: 64k iterations of batch 128,
  decays x0.1 at 32k and 48k, weight decay 1e-4, 45k/5k train/val split).
  At the paper protocol ('' budget) this part trains with exactly that
  schedule on all 50,000 images (390 steps an epoch: 164 epochs = 63,960
  steps, decays at steps 32,000 and 48,000, no warm-up); 'cpu' and 'smoke'
  keep their own budgets.
- 'rho_rows': CIFAR-10-LT at one rho (option rho=<float>, default 100; run
  once per rho in {10, 50, 100, 200}): none + CE and the chosen UniMix recipe
  (option recipe=<decomposition row>, default `official`) + Bayias. Paper
  (Tables 1-2): ERM 86.39 / 74.94 / 70.36 / 66.21 and UniMix + Bayias 89.66 /
  84.32 / 82.75 / 78.48 at rho 10 / 50 / 100 / 200.

BUDGET:
- '' (none): the paper's protocol (ResNet-32, 200 epochs of batch 128,
  warm-up 5, decays at 160 and 180, paper stop epoch 120), 3 seeds, a test
  evaluation every epoch for the best-epoch column (GPU).
- 'cpu': the reduced protocol of `table4.py:cpu`: ResNet-8 of width 16, 10
  epochs of batch 128, the schedule scaled by 10/200 (warm-up 1 epoch, decays
  at 8 and 9, paper stop epoch 120/200 -> 6, "never" -> 10), full test set,
  3 seeds, evaluation every epoch.
- 'smoke': ResNet-8 of width 4, one epoch of batch 1,024 (12 steps; mixing
  throughout, so paper_text and stop_never coincide), 200 test images, 1
  seed: checks the machinery in seconds per cell; the numbers mean nothing.

OPTION: rho=<float> and recipe=<row> (rho_rows only), seeds=<n> (seeds 0..n-1),
'report' (train nothing; write the tables from the finished cells).
"""

import ml_collections

from configs import cifar10_lt, common
from lt_calib.errors import ConfigError

PARTS = ("decomposition", "second_generation", "data_effect", "rho_rows")
# The second-generation copy (lt_calib.data.degrade), relative to the repository.
GEN2_FILE = "data/cifar10_jpeg_gen2.npz"
BUDGETS = ("cpu", "smoke")
PAPER_EPOCHS, PAPER_STOP_EPOCH = 200, 120

# Row order is training order too: under a time budget the rows that matter
# most (the two ends and the baseline) finish first, then the single factors.
DECOMPOSITION_ROWS = ("none", "paper_text", "official", "tau_official", "tau_counts",
                      "stop_never", "alpha_08", "in_batch", "batch_64")


def parse_arg(arg: str) -> dict:
  """'rho_rows,cpu,rho=50,recipe=in_batch' -> dict of the part and options.

  Raises:
    ConfigError: a token that is not a part, a budget or a known option.
  """
  options = {"part": None, "budget": "", "rho": 100.0, "recipe": "official",
             "seeds": None, "report": False}
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, _, value = token.partition("=")
    if not value and key in PARTS and options["part"] is None:
      options["part"] = key
    elif not value and key in BUDGETS and not options["budget"]:
      options["budget"] = key
    elif not value and key == "report":
      options["report"] = True
    elif key == "rho" and value:
      options["rho"] = float(value)
    elif key == "recipe" and value in DECOMPOSITION_ROWS[1:]:
      options["recipe"] = value
    elif key == "seeds" and value.isdigit() and int(value) > 0:
      options["seeds"] = int(value)
    else:
      raise ConfigError(
          f"fidelity grid arg {token!r} not understood; expected one part {PARTS}, "
          f"at most one budget {BUDGETS}, rho=<float>, recipe=<one of "
          f"{DECOMPOSITION_ROWS[1:]}>, seeds=<n> or report.")
  if options["part"] is None:
    raise ConfigError(f"fidelity grid arg {arg!r} names no part; start it with one of "
                      f"{PARTS}, e.g. 'decomposition,cpu'.")
  return options


def base_config(budget: str, base: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """A CIFAR-LT paper config (default CIFAR-10-LT) shrunk to `budget`: '', 'cpu' or 'smoke'."""
  base = cifar10_lt.get_config() if base is None else base
  base.eval_every_epochs = 1  # Every epoch, as the official code (best epoch).
  base.tensorboard = False    # The GPU host has no TensorFlow; metrics.jsonl has it all.
  base.log_every_steps = 960
  if budget == "cpu":
    scale = 10 / PAPER_EPOCHS
    base.model.depth, base.model.width = 8, 16
    base.num_epochs = 10
    base.optim.warmup_epochs = 1
    base.optim.decay_epochs = (8, 9)
    base.mix.stop_epoch = round(PAPER_STOP_EPOCH * scale)  # 6
    base.loss.drw_epoch = 8
    base.checkpoint_every_epochs = 2
    base.log_every_steps = 48
  elif budget == "smoke":
    base.model.depth, base.model.width = 8, 4
    base.batch_size, base.num_epochs = 1024, 1
    base.optim.warmup_epochs = 1
    base.optim.decay_epochs, base.optim.decay_factors = (), ()
    base.mix.stop_epoch = 1
    base.loss.drw_epoch = 1
    base.dataset.test_subset = 200
    base.checkpoint_every_epochs = 1
    base.log_every_steps = 4
  return base


def decomposition_presets(base: ml_collections.ConfigDict, full_protocol: bool) -> dict:
  """Every decomposition row (but 'none') as (dotted field, value) pairs.

  Args:
    base: the budget's base config (num_epochs, the paper-text stop epoch).
    full_protocol: 200 epochs; only then does `official` take the code's
      per-epoch warm-up staircase (a reduced budget keeps its own schedule).

  Returns:
    dict row name -> tuple of (dotted field, value).
  """
  paper_text = (("mix.name", "unimix"), ("mix.pairing", "sampler"), ("mix.alpha", 0.5),
                ("mix.tau", -1.0), ("mix.tau_units", "prior"),
                ("mix.stop_epoch", int(base.mix.stop_epoch)))
  official = common.official_overrides(base.dataset.name, int(base.num_epochs))
  if full_protocol:
    official += common.OFFICIAL_SCHEDULE
  return {
      "paper_text": paper_text,
      "official": official,
      "tau_official": paper_text + (("mix.tau", common.OFFICIAL_TAU[base.dataset.name]),
                                    ("mix.tau_units", "counts")),
      "tau_counts": paper_text + (("mix.tau_units", "counts"),),
      "stop_never": paper_text + (("mix.stop_epoch", int(base.num_epochs)),),
      "alpha_08": paper_text + (("mix.alpha", 0.8),),
      "in_batch": paper_text + (("mix.pairing", "in_batch"),),
      "batch_64": paper_text + (("batch_size", 64),),
  }


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the grid config (base, presets, mixes, losses, pairs, seeds, ...)."""
  options = parse_arg(arg)
  budget, part = options["budget"], options["part"]
  base = base_config(budget)
  presets = decomposition_presets(base, full_protocol=not budget)
  grid = ml_collections.ConfigDict()
  grid.train = not options["report"]
  grid.seeds_in_one_program = False  # Selectable; measured slower (lt_calib/grid.py).
  grid.seeds = (0,) if budget == "smoke" else (0, 1, 2)
  if options["seeds"]:
    grid.seeds = tuple(range(options["seeds"]))
  budget_name = budget or "paper protocol"
  if part == "decomposition":
    grid.title = f"Fidelity: UniMix paper text -> official code, one factor at a time ({budget_name})"
    grid.mix_presets = presets
    grid.mixes = DECOMPOSITION_ROWS
    grid.losses = ("bayias", "ce")  # Bayias rows first: they are the decomposition.
    grid.pairs = tuple((mix, "bayias") for mix in DECOMPOSITION_ROWS) + tuple(
        (mix, "ce") for mix in ("none", "paper_text", "official"))
    grid.baseline = ("paper_text", "bayias")
  elif part == "second_generation":
    grid.title = (f"Fidelity: one more JPEG generation, none + CE, CIFAR-10-LT "
                  f"({budget_name})")
    grid.mix_presets = {"stored": (("mix.name", "none"),),
                        "gen2": (("mix.name", "none"), ("dataset.data_file", GEN2_FILE))}
    grid.mixes, grid.losses, grid.baseline = ("stored", "gen2"), ("ce",), ("stored", "ce")
    if not budget and not options["seeds"]:
      grid.seeds = (0, 1)
  elif part == "data_effect":
    grid.title = f"Fidelity: balanced CIFAR-10, ResNet-{base.model.depth}, CE ({budget_name})"
    base.dataset.imbalance_ratio = 1.0
    if not budget:  # He et al. 2016's CIFAR-10 schedule, in epochs of 390 steps.
      base.num_epochs = 164
      base.optim.weight_decay = 1e-4
      base.optim.warmup_epochs = 0
      base.optim.decay_epochs = (32000 / 390, 48000 / 390)
      base.optim.decay_factors = (0.1, 0.01)
    grid.mixes, grid.losses, grid.baseline = ("none",), ("ce",), ("none", "ce")
  else:
    recipe = options["recipe"]
    grid.title = (f"Fidelity: rho = {options['rho']:g}, none + CE and {recipe} + Bayias "
                  f"({budget_name})")
    base.dataset.imbalance_ratio = options["rho"]
    grid.mix_presets = {recipe: presets[recipe]}
    grid.mixes, grid.losses = ("none", recipe), ("ce", "bayias")
    grid.pairs = (("none", "ce"), (recipe, "bayias"))
    grid.baseline = ("none", "ce")
  grid.base = base
  return grid
