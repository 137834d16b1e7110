"""Model registry: `model.name` -> constructor(config.model, num_classes)."""

import jax.numpy as jnp

from lt_calib.models import heads, resnet_cifar

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
logit_scale = heads.logit_scale


def _resnet_cifar(cfg, num_classes):
  # `head` and `head_scale` are read with defaults: configs saved before the
  # normalised head existed (config.json of older runs) have neither.
  return resnet_cifar.ResNetCifar(num_classes=num_classes, depth=cfg.depth,
                                  width=cfg.width, dtype=get_dtype(cfg.dtype),
                                  head=cfg.get("head", "linear"),
                                  head_scale=float(cfg.get("head_scale", 30.0)))


MODELS = {"resnet_cifar": _resnet_cifar}


def get_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r} is unknown; allowed: {sorted(DTYPES)}.")
  return DTYPES[name]


def create_model(cfg, num_classes: int):
  """Builds the Flax module named by `cfg.name`.

  Args:
    cfg: `config.model` (name, depth, width, dtype, head, head_scale).
    num_classes: number of logits.

  Returns:
    An uninitialised flax.linen.Module.
  """
  if cfg.name not in MODELS:
    raise ValueError(f"model.name={cfg.name!r} is unknown; allowed: {sorted(MODELS)}.")
  return MODELS[cfg.name](cfg, num_classes)
