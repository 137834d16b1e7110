"""Up-front checks of a config, so bad values fail before any data is read.

Each error names the field, the value and what is allowed. Names chosen from
registries (dataset, model, mix, loss) are checked again where they are looked
up, with the registry's own list.
"""

import math

from lt_calib import datasets, losses, mixing, models

PAIRINGS = ("sampler", "in_batch")


def _require(ok: bool, message: str):
  if not ok:
    raise ValueError(message)


def check_config(config, num_devices: int = 1) -> None:
  """Raises ValueError naming the first out-of-range field of `config`.

  Args:
    config: the experiment ConfigDict.
    num_devices: devices the global batch is split over.
  """
  ds, mix = config.dataset, config.mix
  datasets.get_info(ds.name)
  _require(ds.source in datasets.SOURCES,
           f"dataset.source={ds.source!r} is unknown; allowed: {datasets.SOURCES}.")
  _require(ds.imbalance_ratio >= 1,
           f"dataset.imbalance_ratio must be >= 1 (1 = balanced), got {ds.imbalance_ratio}.")
  _require(ds.imbalance_type in ("exp", "step"),
           f"dataset.imbalance_type={ds.imbalance_type!r}; allowed: ('exp', 'step').")
  _require(ds.get("zero_count_smoothing", 0.0) >= 0,
           "dataset.zero_count_smoothing must be >= 0.")
  mixing.get_method(mix.name)
  _require(mix.alpha > 0, f"mix.alpha must be > 0 (Beta(alpha, alpha)), got {mix.alpha}.")
  _require(math.isfinite(mix.tau), f"mix.tau must be a finite number, got {mix.tau}.")
  _require(mix.pairing in PAIRINGS,
           f"mix.pairing={mix.pairing!r} is unknown; allowed: {PAIRINGS}.")
  _require(mix.stop_epoch >= 0, f"mix.stop_epoch must be >= 0, got {mix.stop_epoch}.")
  if config.loss.name not in losses.LOSSES:
    raise ValueError(f"loss.name={config.loss.name!r} is unknown; "
                     f"allowed: {sorted(losses.LOSSES)}.")
  if config.model.name not in models.MODELS:
    raise ValueError(f"model.name={config.model.name!r} is unknown; "
                     f"allowed: {sorted(models.MODELS)}.")
  models.get_dtype(config.model.dtype)
  _require(config.num_epochs > 0, f"num_epochs must be > 0, got {config.num_epochs}.")
  _require(config.batch_size > 0 and config.batch_size % num_devices == 0,
           f"batch_size={config.batch_size} must be a positive multiple of the "
           f"{num_devices} devices.")
  _require(config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0,
           f"eval_batch_size={config.eval_batch_size} must be a positive multiple "
           f"of the {num_devices} devices.")
  opt = config.optim
  _require(opt.learning_rate > 0, f"optim.learning_rate must be > 0, got {opt.learning_rate}.")
  _require(0 <= opt.momentum < 1, f"optim.momentum must be in [0, 1), got {opt.momentum}.")
  _require(opt.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {opt.weight_decay}.")
  _require(len(opt.decay_epochs) == len(opt.decay_factors),
           "optim.decay_epochs and optim.decay_factors need the same length.")
  for name in ("log_every_steps", "eval_every_epochs", "checkpoint_every_epochs"):
    _require(config[name] > 0, f"{name} must be > 0, got {config[name]}.")
