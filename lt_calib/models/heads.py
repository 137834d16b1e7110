"""Classifier heads, chosen by `model.head`.

- 'linear': a dense layer with bias (the plain ResNet head).
- 'normalized': LDAM-DRW's NormedLinear (Cao et al. 2019): cosine of the
  L2-normalised feature and the L2-normalised class weight, no bias, times a
  scale s (`model.head_scale`, 30 in LDAM-DRW). LDAM's margins are meant for
  these logits. The scale is part of the head, so evaluation, ECE and NLL see
  the same s cos(theta) logits the loss was trained on.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lt_calib.errors import ConfigError


def symmetric_uniform(key, shape, dtype=jnp.float32):
  """U(-1, 1), LDAM-DRW's initial NormedLinear weights (only directions matter)."""
  return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


class NormalizedLinear(nn.Module):
  """s * <x / |x|, w_c / |w_c|> for every class c.

  Attributes:
    num_classes: output logits.
    scale: s.
    dtype: computation dtype.
  """
  num_classes: int
  scale: float = 30.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", symmetric_uniform, (x.shape[-1], self.num_classes))
    x = x.astype(jnp.float32)
    features = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    weights = kernel / jnp.maximum(jnp.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
    return self.scale * features @ weights


def linear_head(num_classes: int, scale: float, dtype, kernel_init) -> nn.Module:
  del scale
  return nn.Dense(num_classes, kernel_init=kernel_init, dtype=dtype)


def normalized_head(num_classes: int, scale: float, dtype, kernel_init) -> nn.Module:
  del kernel_init
  return NormalizedLinear(num_classes, scale=scale, dtype=dtype)


HEADS = {"linear": linear_head, "normalized": normalized_head}


def get_head(name: str):
  """Looks up `model.head`, listing the allowed names if unknown."""
  if name not in HEADS:
    raise ConfigError(f"model.head={name!r} is unknown; allowed: {sorted(HEADS)}.")
  return HEADS[name]


def logit_scale(model_cfg) -> float:
  """s of the model's logits s cos(theta): head_scale for 'normalized', else 1."""
  if model_cfg.get("head", "linear") == "normalized":
    return float(model_cfg.get("head_scale", 30.0))
  return 1.0


# Flax's automatic names of the head modules above, as `pool_and_classify`
# creates them: the top-level parameter key of the classifier.
HEAD_MODULE_PREFIXES = ("Dense_", "NormalizedLinear_")


def classifier_keys(params) -> tuple:
  """The top-level parameter keys of a model's classifier head (its last layer).

  Args:
    params: a model's parameters (`variables['params']`).

  Returns:
    tuple of keys (one for the models here).

  Raises:
    ValueError: the tree has no head made by `pool_and_classify`.
  """
  keys = tuple(k for k in params if str(k).startswith(HEAD_MODULE_PREFIXES))
  if len(keys) != 1:
    raise ValueError(f"expected one classifier head among {list(params)}, found {keys}")
  return keys


def pool_and_classify(x, num_classes: int, head: str, head_scale: float, dtype, kernel_init):
  """Global average pooling, then the head `head`: float32 logits [B, C].

  Called inside a Flax module's compact `__call__`, so the head becomes one
  of its submodules.
  """
  x = jnp.mean(x, axis=(1, 2))
  x = get_head(head)(num_classes, head_scale, dtype, kernel_init)(x)
  return x.astype(jnp.float32)


class Classifier(nn.Module):
  """The fields every classifier of the library has (model.* of the config).

  Attributes:
    num_classes: output logits.
    depth: layers (each model says which it accepts).
    width: channels of the first stage.
    dtype: computation dtype (parameters and BatchNorm statistics stay
      float32; logits are returned as float32).
    head: key of HEADS ('linear' or 'normalized').
    head_scale: s of the normalised head.
  """
  num_classes: int
  depth: int
  width: int
  dtype: Any = jnp.float32
  head: str = "linear"
  head_scale: float = 30.0
