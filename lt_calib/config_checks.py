"""Up-front checks of a config, so bad values fail before any data is read.

Each error names the field, the value and what is allowed. Names chosen from
registries (dataset, model, head, mix, loss, sampler) are checked again where
they are looked up, with the registry's own list.
"""

import math

from lt_calib import datasets, losses, mixing, models, sampling
from lt_calib.models import heads

PAIRINGS = ("sampler", "in_batch")


def _require(ok: bool, message: str):
  if not ok:
    raise ValueError(message)


def _check_mix(mix) -> None:
  mixing.get_method(mix.name)
  _require(mix.alpha is None or mix.alpha > 0,
           f"mix.alpha must be > 0 (Beta(alpha, alpha)) or None (the method's "
           f"default), got {mix.alpha}.")
  _require(math.isfinite(mix.tau), f"mix.tau must be a finite number, got {mix.tau}.")
  _require(mix.pairing in PAIRINGS,
           f"mix.pairing={mix.pairing!r} is unknown; allowed: {PAIRINGS}.")
  _require(mix.stop_epoch >= 0, f"mix.stop_epoch must be >= 0, got {mix.stop_epoch}.")
  _require(mix.remix_kappa >= 1, f"mix.remix_kappa must be >= 1, got {mix.remix_kappa}.")
  _require(0 <= mix.remix_tau <= 1, f"mix.remix_tau must be in [0, 1], got {mix.remix_tau}.")
  layers = tuple(mix.manifold_layers)
  _require(len(layers) > 0 and all(k in (0, 1, 2, 3) for k in layers),
           f"mix.manifold_layers must be a non-empty subset of (0, 1, 2, 3) "
           f"(0 = input, k = after stage k), got {layers}.")


def _check_loss(config) -> None:
  loss = config.loss
  if loss.name not in losses.LOSSES:
    raise ValueError(f"loss.name={loss.name!r} is unknown; allowed: {sorted(losses.LOSSES)}.")
  _require(math.isfinite(loss.la_tau), f"loss.la_tau must be finite, got {loss.la_tau}.")
  _require(loss.focal_gamma >= 0, f"loss.focal_gamma must be >= 0, got {loss.focal_gamma}.")
  _require(0 <= loss.cb_beta < 1, f"loss.cb_beta must be in [0, 1), got {loss.cb_beta}.")
  _require(loss.base in losses.FOCAL_BASES,
           f"loss.base={loss.base!r} is unknown; allowed: {losses.FOCAL_BASES}.")
  _require(loss.cdt_gamma >= 0, f"loss.cdt_gamma must be >= 0, got {loss.cdt_gamma}.")
  _require(loss.ldam_max_margin > 0,
           f"loss.ldam_max_margin must be > 0, got {loss.ldam_max_margin}.")
  _require(loss.name != "ldam" or config.model.head == "normalized",
           "loss.name='ldam' needs the normalised cosine head it was designed "
           f"for: set model.head='normalized' (got {config.model.head!r}).")
  _require(loss.schedule in losses.SCHEDULES,
           f"loss.schedule={loss.schedule!r} is unknown; allowed: {losses.SCHEDULES}.")
  if loss.schedule == "drw":
    _require(0 <= loss.drw_epoch < config.num_epochs,
             f"loss.drw_epoch={loss.drw_epoch} must be in [0, num_epochs="
             f"{config.num_epochs}) for DRW to take effect.")
    _require(loss.name != "class_balanced",
             "loss.schedule='drw' on loss.name='class_balanced' would apply the "
             "effective-number weights twice; use one or the other.")


def check_config(config, num_devices: int = 1) -> None:
  """Raises ValueError naming the first out-of-range field of `config`.

  Args:
    config: the experiment ConfigDict.
    num_devices: devices the global batch is split over.
  """
  ds = config.dataset
  datasets.get_info(ds.name)
  _require(ds.source in datasets.SOURCES,
           f"dataset.source={ds.source!r} is unknown; allowed: {datasets.SOURCES}.")
  _require(ds.imbalance_ratio >= 1,
           f"dataset.imbalance_ratio must be >= 1 (1 = balanced), got {ds.imbalance_ratio}.")
  _require(ds.imbalance_type in ("exp", "step"),
           f"dataset.imbalance_type={ds.imbalance_type!r}; allowed: ('exp', 'step').")
  _require(ds.get("zero_count_smoothing", 0.0) >= 0,
           "dataset.zero_count_smoothing must be >= 0.")
  _check_mix(config.mix)
  sampling.get_batch_sampler_tau(config.sampler.name)
  if config.model.name not in models.MODELS:
    raise ValueError(f"model.name={config.model.name!r} is unknown; "
                     f"allowed: {sorted(models.MODELS)}.")
  heads.get_head(config.model.head)
  _require(config.model.head_scale > 0,
           f"model.head_scale must be > 0, got {config.model.head_scale}.")
  models.get_dtype(config.model.dtype)
  _require(config.num_epochs > 0, f"num_epochs must be > 0, got {config.num_epochs}.")
  _check_loss(config)
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
