"""The paper's CIFAR-LT protocol (Appendix C.1) shared by the CIFAR configs.

Every method of docs/methods.md is chosen here by name (`mix.name`,
`loss.name`, `loss.schedule`, `sampler.name`, `model.head`); its settings
default to the values of its own paper.
"""

import ml_collections
from ml_collections import config_dict

from lt_calib.config_fields import set_fields
from lt_calib.errors import ConfigError


def paper_config(dataset: str, num_classes: int, tau: float) -> ml_collections.ConfigDict:
  """ResNet-32, 200 epochs, UniMix (alpha 0.5) + Bayias, rho = 100."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict(dict(
      name=dataset, num_classes=num_classes,
      source="auto",           # 'auto': offline file if found, else TFDS.
      data_file="",            # Explicit offline .npz path (tried first).
      tfds_data_dir="",
      cache_dir="",            # Decoded-image cache; default ~/.cache/lt_calib.
      imbalance_ratio=100.0,   # rho = n_max / n_min.
      imbalance_type="exp",    # 'exp' or 'step'.
      # Images of the largest class (n_max of the LT rule); 0 = all the pool
      # has (CIFAR: 5,000 / 500 a class). Smaller values keep the first n_c of
      # each class's LT order: a nested subset of the standard split.
      n_max=0,
      lt_seed=0,               # np.random.seed of the standard CIFAR-LT rule.
      zero_count_smoothing=0.0,
      test_subset=0,           # 0 = whole balanced test set.
      # Held-out images per class for temperature scaling, drawn from the
      # training pool images the long-tailed split leaves out (0 = none).
      val_per_class=0,
      crop_padding=4,
  ))
  config.model = ml_collections.ConfigDict(dict(
      name="resnet_cifar", depth=32, width=16, dtype="float32",
      head="linear",           # 'linear' or 'normalized' (cosine head; LDAM needs it).
      head_scale=30.0,         # s of the normalised head (LDAM-DRW).
  ))
  config.mix = ml_collections.ConfigDict(dict(
      # 'none', 'mixup', 'remix', 'manifold_mixup', 'unimix', and UniMix's
      # halves 'unimix_factor' and 'unimix_sampler' (lt_calib/method/mixing.py).
      name="unimix",
      # Beta(alpha, alpha); None = the method's default: 0.5 for UniMix
      # (Appendix C.1), 1.0 for mixup and Remix, 2.0 for manifold mixup.
      alpha=config_dict.placeholder(float),
      tau=tau,                 # Eq. 9; Fig. 4: -1 on CIFAR-10-LT, 0 on CIFAR-100-LT.
      # Units of tau (mixing.partner_exponent): 'prior', partner class ∝ pi^tau
      # (Eq. 9's text); 'counts', ∝ n^(1 + tau) (the official code's n^tau weights).
      tau_units="prior",
      pairing="sampler",       # 'sampler' (Eq. 9, R*) or 'in_batch' (official code).
      # Algorithm 1's T1. Appendix C.1: mixup-style methods are fine-tuned
      # without mixing after epoch 120 (the official code never stops).
      stop_epoch=120,
      remix_kappa=3.0,         # Remix (Chou et al. 2020): kappa = 3, tau = 0.5.
      remix_tau=0.5,
      manifold_layers=(0, 1, 2),  # Manifold mixup: input, after stage 1, 2.
  ))
  config.loss = ml_collections.ConfigDict(dict(
      # 'ce', 'bayias', 'logit_adjusted', 'focal', 'class_balanced', 'cdt',
      # 'ldam' (lt_calib/method/losses.py).
      name="bayias",
      test_prior="uniform",    # pi' of Bayias: 'uniform' or C comma-separated weights.
      la_tau=1.0,              # Logit adjustment (Menon et al. 2021).
      focal_gamma=1.0,         # Focal, also under class_balanced (LDAM-DRW's code).
      cb_beta=0.9999,          # Effective number (Cui et al. 2019), CB and DRW.
      base="focal",            # class_balanced on 'focal' (Table 1) or 'ce' (Table 3).
      cdt_gamma=0.2,           # CDT (Ye et al. 2020).
      ldam_max_margin=0.5,     # LDAM (Cao et al. 2019); needs model.head='normalized'.
      schedule="none",         # 'drw': effective-number weights from drw_epoch on.
      drw_epoch=160,           # DRW's epoch in LDAM-DRW (of 200).
      # Label-aware smoothing (MiSLAS's stage 2, Zhong et al. 2021): e_c from
      # las_tail (rarest class) to las_head (most frequent) along las_shape.
      las_head=0.3, las_tail=0.0, las_shape="concave",
  ))
  # Main-batch sampler: 'random' (the epoch permutation R), 'class_balanced'
  # or 'square_root' (class-level re-sampling).
  config.sampler = ml_collections.ConfigDict(dict(name="random"))
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=2e-4,
      warmup_epochs=5, decay_epochs=(160, 180), decay_factors=(0.01, 0.0001),
      # 'linear': the rate is learning_rate at reference_batch_size and scales
      # with batch_size (steps.base_learning_rate); 'none': as given.
      lr_scaling="none", reference_batch_size=128,
      # 'steps': warm-up, then the decay factors above; 'cosine': per epoch e,
      # learning_rate (1 + cos(pi e / num_epochs)) / 2 (MiSLAS's stage 2).
      schedule="steps"))
  # A second stage (`:two_stage`): restore a finished first-stage run, freeze
  # its backbone and retrain the classifier (lt_calib/train/two_stage.py).
  config.stage2 = ml_collections.ConfigDict(dict(
      enabled=False,
      first_stage="",          # The first stage's workdir (local or gs://).
      # 'frozen': BatchNorm uses and keeps the first stage's statistics;
      # 'shift': they are re-estimated on the stage's class-balanced batches
      # (MiSLAS's "shift learning on BatchNorm").
      batchnorm="frozen",
  ))
  config.batch_size = 128
  config.num_epochs = 200
  config.eval_batch_size = 512
  config.eval_every_epochs = 10
  # Orbax save_interval_steps: every 10 epochs, plus the first save, the last
  # step and any stop (preemption, --stop_at_step).
  config.checkpoint_every_epochs = 10
  config.keep_checkpoints = 3
  config.log_every_steps = 100
  # Most steps per compiled dispatch (lax.fori_loop over the step) for data
  # held on the device: 1 = one jitted step per dispatch (the step loop);
  # 0 = the faster for the backend: up to the next log line or epoch end on
  # GPU/TPU, the step loop on CPU (train.steps_per_dispatch says why).
  config.steps_per_dispatch = 0
  config.calibration_bins = 15
  config.tensorboard = True    # TensorBoard events through clu (imports TensorFlow).
  return config


# The official code's UniMix tau per dataset (config/cifar10_*.py: -0.5,
# config/cifar100_*.py: -0.1), in its own units: batch member k is drawn as a
# partner with weight n_{y_k} ** tau (core.py, unimix_sampler).
OFFICIAL_TAU = {"cifar10": -0.5, "cifar100": -0.1}

# The official code's learning rate (utils.py, adjust_learning_rate): 0.1 e / 5
# for epochs e = 1..5 (a per-epoch staircase, not a per-step ramp), 0.1 up to
# epoch 160, then x0.01 and x0.0001. As factors of the base rate from epoch
# boundaries (0-based), with no separate warm-up: the same values epoch by epoch.
OFFICIAL_SCHEDULE = (
    ("optim.warmup_epochs", 0),
    ("optim.decay_epochs", (0, 1, 2, 3, 4, 160, 180)),
    ("optim.decay_factors", (0.2, 0.4, 0.6, 0.8, 1.0, 0.01, 0.0001)),
)


def official_overrides(dataset: str, num_epochs: int) -> tuple:
  """The official code's UniMix recipe as (dotted field, value) pairs.

  What differs from the paper-text default (docs/choices.md, "The official
  code's recipe, line by line"): in-batch partners weighted n^tau (tau in
  count units), alpha 0.8, mixing never stopped, batch 64. The learning-rate
  staircase (OFFICIAL_SCHEDULE) is left out: it only exists at 200 epochs, and
  budget variants replace the schedule.

  Args:
    dataset: 'cifar10' or 'cifar100' (sets tau).
    num_epochs: the run's length; mixing stops there, i.e. never.

  Returns:
    tuple of (dotted field, value).
  """
  if dataset not in OFFICIAL_TAU:
    raise ConfigError(f"dataset.name={dataset!r} has no official-code recipe; "
                      f"allowed: {sorted(OFFICIAL_TAU)}.")
  return (("mix.name", "unimix"), ("mix.pairing", "in_batch"), ("mix.alpha", 0.8),
          ("mix.tau", OFFICIAL_TAU[dataset]), ("mix.tau_units", "counts"),
          ("mix.stop_epoch", num_epochs), ("batch_size", 64))


def _official(config: ml_collections.ConfigDict) -> None:
  # The whole recipe of config/cifar{10,100}_100.py as it runs: UniMix +
  # Bayias (the defaults already), the staircase warm-up, and a test
  # evaluation every epoch (train.py evaluates after each epoch and reports the
  # best; the summary's best_epoch_top1 is that figure).
  set_fields(config, official_overrides(config.dataset.name, config.num_epochs))
  set_fields(config, OFFICIAL_SCHEDULE)
  config.loss.name = "bayias"
  config.eval_every_epochs = 1


def _never_stops(config: ml_collections.ConfigDict) -> bool:
  return config.mix.stop_epoch >= config.num_epochs


def _smoke(config: ml_collections.ConfigDict) -> None:
  # Tiny ResNet-8 (width 8), 2 epochs of batch 512 = 48 steps, mixing on
  # for the first epoch only (or throughout, for a recipe that never stops),
  # 1,000 test images: a CPU end-to-end check.
  never = _never_stops(config)
  config.model.depth, config.model.width = 8, 8
  config.batch_size, config.num_epochs = 512, 2
  config.mix.stop_epoch = config.num_epochs if never else 1
  config.loss.drw_epoch = 1
  config.optim.warmup_epochs = 1
  config.optim.decay_epochs, config.optim.decay_factors = (), ()
  config.dataset.test_subset = 1000
  config.eval_every_epochs = config.checkpoint_every_epochs = 1
  config.log_every_steps = 8
  config.tensorboard = False


def _quick(config: ml_collections.ConfigDict) -> None:
  # ResNet-32 for 6 epochs: the paper's schedule compressed (warm-up 1,
  # mixing stops after 4 unless the recipe never stops, decays at 4 and 5),
  # for CPU comparisons.
  never = _never_stops(config)
  config.num_epochs = 6
  config.mix.stop_epoch = config.num_epochs if never else 4
  config.loss.drw_epoch = 4  # At the first decay, as DRW's 160 of 200.
  config.optim.warmup_epochs = 1
  config.optim.decay_epochs, config.optim.decay_factors = (4, 5), (0.01, 0.0001)
  config.eval_every_epochs = config.checkpoint_every_epochs = 2
  config.log_every_steps = 24


# MiSLAS's stage-2 settings per dataset (config/cifar{10,100}/
# cifar*_imb001_stage2_mislas.yaml): smooth_head, smooth_tail, shift_bn, and
# lr x lr_factor, the classifier's learning rate (0.1 x 0.5, 0.1 x 0.2).
MISLAS_STAGE2 = {
    "cifar10": {"loss.las_head": 0.3, "loss.las_tail": 0.0, "stage2.batchnorm": "frozen",
                "optim.learning_rate": 0.05},
    "cifar100": {"loss.las_head": 0.4, "loss.las_tail": 0.1, "stage2.batchnorm": "shift",
                 "optim.learning_rate": 0.02},
}
# No MiSLAS config for Tiny-ImageNet-LT: CIFAR-100-LT's, the many-class setting
# (our choice, as for its tau).
MISLAS_STAGE2["tiny_imagenet_lt"] = MISLAS_STAGE2["cifar100"]


def two_stage(config: ml_collections.ConfigDict, smoke: bool) -> None:
  """Makes `config` MiSLAS's second stage after a run of it (in place); see below."""
  # MiSLAS's stage 2 after this config's first stage: 10 epochs of the
  # classifier alone (backbone frozen), class-balanced batches of 128, LAS,
  # SGD (momentum 0.9, weight decay 2e-4) at a per-epoch cosine rate, no
  # mixing. The first stage's workdir comes from the command line
  # (--config.stage2.first_stage=DIR); model and data stay this config's, and
  # must be the first stage's (lt_calib/train/two_stage.py checks).
  set_fields(config, MISLAS_STAGE2.get(config.dataset.name, MISLAS_STAGE2["cifar10"]).items())
  config.stage2.enabled = True
  config.mix.name, config.loss.name, config.loss.schedule = "none", "las", "none"
  config.sampler.name = "class_balanced"
  config.optim.schedule, config.optim.warmup_epochs = "cosine", 0
  config.optim.decay_epochs, config.optim.decay_factors = (), ()
  config.optim.momentum, config.optim.weight_decay = 0.9, 2e-4
  config.optim.lr_scaling = "none"
  config.num_epochs = 2 if smoke else 10
  config.batch_size = config.batch_size if smoke else 128
  config.eval_every_epochs = config.checkpoint_every_epochs = 1 if smoke else 5


# Recipe variants change what is trained; budget variants shrink it. Recipes
# are applied first whatever the order in `arg`, so that a budget replaces the
# recipe's 200-epoch schedule instead of the other way round; a stage variant
# comes last (it replaces the schedule of the stage it follows).
RECIPE_VARIANTS = {"official": _official}
BUDGET_VARIANTS = {"smoke": _smoke, "quick": _quick}
STAGE_VARIANTS = ("two_stage",)


def apply_variant(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies `arg`, comma-separated variants, e.g. 'official,quick'.

  '' keeps the paper-text protocol; 'official' is the official code's recipe;
  'smoke' and 'quick' (at most one of them) shrink the budget; 'two_stage'
  makes it MiSLAS's second stage after such a run (`two_stage`).

  Args:
    config: the paper_config ConfigDict, changed in place.
    arg: the part of `--config=file.py:arg` after the colon.

  Returns:
    `config`.

  Raises:
    ConfigError: an unknown variant, or two budget variants.
  """
  names = [name.strip() for name in (arg or "").split(",") if name.strip()]
  allowed = sorted(RECIPE_VARIANTS) + sorted(BUDGET_VARIANTS) + list(STAGE_VARIANTS)
  unknown = [name for name in names if name not in allowed]
  if unknown:
    raise ConfigError(f"unknown config variant(s) {unknown}; allowed: {allowed}, "
                      "comma-separated (e.g. 'official,quick'), or '' for the paper text.")
  budgets = [name for name in names if name in BUDGET_VARIANTS]
  if len(budgets) > 1:
    raise ConfigError(f"config variants {budgets} are both budgets; keep one of "
                      f"{sorted(BUDGET_VARIANTS)}.")
  for name in names:
    if name in RECIPE_VARIANTS:
      RECIPE_VARIANTS[name](config)
  for name in budgets:
    BUDGET_VARIANTS[name](config)
  if "two_stage" in names:
    two_stage(config, smoke="smoke" in budgets)
  return config
