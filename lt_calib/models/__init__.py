"""Model registry: `model.name` -> constructor(config.model, num_classes)."""

import jax.numpy as jnp

from lt_calib.errors import ConfigError
from lt_calib.models import heads, resnet_cifar, resnet_imagenet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
logit_scale = heads.logit_scale


def _resnet_cifar(cfg, num_classes):
  # Checked here too (the module checks at init, after the data is loaded), so
  # `config_checks` reports a bad depth before any work.
  if not isinstance(cfg.depth, int) or (cfg.depth - 2) % 6 or cfg.depth < 8:
    raise ConfigError(f"model.depth must be 6n+2 with n >= 1 (8, 20, 32, 44, 56, "
                      f"110, ...), got {cfg.depth!r}.")
  # `head` and `head_scale` are read with defaults: configs saved before the
  # normalised head existed (config.json of older runs) have neither.
  return resnet_cifar.ResNetCifar(num_classes=num_classes, depth=cfg.depth,
                                  width=cfg.width, dtype=get_dtype(cfg.dtype),
                                  head=cfg.get("head", "linear"),
                                  head_scale=float(cfg.get("head_scale", 30.0)))


def _resnet_imagenet(cfg, num_classes):
  # Checked here so a bad depth fails when the model is built, not at init.
  resnet_imagenet.stage_blocks(cfg.depth)
  return resnet_imagenet.ResNetImageNet(num_classes=num_classes, depth=cfg.depth,
                                        width=cfg.get("width", 64),
                                        dtype=get_dtype(cfg.dtype),
                                        head=cfg.get("head", "linear"),
                                        head_scale=float(cfg.get("head_scale", 30.0)))


MODELS = {"resnet_cifar": _resnet_cifar, "resnet_imagenet": _resnet_imagenet}


def resolve_dtype_name(name: str) -> str:
  """`model.dtype`, with 'auto' resolved: bfloat16 on TPU, float32 elsewhere.

  TPUs compute in bfloat16 at full speed and keep float32 parameters,
  BatchNorm statistics and loss here; on CPUs and GPUs float32 stays the
  default until bfloat16's accuracy is measured there (docs/benchmarks.md).
  """
  if name == "auto":
    import jax  # pylint: disable=g-import-not-at-top
    return "bfloat16" if jax.default_backend() == "tpu" else "float32"
  if name not in DTYPES:
    raise ConfigError(f"model.dtype={name!r} is unknown; allowed: "
                      f"{sorted(DTYPES) + ['auto']}.")
  return name


def get_dtype(name: str):
  return DTYPES[resolve_dtype_name(name)]


def create_model(cfg, num_classes: int):
  """Builds the Flax module named by `cfg.name`.

  Args:
    cfg: `config.model` (name, depth, width, dtype, head, head_scale).
    num_classes: number of logits.

  Returns:
    An uninitialised flax.linen.Module.
  """
  if cfg.name not in MODELS:
    raise ConfigError(f"model.name={cfg.name!r} is unknown; allowed: {sorted(MODELS)}.")
  return MODELS[cfg.name](cfg, num_classes)
