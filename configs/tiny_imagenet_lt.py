"""Tiny-ImageNet-LT (200 classes, 64 px), in memory from the offline pool.

The paper has no Tiny-ImageNet-LT experiment; this is the many-class dataset
that runs offline here (../shared/data/tiny_imagenet_lt10_jpeg.npz, the
rho = 10 pool built with the CIFAR-LT rule, so any rho >= 10 is exact). We apply
the paper's small-scale protocol (App. C.1), as for CIFAR-100-LT:

| field | value | source |
|---|---|---|
| schedule | 200 epochs, batch 128, SGD 0.9, weight decay 2e-4, lr 0.1, warm-up 5, x0.01 / x0.0001 at 160 / 180 | App. C.1 (common.paper_config) |
| mix | UniMix alpha 0.5, tau 0, mixing stops after epoch 120 | App. C.1; tau of CIFAR-100-LT (Fig. 4), the many-class setting |
| model | `resnet_imagenet` depth 18, width 64 | our choice: the ResNet-18 of the Tiny-ImageNet literature (e.g. LDAM-DRW, Cao et al. 2019); 64 px reach the pooling at 2 px |
| augmentation | pad 8 + random 64 px crop + flip, on the device | CIFAR's pad-4-of-32 scaled to 64 px (our choice) |
| rho | 10 (`''` / `:rho10`) or 100 (`:rho100`) | the two ratios the paper reports for calibration (Table 2) |

`,two_stage` after any variant (e.g. `:rho100,two_stage`) is MiSLAS's second
stage after that run (docs/methods.md), with CIFAR-100-LT's stage-2 settings.

Variant `:smoke`: ResNet-10 width 8 on the rho = 100 split (21,549 images),
2 epochs of batch 512 (84 steps), 1,000 test images; a CPU end-to-end check
(300-500 images/s on 2 shared cores, ~2-3 min).
"""

from configs import common
from lt_calib.errors import ConfigError

VARIANTS = ("", "rho10", "rho100", "smoke")


def get_config(arg: str = ""):
  """Returns the ConfigDict; `arg` is '', 'rho10', 'rho100' or 'smoke', optionally
  followed by ',two_stage' (MiSLAS's second stage after that run, common.two_stage)."""
  arg, _, stage = (arg or "").partition(",")
  if arg not in VARIANTS or stage not in ("", "two_stage"):
    raise ConfigError(f"unknown config variant {arg!r}; allowed: {list(VARIANTS)}, each "
                      "optionally followed by ',two_stage'.")
  config = common.paper_config(dataset="tiny_imagenet_lt", num_classes=200, tau=0.0)
  config.dataset.imbalance_ratio = 100.0 if arg == "rho100" else 10.0
  config.dataset.crop_padding = 8
  config.model.update(dict(name="resnet_imagenet", depth=18, width=64, dtype="float32"))
  if arg == "smoke":
    config.dataset.imbalance_ratio = 100.0  # The smaller split: 42 steps an epoch.
    config.model.depth, config.model.width = 10, 8
    config.batch_size, config.num_epochs = 512, 2
    config.mix.stop_epoch = 1
    config.loss.drw_epoch = 1
    config.optim.warmup_epochs = 1
    config.optim.decay_epochs, config.optim.decay_factors = (), ()
    config.dataset.test_subset = 1000
    config.eval_every_epochs = config.checkpoint_every_epochs = 1
    config.log_every_steps = 8
    config.tensorboard = False
  if stage:
    common.two_stage(config, smoke=arg == "smoke")
  return config
