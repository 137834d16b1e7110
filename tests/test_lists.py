"""Split lists: the real published lists, parsing, validation and the messages of each error."""

import contextlib
import hashlib
import os
import pathlib
import time

from etils import epath
import etils.epath.testing  # pylint: disable=unused-import  # epath.testing.mock_epath.
import ml_collections
import numpy as np
import pytest

from lt_calib import storage
from lt_calib.data import lists, sources
from lt_calib.errors import ConfigError, DataError, MissingDataError

SPLITS = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "splits"


def real_list(name):
  path = SPLITS / name
  if not path.is_file():
    pytest.skip(f"{path} not found")
  return path


# Line counts, classes, per-class counts, first lines and SHA-256 prefixes as
# documented in ../shared/data/README.md.
@pytest.mark.parametrize("name,classes,lines,per_class,first,sha", [
    ("ImageNet_LT_test.txt", 1000, 50_000, 50,
     ("val/n01440764/ILSVRC2012_val_00029930.JPEG", 0), "d1590191"),
    ("ImageNet_LT_val.txt", 1000, 20_000, 20,
     ("train/n01440764/n01440764_762.JPEG", 0), "9af7ba68"),
    ("iNaturalist18_val.txt", 8142, 24_426, 3,
     ("train_val2018/Plantae/7291/9f8ecb39e5f767e39e9b28e34488f179.jpg", 7291), "efaeff65"),
])
def test_published_lists_parse(name, classes, lines, per_class, first, sha):
  parsed = lists.parse_list(real_list(name), classes)
  assert len(parsed) == lines
  assert np.array_equal(np.bincount(parsed.labels, minlength=classes),
                        np.full(classes, per_class))
  assert (parsed.rel_paths[0].decode(), int(parsed.labels[0])) == first
  assert parsed.sha256.startswith(sha)
  assert parsed.line_numbers[0] == 1 and parsed.line_numbers[-1] == lines


def test_imagenet_lt_lists_share_no_image():
  val = lists.parse_list(real_list("ImageNet_LT_val.txt"), 1000)
  test = lists.parse_list(real_list("ImageNet_LT_test.txt"), 1000)
  assert not set(val.rel_paths.tolist()) & set(test.rel_paths.tolist())


def test_large_list_parses_fast(tmp_path):
  # The size of iNaturalist18_train.txt: 437,513 lines, 8,142 classes.
  rng = np.random.default_rng(0)
  labels = np.concatenate([np.arange(8142), rng.integers(0, 8142, 437_513 - 8142)])
  text = "".join(f"train_val2018/Plantae/{l}/{k:032x}.jpg {l}\n" for k, l in enumerate(labels))
  path = tmp_path / "iNaturalist18_train.txt"
  path.write_text(text)
  start = time.perf_counter()
  parsed = lists.parse_list(path, 8142)
  elapsed = time.perf_counter() - start
  assert len(parsed) == 437_513 and np.array_equal(parsed.labels, labels)
  assert parsed.rel_paths[5].decode() == f"train_val2018/Plantae/5/{5:032x}.jpg"
  assert parsed.sha256 == hashlib.sha256(text.encode()).hexdigest()
  assert elapsed < 5.0, f"parsing took {elapsed:.2f} s"  # ~0.4 s here; loose for CI.


def test_blank_lines_crlf_and_spaces_in_paths(tmp_path):
  path = tmp_path / "l.txt"
  path.write_bytes(b"a/x 1.jpg 2\r\n\n  b/y.jpg\t0  \nc/z.jpg 1\n\n")
  parsed = lists.parse_list(path, 3)
  assert parsed.rel_paths.tolist() == [b"a/x 1.jpg", b"b/y.jpg", b"c/z.jpg"]
  assert parsed.labels.tolist() == [2, 0, 1]
  assert parsed.line_numbers.tolist() == [1, 3, 4]
  # The fast path (two fields on every line) gives the same numbering.
  path.write_bytes(b"a/x.jpg 2\r\n\n  b/y.jpg\t0  \nc/z.jpg 1\n\n")
  assert lists.parse_list(path, 3).line_numbers.tolist() == [1, 3, 4]


@pytest.mark.parametrize("content,line,what", [
    (b"a.jpg 0\nb.jpg\nc.jpg 1\n", 2, "expected 'relative/path label'"),
    (b"a.jpg 0\n\nb.jpg one\n", 3, "label 'one' is not a non-negative integer"),
    (b"a.jpg 0\nb.jpg 3\n", 2, "label 3 is outside [0, 3)"),
    (b"a.jpg 0\nb.jpg -1\n", 2, "label -1 is outside [0, 3)"),
])
def test_malformed_lines_name_file_and_line(tmp_path, content, line, what):
  path = tmp_path / "bad_list.txt"
  path.write_bytes(content)
  with pytest.raises(DataError) as error:
    lists.parse_list(path, 3)
  message = str(error.value)
  assert f"{path} line {line}" in message and what in message and "\n" not in message


def test_empty_training_class_names_file_and_class(tmp_path):
  path = tmp_path / "train.txt"
  path.write_text("a.jpg 0\nb.jpg 2\nc.jpg 0\n")
  with pytest.raises(DataError, match=r"train.txt: class 1 has no training image"):
    lists.check_no_empty_class(lists.parse_list(path, 3), 3)


def config(**fields):
  base = dict(name="imagenet_lt", num_classes=1000, image_root="", split_dir="",
              train_list="", val_list="", test_list="", source="auto", image_size=32,
              test_subset=0, zero_count_smoothing=0.0, tfds_data_dir="", cache_dir="")
  base.update(fields)
  return ml_collections.ConfigDict(base)


def test_missing_train_list_names_file_folder_and_source(tmp_path):
  from lt_calib.data import streaming  # pylint: disable=g-import-not-at-top
  with pytest.raises(MissingDataError) as error:
    streaming.load_streaming_dataset(config(split_dir=str(tmp_path), image_root=str(tmp_path)))
  message = str(error.value)
  assert "ImageNet_LT_train.txt" in message and str(tmp_path) in message
  assert "facebookresearch/classifier-balancing" in message
  assert "OpenLongTailRecognition-OLTR" in message and "\n" not in message


def test_default_split_dir_is_the_shared_folder():
  real_list("ImageNet_LT_test.txt")
  files = lists.resolve_list_files(config())
  assert files.split_dir == SPLITS
  assert files.train == SPLITS / "ImageNet_LT_train.txt"
  assert files.evals == {"test": SPLITS / "ImageNet_LT_test.txt",
                         "val": SPLITS / "ImageNet_LT_val.txt"}
  inat = lists.resolve_list_files(config(name="inat2018", num_classes=8142))
  assert inat.evals == {"test": SPLITS / "iNaturalist18_val.txt"}


def test_generic_image_list_needs_its_fields(tmp_path):
  with pytest.raises(ConfigError, match="dataset.split_dir is empty"):
    lists.resolve_list_files(config(name="image_list", num_classes=5))
  with pytest.raises(ConfigError, match="dataset.train_list and dataset.test_list"):
    lists.resolve_list_files(config(name="image_list", num_classes=5, split_dir=str(tmp_path)))
  with pytest.raises(ConfigError, match="dataset.num_classes must be > 0"):
    lists.resolve_list_files(config(name="image_list", num_classes=0, split_dir=str(tmp_path),
                                    train_list="a.txt", test_list="b.txt"))
  files = lists.resolve_list_files(config(name="image_list", num_classes=5,
                                          split_dir=str(tmp_path), train_list="a.txt",
                                          test_list="b.txt"))
  assert (files.num_classes, files.train, files.evals) == (5, tmp_path / "a.txt",
                                                           {"test": tmp_path / "b.txt"})


def test_image_root_must_be_set(tmp_path):
  with pytest.raises(ConfigError, match="dataset.image_root is empty"):
    lists.require_image_root(config(), lists.LAYOUTS["imagenet_lt"])
  with pytest.raises(MissingDataError, match="is not a folder"):
    lists.require_image_root(config(image_root=str(tmp_path / "nope")),
                             lists.LAYOUTS["imagenet_lt"])


def test_missing_image_in_a_small_list(tmp_path):
  (tmp_path / "a.jpg").write_bytes(b"x")
  path = tmp_path / "l.txt"
  path.write_text("a.jpg 0\n\nsub/missing.jpg 1\n")
  with pytest.raises(MissingDataError) as error:
    lists.check_paths_exist(lists.parse_list(path, 2), tmp_path)
  message = str(error.value)
  assert f"{path} line 3" in message and str(tmp_path / "sub" / "missing.jpg") in message


def test_streaming_datasets_are_registered_and_refused_in_memory():
  for name, classes in (("imagenet_lt", 1000), ("inat2018", 8142)):
    info = sources.get_info(name)
    assert info.streaming and info.num_classes == classes and info.image_size == 224
    assert (info.mean, info.std) == (sources.IMAGENET_MEAN, sources.IMAGENET_STD)
  assert sources.get_info("image_list").streaming
  assert not sources.get_info("cifar10").streaming
  with pytest.raises(ConfigError, match="load_streaming_dataset"):
    sources.load_dataset(config())


def test_small_list_existence_check_is_fast(tmp_path):
  # The ImageNet-LT test list's size: 50,000 entries, one stat each (50 files,
  # so the test does not spend its time creating them).
  for k in range(50):
    (tmp_path / f"{k}.jpg").write_bytes(b"x")
  path = tmp_path / "l.txt"
  path.write_text("".join(f"{k % 50}.jpg {k % 7}\n" for k in range(50_000)))
  parsed = lists.parse_list(path, 7)
  start = time.perf_counter()
  lists.check_paths_exist(parsed, storage.as_path(tmp_path))
  elapsed = time.perf_counter() - start
  assert elapsed < 1.0, f"checking 50,000 entries took {elapsed:.2f} s"  # ~0.2 s here.


# ---------------------------------------------------------------------------
# Lists and images on Cloud Storage (gs://): the local GCS emulator.
# ---------------------------------------------------------------------------

def upload(gcs, local_dir, stem) -> str:
  """Copies a local folder into a new gs:// folder of the emulator; returns it."""
  import fsspec  # pylint: disable=g-import-not-at-top
  remote = gcs.folder(stem)
  fsspec.filesystem("gs").put(f"{local_dir}/", f"{remote}/", recursive=True)
  return remote


def test_remote_paths_are_recognised():
  assert storage.is_remote("gs://bucket/imagenet") and storage.is_remote("s3://b/x")
  assert storage.is_remote(epath.Path("gs://bucket/imagenet"))
  assert not storage.is_remote("/data/imagenet") and not storage.is_remote("data/gs:/x")
  assert str(storage.as_path("gs://bucket/imagenet/")) == "gs://bucket/imagenet"
  assert storage.as_path("~/x") == pathlib.Path.home() / "x"


def test_lists_load_from_a_gs_split_dir(tmp_path, gcs):
  train = b"train/a/1.JPEG 0\ntrain/b/2.JPEG 2\ntrain/c/3.JPEG 1\n"
  (tmp_path / "train.txt").write_bytes(train)
  (tmp_path / "test.txt").write_bytes(b"val/x.JPEG 1\n\nval/y.JPEG 0\n")
  split_dir = upload(gcs, tmp_path, "lists")
  cfg = config(name="image_list", num_classes=3, split_dir=split_dir,
               train_list="train.txt", test_list="test.txt", val_list="val.txt")
  files = lists.resolve_list_files(cfg)
  assert str(files.train) == f"{split_dir}/train.txt"
  assert {s: str(p) for s, p in files.evals.items()} == {
      "test": f"{split_dir}/test.txt", "val": f"{split_dir}/val.txt"}
  parsed = lists.load_list(files.train, files.layout, 3)
  test = lists.load_list(files.evals["test"], files.layout, 3)
  assert not lists.list_exists(files.evals["val"])
  assert str(parsed.path) == f"{split_dir}/train.txt"
  assert parsed.rel_paths.tolist() == [b"train/a/1.JPEG", b"train/b/2.JPEG", b"train/c/3.JPEG"]
  assert parsed.labels.tolist() == [0, 2, 1]
  assert parsed.sha256 == hashlib.sha256(train).hexdigest()
  assert test.labels.tolist() == [1, 0] and test.line_numbers.tolist() == [1, 3]
  assert parsed.where(1) == f"{split_dir}/train.txt line 2 (train/b/2.JPEG)"


def test_missing_gs_list_names_the_gs_path(tmp_path, gcs):
  (tmp_path / "readme.txt").write_text("no lists here\n")
  split_dir = upload(gcs, tmp_path, "lists")
  cfg = config(split_dir=split_dir, image_root=split_dir)
  from lt_calib.data import streaming  # pylint: disable=g-import-not-at-top
  with pytest.raises(MissingDataError) as error:
    streaming.load_streaming_dataset(cfg)
  message = str(error.value)
  assert (f"list file ImageNet_LT_train.txt not found in {split_dir} "
          "(dataset.split_dir)") in message
  assert str(tmp_path) not in message and "\n" not in message


def test_gs_image_root_is_accepted_and_not_scanned(tmp_path, gcs):
  (tmp_path / "imagenet" / "train").mkdir(parents=True)
  (tmp_path / "imagenet" / "train" / "kept.JPEG").write_bytes(b"x")
  (tmp_path / "list.txt").write_text("train/a/1.JPEG 0\ntrain/b/2.JPEG 1\n")
  bucket = upload(gcs, tmp_path / "imagenet", "imagenet")
  layout = lists.LAYOUTS["imagenet_lt"]
  root = lists.require_image_root(config(image_root=bucket), layout)
  assert str(root) == bucket and storage.is_remote(root)
  # Neither image exists, and nothing is asked about them here: they are
  # reported when read (tests/test_pipeline.py).
  lists.check_paths_exist(lists.parse_list(tmp_path / "list.txt", 2), root)
  with pytest.raises(MissingDataError) as error:
    lists.require_image_root(config(image_root=f"{bucket}-nope"), layout)
  assert f"dataset.image_root='{bucket}-nope' is not a folder" in str(error.value)


@contextlib.contextmanager
def unreachable_gcs(cause):
  """Every gs:// request raises `cause`, as without credentials or network."""

  def refuse(original, path, *args, **kwargs):
    if os.fspath(path).startswith("gs://"):
      raise cause
    return original(path, *args, **kwargs)

  with epath.testing.mock_epath(exists=refuse, isdir=refuse, open=refuse, stat=refuse):
    yield


def test_unreachable_gs_paths_give_one_line(tmp_path):
  # No credentials or no network: the backend raises; the message names the
  # gs:// path and the cause, on one line.
  cause = PermissionError("403 Forbidden:\nno storage.objects.get access")
  files = lists.resolve_list_files(config(split_dir="gs://bucket/lists"))
  layout = lists.LAYOUTS["imagenet_lt"]
  del tmp_path
  with unreachable_gcs(cause):
    with pytest.raises(DataError) as list_error:
      lists.load_list(files.train, layout, 1000)
    with pytest.raises(DataError) as root_error:
      lists.require_image_root(config(image_root="gs://bucket/imagenet"), layout)
  for error, path in ((list_error, "gs://bucket/lists/ImageNet_LT_train.txt"),
                      (root_error, "gs://bucket/imagenet")):
    message = str(error.value)
    assert f"{path} (PermissionError: 403 Forbidden:)" in message, message
    assert "\n" not in message
