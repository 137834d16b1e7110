"""Small datasets and configs the tests (and the test drivers) share.

- `tiny_config`: the CIFAR-10-LT :smoke config shrunk further (ResNet-8 of
  width 4; the LT rule at n_max 625, 1,547 images; 12 steps of 128 an epoch;
  200 test images); `TINY_FLAGS`, the same as command-line flags.
- `train_records`: a run's train_metrics.jsonl; `skip_report`: runs end
  without the calibration report.
- `synthetic_dataset`: a separable, long-tailed in-memory dataset of 8 x 8
  images (4 colours plus noise, 360 training images): what a test that
  trains needs when the data itself is not under test, at a fraction of
  CIFAR's cost.
"""

import json
import os
import pathlib

import numpy as np

from lt_calib import check, config_fields
from lt_calib.data import long_tail, sources


def xla_environment(devices: int, **extra) -> dict:
  """This process's environment for a subprocess on `devices` CPU devices.

  Keeps the session's other XLA flags (conftest's optimisation level), so
  that a subprocess compiles the programs this process does.
  """
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": check.host_device_xla_flags(devices), **extra}


# CIFAR-10-LT rho 100 at n_max 625 (625 down to 6 images a class, 1,547 in
# all, an eighth of the standard split's 12,406): 12 steps of 128 an epoch,
# so each tiny run trains on real data in a few seconds.
TINY_OVERRIDES = {"model.width": 4, "batch_size": 128, "dataset.n_max": 625,
                  "dataset.test_subset": 200, "log_every_steps": 4}
TINY_FLAGS = ["--config=configs/cifar10_lt.py:smoke",
              *(f"--config.{field}={value}" for field, value in TINY_OVERRIDES.items())]


def tiny_config(**overrides):
  """The :smoke config shrunk further (`TINY_OVERRIDES`), then `overrides`."""
  from configs import cifar10_lt  # pylint: disable=g-import-not-at-top
  config = config_fields.set_fields(cifar10_lt.get_config("smoke"), TINY_OVERRIDES.items())
  return override(config, **overrides)


def dotted(overrides: dict) -> dict:
  """Keyword arguments with `__` for the dots (mix__alpha=1) as dotted field names."""
  return {name.replace("__", "."): value for name, value in overrides.items()}


def override(config, **overrides):
  """`config` with fields set from keyword arguments, `__` for the dots (mix__alpha=1)."""
  return config_fields.set_fields(config, dotted(overrides).items())


def train_records(workdir) -> list:
  """The records of a local run's train_metrics.jsonl ([] before its first)."""
  path = pathlib.Path(workdir, "train_metrics.jsonl")
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def skip_report(setattr_fn) -> None:
  """Runs end without the calibration report (report.md and its pictures).

  Args:
    setattr_fn: how to replace `report.write_training_report`: a
      monkeypatch's `setattr` (undone after the test).
  """
  from lt_calib.calibration import report  # pylint: disable=g-import-not-at-top
  setattr_fn(report, "write_training_report", lambda *args, **kwargs: None)


FAKE_CLASSES = 12


def streamed_overrides(root, **overrides) -> dict:
  """`configs/imagenet_lt.py:smoke` made a run on `build_fake_lists(root)`: dotted fields."""
  fields = {"dataset.name": "image_list", "dataset.num_classes": FAKE_CLASSES,
            "dataset.train_list": "ImageNet_LT_train.txt",
            "dataset.test_list": "ImageNet_LT_test.txt",
            "dataset.val_list": "ImageNet_LT_val.txt",
            "dataset.image_root": str(root), "dataset.split_dir": str(root),
            "model.width": 4, "batch_size": 32, "eval_batch_size": 16, "log_every_steps": 2}
  return {**fields, **dotted(overrides)}


def build_fake_lists(root):
  """A 12-class image-list dataset in the ImageNet-LT layout (lt_calib.data.fake) at root."""
  from lt_calib.data import fake  # pylint: disable=g-import-not-at-top
  fake.build(root, num_classes=FAKE_CLASSES, image_size="40x32", max_per_class=40,
             min_per_class=4, val_per_class=2, test_per_class=5, seed=0)
  return root


COUNTS = (192, 96, 48, 24)


def synthetic_dataset(counts=COUNTS, size=8, test_per_class=32, seed=0):
  """Long-tailed, separable: class c is a colour plus noise."""
  rng = np.random.RandomState(seed)
  colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]])

  def draw(labels):
    noise = rng.randint(-40, 41, size=(len(labels), size, size, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)

  train_labels = np.repeat(np.arange(4), counts).astype(np.int32)
  test_labels = np.repeat(np.arange(4), test_per_class).astype(np.int32)
  info = sources.DatasetInfo(4, size, max(counts), None, None, sources.CIFAR_MEAN,
                              sources.CIFAR_STD)
  return sources.Dataset(draw(train_labels), train_labels, draw(test_labels), test_labels,
                          info, long_tail.class_prior(train_labels, 4), "synthetic")


def synthetic_config(**overrides):
  settings = dict(batch_size=32, num_epochs=3, dataset__crop_padding=1,
                  mix__stop_epoch=2, loss__drw_epoch=1)
  settings.update(overrides)
  return tiny_config(**settings)
