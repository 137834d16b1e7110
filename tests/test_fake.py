"""The fake ImageNet-LT / iNaturalist builder: layout, list counts, a learnable signal."""

import collections
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from lt_calib.data import fake

REPO = pathlib.Path(__file__).resolve().parent.parent
# int(20 * 0.1 ** (c / 9)) for c = 0..9, worked out by hand: 20, 15.48, 11.98,
# 9.28, 7.19, 5.56, 4.31, 3.34, 2.58, 2.
EXP_COUNTS_20_TO_2 = [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]


def read_list(path):
  lines = pathlib.Path(path).read_text().splitlines()
  return [(p, int(l)) for p, l in (line.split() for line in lines)]


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
  out = tmp_path_factory.mktemp("fake_inet")
  counts = fake.build(out, num_classes=10, image_size="40x30", max_per_class=20,
                      min_per_class=2, val_per_class=2, test_per_class=3)
  return out, counts


def test_imagenet_lists_have_the_requested_counts(imagenet_like):
  out, counts = imagenet_like
  assert counts == {"ImageNet_LT_train.txt": 78, "ImageNet_LT_val.txt": 20,
                    "ImageNet_LT_test.txt": 30}
  train = read_list(out / "ImageNet_LT_train.txt")
  per_class = collections.Counter(label for _, label in train)
  assert [per_class[c] for c in range(10)] == EXP_COUNTS_20_TO_2
  for name, per in (("ImageNet_LT_val.txt", 2), ("ImageNet_LT_test.txt", 3)):
    assert collections.Counter(l for _, l in read_list(out / name)) == {c: per for c in range(10)}


def test_imagenet_layout_and_images(imagenet_like):
  out, _ = imagenet_like
  train = read_list(out / "ImageNet_LT_train.txt")
  val = read_list(out / "ImageNet_LT_val.txt")
  test = read_list(out / "ImageNet_LT_test.txt")
  # As ImageNet-LT: train and val lists from train/, test from val/, with
  # class folders; val images are not training images.
  assert all(p.startswith("train/n") and p.endswith(".JPEG") for p, _ in train + val)
  assert all(p.startswith("val/n") and "/ILSVRC2012_val_" in p for p, _ in test)
  assert not {p for p, _ in train} & {p for p, _ in val}
  folders = {p.split("/")[1] for p, l in train if l == 3}
  assert len(folders) == 1  # One wnid folder per class.
  for path, _ in train[:3] + test[:3]:
    with Image.open(out / path) as image:
      assert image.format == "JPEG" and image.size == (40, 30) and image.mode == "RGB"


def test_inat_layout(tmp_path):
  counts = fake.build(tmp_path, num_classes=7, image_size="16", max_per_class=4,
                      min_per_class=1, test_per_class=3, layout="inat2018")
  assert set(counts) == {"iNaturalist18_train.txt", "iNaturalist18_val.txt"}
  assert counts["iNaturalist18_val.txt"] == 21
  entries = read_list(tmp_path / "iNaturalist18_train.txt") + read_list(
      tmp_path / "iNaturalist18_val.txt")
  for path, label in entries:
    top, _, folder, name = path.split("/")
    assert top == "train_val2018" and folder == str(label)
    assert len(name) == 32 + len(".jpg")
    assert (tmp_path / path).is_file()
  assert len({p for p, _ in entries}) == len(entries)


def test_class_signal_is_learnable(imagenet_like):
  # Nearest class-mean colour of the training images classifies the test
  # images far above chance (10%): a smoke run has something to learn.
  out, _ = imagenet_like

  def mean_colours(entries):
    return np.stack([np.asarray(Image.open(out / p), np.float32).mean((0, 1))
                     for p, _ in entries]), np.array([l for _, l in entries])

  train_x, train_y = mean_colours(read_list(out / "ImageNet_LT_train.txt"))
  test_x, test_y = mean_colours(read_list(out / "ImageNet_LT_test.txt"))
  centres = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
  predicted = np.argmin(((test_x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
  assert (predicted == test_y).mean() >= 0.8


@pytest.mark.slow  # Starts a process.
def test_command_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "lt_calib.data.fake", f"--out={tmp_path}", "--classes=3",
       "--image_size=8", "--max_per_class=4", "--min_per_class=2", "--test_per_class=1",
       "--val_per_class=1"], cwd=REPO, capture_output=True, text=True, check=True)
  # rho = 4 / 2: 4, int(4 * 0.5 ** 0.5) = int(2.83) = 2, and 2.
  assert "ImageNet_LT_train.txt: 8 images" in result.stdout
  assert len(read_list(tmp_path / "ImageNet_LT_test.txt")) == 3


def test_bad_arguments():
  with pytest.raises(ValueError, match="image_size"):
    fake.parse_size("40x")
  with pytest.raises(ValueError, match="min_per_class"):
    fake.plan(3, 2, 5, 1, 1, "imagenet_lt")
