"""CIFAR-10-LT, the paper's protocol and method (UniMix + Bayias, ResNet-32).

Variants: `configs/cifar10_lt.py:smoke` (tiny ResNet, a few dozen steps, test
subset; < 60 s on a 2-core CPU) and `:quick` (ResNet-32, a few epochs).
`:official` is the official code's recipe as it runs instead of the paper's
text (config/cifar10_100.py: in-batch partners weighted n^-0.5, alpha 0.8,
mixing never stopped, batch 64, per-epoch warm-up staircase, evaluation every
epoch; docs/choices.md); it combines with a budget, e.g. `:official,quick`.
"""

from configs import common


def get_config(arg: str = ""):
  """Returns the ConfigDict; `arg`: comma-separated variants (common.apply_variant)."""
  config = common.paper_config(dataset="cifar10", num_classes=10, tau=-1.0)
  return common.apply_variant(config, arg)
