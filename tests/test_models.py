"""ResNet-32 for CIFAR: parameter count and shapes."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from lt_calib import models


def count(depth, width, classes):
  cfg = ml_collections.ConfigDict(dict(name="resnet_cifar", depth=depth, width=width,
                                       dtype="float32"))
  model = models.create_model(cfg, classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, 32, 32, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def test_resnet32_parameter_count():
  # By hand: stem 3*16*9 + BN 2*16 = 464; stage 1: 5 blocks * (2*16*16*9 + 2*32)
  # = 23360; stage 2: (16*32*9 + 32*32*9 + 128) + 4*(2*32*32*9 + 128) = 88192;
  # stage 3: (32*64*9 + 64*64*9 + 256) + 4*(2*64*64*9 + 256) = 351488;
  # head 64*10 + 10 = 650. Sum 464154 (option-A shortcuts add nothing).
  assert count(32, 16, 10) == 464 + 23360 + 88192 + 351488 + 650 == 464154


def test_depth_validation_and_unknown_names():
  with pytest.raises(ValueError, match="6n\\+2"):
    count(30, 16, 10)
  with pytest.raises(ValueError, match="model.name='vit' is unknown"):
    models.create_model(ml_collections.ConfigDict(dict(name="vit")), 10)
