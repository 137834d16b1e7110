"""CIFAR-100-LT, the paper's protocol and method (UniMix tau = 0 + Bayias).

Variants as for cifar10_lt.py; `:official` takes the code's CIFAR-100 tau,
-0.1 in count units (config/cifar100_100.py). No offline copy of CIFAR-100
ships here: it is read through TFDS unless `dataset.data_file` points at an
offline `.npz`.
"""

from configs import common


def get_config(arg: str = ""):
  """Returns the ConfigDict; `arg`: comma-separated variants (common.apply_variant)."""
  config = common.paper_config(dataset="cifar100", num_classes=100, tau=0.0)
  return common.apply_variant(config, arg)
