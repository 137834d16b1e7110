"""ResNet for ImageNet (He et al. 2016, Table 1), as used on ImageNet-LT and iNaturalist.

The layout of torchvision's ResNet ("v1.5"): a 7x7/2 stem convolution with 64
channels, BatchNorm, ReLU and a 3x3/2 max-pool; four stages with
width * (1, 2, 4, 8) channels (stride 1/2/2/2); global average pooling and a
head (linear, or LDAM's normalised one, see heads.py). Depths 10/18/34 use
BasicBlocks, 50/101/152 Bottlenecks (expansion 4) whose stride sits on the
3x3 convolution, not the first 1x1. Where a block changes the shape, the
shortcut is a projection (1x1 convolution + BatchNorm, option B). ResNet-10
(one BasicBlock per stage) is the long-tailed literature's small ImageNet-LT
backbone (Liu et al. 2019, Kang et al. 2020; Table 3 of the paper).

With width 64 and 1000 classes, ResNet-50 has 25,557,032 parameters and
ResNet-10 5,418,792. An input of 224 px reaches the stages at 56 px and the
pooling at 7 px; a 32 px input at 8 and 1 px.

Convolutions use the same Kaiming-normal (fan-in) initialiser as the CIFAR
ResNet. Manifold mixup mixes at layer k: k = 0 is the input, k = s (1..4) the
output of stage s, exactly as in resnet_cifar.py (see its docstring for how
BatchNorm sees mixed states).
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lt_calib.method import mixing
from lt_calib.errors import ConfigError
from lt_calib.models import heads
from lt_calib.models.resnet_cifar import kaiming_normal

# depth -> (block kind, blocks per stage), torchvision's table.
STAGE_BLOCKS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
DEPTHS = tuple(STAGE_BLOCKS)


def stage_blocks(depth: int) -> tuple[str, tuple[int, ...]]:
  """Block kind and blocks per stage of a ResNet of `depth`.

  Args:
    depth: one of DEPTHS.

  Returns:
    ('basic' or 'bottleneck', four block counts).

  Raises:
    ConfigError: `depth` is not an ImageNet ResNet depth.
  """
  if depth not in STAGE_BLOCKS:
    raise ConfigError(f"model.depth={depth!r} has no ImageNet ResNet; allowed: {DEPTHS}.")
  return STAGE_BLOCKS[depth]


def _layers(dtype, train: bool):
  """Convolution and BatchNorm constructors shared by the blocks and the stem."""
  conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kaiming_normal, dtype=dtype)
  # Flax keeps BatchNorm's statistics and reductions in float32 under a
  # bfloat16 `dtype` (force_float32_reductions), so only activations are bf16.
  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5, dtype=dtype)
  return conv, norm


def _shortcut(x, features: int, strides: int, conv, norm):
  """Identity, or a 1x1 projection + BN where the block changes the shape."""
  if strides == 1 and x.shape[-1] == features:
    return x
  return norm()(conv(features, (1, 1), strides=strides, padding=0)(x))


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers (ResNet-10/18/34)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = _layers(self.dtype, train)
    y = nn.relu(norm()(conv(self.features, (3, 3), strides=self.strides, padding=1)(x)))
    y = norm()(conv(self.features, (3, 3), padding=1)(y))
    return nn.relu(y + _shortcut(x, self.features, self.strides, conv, norm))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand to 4 `features` (ResNet-50/101/152)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = _layers(self.dtype, train)
    out = self.features * self.expansion
    y = nn.relu(norm()(conv(self.features, (1, 1), padding=0)(x)))
    # v1.5: the stride is on the 3x3 convolution, which sees every pixel;
    # a strided 1x1 (v1) would drop three quarters of them unseen.
    y = nn.relu(norm()(conv(self.features, (3, 3), strides=self.strides, padding=1)(y)))
    y = norm()(conv(out, (1, 1), padding=0)(y))
    return nn.relu(y + _shortcut(x, out, self.strides, conv, norm))


class ResNetImageNet(heads.Classifier):
  """ImageNet ResNet of depth 10, 18, 34, 50, 101 or 152.

  `depth` is a key of STAGE_BLOCKS (10 and 50 in the paper's Table 3);
  `width` is the channels of the stem and of the first stage's 3x3
  convolutions (64 standard), the stages using width * (1, 2, 4, 8), times 4
  at the output of a Bottleneck. The other fields are heads.Classifier's.
  """
  depth: int = 50
  width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = True, mix: mixing.HiddenMix | None = None):
    """Logits of `x` [B, H, W, 3]; `mix` (training only) mixes hidden states.

    Args:
      x: images, NHWC.
      train: BatchNorm on batch statistics (and updates them) if True.
      mix: manifold mixup's instruction, or None.

    Returns:
      float32 logits [B, num_classes].
    """
    kind, blocks = stage_blocks(self.depth)
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    conv, norm = _layers(self.dtype, train)
    x = mixing.mix_hidden(x, mix, 0)
    # Stem: 7x7/2 with torch's symmetric 3-pixel padding (Flax's 'SAME' would
    # pad 2 before and 3 after an even-sized input), then a 3x3/2 max-pool
    # whose padding never wins (-inf).
    x = conv(self.width, (7, 7), strides=2, padding=3, name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, count in enumerate(blocks):
      for block in range(count):
        strides = 2 if stage > 0 and block == 0 else 1
        x = block_cls(self.width * 2 ** stage, strides, self.dtype,
                      name=f"stage{stage + 1}_block{block}")(x, train)
      x = mixing.mix_after_stage(self, x, mix, stage)
    return heads.pool_and_classify(x, self.num_classes, self.head, self.head_scale,
                                   self.dtype, kaiming_normal)
