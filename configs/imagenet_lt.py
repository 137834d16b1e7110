"""ImageNet-LT, the paper's large-scale protocol (Appendix C.2): UniMix + Bayias.

Variants: `configs/imagenet_lt.py` or `:resnet10` (ResNet-10, batch 512),
`:resnet50` (ResNet-50, batch 64), and `:smoke`, a tiny ResNet-10 on 32 px
images of a fake 1000-class ImageNet-LT, for a CPU end-to-end check in under
two minutes. Make its data once with

    python -m lt_calib.data.fake --out=data/fake_imagenet_lt --classes=1000

Where every value comes from:

| field | value | source |
|---|---|---|
| model | `resnet_imagenet`, depth 10 / 50, width 64, from scratch | App. C.2: "ResNet-10 & ResNet-50 ... trained from scratch" |
| batch_size | 512 (ResNet-10), 64 (ResNet-50) | App. C.2: "mini-batch as 512 and 64, respectively" |
| num_epochs | 90 | App. C.2 |
| optim | SGD, momentum 0.9, weight decay 1e-4, lr 0.2, x0.1 at epochs 30 and 60 | App. C.2 ("base learning rate as 0.2 and decay it at the 30th and 60th epoch by 0.1"; the same 0.2 for both batch sizes, as written) |
| optim.lr_scaling | 'linear', reference_batch_size = the App. C.2 batch (512 / 64) | our choice (Goyal et al. 2017): a pod's global batch (e.g. 1,024 on a v4-32) trains with lr 0.2 x batch / reference; at the paper's batch the rate is the paper's |
| model.dtype | 'auto': bfloat16 compute on TPU (float32 parameters, BatchNorm statistics and loss), float32 elsewhere | our choice: TPUs compute bfloat16 at full rate; float32 on GPU/CPU until measured there |
| optim.warmup_epochs | 0 | App. C.2 names no warm-up (C.1's 5-epoch warm-up is for CIFAR) |
| mix.alpha | 1.0 | App. E: "keep the same alpha as mixup and Remix on ImageNet-LT and iNaturalist 2018"; App. C.1: mixup's alpha is 1.0 |
| mix.tau | 0 (partner class uniform over classes) | not reported for the large datasets (Fig. 4 is CIFAR only); CIFAR-100-LT's value, the many-class setting (our choice) |
| mix.stop_epoch | 90 (mixing throughout) | App. C.2 names no mixing-free fine-tuning (C.1's epoch 120 of 200 is for CIFAR); the official code never stops (our choice) |
| loss | Bayias, uniform test prior | Sec. 3.2, Table 3 |
| data | train: random-resized-crop 224 (scale 0.08-1, ratio 3/4-4/3) + flip; test: shorter side 256, centre crop 224; ImageNet mean/std | App. C.2 "proper data augment strategy", as in the classifier-balancing code the lists come from (which adds colour jitter for ImageNet-LT; not used here) |
| lists | ImageNet_LT_train/val/test.txt; test = 50 per class from ImageNet val | Sec. 4.2 (Liu et al. 2019's split), docs/data.md |

`dataset.image_root` must point at the ImageNet folder holding train/ and
val/ (val/ in class folders) and `dataset.split_dir` at the list folder;
with `split_dir=''` the lists are looked up in ../shared/data/splits.
`dataset.imbalance_ratio` is informational here (1280 / 5 = 256): the lists fix
the split.
"""

import pathlib

from configs import common
from lt_calib.errors import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE_DIR = REPO_ROOT / "data" / "fake_imagenet_lt"
# depth -> batch size of App. C.2.
BATCH_OF_DEPTH = {10: 512, 50: 64}


def large_scale_config(dataset: str, num_classes: int, depth: int, batch_size: int,
                       imbalance_ratio: float):
  """The App. C.2 protocol on a streamed dataset (ImageNet-LT, iNaturalist 2018).

  Args:
    dataset: 'imagenet_lt', 'inat2018' or 'image_list'.
    num_classes: C.
    depth: ResNet depth (10 or 50 in the paper).
    batch_size: global batch size.
    imbalance_ratio: rho of the published lists (informational).

  Returns:
    ConfigDict with every field of common.paper_config.
  """
  config = common.paper_config(dataset=dataset, num_classes=num_classes, tau=0.0)
  config.dataset.update(dict(
      imbalance_ratio=imbalance_ratio,
      test_subset=0, val_per_class=0,
      crop_padding=0,      # Augmentation happens in tf.data, not on the device.
  ))
  # Streaming fields (lt_calib/data/lists.py, docs/data.md).
  config.dataset.image_root = ""   # Folder the list paths are relative to.
  config.dataset.split_dir = ""    # Folder of the list files ('' = ../shared/data/splits).
  config.dataset.train_list = ""   # '' = the dataset's published file names.
  config.dataset.val_list = ""
  config.dataset.test_list = ""
  config.dataset.image_size = 224
  config.model.update(dict(name="resnet_imagenet", depth=depth, width=64, dtype="auto"))
  config.mix.alpha = 1.0
  config.mix.stop_epoch = 90
  config.loss.drw_epoch = 60  # DRW (if chosen) re-weights in the last stage.
  config.optim.update(dict(learning_rate=0.2, momentum=0.9, nesterov=False,
                           weight_decay=1e-4, warmup_epochs=0,
                           decay_epochs=(30, 60), decay_factors=(0.1, 0.01),
                           lr_scaling="linear", reference_batch_size=batch_size))
  config.batch_size = batch_size
  config.num_epochs = 90
  config.eval_batch_size = 512
  config.eval_every_epochs = 10
  config.checkpoint_every_epochs = 1
  config.log_every_steps = 50
  return config


def smoke(config):
  """Shrinks a large-scale config to a CPU check on a fake 1000-class dataset."""
  config.dataset.image_root = config.dataset.split_dir = str(SMOKE_DIR)
  config.dataset.image_size = 32
  config.dataset.test_subset = 0  # The whole test list (2 per class from the fake builder).
  config.model.depth, config.model.width = 10, 8
  # 7,337 fake training images: 28 steps an epoch, 56 in all.
  config.batch_size, config.num_epochs = 256, 2
  config.eval_batch_size = 500
  config.mix.stop_epoch = 1
  config.loss.drw_epoch = 1
  config.optim.decay_epochs, config.optim.decay_factors = (), ()
  config.eval_every_epochs = config.checkpoint_every_epochs = 1
  config.log_every_steps = 7
  config.tensorboard = False
  return config


def get_config(arg: str = ""):
  """Returns the ConfigDict; `arg` is '', 'resnet10', 'resnet50' or 'smoke'."""
  variants = {"": 10, "resnet10": 10, "resnet50": 50, "smoke": 10}
  if arg not in variants:
    raise ConfigError(f"unknown config variant {arg!r}; allowed: {sorted(variants)}.")
  depth = variants[arg]
  config = large_scale_config("imagenet_lt", 1000, depth, BATCH_OF_DEPTH[depth], 256.0)
  return smoke(config) if arg == "smoke" else config
