"""Dataset sources: offline `.npz` files of JPEG bytes, and TFDS.

Both sources end in the same in-memory arrays (uint8 NHWC images, int labels)
so the rest of the library never sees where the data came from. The offline
path decodes with Pillow and needs no TensorFlow, so it runs on accelerator
hosts that lack it; decoded arrays are cached (plain `.npz`, no pickles).

Source resolution for `dataset.source='auto'`: the offline file of the dataset
is looked up in, in this order, `dataset.data_file`, `$LT_CALIB_DATA_DIR`,
`<repo>/data/` and `<repo>/../shared/data/`; if none exists, TFDS is used.
"""

import dataclasses
from typing import Iterator, Optional

import jax
import numpy as np

from lt_calib import parallel
from lt_calib.data import batches, long_tail, offline
from lt_calib.errors import ConfigError, DataError, MissingDataError, MissingDependencyError
from lt_calib.method import sampling

SOURCES = ("auto", "offline", "tfds")
# LDAM-DRW / Prior-LT normalisation constants for both CIFARs.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset.

  `pool_is_long_tailed` marks an offline pool that is already the rho=`pool_rho`
  long-tailed split stored in kept order (Tiny-ImageNet-LT): any rho >= pool_rho
  keeps the first n_c images of each class, which is the CIFAR-LT rule.
  `streaming` marks a dataset read from split lists through tf.data
  (lt_calib.data.streaming.load_streaming_dataset), never held in memory.
  """
  num_classes: int
  image_size: int
  n_max: int
  offline_file: Optional[str]
  tfds_name: Optional[str]
  mean: tuple
  std: tuple
  pool_is_long_tailed: bool = False
  pool_rho: float = 1.0
  streaming: bool = False


DATASETS = {
    "cifar10": DatasetInfo(10, 32, 5000, "cifar10_jpeg.npz", "cifar10",
                           CIFAR_MEAN, CIFAR_STD),
    # No offline copy ships here; a user may drop `cifar100_jpeg.npz` in the
    # same format into any searched folder.
    "cifar100": DatasetInfo(100, 32, 500, "cifar100_jpeg.npz", "cifar100",
                            CIFAR_MEAN, CIFAR_STD),
    "tiny_imagenet_lt": DatasetInfo(200, 64, 500, "tiny_imagenet_lt10_jpeg.npz",
                                    None, IMAGENET_MEAN, IMAGENET_STD,
                                    pool_is_long_tailed=True, pool_rho=10.0),
    # Streamed from split lists (lt_calib/data/lists.py, docs/data.md); n_max is
    # the largest class of the published training list. 'image_list' takes
    # num_classes and image_size from the config (0 here = unset).
    "imagenet_lt": DatasetInfo(1000, 224, 1280, None, "imagenet2012", IMAGENET_MEAN,
                               IMAGENET_STD, streaming=True),
    "inat2018": DatasetInfo(8142, 224, 1000, None, "i_naturalist2018", IMAGENET_MEAN,
                            IMAGENET_STD, streaming=True),
    "image_list": DatasetInfo(0, 224, 0, None, None, IMAGENET_MEAN, IMAGENET_STD,
                              streaming=True),
}


@dataclasses.dataclass
class Dataset:
  """A long-tailed training set and its balanced test set, in memory.

  It implements the interface every dataset does (lt_calib/data/__init__.py).
  """
  train_images: np.ndarray  # uint8 [N, H, W, 3]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  info: DatasetInfo
  prior: long_tail.ClassPrior
  source: str               # human-readable origin, for the summary.
  identity: dict = dataclasses.field(default_factory=dict)  # Filled by run_identity.
  config: object = dataclasses.field(default=None, repr=False)  # config.dataset.

  @property
  def image_shape(self) -> tuple:
    """(H, W, 3) of the images the model sees."""
    return tuple(self.train_images.shape[1:])

  def make_feed(self, *, mesh, step_cfg, seed: int, start_step: int, global_batch: int,
                members: bool = False) -> "ArrayFeed":
    """The trainer's input: the training set on every device, sampled there."""
    del step_cfg, seed, start_step
    return ArrayFeed(self.train_images, self.train_labels, mesh, members,
                     len(self.train_labels) // global_batch)

  def eval_batches(self, *, global_batch: int, rows: np.ndarray,
                   split: str = "test") -> Iterator[dict]:
    """This process's rows of every padded evaluation batch (`padded_batches`)."""
    if split != "test":
      raise ConfigError(f"evaluation split {split!r} is unknown; allowed: ['test'].")
    return padded_batches(self.test_images, self.test_labels, global_batch, rows)

  def validation_batches(self, *, per_class: int, global_batch: int, rows) -> tuple:
    """(labels, batches) of `per_class` unused training-pool images per class.

    Raises:
      MissingDataError: no offline file to draw them from (TFDS source).
    """
    images, labels = load_validation_split(self.config, per_class)
    return labels, padded_batches(images, labels, global_batch, rows)


class ArrayFeed:
  """An in-memory run's input: the training set on every device, sampled there.

  What the host hands over per dispatch (`fed`) is R's permutation of the
  epoch, drawn once per epoch; every step of a stretch gathers, crops, flips
  and mixes its rows on the devices (`batches.prepare_batch`), so whole
  epochs run without the host.
  """
  on_device = True

  def __init__(self, images, labels, mesh, members: bool, steps_per_epoch: int):
    self.resident = (images, labels)
    self.steps_per_epoch = steps_per_epoch
    num_examples = len(labels)

    def permutation(run_keys, epoch):
      return sampling.epoch_permutation(run_keys.data, epoch, num_examples)

    if members:  # K runs in one program: one permutation per run.
      permutation = jax.vmap(permutation, in_axes=(0, None))
    self._permutation = jax.jit(permutation, out_shardings=parallel.replicated(mesh))
    self._epoch, self._value = None, None

  def fed(self, step: int, run_keys):
    """R's permutation of `step`'s epoch (computed once per epoch)."""
    epoch = step // self.steps_per_epoch
    if self._epoch != epoch:
      self._value, self._epoch = self._permutation(run_keys, epoch), epoch
    return self._value

  @staticmethod
  def batch(resident, fed, step, key, cfg) -> dict:
    return batches.prepare_batch(*resident, step, key, fed, cfg)


def padded_batches(images: np.ndarray, labels: np.ndarray, global_batch: int,
                   rows: np.ndarray) -> Iterator[dict]:
  """Padded evaluation batches of in-memory arrays, this process's rows.

  Args:
    images: uint8 [M, H, W, 3], the whole split (every process has it).
    labels: int [M].
    global_batch: rows per global batch.
    rows: this process's rows of each global batch (`parallel.process_rows`).

  Yields:
    {'image', 'label', 'index'} with len(rows) rows; 'index' is the position
    in the split, -1 for padding (a black image, label 0).
  """
  for start in range(0, len(images), global_batch):
    index = start + np.asarray(rows, np.int64)
    valid = index < len(images)
    safe = np.where(valid, index, 0)
    yield {"image": np.where(valid[:, None, None, None], images[safe], 0).astype(np.uint8),
           "label": np.where(valid, labels[safe], 0).astype(np.int32),
           "index": np.where(valid, index, -1)}


def get_info(name: str) -> DatasetInfo:
  """Looks up a dataset by name, with the allowed names in the error."""
  if name not in DATASETS:
    raise ConfigError(f"dataset.name={name!r} is unknown; allowed: {sorted(DATASETS)}.")
  return DATASETS[name]


def largest_class(info: DatasetInfo, cfg) -> int:
  """n_max of the long-tail rule: `dataset.n_max`, or all the pool holds (0)."""
  n_max = int(cfg.get("n_max", 0) or info.n_max)
  if not 0 < n_max <= info.n_max:
    raise ConfigError(f"dataset.n_max={n_max} is outside [1, {info.n_max}], the images a "
                      f"class of {cfg.name!r} has; use 0 (all of them) or a value in that range.")
  return n_max


def train_indices(info: DatasetInfo, labels: np.ndarray, cfg) -> np.ndarray:
  """Indices of the long-tailed training split within the stored pool."""
  counts = long_tail.long_tail_counts(largest_class(info, cfg), info.num_classes,
                                      cfg.imbalance_ratio, cfg.imbalance_type)
  if not info.pool_is_long_tailed:
    return long_tail.select_long_tail(labels, counts, seed=cfg.lt_seed)
  if cfg.imbalance_type != "exp" or cfg.imbalance_ratio < info.pool_rho:
    raise ConfigError(
        f"the offline pool of this dataset is its rho={info.pool_rho:g} 'exp' "
        f"split: dataset.imbalance_ratio must be >= {info.pool_rho:g} and "
        "dataset.imbalance_type='exp'.")
  # Stored in kept order: the first n_c of each class are the rho split.
  return np.concatenate([np.where(labels == c)[0][:n] for c, n in enumerate(counts)])


def test_indices(labels: np.ndarray, num_classes: int, subset: int) -> np.ndarray:
  """All test indices, or a class-balanced subset (first k of each class)."""
  if subset <= 0:
    return np.arange(len(labels))
  per_class = -(-subset // num_classes)
  return np.sort(np.concatenate(
      [np.where(labels == c)[0][:per_class] for c in range(num_classes)]))


def _check_labels(labels, num_classes, what, source):
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
        f"{what} labels of {source} span [{labels.min()}, {labels.max()}], outside "
        f"[0, {num_classes}): the data holds another dataset than dataset.name "
        "says; check dataset.name and dataset.data_file.")


def _load_offline(path, info, cfg):
  archive = offline.read_npz(path)
  for split in ("train", "test"):
    offline.check_split(archive, split, path)
  train_labels = archive["train_labels"].astype(np.int64)
  test_labels = archive["test_labels"].astype(np.int64)
  _check_labels(train_labels, info.num_classes, "training", path)
  _check_labels(test_labels, info.num_classes, "test", path)
  train_idx = train_indices(info, train_labels, cfg)
  test_idx = test_indices(test_labels, info.num_classes, cfg.test_subset)
  cache_dir = offline.cache_dir(cfg)
  train_images = offline.decode_cached(path, archive, "train", train_idx, info, cache_dir)
  test_images = offline.decode_cached(path, archive, "test", test_idx, info, cache_dir)
  return (train_images, train_labels[train_idx], test_images,
          test_labels[test_idx], f"offline:{path}")


def _load_tfds(name, info, cfg):
  """Reads a whole TFDS dataset into memory (fine for CIFAR-sized data)."""
  if info.tfds_name is None:
    raise ConfigError(f"dataset {name!r} has no TFDS source: set dataset.source="
                      "'offline' and give its offline file.")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError(
        f"dataset {name!r} comes from TFDS here (no offline file was found), which "
        "needs TensorFlow and TFDS: pip install -e '.[tfds]', or give the offline "
        "file with dataset.data_file.") from e
  # TensorFlow must not take accelerator memory that JAX needs.
  tf.config.set_visible_devices([], "GPU")
  splits = {}
  for split in ("train", "test"):
    dataset = tfds.load(info.tfds_name, split=split, as_supervised=True,
                        data_dir=cfg.get("tfds_data_dir") or None)
    chunks = list(tfds.as_numpy(dataset.batch(8192)))
    splits[split] = (np.concatenate([c[0] for c in chunks]).astype(np.uint8),
                     np.concatenate([c[1] for c in chunks]).astype(np.int64))
  (train_images, train_labels), (test_images, test_labels) = splits["train"], splits["test"]
  _check_labels(train_labels, info.num_classes, "training", f"tfds:{info.tfds_name}")
  _check_labels(test_labels, info.num_classes, "test", f"tfds:{info.tfds_name}")
  # TFDS stores CIFAR in its own shuffled order, so the same rule keeps the same
  # class counts but not the same images as on the original files.
  train_idx = train_indices(info, train_labels, cfg)
  test_idx = test_indices(test_labels, info.num_classes, cfg.test_subset)
  return (train_images[train_idx], train_labels[train_idx], test_images[test_idx],
          test_labels[test_idx], f"tfds:{info.tfds_name}")


def load_dataset(cfg) -> Dataset:
  """Loads the long-tailed training set and the balanced test set.

  Args:
    cfg: the `config.dataset` ConfigDict (name, source, data_file, num_classes,
      imbalance_ratio, imbalance_type, lt_seed, test_subset, cache_dir,
      zero_count_smoothing).

  Returns:
    Dataset with the train prior computed once.
  """
  info = get_info(cfg.name)
  if info.streaming:
    raise ConfigError(f"dataset.name={cfg.name!r} is streamed from split lists, not held "
                      "in memory: load it with lt_calib.data.streaming.load_streaming_dataset.")
  if cfg.num_classes != info.num_classes:
    raise ConfigError(f"dataset.num_classes={cfg.num_classes} disagrees with "
                      f"{cfg.name!r}, which has {info.num_classes} classes.")
  if cfg.source not in SOURCES:
    raise ConfigError(f"dataset.source={cfg.source!r} is unknown; allowed: {SOURCES}.")
  paths = offline.candidate_paths(info, cfg.get("data_file", ""))
  found = next((p for p in paths if p.is_file()), None)
  if cfg.get("data_file") and found != paths[0]:
    where = "" if str(paths[0]) == cfg.data_file else f" ({paths[0]})"
    raise MissingDataError(
        f"dataset.data_file={cfg.data_file!r} does not exist{where}; fix the path to "
        f"the .npz file (format: {offline.NPZ_FORMAT}), or set dataset.data_file='' to "
        "search the default places.")
  if cfg.source == "offline" and found is None:
    raise MissingDataError(offline.missing_data_message(cfg.name, paths))
  if cfg.source == "tfds" and info.tfds_name is None:
    raise ConfigError(f"dataset.source='tfds': dataset {cfg.name!r} has no TFDS "
                      "source; use dataset.source='offline' or 'auto' with its "
                      "offline file.")
  if cfg.source == "tfds" or found is None:
    if info.tfds_name is None:
      raise MissingDataError(offline.missing_data_message(cfg.name, paths))
    arrays = _load_tfds(cfg.name, info, cfg)
  else:
    arrays = _load_offline(found, info, cfg)
  train_images, train_labels, test_images, test_labels, source = arrays
  prior = long_tail.class_prior(train_labels, info.num_classes,
                                cfg.get("zero_count_smoothing", 0.0))
  return Dataset(train_images, train_labels.astype(np.int32), test_images,
                 test_labels.astype(np.int32), info, prior, source, config=cfg)


def validation_indices(labels: np.ndarray, kept_train_indices: np.ndarray,
                       per_class: int, seed: int = 0) -> np.ndarray:
  """A per-class validation split from training-pool images left out of training.

  Only pool images NOT in the long-tailed training set are candidates, so the
  standard CIFAR-LT training set is unchanged and the split never touches the
  test set. Each class (in class order, one `np.random.RandomState(seed)`)
  draws `per_class` of its unused images; a class with fewer unused images
  (class 0 of CIFAR-10-LT keeps all 5,000) gives what it has -- callers
  record the actual counts with `np.bincount(labels[indices])`.

  Args:
    labels: int [N] labels of the whole training pool.
    kept_train_indices: indices of the training set within the pool.
    per_class: images wanted per class.
    seed: seed of the RandomState.

  Returns:
    int64 sorted pool indices.
  """
  labels = np.asarray(labels)
  unused = np.ones(len(labels), bool)
  unused[np.asarray(kept_train_indices, np.int64)] = False
  rng = np.random.RandomState(seed)
  chosen = []
  for c in range(int(labels.max()) + 1 if labels.size else 0):
    candidates = np.where(unused & (labels == c))[0]
    chosen.append(rng.permutation(candidates)[:per_class])
  if not chosen:
    return np.zeros(0, np.int64)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_validation_split(cfg, per_class: int, seed: int = 0) -> tuple:
  """Images and labels of `validation_indices` for the config's training set.

  Offline source only (the TFDS pool is in another order, so its unused
  images differ); raises FileNotFoundError without an offline file.

  Args:
    cfg: the `config.dataset` ConfigDict of the run.
    per_class: images wanted per class.
    seed: seed of the split.

  Returns:
    (uint8 images [n, H, W, 3], int32 labels [n]).
  """
  info = get_info(cfg.name)
  paths = offline.candidate_paths(info, cfg.get("data_file", ""))
  found = offline.find_file(info, cfg.get("data_file", ""))
  if found is None or cfg.get("source", "auto") == "tfds":
    raise MissingDataError("the validation split needs the offline data file: "
                           + offline.missing_data_message(cfg.name, paths))
  archive = offline.read_npz(found)
  labels = archive["train_labels"].astype(np.int64)
  index = validation_indices(labels, train_indices(info, labels, cfg), per_class, seed)
  images = offline.decode_cached(found, archive, "train", index, info, offline.cache_dir(cfg))
  return images, labels[index].astype(np.int32)


