"""Model registry: `model.name` -> constructor(config.model, num_classes)."""

import jax.numpy as jnp

from lt_calib.models import resnet_cifar

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _resnet_cifar(cfg, num_classes):
  return resnet_cifar.ResNetCifar(num_classes=num_classes, depth=cfg.depth,
                                  width=cfg.width, dtype=get_dtype(cfg.dtype))


MODELS = {"resnet_cifar": _resnet_cifar}


def get_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r} is unknown; allowed: {sorted(DTYPES)}.")
  return DTYPES[name]


def create_model(cfg, num_classes: int):
  """Builds the Flax module named by `cfg.name`.

  Args:
    cfg: `config.model` (name, depth, width, dtype).
    num_classes: number of logits.

  Returns:
    An uninitialised flax.linen.Module.
  """
  if cfg.name not in MODELS:
    raise ValueError(f"model.name={cfg.name!r} is unknown; allowed: {sorted(MODELS)}.")
  return MODELS[cfg.name](cfg, num_classes)
