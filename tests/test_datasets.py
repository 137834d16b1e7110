"""Offline and TFDS sources, caching, and the errors for bad data."""

import dataclasses
import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import imagenet_lt
from lt_calib import config_checks
from lt_calib.data import sources
from lt_calib.errors import ConfigError
from tests.helpers import tiny_config


def write_npz(path, train_labels, test_labels, size=32):
  """A tiny archive in the offline format, with solid-colour JPEGs."""
  def pack(labels):
    blobs = []
    for label in labels:
      buffer = io.BytesIO()
      Image.new("RGB", (size, size), (int(label) * 20 % 256, 0, 0)).save(buffer, "JPEG")
      blobs.append(buffer.getvalue())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return np.frombuffer(b"".join(blobs), np.uint8), offsets
  train_jpeg, train_offsets = pack(train_labels)
  test_jpeg, test_offsets = pack(test_labels)
  np.savez(path, train_jpeg=train_jpeg, train_offsets=train_offsets,
           train_labels=np.asarray(train_labels, np.int64), test_jpeg=test_jpeg,
           test_offsets=test_offsets, test_labels=np.asarray(test_labels, np.int64),
           class_names=np.array([str(i) for i in range(10)]))


def test_offline_cifar10_long_tail(cifar10_file):
  # The tests' n_max 625 split (the standard split's counts, from its indices
  # alone, are in the n_max test below: decoding 12,406 images takes seconds).
  config = tiny_config()
  data = sources.load_dataset(config.dataset)
  assert data.source == f"offline:{cifar10_file}"
  assert data.prior.counts.tolist() == [625, 374, 224, 134, 80, 48, 29, 17, 10, 6]
  assert data.train_images.shape == (1547, 32, 32, 3) and data.train_images.dtype == np.uint8
  assert np.bincount(data.test_labels).tolist() == [20] * 10  # Balanced subset.
  # README: per-channel train mean of the full set is 0.4913/0.4821/0.4465; the
  # LT subset is a different sample, so only a loose check of decoding.
  mean = data.train_images.reshape(-1, 3).mean(0) / 255
  assert np.all(np.abs(mean - [0.49, 0.48, 0.45]) < 0.05)
  again = sources.load_dataset(config.dataset)  # From the cache.
  np.testing.assert_array_equal(again.train_images, data.train_images)


def test_missing_and_corrupt_files(tmp_path):
  config = tiny_config()
  config.dataset.data_file = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    sources.load_dataset(config.dataset)
  broken = tmp_path / "broken.npz"
  broken.write_bytes(b"not a zip file")
  config.dataset.data_file = str(broken)
  with pytest.raises(ValueError, match="broken.npz is not an .npz archive"):
    sources.load_dataset(config.dataset)
  incomplete = tmp_path / "incomplete.npz"
  np.savez(incomplete, train_labels=np.zeros(3))
  config.dataset.data_file = str(incomplete)
  with pytest.raises(ValueError, match=r"incomplete.npz lacks the arrays \['train_jpeg'"):
    sources.load_dataset(config.dataset)


def test_labels_out_of_range_and_class_count(tmp_path):
  path = tmp_path / "tiny.npz"
  write_npz(path, train_labels=[0, 1, 12], test_labels=[0, 1])
  config = tiny_config()
  config.dataset.data_file = str(path)
  with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
    sources.load_dataset(config.dataset)
  config.dataset.num_classes = 100
  with pytest.raises(ValueError, match="num_classes=100 disagrees"):
    sources.load_dataset(config.dataset)


def test_unknown_dataset_and_source():
  config = tiny_config()
  config.dataset.name = "mnist"
  with pytest.raises(ValueError, match="dataset.name='mnist' is unknown"):
    sources.load_dataset(config.dataset)
  config = tiny_config()
  config.dataset.source = "web"
  with pytest.raises(ValueError, match="dataset.source='web' is unknown"):
    sources.load_dataset(config.dataset)


@pytest.mark.slow
def test_tfds_source_with_mock_data(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  # CIFAR-10 with a 20-image head class, so mock data of 400 examples suffices.
  info = dataclasses.replace(sources.DATASETS["cifar10"], n_max=20)
  cfg = ml_collections.ConfigDict(dict(
      imbalance_ratio=10.0, imbalance_type="exp", lt_seed=0, test_subset=0,
      tfds_data_dir=""))
  with tfds.testing.mock_data(num_examples=400):
    train_images, train_labels, test_images, _, source = sources._load_tfds(
        "cifar10", info, cfg)
  expected = [int(20 * 0.1 ** (c / 9)) for c in range(10)]
  assert np.bincount(train_labels, minlength=10).tolist() == expected
  assert train_images.shape[1:] == (32, 32, 3) and train_images.dtype == np.uint8
  assert len(test_images) == 400 and source == "tfds:cifar10"


@pytest.mark.slow
def test_second_generation_copy_from_the_command_line(tmp_path):
  # python -m lt_calib.data.degrade on a small archive of textured JPEGs
  # (quality 75, as the stored CIFAR-10): the copy holds lossless PNGs, and the
  # PSNR it reports is the one computed here from both files.
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from lt_calib.data import offline  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)

  def pack(count):
    blobs = []
    for _ in range(count):
      coarse = rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)
      image = np.asarray(Image.fromarray(coarse).resize((32, 32), Image.BILINEAR))
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, "JPEG", quality=75)
      blobs.append(buffer.getvalue())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return np.frombuffer(b"".join(blobs), np.uint8), offsets

  src, out = tmp_path / "stored.npz", tmp_path / "gen2.npz"
  arrays = {}
  for split, count in (("train", 12), ("test", 6)):
    arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"] = pack(count)
    arrays[f"{split}_labels"] = np.arange(count, dtype=np.int64) % 10
  np.savez(src, class_names=np.array([str(i) for i in range(10)]), **arrays)
  done = subprocess.run([sys.executable, "-m", "lt_calib.data.degrade", f"--src={src}",
                         f"--out={out}", "--reference_pool="], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  record = json.loads(out.with_suffix(".json").read_text())
  stored, second = offline.read_npz(src), offline.read_npz(out)
  decode = lambda a, split, n: offline.decode_jpegs(
      a[f"{split}_jpeg"], a[f"{split}_offsets"], np.arange(n), 32).astype(np.float64)
  for split, count in (("train", 12), ("test", 6)):
    np.testing.assert_array_equal(second[f"{split}_labels"], stored[f"{split}_labels"])
    mse = np.mean((decode(second, split, count) - decode(stored, split, count)) ** 2)
    assert record["psnr_second_generation_vs_stored"][split] == pytest.approx(
        10 * np.log10(255 ** 2 / mse), abs=1e-9)
  # The shifted, coarser generation is further from the stored images than a
  # same-grid, same-quality re-encode.
  assert (record["psnr_second_generation_vs_stored"]["test"]
          < record["psnr_same_grid_reencode_vs_stored_test"] - 5)


def test_n_max_keeps_the_first_images_of_each_class_of_the_standard_split(cifar10_file):
  with np.load(cifar10_file, allow_pickle=False) as archive:
    pool = archive["train_labels"]
  info = sources.get_info("cifar10")
  standard = sources.train_indices(info, pool, tiny_config(dataset__n_max=0).dataset)
  assert np.bincount(pool[standard]).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232,
                                                  139, 83, 50]  # CIFAR-10-LT rho 100.
  small = sources.train_indices(info, pool, tiny_config(dataset__n_max=625).dataset)
  # int(625 * 0.01 ** (c / 9)) by hand: 625, 374.7, 224.7, 134.7, 80.7, 48.4, ...
  counts = [625, 374, 224, 134, 80, 48, 29, 17, 10, 6]
  assert np.bincount(pool[small], minlength=10).tolist() == counts
  for c, n in enumerate(counts):  # The same LT order, cut shorter.
    np.testing.assert_array_equal(small[pool[small] == c], standard[pool[standard] == c][:n])
  with pytest.raises(ConfigError, match=r"dataset.n_max=5001 is outside \[1, 5000\]"):
    config_checks.check_config(tiny_config(dataset__n_max=5001))
  streamed = imagenet_lt.get_config("smoke")
  streamed.dataset.n_max = 100
  with pytest.raises(ConfigError, match="dataset.n_max=100 applies to the in-memory"):
    config_checks.check_config(streamed)
