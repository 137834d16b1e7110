"""ResNet for CIFAR (He et al. 2016, Sec. 4.2), as used by LDAM-DRW and Prior-LT.

ResNet-(6n+2): a 3x3 stem, three stages of n BasicBlocks with 16/32/64
channels (stride 1/2/2), global average pooling and a head (linear, or
LDAM's normalised one, see heads.py). Shortcuts are option A: strided
subsampling plus zero-padded channels, so they add no parameters. ResNet-32
(n = 5) with 10 classes has 464,154 parameters.

Manifold mixup (Verma et al. 2019) mixes the hidden states at layer k: k = 0
is the input, k = s the output of stage s. The model takes the instruction
(`mixing.HiddenMix`) and mixes at the chosen layer only; partners are members
of the same batch, so their hidden states come from the same forward pass.
BatchNorm statistics are those of the batch as it is at each layer: unmixed
states before layer k, mixed ones after (as in Verma et al.'s code, which
mixes within the batch too).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lt_calib.method import mixing
from lt_calib.models import heads

# Kaiming-normal (fan-in, gain sqrt 2), untruncated like torch's kaiming_normal_.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def materialize_relu(x):
  """Returns the ReLU output `x` unchanged, computed once on XLA:CPU.

  XLA:CPU fuses cheap elementwise producers (BatchNorm's scale and shift, the
  residual add, ReLU) into each of their consumers, duplicating them. Along the
  residual stream this compounds: inside every consumer of block k's output
  (the next block's add, the backward pass's ReLU masks, the layout transposes
  that feed the weight-gradient convolutions) the output is recomputed from
  all earlier BatchNorm outputs of the stage, so a stage of n blocks does
  O(n^2) elementwise passes, many of them in transposed, cache-hostile order.
  That made the ResNet-32 train step 1.7x slower (docs/benchmarks.md). A
  conditional is opaque to fusion, so its result is written to memory once
  and read by every consumer (lax.optimization_barrier would be the natural
  tool, but XLA:CPU removes it before fusion). Both branches return `x` bit
  for bit (ReLU is idempotent), whatever the predicate, so values and
  gradients are those of the plain model. Other backends get `x` itself:
  their fusion heuristics differ, and a GPU conditional waits for its
  predicate on the host. So do bfloat16 activations, with which the step
  measured 4-9 % faster without it.

  Args:
    x: a ReLU output (non-negative or NaN), any shape.

  Returns:
    `x`.
  """
  if x.dtype != jnp.float32:
    return x

  def on_cpu(v):
    # Any predicate the compiler cannot fold will do; the branches agree.
    return jax.lax.cond(jnp.isfinite(v.ravel()[0]), lambda u: u, nn.relu, v)

  return jax.lax.platform_dependent(x, cpu=on_cpu, default=lambda v: v)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with an option-A shortcut."""
  features: int
  strides: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1, use_bias=False,
                             kernel_init=kaiming_normal, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    y = materialize_relu(nn.relu(norm()(conv(self.features, strides=self.strides)(x))))
    y = norm()(conv(self.features)(y))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      # Option A: take every `strides`-th pixel and zero-pad the new channels.
      shortcut = x[:, ::self.strides, ::self.strides, :]
      extra = self.features - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0),
                                    (extra // 2, extra - extra // 2)))
    return materialize_relu(nn.relu(y + shortcut))


class ResNetCifar(heads.Classifier):
  """CIFAR ResNet of depth 6n+2.

  `depth` is 6n+2 (20, 32, 44, 56, 110; 8 for tests); the stages have
  width, 2 width and 4 width channels (width 16 in the paper). The other
  fields are heads.Classifier's.
  """
  depth: int = 32
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = True, mix: mixing.HiddenMix | None = None):
    """Logits of `x`; `mix` (training only) mixes hidden states, see above."""
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"model.depth must be 6n+2 with n >= 1, got {self.depth}.")
    blocks = (self.depth - 2) // 6
    x = mixing.mix_hidden(x, mix, 0)
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False,
                kernel_init=kaiming_normal, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype)(x)
    x = materialize_relu(nn.relu(x))
    for stage in range(3):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2 ** stage, strides, self.dtype)(x, train)
      x = mixing.mix_after_stage(self, x, mix, stage)
    return heads.pool_and_classify(x, self.num_classes, self.head, self.head_scale,
                                   self.dtype, kaiming_normal)
