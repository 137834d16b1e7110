"""CIFAR-10-LT, the paper's protocol and method (UniMix + Bayias, ResNet-32).

Variants: `configs/cifar10_lt.py:smoke` (tiny ResNet, a few dozen steps, test
subset; < 60 s on a 2-core CPU) and `:quick` (ResNet-32, a few epochs).
"""

from configs import common


def get_config(arg: str = ""):
  """Returns the ConfigDict; `arg` is '', 'smoke' or 'quick'."""
  config = common.paper_config(dataset="cifar10", num_classes=10, tau=-1.0)
  return common.apply_variant(config, arg)
