"""Split lists: the real published lists, parsing, validation and the messages of each error."""

import hashlib
import pathlib
import time

import ml_collections
import numpy as np
import pytest

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
  from lt_calib.data import pipeline  # pylint: disable=g-import-not-at-top
  with pytest.raises(MissingDataError) as error:
    pipeline.load_streaming_dataset(config(split_dir=str(tmp_path), image_root=str(tmp_path)))
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
