"""Up-front checks of a config, so bad values fail before any data is read.

Each error is a `ConfigError` whose one-line message names the field, the
value and what is allowed. Names chosen from registries (dataset, model, head,
mix, loss, sampler) are checked again where they are looked up, with the
registry's own list.
"""

import math
from typing import Callable

from lt_calib import models
from lt_calib.data import long_tail, sources
from lt_calib.errors import ConfigError
from lt_calib.method import losses, mixing, sampling
from lt_calib.models import heads
from lt_calib.train import state

PAIRINGS = ("sampler", "in_batch")


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def _is_number(value) -> bool:
  # bool is an int subclass, but True is never meant as a learning rate.
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(field: str, value, ok: Callable[[float], bool] = lambda v: True,
                  allowed: str = "") -> None:
  """Raises ConfigError unless `value` is a finite number for which `ok` holds.

  NaN is caught first and said in words: every comparison with NaN is False,
  so 'must be > 0, got nan' would leave the user guessing.

  Args:
    field: dotted name of the field, e.g. 'optim.learning_rate'.
    value: its value.
    ok: the range test, applied to finite numbers only.
    allowed: the range in words, e.g. '> 0' or 'in [0, 1)'.
  """
  if not _is_number(value) or not math.isfinite(value):
    rule = f"a finite number {allowed}".rstrip()
    raise ConfigError(f"{field} must be {rule}, got {value!r}.")
  _require(ok(value), f"{field} must be {allowed}, got {value}.")


def _check_int(field: str, value, minimum: int) -> None:
  """Raises ConfigError unless `value` is an integer >= `minimum`."""
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
           f"{field} must be an integer >= {minimum}, got {value!r}.")


def _check_dataset(ds) -> None:
  info = sources.get_info(ds.name)
  _check_int("dataset.num_classes", ds.num_classes, 1)
  # 0 in the table: the dataset takes its class count from the config.
  _require(info.num_classes in (0, ds.num_classes),
           f"dataset.num_classes={ds.num_classes} disagrees with {ds.name!r}, which "
           f"has {info.num_classes} classes.")
  _require(ds.source in sources.SOURCES,
           f"dataset.source={ds.source!r} is unknown; allowed: {sources.SOURCES}.")
  _check_number("dataset.imbalance_ratio", ds.imbalance_ratio, lambda v: v >= 1,
                ">= 1 (1 = balanced)")
  _require(ds.imbalance_type in long_tail.PROFILES,
           f"dataset.imbalance_type={ds.imbalance_type!r} is unknown; allowed: "
           f"{long_tail.PROFILES}.")
  _check_number("dataset.zero_count_smoothing", ds.get("zero_count_smoothing", 0.0),
                lambda v: v >= 0, ">= 0")
  # 0 means 'all' for these three; a negative value is a typo, not a request.
  _check_int("dataset.test_subset", ds.get("test_subset", 0), 0)
  _check_int("dataset.val_per_class", ds.get("val_per_class", 0), 0)
  n_max = ds.get("n_max", 0)
  _check_int("dataset.n_max", n_max, 0)
  if info.streaming:
    _require(not n_max, f"dataset.n_max={n_max} applies to the in-memory long-tailed "
             f"datasets; {ds.name!r}'s split lists fix its class counts: set it to 0.")
  else:
    sources.largest_class(info, ds)  # At most the pool's images a class.
  _check_int("dataset.crop_padding", ds.get("crop_padding", 0), 0)


def _check_mix(mix, num_stages: int) -> None:
  mixing.get_method(mix.name)
  if mix.alpha is not None:
    _check_number("mix.alpha", mix.alpha, lambda v: v > 0,
                  "> 0 (Beta(alpha, alpha)) or None (the method's default)")
  _check_number("mix.tau", mix.tau)
  mixing.partner_exponent(mix)  # Checks mix.tau_units.
  _require(mix.pairing in PAIRINGS,
           f"mix.pairing={mix.pairing!r} is unknown; allowed: {PAIRINGS}.")
  _check_number("mix.stop_epoch", mix.stop_epoch, lambda v: v >= 0, ">= 0")
  _check_number("mix.remix_kappa", mix.remix_kappa, lambda v: v >= 1, ">= 1")
  _check_number("mix.remix_tau", mix.remix_tau, lambda v: 0 <= v <= 1, "in [0, 1]")
  layers, allowed = tuple(mix.manifold_layers), tuple(range(num_stages + 1))
  _require(len(layers) > 0 and all(k in allowed for k in layers),
           f"mix.manifold_layers must be a non-empty subset of {allowed} "
           f"(0 = input, k = after stage k), got {layers}.")


def _check_model(config) -> None:
  model = config.model
  # Builds the (uninitialised) module: checks the name and the depth, cheaply.
  models.create_model(model, config.dataset.num_classes)
  heads.get_head(model.get("head", "linear"))
  _check_number("model.head_scale", model.get("head_scale", 30.0), lambda v: v > 0, "> 0")
  models.get_dtype(model.dtype)
  if "width" in model:
    _check_int("model.width", model.width, 1)


def _check_loss(config) -> None:
  loss = config.loss
  if loss.name not in losses.LOSSES:
    raise ConfigError(f"loss.name={loss.name!r} is unknown; allowed: "
                      f"{sorted(losses.LOSSES)}.")
  # Parsed here, not only when the loss is built after the data is loaded.
  losses.parse_test_prior(loss.get("test_prior", "uniform"), config.dataset.num_classes)
  _check_number("loss.la_tau", loss.la_tau)
  _check_number("loss.focal_gamma", loss.focal_gamma, lambda v: v >= 0, ">= 0")
  _check_number("loss.cb_beta", loss.cb_beta, lambda v: 0 <= v < 1, "in [0, 1)")
  _require(loss.base in losses.FOCAL_BASES,
           f"loss.base={loss.base!r} is unknown; allowed: {losses.FOCAL_BASES}.")
  _check_number("loss.cdt_gamma", loss.cdt_gamma, lambda v: v >= 0, ">= 0")
  _check_number("loss.ldam_max_margin", loss.ldam_max_margin, lambda v: v > 0, "> 0")
  _require(loss.name != "ldam" or config.model.head == "normalized",
           "loss.name='ldam' needs the normalised cosine head it was designed "
           f"for: set model.head='normalized' (got {config.model.head!r}).")
  _check_number("loss.las_head", loss.get("las_head", 0.0), lambda v: 0 <= v <= 1,
                "in [0, 1]")
  _check_number("loss.las_tail", loss.get("las_tail", 0.0), lambda v: 0 <= v <= 1,
                "in [0, 1]")
  shape = loss.get("las_shape", "concave")
  _require(shape in losses.LAS_SHAPES,
           f"loss.las_shape={shape!r} is unknown; allowed: {losses.LAS_SHAPES}.")
  _require(loss.schedule in losses.SCHEDULES,
           f"loss.schedule={loss.schedule!r} is unknown; allowed: {losses.SCHEDULES}.")
  if loss.schedule == "drw":
    _check_number("loss.drw_epoch", loss.drw_epoch)
    _require(0 <= loss.drw_epoch < config.num_epochs,
             f"loss.drw_epoch={loss.drw_epoch} must be in [0, num_epochs="
             f"{config.num_epochs}) for DRW to take effect.")
    _require(loss.name != "class_balanced",
             "loss.schedule='drw' on loss.name='class_balanced' would apply the "
             "effective-number weights twice; use one or the other.")


STAGE2_BATCHNORM = ("frozen", "shift")


def _check_stage2(config) -> None:
  stage2 = config.get("stage2")
  if not stage2 or not stage2.get("enabled", False):
    return
  _require(bool(stage2.first_stage),
           "stage2.enabled needs the first stage's workdir: add "
           "--config.stage2.first_stage=DIR (a finished run of this config without "
           "':two_stage').")
  _require(stage2.batchnorm in STAGE2_BATCHNORM, f"stage2.batchnorm={stage2.batchnorm!r} "
           f"is unknown; allowed: {STAGE2_BATCHNORM}.")


def _check_optim(opt) -> None:
  _check_number("optim.learning_rate", opt.learning_rate, lambda v: v > 0, "> 0")
  schedule = opt.get("schedule", "steps")
  _require(schedule in state.SCHEDULES, f"optim.schedule={schedule!r} is unknown; "
           f"allowed: {state.SCHEDULES}.")
  scaling = opt.get("lr_scaling", "none")
  _require(scaling in state.LR_SCALING, f"optim.lr_scaling={scaling!r} is unknown; "
           f"allowed: {state.LR_SCALING}.")
  if scaling == "linear":
    _check_int("optim.reference_batch_size", opt.get("reference_batch_size"), 1)
  _check_number("optim.momentum", opt.momentum, lambda v: 0 <= v < 1, "in [0, 1)")
  _check_number("optim.weight_decay", opt.weight_decay, lambda v: v >= 0, ">= 0")
  _check_number("optim.warmup_epochs", opt.get("warmup_epochs", 0), lambda v: v >= 0,
                ">= 0")
  _require(len(opt.decay_epochs) == len(opt.decay_factors),
           f"optim.decay_epochs {tuple(opt.decay_epochs)} and optim.decay_factors "
           f"{tuple(opt.decay_factors)} need the same length.")
  for k, (epoch, factor) in enumerate(zip(opt.decay_epochs, opt.decay_factors)):
    _check_number(f"optim.decay_epochs[{k}]", epoch, lambda v: v >= 0, ">= 0")
    # Each factor divides the next one's step, so 0 would make it inf.
    _check_number(f"optim.decay_factors[{k}]", factor, lambda v: v > 0,
                  "> 0 (a multiple of the base rate)")


def check_config(config, num_devices: int = 1) -> None:
  """Raises ConfigError naming the first out-of-range field of `config`.

  Args:
    config: the experiment ConfigDict.
    num_devices: devices the global batch is split over.
  """
  _check_dataset(config.dataset)
  # CIFAR ResNets have 3 stages, ImageNet ResNets 4 (manifold mixup's layers).
  _check_mix(config.mix, 4 if config.model.name == "resnet_imagenet" else 3)
  sampling.get_batch_sampler_tau(config.sampler.name)
  _check_model(config)
  _check_int("num_epochs", config.num_epochs, 1)
  _check_loss(config)
  for name in ("batch_size", "eval_batch_size"):
    _check_int(name, config[name], 1)
    _require(config[name] % num_devices == 0,
             f"{name}={config[name]} must be a positive multiple of the "
             f"{num_devices} devices.")
  _check_optim(config.optim)
  _check_stage2(config)
  for name in ("log_every_steps", "eval_every_epochs", "checkpoint_every_epochs",
               "calibration_bins"):
    _check_int(name, config[name], 1)
