"""The streaming input pipeline: index sequence, samplers, hosts, resumption, augmentation, errors.

Expected values are worked out here from the sampler definitions (class
counts, pi^tau by hand, a permutation covers each row once), never read back
from the pipeline. Datasets are a few dozen small generated JPEGs.
"""

import gc
import io
import os
import pathlib
import subprocess
import sys
import tarfile

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
from scipy import stats

from lt_calib import parallel
from lt_calib.data import fake, index_sequence, lists, streaming
from lt_calib.errors import ConfigError, DataError, MissingDataError
from lt_calib.method import sampling
from tests.test_lists import upload

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = 24  # Output side of the test pipelines.


def config(root, **fields):
  base = dict(name="imagenet_lt", num_classes=1000, image_root=str(root),
              split_dir=str(root), train_list="", val_list="", test_list="",
              source="auto", image_size=SIZE, test_subset=0, zero_count_smoothing=0.0,
              tfds_data_dir="", cache_dir="")
  base.update(fields)
  return ml_collections.ConfigDict(base)


def list_counts(path, num_classes):
  labels = [int(line.split()[-1]) for line in pathlib.Path(path).read_text().splitlines()]
  return np.bincount(labels, minlength=num_classes)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
  """12-class fake ImageNet-LT: 24 down to 3 training images per class."""
  root = tmp_path_factory.mktemp("fake_lt")
  fake.build(root, num_classes=12, image_size="40x32", max_per_class=24, min_per_class=3,
             val_per_class=1, test_per_class=4)
  return root


@pytest.fixture(scope="module")
def dataset(fake_root):
  return streaming.load_streaming_dataset(
      config(fake_root, name="image_list", num_classes=12,
             train_list="ImageNet_LT_train.txt", test_list="ImageNet_LT_test.txt",
             val_list="ImageNet_LT_val.txt"))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------------------
# The index sequence.
# ---------------------------------------------------------------------------

def labels_with_counts(counts):
  return np.repeat(np.arange(len(counts)), counts)


NO_CLASS_LAWS = index_sequence.Laws(None, None)
UNIFORM_PARTNERS = index_sequence.Laws(None, np.log(np.full(12, 1 / 12)))


def r_rows(seed, step, num_examples, batch):
  """R's rows of a step, from the documented law: the data key is
  split(key(seed), 3)[1]; epoch e's order is permutation(fold_in(it, e), N)."""
  epoch, position = divmod(step, num_examples // batch)
  data_key = jax.random.split(jax.random.key(seed), 3)[1]
  order = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples))
  return order[position * batch:(position + 1) * batch]


def test_streamed_rows_follow_r_as_the_in_memory_step_does():
  sequence = index_sequence.IndexSequence(3, np.zeros(120, np.int32), 1, 12, NO_CLASS_LAWS)
  rows = [sequence(s)["main"] for s in range(20)]
  for step in (0, 7, 13):
    np.testing.assert_array_equal(rows[step], r_rows(3, step, 120, 12))
  for epoch in (0, 1):
    assert sorted(np.concatenate(rows[10 * epoch:10 * epoch + 10]).tolist()) == list(range(120))
  assert not np.array_equal(np.concatenate(rows[:10]), np.concatenate(rows[10:]))
  # N = 125, B = 12: 10 steps an epoch, 120 distinct rows, 5 left out.
  partial = index_sequence.IndexSequence(0, np.zeros(125, np.int32), 1, 12, NO_CLASS_LAWS)
  taken = np.concatenate([partial(s)["main"] for s in range(10)])
  assert len(np.unique(taken)) == 120 and taken.max() < 125


def test_index_sequence_resumes_exactly():
  labels = labels_with_counts([40, 20, 10, 5, 4, 1])
  prior = np.bincount(labels) / len(labels)
  for main in (None, sampling.class_level_log_probs(prior, 0.5)):
    laws = index_sequence.Laws(main, sampling.class_level_log_probs(prior, -1.0))
    straight = index_sequence.IndexSequence(7, labels, 6, 16, laws)
    first = [straight(s) for s in range(30)]
    resumed = index_sequence.IndexSequence(7, labels, 6, 16, laws)  # A fresh process.
    for step in range(17, 30):
      again = resumed(step)
      assert again.keys() == first[step].keys() == {"main", "partner"}
      assert all(np.array_equal(again[k], first[step][k]) for k in again)
    seeds = [index_sequence.augmentation_seeds(7, s, index_sequence.MAIN, 16) for s in (17, 18)]
    assert not np.array_equal(*seeds)


def test_streamed_class_level_rows_follow_prior_power():
  # The host runs the in-memory sampler (`sampling.batch_indices`): check the
  # law end to end once more. tau = -1: P(c) ∝ 1 / n_c.
  counts = [40, 20, 10, 5, 4, 1]
  labels = labels_with_counts(counts)
  inverse = np.array([0.015385, 0.030769, 0.061538, 0.123077, 0.153846, 0.615385])
  laws = index_sequence.Laws(None, sampling.class_level_log_probs(np.array(counts) / 80, -1.0))
  sequence = index_sequence.IndexSequence(1, labels, 6, 64, laws)
  rows = np.concatenate([sequence(s)["partner"] for s in range(300)])
  assert stats.chisquare(np.bincount(labels[rows], minlength=6),
                         inverse * len(rows)).pvalue > 1e-3


def test_rows_of_a_process_are_checked():
  assert index_sequence.checked_rows([4, 5, 12, 13], 16).tolist() == [4, 5, 12, 13]
  for bad in ([], [3, 3], [-1, 2], [16]):
    with pytest.raises(ConfigError, match="distinct positions in"):
      index_sequence.checked_rows(bad, 16)


def host_rows(process, processes, devices_each, global_batch):
  """Rows of `process` on a mesh whose processes interleave (p0d0, p1d0, p0d1, ...)."""
  owners = np.tile(np.arange(processes), devices_each)
  return parallel.rows_of_process(owners, global_batch, process)


def test_eval_positions_pad_with_minus_one():
  positions = index_sequence.eval_positions(10, 4)
  assert positions.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]


# ---------------------------------------------------------------------------
# tf.data batches.
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_train_batches_follow_the_index_sequence(dataset, fake_root):
  counts = list_counts(fake_root / "ImageNet_LT_train.txt", 12)
  assert np.array_equal(dataset.prior.counts, counts)
  log_probs = sampling.class_level_log_probs(counts / counts.sum(), -1.0)
  batches = take(dataset.train_batches(seed=2, start_step=0, global_batch=48,
                                       rows=np.arange(48), laws=index_sequence.Laws(None, log_probs)), 20)
  first = batches[0]
  assert first["image"].shape == first["partner_image"].shape == (48, SIZE, SIZE, 3)
  assert first["image"].dtype == np.uint8 and first["label"].dtype == np.int32
  # Main labels are those of the epoch permutation's rows.
  for step in (0, 7):
    rows = r_rows(2, step, len(dataset.train_labels), 48)
    assert np.array_equal(batches[step]["label"], dataset.train_labels[rows])
  # Partner classes follow pi^-1, i.e. 1 / n_c normalised.
  expected = (1 / counts) / (1 / counts).sum()
  observed = np.bincount(np.concatenate([b["partner_label"] for b in batches]), minlength=12)
  assert stats.chisquare(observed, expected * observed.sum()).pvalue > 1e-3


def test_resumed_batches_equal_uninterrupted_ones(dataset):
  kwargs = dict(seed=5, global_batch=16, rows=np.arange(16), laws=UNIFORM_PARTNERS)
  straight = take(dataset.train_batches(start_step=0, **kwargs), 6)
  resumed = take(dataset.train_batches(start_step=4, **kwargs), 2)
  for a, b in zip(straight[4:], resumed):
    for key in ("image", "label", "partner_image", "partner_label"):
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(straight[0]["image"], straight[1]["image"])


def test_interleaved_hosts_decode_the_rows_of_the_single_host(dataset):
  kwargs = dict(seed=1, start_step=3, global_batch=16, laws=UNIFORM_PARTNERS)
  single = take(dataset.train_batches(rows=np.arange(16), **kwargs), 2)
  rows = [host_rows(p, 2, 2, 16) for p in (0, 1)]
  assert rows[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
  hosts = [take(dataset.train_batches(rows=r, **kwargs), 2) for r in rows]
  for step in range(2):
    for key in ("image", "label", "partner_image", "partner_label"):
      for r, host in zip(rows, hosts):
        np.testing.assert_array_equal(host[step][key], single[step][key][r])


def test_partners_stop_with_the_mixing(dataset):
  kwargs = dict(seed=1, global_batch=16, rows=np.arange(16), laws=UNIFORM_PARTNERS)
  batches = take(dataset.train_batches(start_step=2, partner_until_step=4, **kwargs), 4)
  assert [sorted(b) for b in batches] == [
      ["image", "label", "partner_image", "partner_label"]] * 2 + [["image", "label"]] * 2
  # The main batches are those of a run that draws partners throughout.
  always = take(dataset.train_batches(start_step=2, **kwargs), 4)
  for a, b in zip(batches, always):
    np.testing.assert_array_equal(a["image"], b["image"])
  resumed = take(dataset.train_batches(start_step=5, partner_until_step=4, **kwargs), 1)
  assert sorted(resumed[0]) == ["image", "label"]
  np.testing.assert_array_equal(resumed[0]["image"], batches[3]["image"])


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_eval_covers_every_image_once(dataset, processes):
  test_labels = [int(l.split()[-1]) for l in
                 (dataset.splits["test"].image_list.path).read_text().splitlines()]
  assert dataset.test_labels.tolist() == test_labels
  per_process = [list(dataset.eval_batches(global_batch=18,
                                           rows=host_rows(p, processes, 2, 18)))
                 if 18 % (2 * processes) == 0 else
                 list(dataset.eval_batches(global_batch=18,
                                           rows=host_rows(p, processes, 1, 18)))
                 for p in range(processes)]
  # 48 test images -> 3 global batches of 18 (6 padding rows) on every process.
  assert [len(b) for b in per_process] == [3] * processes
  index = np.concatenate([b["index"] for batches in per_process for b in batches])
  assert np.array_equal(np.sort(index[index >= 0]), np.arange(48))
  assert (index == -1).sum() == 6
  for batches in per_process:
    for b in batches:
      real = b["index"] >= 0
      assert b["label"][real].tolist() == [test_labels[i] for i in b["index"][real]]
      assert not b["image"][~real].any()  # Padding is black.


def test_eval_images_do_not_depend_on_the_process_layout(dataset):
  single = next(dataset.eval_batches(global_batch=12, rows=np.arange(12)))
  rows = [host_rows(p, 2, 2, 12) for p in (0, 1)]
  for r in rows:
    part = next(dataset.eval_batches(global_batch=12, rows=r))
    np.testing.assert_array_equal(part["image"], single["image"][r])


# ---------------------------------------------------------------------------
# Decoding and augmentation.
# ---------------------------------------------------------------------------

def write_image(path, array, image_format="JPEG"):
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=image_format, quality=100)
  path.write_bytes(buffer.getvalue())


def image_list_set(root, images, num_classes=2, **fields):
  """A generic image-list dataset of `images` {relative path: array}, all in train and test."""
  lines = "".join(f"{path} {k % num_classes}\n" for k, path in enumerate(images))
  for path, array in images.items():
    write_image(root / path, array, "PNG" if path.endswith(".png.JPEG") else "JPEG")
  (root / "train.txt").write_text(lines)
  (root / "test.txt").write_text(lines)
  return config(root, name="image_list", num_classes=num_classes, train_list="train.txt",
                test_list="test.txt", **fields)


def test_random_resized_crop_and_flip_statistics(tmp_path):
  # Red encodes x and green y (ramps), so each output gives back its crop
  # window and whether it was flipped.
  width, height = 200, 150
  y, x = np.mgrid[0:height, 0:width]
  ramp = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.zeros_like(x)], -1)
  cfg = image_list_set(tmp_path, {f"r{k}.JPEG": ramp.astype(np.uint8) for k in range(8)},
                       image_size=32)
  data = streaming.load_streaming_dataset(cfg)
  images = np.concatenate([b["image"] for b in take(data.train_batches(
      seed=0, start_step=0, global_batch=8, rows=np.arange(8), laws=NO_CLASS_LAWS), 30)]).astype(np.float64)
  red, green = images[:, 16, :, 0], images[:, :, 16, 1]
  shrink = 1 - 1 / 32  # Output pixel centres span 31/32 of the crop.
  crop_w = (red.max(1) - red.min(1)) / 255 * (width - 1) / shrink
  crop_h = (green.max(1) - green.min(1)) / 255 * (height - 1) / shrink
  area, ratio = crop_w * crop_h / (width * height), crop_w / crop_h
  assert area.min() > 0.08 * 0.85 and area.max() < 1.05
  assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 * 1.1
  assert 0.3 < area.mean() < 0.7 and area.min() < 0.2  # The whole range is used.
  flipped = red[:, -1] < red[:, 0]
  assert stats.binomtest(int(flipped.sum()), len(flipped)).pvalue > 1e-3


def test_eval_resizes_the_shorter_side_and_centre_crops(tmp_path):
  # 64 x 48 (W x H) black with a white 16 x 16 square in the centre and a red
  # border 4 px wide: shorter side 48 -> round(24 / 0.875) = 27, width
  # int(64 * 27 / 48) = 36; the centre 24 x 24 keeps the square (16 * 27/48 =
  # 9 px wide, in the middle) and loses the left/right borders.
  image = np.zeros((48, 64, 3), np.uint8)
  image[16:32, 24:40] = 255
  image[:, :4, 0] = image[:, -4:, 0] = 255
  cfg = image_list_set(tmp_path, {"a.JPEG": image, "b.png.JPEG": image})
  data = streaming.load_streaming_dataset(cfg)
  batch = next(data.eval_batches(global_batch=2, rows=np.arange(2)))
  for out in batch["image"]:  # A JPEG and a PNG named .JPEG, as in ImageNet.
    assert out.shape == (SIZE, SIZE, 3)
    assert out[12, 12].min() > 200  # Centre: the white square.
    assert out[12, 12 - 7].max() < 60 and out[12, 12 + 7].max() < 60  # Square is ~9 px.
    assert out[12, 0, 0] < 60 and out[12, -1, 0] < 60  # Red borders cropped away.


# ---------------------------------------------------------------------------
# Errors name the file.
# ---------------------------------------------------------------------------

def small_set(tmp_path):
  rng = np.random.default_rng(0)
  images = {f"c{k % 2}/img{k}.JPEG": rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            for k in range(6)}
  return image_list_set(tmp_path, images)


def test_missing_image_in_a_large_list_stops_at_read_time(tmp_path, monkeypatch):
  cfg = small_set(tmp_path)
  monkeypatch.setattr(lists, "EXISTENCE_CHECK_MAX_LINES", 0)  # Treat every list as large.
  data = streaming.load_streaming_dataset(cfg)
  os.remove(tmp_path / "c1" / "img3.JPEG")
  with pytest.raises(MissingDataError) as error:
    take(data.train_batches(seed=0, start_step=0, global_batch=6, rows=np.arange(6), laws=NO_CLASS_LAWS), 1)
  message = str(error.value)
  assert "train.txt line 4" in message and str(tmp_path / "c1" / "img3.JPEG") in message
  assert "\n" not in message


def test_missing_image_in_a_small_list_stops_at_load(tmp_path):
  cfg = small_set(tmp_path)
  os.remove(tmp_path / "c0" / "img2.JPEG")
  with pytest.raises(MissingDataError, match=r"train.txt line 3 .*img2.JPEG does not exist"):
    streaming.load_streaming_dataset(cfg)


def read_first_batches(data, split, train_batch):
  """Reads the first training batch, or every evaluation batch, of a streamed dataset."""
  if split == "train":
    take(data.train_batches(seed=0, start_step=0, global_batch=train_batch,
                            rows=np.arange(train_batch), laws=NO_CLASS_LAWS), 1)
  else:
    list(data.eval_batches(global_batch=4, rows=np.arange(4)))


@pytest.mark.parametrize("split", ["train", "test"])
def test_undecodable_jpeg_names_the_file(tmp_path, split):
  cfg = small_set(tmp_path)
  bad = tmp_path / "c0" / "img4.JPEG"
  bad.write_bytes(bad.read_bytes()[:120])  # A JPEG cut short: header, no image data.
  data = streaming.load_streaming_dataset(cfg)
  with pytest.raises(DataError) as error:
    read_first_batches(data, split, train_batch=6)
  message = str(error.value)
  assert f"cannot decode image {bad}" in message and "line 5" in message
  assert "\n" not in message and "{{" not in message


# gs:// data, on the local GCS emulator: lists and existence checks through
# etils.epath, images through `storage.read_bytes`, both gcsfs.

def gcs_set(tmp_path, gcs):
  """8 images (small_set's layout), uploaded; (local folder, config of the gs:// copy)."""
  local = tmp_path / "data"
  rng = np.random.default_rng(0)
  image_list_set(local, {f"c{k % 2}/img{k}.JPEG": rng.integers(0, 255, (20, 30, 3),
                                                                dtype=np.uint8)
                         for k in range(8)})
  remote = upload(gcs, local, "data")
  cfg = config(remote, name="image_list", num_classes=2, train_list="train.txt",
               test_list="test.txt")
  return local, cfg


def test_gs_dataset_reads_what_the_local_one_does(tmp_path, gcs):
  local, cfg = gcs_set(tmp_path, gcs)
  from_local = streaming.load_streaming_dataset(
      config(local, name="image_list", num_classes=2, train_list="train.txt",
             test_list="test.txt"))
  from_gs = streaming.load_streaming_dataset(cfg)
  rel = [f"c{k % 2}/img{k}.JPEG" for k in range(8)]
  assert from_gs.train_reader.keys(np.arange(8)).tolist() == [
      f"{cfg.image_root}/{r}".encode() for r in rel]
  assert from_gs.source == f"lists:{cfg.image_root} images:{cfg.image_root}"
  assert from_gs.identity == from_local.identity  # Same names and SHA-256.
  same_batches(from_gs, from_local, 2)


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_gs_image_stops_at_read_time_naming_it(tmp_path, gcs, split):
  local, cfg = gcs_set(tmp_path, gcs)
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.filesystem("gs").rm(f"{cfg.image_root}/c1/img3.JPEG")
  data = streaming.load_streaming_dataset(cfg)  # No up-front check on gs://.
  with pytest.raises(MissingDataError) as error:
    read_first_batches(data, split, train_batch=8)
  message = str(error.value)
  assert (f"{cfg.image_root}/{split}.txt line 4 (c1/img3.JPEG): image "
          f"{cfg.image_root}/c1/img3.JPEG does not exist") in message
  assert "\n" not in message
  # The error's traceback keeps the failed tf.data iterator alive. Freed by a
  # garbage collection that happens to run on gcsfs's event-loop thread, its
  # destructor would wait for workers that wait for that loop (a deadlock
  # seen here): free it now, on this thread.
  del error, data, local
  gc.collect()


def test_batch_and_seed_errors(dataset):
  kwargs = dict(start_step=0, laws=NO_CLASS_LAWS)
  with pytest.raises(ConfigError, match="distinct positions in"):
    dataset.train_batches(seed=0, global_batch=16, rows=np.arange(20), **kwargs)
  with pytest.raises(ConfigError, match="must be in"):
    dataset.train_batches(seed=0, global_batch=10_000, rows=np.arange(16), **kwargs)
  with pytest.raises(ConfigError, match="seed and step must be >= 0"):
    dataset.train_batches(seed=-1, global_batch=16, rows=np.arange(16), **kwargs)
  with pytest.raises(MissingDataError, match="list file missing.txt not found"):
    streaming.load_streaming_dataset(
        config(dataset.splits["test"].image_list.path.parent, name="image_list",
               num_classes=12, train_list="ImageNet_LT_train.txt",
               test_list="ImageNet_LT_test.txt", val_list="missing.txt")).eval_split("val")


# ---------------------------------------------------------------------------
# TFDS and TensorFlow-free imports.
# ---------------------------------------------------------------------------

def same_batches(a, b, num_classes):
  """Asserts that two StreamingDatasets give the same train and eval batches."""
  kwargs = dict(seed=0, start_step=0, global_batch=8, rows=np.arange(8),
                laws=index_sequence.Laws(None, np.zeros(num_classes)))
  evals = dict(global_batch=8, rows=np.arange(8))
  for x, y in ((next(a.train_batches(**kwargs)), next(b.train_batches(**kwargs))),
               (next(a.eval_batches(**evals)), next(b.eval_batches(**evals)))):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def add_to_tar(archive, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def test_tfds_imagenet2012_array_record_end_to_end(tmp_path):
  # The real imagenet2012 builder on a tiny manual download (train tar of class
  # tars, val tar), in ArrayRecord format; the lists then read it by index.
  tfds = pytest.importorskip("tensorflow_datasets")
  meta = pathlib.Path(tfds.__file__).parent / "datasets" / "imagenet2012"
  wnids = (meta / "labels.txt").read_text().split()
  val_wnids = (meta / "validation_labels.txt").read_text().split()
  root, manual = tmp_path / "images", tmp_path / "manual"
  manual.mkdir()
  rng = np.random.default_rng(0)
  train_lines, test_lines = [], []

  def image(path):
    array = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    write_image(root / path, array)
    return (root / path).read_bytes()

  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train_tar:
    for c in range(4):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for k in range(6 - c):
          name = f"{wnids[c]}_{k}.JPEG"
          add_to_tar(class_tar, name, image(f"train/{wnids[c]}/{name}"))
          train_lines.append(f"train/{wnids[c]}/{name} {c}")
      add_to_tar(train_tar, f"{wnids[c]}.tar", inner.getvalue())
  # TFDS pairs the sorted names of the val tar with validation_labels.txt, so
  # the first names carry the real labels of ILSVRC2012_val_00000001, ...
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val_tar:
    for i in range(6):
      label, name = wnids.index(val_wnids[i]), f"ILSVRC2012_val_{i + 1:08d}.JPEG"
      add_to_tar(val_tar, name, image(f"val/{val_wnids[i]}/{name}"))
      test_lines.append(f"val/{val_wnids[i]}/{name} {label}")
  (root / "ImageNet_LT_train.txt").write_text("\n".join(train_lines[::-1]) + "\n")
  (root / "ImageNet_LT_test.txt").write_text("\n".join(test_lines) + "\n")
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path / "tfds"),
                         file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  # 1000 classes, most without images here: a pseudo-count keeps log pi finite.
  common = dict(num_classes=1000, zero_count_smoothing=1.0, cache_dir=str(tmp_path / "c"))
  from_tfds = streaming.load_streaming_dataset(config(
      root, source="tfds", image_root="", tfds_data_dir=str(tmp_path / "tfds"), **common))
  assert from_tfds.identity["tfds_name"] == "imagenet2012"
  assert from_tfds.source.startswith("tfds:imagenet2012:")
  same_batches(from_tfds, streaming.load_streaming_dataset(config(root, **common)), 1000)
  # A list entry without a record names its line.
  (root / "ImageNet_LT_test.txt").write_text(
      test_lines[0] + "\nval/x/ILSVRC2012_val_00049999.JPEG 3\n")
  with pytest.raises(MissingDataError, match=r"ImageNet_LT_test.txt line 2 .*no record"):
    streaming.load_streaming_dataset(config(
        root, source="tfds", image_root="", tfds_data_dir=str(tmp_path / "tfds"), **common))


def test_tfds_inat2018_matches_ids_by_list_role(tmp_path):
  # iNaturalist's TFDS 'id' is the file name without '.jpg'; the train list
  # lives in TFDS 'train' and the val list in 'validation', whatever the path.
  tfds = pytest.importorskip("tensorflow_datasets")
  root = tmp_path / "inat"
  fake.build(root, num_classes=5, image_size="24x20", max_per_class=6, min_per_class=2,
             test_per_class=2, layout="inat2018")
  features = tfds.builder("i_naturalist2018").info.features
  records = {}
  for split, name in (("train", "iNaturalist18_train.txt"),
                      ("validation", "iNaturalist18_val.txt")):
    lines = (root / name).read_text().splitlines()[::-1]  # TFDS has its own order.
    records[split] = [features.serialize_example({
        "id": path.rsplit("/", 1)[1][:-len(".jpg")], "label": int(label),
        "image": io.BytesIO((root / path).read_bytes()), "supercategory": 0})
                      for path, label in (line.split() for line in lines)]

  def as_data_source(self, split, decoders=None, deserialize_method=None):
    del self, decoders, deserialize_method
    return records[split]

  common = dict(name="inat2018", num_classes=8142, zero_count_smoothing=1.0)
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    from_tfds = streaming.load_streaming_dataset(config(
        root, source="tfds", image_root="", cache_dir=str(tmp_path / "c"), **common))
  assert from_tfds.identity["tfds_name"] == "i_naturalist2018"
  same_batches(from_tfds, streaming.load_streaming_dataset(config(root, **common)), 8142)


@pytest.mark.slow  # Starts a process.
def test_imports_and_list_loading_need_no_tensorflow(fake_root):
  # As if TensorFlow were not installed: None in sys.modules makes `import`
  # fail and importlib.util.find_spec (which etils.epath asks) answer None.
  code = f"""
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError('no ' + name)
sys.meta_path.insert(0, Block())
sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None
import ml_collections
import lt_calib.data, lt_calib.data.sources, lt_calib.data.lists, lt_calib.data.fake
from lt_calib.data import streaming
from lt_calib.errors import MissingDependencyError
data = streaming.load_streaming_dataset(ml_collections.ConfigDict(dict(
    name='image_list', num_classes=12, image_root={str(fake_root)!r},
    split_dir={str(fake_root)!r}, train_list='ImageNet_LT_train.txt',
    test_list='ImageNet_LT_test.txt', image_size=8)))
try:
  data.eval_batches(global_batch=4, rows=[0, 1, 2, 3])
except MissingDependencyError as e:
  print('needs tf:', e)
assert not [m for m, v in sys.modules.items() if m.startswith('tensorflow') and v]
print('ok', len(data.train_labels))
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr
  assert "needs tf: the streaming input pipeline" in result.stdout
  assert "ok " in result.stdout
