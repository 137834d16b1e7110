"""The trainer on a streamed (tf.data) dataset in the ImageNet-LT layout.

A generated 12-class dataset (lt_calib.data.fake) is trained through
`trainer.train_and_evaluate` exactly as ImageNet-LT would be: split lists, an
image folder, the R main batch and the R* partner batch from the index
sequence, evaluation in padded batches.
"""

import collections

import numpy as np
import pytest

from configs import imagenet_lt
from lt_calib import config_fields
from lt_calib.train import trainer
from tests.helpers import FAKE_CLASSES, build_fake_lists, streamed_overrides, train_records

CLASSES = FAKE_CLASSES


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
  return build_fake_lists(tmp_path_factory.mktemp("fake_imagenet_lt"))


def streamed_config(root, **overrides):
  """`helpers.streamed_overrides` as a config (the command-line tests pass them as flags)."""
  return config_fields.set_fields(imagenet_lt.get_config("smoke"),
                                  streamed_overrides(root, **overrides).items())


def list_counts(path):
  counts = collections.Counter(int(line.split()[1]) for line in open(path))
  return [counts.get(c, 0) for c in range(CLASSES)]


@pytest.mark.slow
def test_streamed_run_counts_and_resumes_exactly(tmp_path, fake_root, no_report):
  config = streamed_config(fake_root)
  whole = trainer.train_and_evaluate(config, str(tmp_path / "whole"))
  train_counts = list_counts(fake_root / "ImageNet_LT_train.txt")
  assert whole["train_class_counts"] == train_counts
  num_test = sum(1 for _ in open(fake_root / "ImageNet_LT_test.txt"))
  assert whole["num_test_images"] == num_test == 5 * CLASSES
  # Each test image counted once: the per-class accuracies are multiples of 1/5.
  per_class = np.asarray(whole["final"]["per_class_acc"]) * 5
  np.testing.assert_allclose(per_class, np.round(per_class), atol=1e-6)
  steps_per_epoch = sum(train_counts) // 32
  assert whole["steps"] == 2 * steps_per_epoch
  # A stop mid-epoch and a new call read the same images: the same bits.
  stop = steps_per_epoch // 2 + 1
  split = trainer.train_and_evaluate(config, str(tmp_path / "split"), stop_at_step=stop)
  assert split["stopped_at_step"] == stop
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "split"))
  assert resumed["resumed_from_step"] == stop
  assert resumed["steps_this_run"] == 2 * steps_per_epoch - stop
  assert resumed["fingerprint"] == whole["fingerprint"]
  assert np.isfinite([r["loss"] for r in train_records(tmp_path / "whole")]).all()
