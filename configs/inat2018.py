"""iNaturalist 2018, the paper's large-scale protocol (Appendix C.2): UniMix + Bayias.

ResNet-50, batch 512, 90 epochs ("we adopt the vanilla ResNet-50 with
mini-batch as 512 and train for 90 epochs", App. C.2); everything else as
configs/imagenet_lt.py (SGD momentum 0.9, weight decay 1e-4, lr 0.2 x0.1 at
epochs 30 and 60, alpha 1.0 as mixup's by App. E, tau 0, mixing throughout,
random-resized-crop 224 + flip, test at 256 -> 224), whose docstring gives the
source of each value.

Lists (docs/data.md): iNaturalist18_train.txt (437,513 images, 8,142 classes)
and iNaturalist18_val.txt, the official val split used as the test set in the
literature (3 per class, 24,426 images). `dataset.image_root` is the folder
holding train_val2018/. rho = 1000 / 2 = 500 (informational; the lists fix
the split). ImageNet mean/std are used (classifier-balancing's iNaturalist
statistics, 0.466/0.471/0.380 and 0.195/0.194/0.192, differ by < 0.03).

Variant `:smoke`: the CPU check of imagenet_lt.py:smoke on a fake 1000-class
set in the iNaturalist layout (`python -m lt_calib.data.fake
--out=data/fake_inat2018 --classes=1000 --layout=inat2018`), with
dataset.name='image_list' and the iNaturalist file names.
"""

from configs import imagenet_lt
from lt_calib.errors import ConfigError

SMOKE_DIR = imagenet_lt.REPO_ROOT / "data" / "fake_inat2018"


def get_config(arg: str = ""):
  """Returns the ConfigDict; `arg` is '' or 'smoke'."""
  if arg not in ("", "smoke"):
    raise ConfigError(f"unknown config variant {arg!r}; allowed: ['', 'smoke'].")
  if arg == "":
    return imagenet_lt.large_scale_config("inat2018", 8142, 50, 512, 500.0)
  # The fake set has 1000 classes, not 8,142: read it as a generic image list.
  config = imagenet_lt.smoke(
      imagenet_lt.large_scale_config("image_list", 1000, 10, 256, 10.0))
  config.dataset.image_root = config.dataset.split_dir = str(SMOKE_DIR)
  config.dataset.train_list = "iNaturalist18_train.txt"
  config.dataset.test_list = "iNaturalist18_val.txt"
  return config
