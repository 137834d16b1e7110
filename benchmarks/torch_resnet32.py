"""PyTorch ResNet-32 train step, the reference for the JAX step's throughput.

The same network as lt_calib/models/resnet_cifar.py: a 3x3 stem, three stages
of five BasicBlocks with 16/32/64 channels (stride 1/2/2), option-A
shortcuts (strided subsampling plus zero-padded channels, no parameters),
BatchNorm (momentum 0.1 in torch's convention = 0.9 in Flax's, eps 1e-5),
Kaiming-normal (fan-in) weights, a linear head with zero bias, global
average pooling; 464,154 parameters with 10 classes. One step is forward,
cross-entropy, backward and SGD (momentum 0.9, weight decay 2e-4 added to the
gradient before momentum, as optax.add_decayed_weights + optax.sgd in
lt_calib/train/step.py) on a fixed batch of 32x32 inputs, so it times the model
step alone (the JAX library step also samples, augments and mixes).

Needs the `bench` extra (`pip install -e .[bench]`, torch 2.13.0 CPU).

On a host whose cores are shared with other processes, torch's OpenMP
threads spin at every barrier while a sibling waits for a core: here, with a
load average of 5 on 2 cores, the 2-thread step took 5.1 s against 0.8 s with
OMP_WAIT_POLICY=PASSIVE (or 1 thread). Set OMP_WAIT_POLICY=PASSIVE in the
environment (it is read when torch loads) to measure on such a host.

  python benchmarks/torch_resnet32.py [--steps=20] [--repeats=5] [--batch_size=128]
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with an option-A shortcut."""

  def __init__(self, in_features: int, features: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_features, features, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
    self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
    self.stride = stride
    self.extra = features - in_features

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x
    if self.stride != 1 or self.extra:
      # Option A: every `stride`-th pixel, new channels zero-padded half before
      # and half after (the Flax model's jnp.pad split).
      shortcut = x[:, :, ::self.stride, ::self.stride]
      shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2,
                                  self.extra - self.extra // 2))
    return F.relu(y + shortcut)


class ResNetCifar(nn.Module):
  """CIFAR ResNet of depth 6n+2 with a linear head.

  Args:
    num_classes: output logits.
    depth: 6n+2 (32 for ResNet-32).
    width: channels of the first stage.
  """

  def __init__(self, num_classes: int = 10, depth: int = 32, width: int = 16):
    super().__init__()
    if (depth - 2) % 6 or depth < 8:
      raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}.")
    blocks = (depth - 2) // 6
    self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.stem_bn = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
    layers, in_features = [], width
    for stage in range(3):
      features = width * 2 ** stage
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        layers.append(BasicBlock(in_features, features, stride))
        in_features = features
    self.blocks = nn.Sequential(*layers)
    self.head = nn.Linear(in_features, num_classes)
    for module in self.modules():
      # Kaiming normal, fan-in, gain sqrt 2 (the Flax model's kaiming_normal,
      # head included); zero head bias as Flax's Dense.
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
          nn.init.zeros_(module.bias)

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem(x)))
    x = self.blocks(x)
    return self.head(x.mean(dim=(2, 3)))


def make_step(batch_size: int = 128, channels_last: bool = True,
              dtype: str = "float32", num_classes: int = 10, seed: int = 0):
  """A train step closure over a fresh model and a fixed random batch.

  Args:
    batch_size: images per step.
    channels_last: NHWC memory format for the model and the batch (oneDNN's
      preferred layout on CPU) instead of contiguous NCHW.
    dtype: 'float32', or 'bfloat16' for bf16 autocast of the forward pass
      (parameters and optimizer stay float32, as the JAX model's dtype).
    num_classes: logits.
    seed: torch seed of init and batch.

  Returns:
    (step, model): step() runs one SGD step and returns the loss tensor.
  """
  # XLA:CPU generates code with denormals flushed to zero (xla_cpu_ftz, on by
  # default); ask the same of torch, so that neither side pays for denormal
  # arithmetic if the fixed batch's gradients shrink that far.
  torch.set_flush_denormal(True)
  torch.manual_seed(seed)
  model = ResNetCifar(num_classes)
  images = torch.randn(batch_size, 3, 32, 32)
  labels = torch.randint(0, num_classes, (batch_size,))
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                              weight_decay=2e-4)
  autocast = dtype == "bfloat16"
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is unknown; allowed: {sorted(DTYPES)}.")

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    return loss

  return step, model


def time_steps(step, steps: int) -> float:
  """Seconds for `steps` calls of `step` (torch CPU ops run synchronously)."""
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  loss.item()
  return time.perf_counter() - start


def summarize(rates: list) -> dict:
  """Median, min, max and relative spread ((max - min) / median) of rates."""
  median = statistics.median(rates)
  return {"images_per_s": median, "min": min(rates), "max": max(rates),
          "spread": (max(rates) - min(rates)) / median,
          "repeats": [round(r, 2) for r in rates]}


def measure(batch_size: int = 128, steps: int = 20, repeats: int = 5,
            channels_last: bool = True, dtype: str = "float32",
            warmup_steps: int = 5) -> dict:
  """Steady-state train images/s of the PyTorch ResNet-32 step.

  Args:
    batch_size: images per step.
    steps: timed steps per repetition.
    repeats: repetitions; the median and spread are over these.
    channels_last: NHWC memory format (see make_step).
    dtype: 'float32' or 'bfloat16' (autocast).
    warmup_steps: untimed steps first (oneDNN primitive creation, allocator).

  Returns:
    dict: images_per_s (median), min, max, spread, repeats (each rate),
    and the settings.
  """
  step, _ = make_step(batch_size, channels_last, dtype)
  time_steps(step, warmup_steps)
  rates = [steps * batch_size / time_steps(step, steps) for _ in range(repeats)]
  result = summarize(rates)
  result.update(batch_size=batch_size, steps=steps, channels_last=channels_last,
                dtype=dtype, threads=torch.get_num_threads(), torch=torch.__version__)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=128)
  args = parser.parse_args()
  for dtype in ("float32", "bfloat16"):
    for channels_last in (True, False):
      print(json.dumps(measure(args.batch_size, args.steps, args.repeats,
                               channels_last, dtype)), flush=True)


if __name__ == "__main__":
  main()
