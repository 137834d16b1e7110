"""A long-tailed training list and its evaluation lists, read through tf.data.

ImageNet-LT and iNaturalist 2018 do not fit in device memory, so their images
are read, decoded and augmented on the host CPUs by tf.data
(lt_calib/data/preprocess.py) and reach the accelerator as uint8 batches;
normalisation, mixing and the train step stay on the device, as for the
in-memory datasets. Which rows each step uses is decided on the host before
any file is read (lt_calib/data/index_sequence.py: the in-memory run's own
sampler law and keys); each process reads only the rows of each global batch
that its devices hold (`parallel.process_rows`, in any mesh order).
"""

import dataclasses
import functools
import itertools
from typing import Iterator, Optional

import numpy as np

from lt_calib import parallel
from lt_calib.data import batches, index_sequence, lists, long_tail, preprocess, readers, sources
from lt_calib.errors import ConfigError, MissingDataError


@dataclasses.dataclass
class StreamingDataset:
  """A long-tailed training list and its evaluation lists, read through tf.data.

  Attributes:
    info: DatasetInfo with the config's num_classes and image_size.
    prior: class counts/prior of the training list.
    train_labels: int32 [N] in training-list order.
    test_labels: int32 [M] of the 'test' split, in evaluation order.
    source: one line for the console and the summary.
    identity: list file names and sha256 (+ TFDS name/version) for resume checks.
  """
  info: sources.DatasetInfo
  prior: long_tail.ClassPrior
  train_labels: np.ndarray
  test_labels: np.ndarray
  source: str
  identity: dict
  train_reader: object = dataclasses.field(default=None, repr=False)
  splits: dict = dataclasses.field(default_factory=dict, repr=False)
  # Split name -> message, for evaluation lists that are absent (e.g. 'val').
  missing_splits: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def image_shape(self) -> tuple:
    """(S, S, 3) of the images the model sees."""
    return (self.info.image_size, self.info.image_size, 3)

  # -- training -------------------------------------------------------------

  def make_feed(self, *, mesh, step_cfg, seed: int, start_step: int, global_batch: int,
                members: bool = False) -> "PipelineFeed":
    """The trainer's input: this process's rows of each step, read and augmented.

    Args:
      mesh: the training mesh.
      step_cfg: the run's StepConfig (samplers, mixing stop).
      seed: the run's seed.
      start_step: the first step (the resume step).
      global_batch: B.
      members: K runs in one program; a stream feeds one run only.
    """
    if members:
      raise ConfigError("runs in one program need an in-memory dataset; train streamed "
                        "datasets one run at a time.")
    laws = index_sequence.Laws(
        None if step_cfg.batch_log_class_probs is None
        else np.asarray(step_cfg.batch_log_class_probs),
        None if step_cfg.partner_log_probs is None else np.asarray(step_cfg.partner_log_probs))
    iterator = self.train_batches(seed=seed, start_step=start_step, global_batch=global_batch,
                                  rows=parallel.process_rows(mesh, global_batch), laws=laws,
                                  partner_until_step=step_cfg.mix_stop_step)
    return PipelineFeed(iterator, mesh, global_batch)

  def train_rows(self, sequence: index_sequence.IndexSequence, step: int, rows,
                 partners: bool = True) -> dict:
    """This host's rows of step `step`: training rows, labels and augmentation seeds.

    Returns:
      {'main', 'main_seed', 'main_label'} (+ 'partner...' when partners are
      drawn): int64 [local] rows, int64 [local, 2] seeds, int32 [local] labels.
    """
    indices = sequence(step, partners)
    out = {}
    for name, stream in (("main", index_sequence.MAIN), ("partner", index_sequence.PARTNER)):
      if name not in indices:
        continue
      seeds = index_sequence.augmentation_seeds(sequence.seed, step, stream,
                                                sequence.global_batch)
      out[name] = indices[name][rows]
      out[f"{name}_seed"] = seeds[rows]
      out[f"{name}_label"] = self.train_labels[out[name]]
    return out

  def train_batches(self, *, seed: int, start_step: int, global_batch: int, rows,
                    laws: index_sequence.Laws,
                    partner_until_step: Optional[int] = None) -> Iterator[dict]:
    """Endless training batches of this host, from step `start_step` on.

    Args:
      seed: run seed (>= 0).
      start_step: global step of the first batch (the resume step).
      global_batch: B over all processes.
      rows: the positions in each global batch this process feeds
        (`parallel.process_rows`, any subset of [0, B)).
      laws: the run's samplers (`index_sequence.Laws`).
      partner_until_step: steps from this one on carry no partner batch (the
        mixing has stopped, Algorithm 1's T1), so no partner image is read or
        decoded; None = partners throughout.

    Returns:
      An iterator of {'image': uint8 [len(rows), S, S, 3], 'label': int32
      [len(rows)]} (+ 'partner_image', 'partner_label' while partners are
      drawn), one per step.
    """
    index_sequence.check_seed(seed, start_step)
    sequence = index_sequence.IndexSequence(seed, self.train_labels, self.info.num_classes,
                                            global_batch, laws)
    rows = index_sequence.checked_rows(rows, global_batch)
    last = np.iinfo(np.int64).max
    stop = last if partner_until_step is None else max(int(partner_until_step), start_step)
    if laws.partner_log_probs is None:
      stop = start_step
    # Two pipelines in turn; the second is built (and prefetches) once reached.
    return itertools.chain(
        self._stretch(sequence, start_step, stop, rows, partners=True),
        itertools.chain.from_iterable(
            self._stretch(sequence, first, last, rows, partners=False) for first in [stop]))

  def _stretch(self, sequence, first: int, end: int, rows, partners: bool):
    """Batches of steps [first, end) of `train_batches`, one tf.data pipeline."""
    if first >= end:
      return iter(())
    tf = preprocess.tf_module()
    local, reader, size = len(rows), self.train_reader, self.info.image_size
    streams = ("main", "partner") if partners else ("main",)
    fields = [f"{n}_{k}" for n in streams for k in ("key", "seed", "label")]
    # A remote folder: each step's files are fetched together, concurrently,
    # in one Python call (one call per image costs ~5x the throughput).
    prefetch = getattr(reader, "fetches_per_step", False)
    dtypes = {"key": tf.string if prefetch else getattr(tf, reader.key_dtype),
              "seed": tf.int64, "label": tf.int32}
    shapes = {"key": [local], "seed": [local, 2], "label": [local]}

    def host_rows(step):
      # The index sequence is a pure function of the step: no state to resume.
      chosen = self.train_rows(sequence, int(step), rows, partners)
      out = []
      for n, k in (f.split("_") for f in fields):
        if k == "key":
          keys = reader.keys(chosen[n])
          out.append(reader.fetch(keys) if prefetch else keys)
        else:
          out.append(chosen[f"{n}_{k}"])
      return out

    def step_rows(step):
      values = tf.numpy_function(host_rows, [step], [dtypes[f.split("_")[1]] for f in fields],
                                 stateful=False)
      for value, field in zip(values, fields):
        value.set_shape(shapes[field.split("_")[1]])
      return dict(zip(fields, values))

    def read(key):
      return key if prefetch else reader.read(key)

    def decode(row):
      out = {"image": preprocess.train_image(read(row["main_key"]), row["main_seed"], size),
             "label": row["main_label"]}
      if partners:
        out["partner_image"] = preprocess.train_image(read(row["partner_key"]),
                                                      row["partner_seed"], size)
        out["partner_label"] = row["partner_label"]
      return out

    dataset = tf.data.Dataset.range(first, end).map(step_rows)
    dataset = dataset.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=True)
    dataset = dataset.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def problem_at(step):
      chosen = self.train_rows(sequence, step, rows, partners)
      for name in streams:
        for row, seed_row in zip(chosen[name], chosen[f"{name}_seed"]):
          problem = readers.first_problem(
              reader, [row], functools.partial(preprocess.train_check, seed=seed_row,
                                               size=size))
          if problem is not None:
            return problem
      return None

    return readers.guarded(dataset.as_numpy_iterator(), first, problem_at)

  # -- evaluation -----------------------------------------------------------

  def eval_split(self, split: str) -> readers.Split:
    if split in self.splits:
      return self.splits[split]
    if split in self.missing_splits:
      raise MissingDataError(self.missing_splits[split])
    raise ConfigError(f"evaluation split {split!r} is unknown; allowed: "
                      f"{sorted(set(self.splits) | set(self.missing_splits))}.")

  def eval_labels(self, split: str = "test") -> np.ndarray:
    """int32 [M] labels of `split` in evaluation order (index i -> label i)."""
    return self.eval_split(split).labels

  def num_eval_batches(self, *, global_batch: int, split: str = "test") -> int:
    return len(index_sequence.eval_positions(len(self.eval_split(split).rows), global_batch))

  def eval_batches(self, *, global_batch: int, rows, split: str = "test") -> Iterator[dict]:
    """Every image of `split` once, padded to whole global batches.

    Every process yields `num_eval_batches` batches; a padding row has index
    -1, label 0 and a black image, so count only rows with index >= 0.

    Args:
      global_batch: B over all processes.
      rows: the positions in each global batch this process feeds
        (`parallel.process_rows`).
      split: 'test' or 'val'.

    Yields:
      {'image': uint8 [len(rows), S, S, 3], 'label': int32 [len(rows)], 'index':
      int64 [len(rows)]} where index is the row's position in the split (-1 =
      padding).
    """
    tf = preprocess.tf_module()
    split_data = self.eval_split(split)
    feed_rows = index_sequence.checked_rows(rows, global_batch)
    local = len(feed_rows)
    positions = index_sequence.eval_positions(len(split_data.rows), global_batch)
    host = positions[:, feed_rows].reshape(-1)
    real = host >= 0
    rows = split_data.rows[np.where(real, host, 0)]
    reader, size = split_data.reader, self.info.image_size
    dataset = tf.data.Dataset.from_tensor_slices({
        "key": reader.keys(rows).astype(np.bytes_) if reader.key_dtype == "string"
               else reader.keys(rows),
        "label": np.where(real, split_data.image_list.labels[rows], 0).astype(np.int32),
        "index": host})

    def decode(row):
      image = tf.cond(row["index"] >= 0,
                      lambda: preprocess.eval_image(reader.read(row["key"]), size),
                      lambda: tf.zeros([size, size, 3], tf.uint8))
      return {"image": image, "label": row["label"], "index": row["index"]}

    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def problem_at(batch):
      batch_rows = host[batch * local:(batch + 1) * local]
      batch_rows = split_data.rows[batch_rows[batch_rows >= 0]]
      return readers.first_problem(reader, batch_rows,
                                   functools.partial(preprocess.eval_image, image_size=size))

    return readers.guarded(dataset.as_numpy_iterator(), 0, problem_at)

  def validation_batches(self, *, per_class: int, global_batch: int, rows) -> tuple:
    """(labels, batches) of the 'val' list, for temperature scaling.

    `per_class` is the in-memory datasets' knob; a list has what it has.

    Raises:
      MissingDataError: the dataset has no 'val' list.
    """
    del per_class
    return (self.eval_labels("val"),
            self.eval_batches(global_batch=global_batch, rows=rows, split="val"))


class PipelineFeed:
  """A streamed run's input: each step's global batch, from tf.data.

  The host hands over one batch per step (`fed`); nothing stays on the
  devices (`resident` is empty).
  """
  on_device = False
  resident = ()

  def __init__(self, iterator, mesh, global_batch: int):
    self._iterator, self._mesh, self._global_batch = iterator, mesh, global_batch

  def fed(self, step: int, run_keys=None):
    """The global batch of `step` (steps are asked for in order)."""
    del step, run_keys
    return parallel.to_global(next(self._iterator), self._mesh, self._global_batch)

  @staticmethod
  def batch(resident, fed, step, key, cfg) -> dict:
    del resident, step
    return batches.streamed_batch(fed, key, cfg)


def _file_readers(cfg, files, train_list, eval_lists):
  """FileReaders over dataset.image_root; small lists checked for existence now.

  A remote root (gs://) is only checked to exist: its images are checked when
  read (see lists.check_paths_exist).
  """
  root = lists.require_image_root(cfg, files.layout)
  for image_list in [train_list, *eval_lists.values()]:
    if len(image_list) <= lists.EXISTENCE_CHECK_MAX_LINES:
      lists.check_paths_exist(image_list, root)
  eval_readers = {s: readers.FileReader(l, root) for s, l in eval_lists.items()}
  return (readers.FileReader(train_list, root), eval_readers,
          f"lists:{files.split_dir} images:{root}")


def _load_lists(files: lists.ListFiles, smoothing: float):
  """(train list, {split: eval list}, {split: message} of absent optional lists)."""
  train_list = lists.load_list(files.train, files.layout, files.num_classes)
  if smoothing == 0:
    lists.check_no_empty_class(train_list, files.num_classes)
  eval_lists, missing = {}, {}
  for split, path in files.evals.items():
    if split == "test" or lists.list_exists(path):  # Only the test list is required.
      eval_lists[split] = lists.load_list(path, files.layout, files.num_classes)
    else:
      missing[split] = lists.missing_list_message(path, files.layout)
  return train_list, eval_lists, missing


def _eval_splits(eval_lists, eval_readers, num_classes: int, test_subset: int) -> dict:
  """_Split per evaluation list; test_subset keeps the first k/C test images per class."""
  splits = {}
  for split, image_list in eval_lists.items():
    rows = (sources.test_indices(image_list.labels, num_classes, test_subset)
            if split == "test" else np.arange(len(image_list)))
    splits[split] = readers.Split(image_list, eval_readers[split], rows.astype(np.int64))
  return splits


def load_streaming_dataset(cfg) -> StreamingDataset:
  """Parses and checks the lists of `cfg` and prepares their readers.

  Args:
    cfg: the `config.dataset` ConfigDict (name, num_classes, image_size,
      image_root, split_dir, train_list/test_list/val_list, source,
      tfds_data_dir, cache_dir, test_subset, zero_count_smoothing).

  Returns:
    StreamingDataset; no image has been read yet.
  """
  info = sources.get_info(cfg.name)
  if not info.streaming:
    raise ConfigError(f"dataset.name={cfg.name!r} is held in memory: load it with "
                      "lt_calib.data.sources.load_dataset.")
  files = lists.resolve_list_files(cfg)
  num_classes = files.num_classes
  if cfg.get("num_classes") and int(cfg.num_classes) != num_classes:
    raise ConfigError(f"dataset.num_classes={cfg.num_classes} disagrees with "
                      f"{cfg.name!r}, which has {num_classes} classes.")
  image_size = int(cfg.get("image_size") or info.image_size)
  if image_size <= 0:
    raise ConfigError(f"dataset.image_size must be > 0, got {image_size}.")
  smoothing = float(cfg.get("zero_count_smoothing", 0.0))
  train_list, eval_lists, missing = _load_lists(files, smoothing)
  source_name = cfg.get("source", "auto")
  if source_name == "tfds":
    from lt_calib.data import tfds_source  # pylint: disable=g-import-not-at-top
    train_reader, eval_readers, source, tfds_identity = tfds_source.readers(
        cfg, train_list, eval_lists)
  elif source_name in sources.SOURCES:  # 'auto' / 'offline': lists + image folder.
    train_reader, eval_readers, source = _file_readers(cfg, files, train_list, eval_lists)
    tfds_identity = {}
  else:
    raise ConfigError(f"dataset.source={source_name!r} is unknown; allowed: {sources.SOURCES}.")

  splits = _eval_splits(eval_lists, eval_readers, num_classes, int(cfg.get("test_subset", 0) or 0))
  identity = {**tfds_identity}
  for split, image_list in [("train", train_list), *eval_lists.items()]:
    identity[f"{split}_list"] = image_list.path.name
    identity[f"{split}_list_sha256"] = image_list.sha256
  return StreamingDataset(
      info=dataclasses.replace(info, num_classes=num_classes, image_size=image_size),
      prior=long_tail.class_prior(train_list.labels, num_classes, smoothing),
      train_labels=train_list.labels, test_labels=splits["test"].labels, source=source,
      identity=identity, train_reader=train_reader, splits=splits, missing_splits=missing)
