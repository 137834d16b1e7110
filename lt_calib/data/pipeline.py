"""Streaming input for large datasets: split lists (or TFDS) through tf.data.

ImageNet-LT and iNaturalist 2018 do not fit in device memory, so their images
are read, decoded and augmented on the host CPUs by tf.data and reach the
accelerator as uint8 batches; normalisation, mixing and the train step stay on
the device, as for the in-memory datasets.

Determinism and resumption. Which images make up each step is decided in NumPy
before any file is read, as a pure function of (seed, global step):

- main batch, sampler R: epoch e = step // steps_per_epoch is a permutation of
  the N training images drawn by `default_rng((seed, STREAM_EPOCH, e))`; step
  takes positions (step % steps_per_epoch) * B ... + B of it (the last partial
  batch of an epoch is dropped, as in the in-memory path);
- main batch, class-level re-sampler, and the UniMix partner batch R*: a class
  c with probability exp(log_class_probs[c]), then an image of c uniformly,
  from `default_rng((seed, stream, step))`;
- augmentation: two stateless seeds per row of the GLOBAL batch from
  `default_rng((seed, STREAM_AUGMENT, stream, step))`, consumed by
  tf.image.stateless_* ops.

So a run resumed at step k reads and augments exactly what an uninterrupted run
would, whatever was prefetched, and what a row holds does not depend on how
many hosts there are: each host feeds the rows of the global batch that its
devices hold (`parallel.process_rows`, in any mesh order). The class probabilities are the caller's (computed with
`lt_calib.data.sampling.class_level_log_probs`, as in the in-memory path).

TensorFlow is imported lazily, inside the functions that build pipelines:
`import lt_calib.data.pipeline` works without it, and GPUs are hidden from it
so that it never takes accelerator memory from JAX.
"""

import dataclasses
import functools
import itertools
import os
import re
from typing import Iterator, NamedTuple, Optional

import numpy as np

from lt_calib import storage
from lt_calib.data import lists, long_tail, sources
from lt_calib.errors import ConfigError, DataError, MissingDataError, MissingDependencyError

# Random streams of the index sequence: (seed, stream, epoch or step) seeds a
# fresh generator, so no draw depends on how many draws came before it.
STREAM_EPOCH = 1         # Epoch permutation R.
STREAM_MAIN_CLASS = 2    # Class-level re-sampler of the main batch.
STREAM_PARTNER = 3       # UniMix partner sampler R*.
STREAM_AUGMENT = 4       # Per-row seeds of the stateless augmentation.
MAIN, PARTNER = 0, 1     # Augmentation sub-streams.

# Random-resized-crop of torchvision / classifier-balancing.
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Evaluation: shorter side to image_size / 0.875 (256 for 224), centre crop.
EVAL_CROP_FRACTION = 0.875
# PIL (torchvision's backend) low-pass filters when it shrinks; so do we.
ANTIALIAS = True


# ---------------------------------------------------------------------------
# The index sequence (NumPy only).
# ---------------------------------------------------------------------------

class ClassMembers(NamedTuple):
  """Training rows grouped by class, so a class-level sampler can pick in one."""
  order: np.ndarray   # int64 [N]: rows sorted by class (stable).
  start: np.ndarray   # int64 [C]: where class c begins in `order`.
  counts: np.ndarray  # int64 [C]: n_c.


def class_members(labels: np.ndarray, num_classes: int) -> ClassMembers:
  """Builds the per-class lookup of `class_level_indices`."""
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
  return ClassMembers(np.argsort(labels, kind="stable").astype(np.int64),
                      np.cumsum(counts) - counts, counts)


def _check_seed(seed: int, step: int) -> None:
  # SeedSequence takes non-negative integers only.
  if seed < 0 or step < 0:
    raise ConfigError(f"seed and step must be >= 0 for the input pipeline, got "
                      f"seed={seed}, step={step}.")


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """N // B: the last partial batch of an epoch is dropped."""
  if global_batch <= 0 or num_examples < global_batch:
    raise ConfigError(f"batch_size={global_batch} must be in [1, {num_examples}], "
                      "the number of training images.")
  return num_examples // global_batch


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  permutation = np.random.default_rng((seed, STREAM_EPOCH, epoch)).permutation(num_examples)
  permutation.flags.writeable = False  # Shared by the cache.
  return permutation


def epoch_batch_indices(seed: int, step: int, num_examples: int,
                        global_batch: int) -> np.ndarray:
  """Rows of global batch `step` under the epoch-permutation sampler R.

  Args:
    seed: run seed (>= 0).
    step: global step (>= 0).
    num_examples: N.
    global_batch: B.

  Returns:
    int64 [B] training rows, distinct within an epoch.
  """
  _check_seed(seed, step)
  epoch, position = divmod(step, steps_per_epoch(num_examples, global_batch))
  permutation = _epoch_permutation(seed, epoch, num_examples)
  return permutation[position * global_batch:(position + 1) * global_batch].astype(np.int64)


def class_level_indices(seed: int, step: int, stream: int, members: ClassMembers,
                        log_class_probs: np.ndarray, global_batch: int) -> np.ndarray:
  """Rows drawn by a class-level sampler: class c ∝ exp(log_class_probs[c]), then uniform.

  A class without training images (possible with zero_count_smoothing) is
  never drawn, as in `sampling.class_level_sample`.

  Args:
    seed: run seed.
    step: global step.
    stream: STREAM_MAIN_CLASS or STREAM_PARTNER.
    members: ClassMembers of the training labels.
    log_class_probs: float [C] log class probabilities.
    global_batch: B (draws with replacement).

  Returns:
    int64 [B] training rows.
  """
  _check_seed(seed, step)
  log_class_probs = np.asarray(log_class_probs, np.float64)
  if log_class_probs.shape != members.counts.shape or np.isnan(log_class_probs).any():
    raise ConfigError(f"log class probabilities must be [C={len(members.counts)}] "
                      f"without NaN, got shape {log_class_probs.shape}.")
  weights = np.where(members.counts > 0, np.exp(log_class_probs - log_class_probs.max()), 0.0)
  rng = np.random.default_rng((seed, stream, step))
  classes = rng.choice(len(weights), size=global_batch, p=weights / weights.sum())
  offsets = rng.integers(0, members.counts[classes])
  return members.order[members.start[classes] + offsets]


def augmentation_seeds(seed: int, step: int, stream: int, global_batch: int) -> np.ndarray:
  """int64 [B, 2] seeds of the stateless crop/flip of each global-batch row."""
  _check_seed(seed, step)
  rng = np.random.default_rng((seed, STREAM_AUGMENT, stream, step))
  return rng.integers(0, 2**31 - 1, size=(global_batch, 2), dtype=np.int64)


def global_batch_indices(seed: int, step: int, *, num_examples: int, global_batch: int,
                         members: Optional[ClassMembers] = None,
                         main_log_class_probs: Optional[np.ndarray] = None,
                         partner_log_class_probs: Optional[np.ndarray] = None) -> dict:
  """The training rows of global step `step`: a pure function of (seed, step).

  Args:
    seed: run seed (>= 0).
    step: global step (>= 0).
    num_examples: N.
    global_batch: B.
    members: ClassMembers, needed when either log-prob vector is given.
    main_log_class_probs: [C] log probabilities of a class-level main sampler;
      None = the epoch permutation R.
    partner_log_class_probs: [C] log P_inv of the partner sampler R*; None =
      no partner batch.

  Returns:
    {'main': int64 [B]} plus 'partner': int64 [B] when partners are drawn.
  """
  if main_log_class_probs is None:
    rows = {"main": epoch_batch_indices(seed, step, num_examples, global_batch)}
  else:
    rows = {"main": class_level_indices(seed, step, STREAM_MAIN_CLASS, members,
                                        main_log_class_probs, global_batch)}
  if partner_log_class_probs is not None:
    rows["partner"] = class_level_indices(seed, step, STREAM_PARTNER, members,
                                          partner_log_class_probs, global_batch)
  return rows


def checked_rows(rows, global_batch: int) -> np.ndarray:
  """A process's rows of the global batch (`parallel.process_rows`), checked.

  Raises:
    ConfigError: a row outside [0, global_batch), a repeated row, or no row.
  """
  rows = np.asarray(rows, np.int64)
  if rows.ndim != 1 or not rows.size or rows.min() < 0 or rows.max() >= global_batch \
      or np.unique(rows).size != rows.size:
    raise ConfigError(f"the rows of this process must be distinct positions in "
                      f"[0, {global_batch}), got {rows.tolist()[:8]}...")
  return rows


def eval_positions(num_examples: int, global_batch: int) -> np.ndarray:
  """int64 [num_batches, B]: positions 0..M-1 of the split, then -1 padding."""
  num_batches = max(1, -(-num_examples // global_batch))
  positions = np.arange(num_batches * global_batch, dtype=np.int64)
  return np.where(positions < num_examples, positions, -1).reshape(num_batches, global_batch)


# ---------------------------------------------------------------------------
# Decoding and augmentation (TensorFlow, imported lazily).
# ---------------------------------------------------------------------------

_GPUS_HIDDEN = []


def _tf():
  """TensorFlow, with GPUs hidden (once) so that it never takes JAX's memory."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError("the streaming input pipeline (dataset.name of split "
                                 "lists) needs TensorFlow: pip install -e '.[tfds]'.") from e
  if not _GPUS_HIDDEN:
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices (another module did).
      pass
    _GPUS_HIDDEN.append(True)
  return tf


def _decode_window(tf, data, window_fn=None):
  """Decodes an image, or its window `window_fn(shape)` = (begin [3], size [3]).

  JPEGs are decoded inside the window only (decode_and_crop_jpeg); anything
  else tf.io.decode_image reads (PNG, GIF, BMP files with a .JPEG name exist
  in ImageNet) is decoded whole, then cropped. Always 3 channels (grayscale
  and CMYK images become RGB).
  """
  def jpeg():
    if window_fn is None:
      return tf.io.decode_jpeg(data, channels=3)
    begin, size = window_fn(tf.io.extract_jpeg_shape(data))
    crop = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.io.decode_and_crop_jpeg(data, crop, channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    if window_fn is None:
      return image
    begin, size = window_fn(tf.shape(image))
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _to_uint8(tf, image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def train_image(data, seed, image_size: int):
  """Random-resized-crop (scale (0.08, 1), ratio (3/4, 4/3)) + flip, to uint8.

  As torchvision's RandomResizedCrop: 10 tries of an area fraction and an
  aspect ratio; if none fits, the whole image (torchvision: a centre crop).

  Args:
    data: scalar tf.string, the encoded image.
    seed: int64 [2] stateless seed of this row.
    image_size: output side S.

  Returns:
    uint8 [S, S, 3].
  """
  tf = _tf()
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=CROP_RATIO,
        area_range=CROP_AREA, max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  image = _decode_window(tf, data, window)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear",
                          antialias=ANTIALIAS)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return _to_uint8(tf, image)


def eval_image(data, image_size: int):
  """Shorter side to round(S / 0.875), centre crop S x S (torchvision Resize + CenterCrop)."""
  tf = _tf()
  image = _decode_window(tf, data)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  target = int(round(image_size / EVAL_CROP_FRACTION))
  scale = target / tf.cast(tf.minimum(height, width), tf.float32)
  # torchvision truncates the longer side: int(target * long / short).
  new_height = tf.where(height <= width, target,
                        tf.cast(tf.cast(height, tf.float32) * scale, tf.int32))
  new_width = tf.where(width < height, target,
                       tf.cast(tf.cast(width, tf.float32) * scale, tf.int32))
  image = tf.image.resize(image, [new_height, new_width], method="bilinear",
                          antialias=ANTIALIAS)
  top = tf.cast(tf.round(tf.cast(new_height - image_size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - image_size, tf.float32) / 2), tf.int32)
  image = tf.slice(image, [top, left, 0], [image_size, image_size, 3])
  return _to_uint8(tf, image)


# ---------------------------------------------------------------------------
# Readers: list row -> encoded bytes.
# ---------------------------------------------------------------------------

class FileReader:
  """Reads the images of one list from an image folder.

  Args:
    image_list: the list.
    image_root: the folder its paths are relative to: local (read by
      tf.io.read_file), or gs:// (any etils.epath path), read through
      `storage.read_bytes`, the client every other remote file of the run
      uses, from tf.data's parallel map (the GIL is free while it waits).
  """

  key_dtype = "string"

  def __init__(self, image_list: lists.ImageList, image_root):
    self.image_list = image_list
    # Keys are full paths as bytes (os.path.join keeps 'gs://' intact).
    self.root = os.fsencode(image_root)
    self.remote = storage.is_remote(image_root)

  def keys(self, rows: np.ndarray) -> np.ndarray:
    """Full paths of the rows, as bytes."""
    return np.array([os.path.join(self.root, p) for p in self.image_list.rel_paths[rows]],
                    dtype=np.object_)

  @property
  def fetches_per_step(self) -> bool:
    """Whether training fetches a step's files together (`fetch`) instead of one by one."""
    return self.remote

  def fetch(self, keys: np.ndarray) -> np.ndarray:
    """The bytes of the files `keys`, fetched concurrently (remote roots)."""
    return np.array(storage.read_many(keys), dtype=np.object_)

  def read(self, key):
    tf = _tf()
    if not self.remote:
      return tf.io.read_file(key)
    data = tf.numpy_function(storage.read_bytes, [key], tf.string, stateful=False)
    data.set_shape([])
    return data

  def missing(self, row: int) -> Optional[Exception]:
    """A MissingDataError if the image of `row` does not exist, else None."""
    path = os.path.join(self.root, self.image_list.rel_paths[row])
    if self.remote:
      # Asked only after a batch failed: one request for this row, not one per
      # image up front. If it cannot be asked, the read error names the file.
      try:
        exists = storage.exists(os.fsdecode(path))
      except Exception:  # pylint: disable=broad-except
        return None
    else:
      exists = os.path.isfile(path)
    if exists:
      return None
    return MissingDataError(f"{self.image_list.where(row)}: image "
                            f"{os.fsdecode(path)} does not exist; check dataset.image_root.")

  def describe(self, row: int) -> str:
    path = os.fsdecode(os.path.join(self.root, self.image_list.rel_paths[row]))
    return f"{path} ({self.image_list.path.name} line {int(self.image_list.line_numbers[row])})"


@dataclasses.dataclass
class _Split:
  """An evaluation split: its list, reader and the rows evaluated."""
  image_list: lists.ImageList
  reader: object
  rows: np.ndarray  # int64 [M]: list rows in evaluation order (test_subset applied).

  @property
  def labels(self) -> np.ndarray:
    return self.image_list.labels[self.rows]


def _op_message(error) -> str:
  """The first line of a TensorFlow error without its graph-node decorations."""
  text = str(getattr(error, "message", error)).strip().splitlines()[0]
  text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|name: *$", "", text)
  return " ".join(text.split())


def _first_problem(reader, rows, decode_fn) -> Optional[Exception]:
  """Re-reads `rows` one by one (eagerly) to name the image that broke a batch."""
  tf = _tf()
  for row in dict.fromkeys(int(r) for r in rows):  # Unique, in order.
    missing = reader.missing(row)
    if missing is not None:
      return missing
    try:  # Reading apart from decoding: a gs:// permission error is no bad JPEG.
      data = reader.read(tf.constant(reader.keys(np.array([row]))[0]))
    except tf.errors.OpError as e:
      cause = _op_message(e).rstrip(".")
      return DataError(f"cannot read image {reader.describe(row)}: {cause}. Check "
                       "dataset.image_root and that this host may read it.")
    try:
      decode_fn(data)
    except (tf.errors.OpError, ValueError) as e:
      return DataError(f"cannot decode image {reader.describe(row)}: {_op_message(e)} "
                       "Replace the file or remove its line from the list.")
  return None


def _guarded(iterator, first, problem_at):
  """Yields from a tf.data iterator; a tf.data error becomes one DataError line.

  Args:
    iterator: numpy iterator of the dataset.
    first: number (step or batch) of the first element.
    problem_at: number -> the exception that names the bad file, or None.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for number in itertools.count(first):
    try:
      element = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      problem = problem_at(number)
      if problem is None:
        problem = DataError(f"the input pipeline failed at element {number}: "
                            f"{_op_message(e)}")
      raise problem from e
    yield element


# ---------------------------------------------------------------------------
# The dataset.
# ---------------------------------------------------------------------------

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

  def train_rows(self, *, seed: int, step: int, global_batch: int, rows,
                 main_log_class_probs=None, partner_log_class_probs=None) -> dict:
    """This host's rows of step `step`: training rows, labels and aug seeds.

    Args:
      rows: the positions in the global batch this process feeds
        (`parallel.process_rows`); other arguments as `train_batches`.

    Returns:
      {'main', 'main_seed', 'main_label'} (+ 'partner...' when partners are
      drawn): int64 [local] rows, int64 [local, 2] seeds, int32 [local] labels.
    """
    members = self._members() if (main_log_class_probs is not None
                                  or partner_log_class_probs is not None) else None
    indices = global_batch_indices(
        seed, step, num_examples=len(self.train_labels), global_batch=global_batch,
        members=members, main_log_class_probs=main_log_class_probs,
        partner_log_class_probs=partner_log_class_probs)
    rows = checked_rows(rows, global_batch)
    out = {}
    for name, stream in (("main", MAIN), ("partner", PARTNER)):
      if name not in indices:
        continue
      seeds = augmentation_seeds(seed, step, stream, global_batch)
      out[name] = indices[name][rows]
      out[f"{name}_seed"] = seeds[rows]
      out[f"{name}_label"] = self.train_labels[out[name]]
    return out

  def _members(self) -> ClassMembers:
    if getattr(self, "_class_members", None) is None:
      self._class_members = class_members(self.train_labels, self.info.num_classes)
    return self._class_members

  def train_batches(self, *, seed: int, start_step: int, global_batch: int, rows,
                    main_log_class_probs: Optional[np.ndarray],
                    partner_log_class_probs: Optional[np.ndarray],
                    partner_until_step: Optional[int] = None) -> Iterator[dict]:
    """Endless training batches of this host, from step `start_step` on.

    Args:
      seed: run seed (>= 0).
      start_step: global step of the first batch (the resume step).
      global_batch: B over all processes.
      rows: the positions in each global batch this process feeds
        (`parallel.process_rows`, any subset of [0, B)).
      main_log_class_probs: [C] of a class-level main sampler; None = R.
      partner_log_class_probs: [C] of R*; None = no partner batch.
      partner_until_step: steps from this one on carry no partner batch (the
        mixing has stopped, Algorithm 1's T1), so no partner image is read or
        decoded; None = partners throughout.

    Yields:
      {'image': uint8 [len(rows), S, S, 3], 'label': int32 [len(rows)]}
      (+ 'partner_image', 'partner_label' while partners are drawn), one per
      step.
    """
    steps_per_epoch(len(self.train_labels), global_batch)  # Checks B <= N.
    _check_seed(seed, start_step)
    kwargs = dict(seed=seed, global_batch=global_batch, rows=checked_rows(rows, global_batch),
                  main_log_class_probs=main_log_class_probs)
    last = np.iinfo(np.int64).max
    stop = last if partner_until_step is None else max(int(partner_until_step), start_step)
    if partner_log_class_probs is None:
      stop = start_step
    # Two pipelines in turn; the second is built (and prefetches) once reached.
    return itertools.chain(
        self._stretch(start_step, stop, partner_log_class_probs, **kwargs),
        itertools.chain.from_iterable(
            self._stretch(first, last, None, **kwargs) for first in [stop]))

  def _stretch(self, first: int, end: int, partner_log_class_probs, **kwargs):
    """Batches of steps [first, end) of `train_batches`, one tf.data pipeline."""
    if first >= end:
      return iter(())
    tf = _tf()
    kwargs["partner_log_class_probs"] = partner_log_class_probs
    local = len(kwargs["rows"])
    reader, size = self.train_reader, self.info.image_size
    streams = ("main", "partner") if partner_log_class_probs is not None else ("main",)
    fields = [f"{n}_{k}" for n in streams for k in ("key", "seed", "label")]
    dtypes = {"key": getattr(tf, reader.key_dtype), "seed": tf.int64, "label": tf.int32}
    shapes = {"key": [local], "seed": [local, 2], "label": [local]}

    # A remote folder: each step's files are fetched together, concurrently,
    # in one Python call (one call per image costs ~5x the throughput).
    prefetch = getattr(reader, "fetches_per_step", False)
    if prefetch:
      dtypes["key"] = tf.string

    def host_rows(step):
      # The index sequence is a pure function of the step: no state to resume.
      rows = self.train_rows(step=int(step), **kwargs)
      out = []
      for n, k in (f.split("_") for f in fields):
        if k == "key":
          keys = reader.keys(rows[n])
          out.append(reader.fetch(keys) if prefetch else keys)
        else:
          out.append(rows[f"{n}_{k}"])
      return out

    def read(key):
      return key if prefetch else reader.read(key)

    def step_rows(step):
      values = tf.numpy_function(host_rows, [step], [dtypes[f.split("_")[1]] for f in fields],
                                 stateful=False)
      for value, field in zip(values, fields):
        value.set_shape(shapes[field.split("_")[1]])
      return dict(zip(fields, values))

    def decode(row):
      out = {"image": train_image(read(row["main_key"]), row["main_seed"], size),
             "label": row["main_label"]}
      if "partner" in streams:
        out["partner_image"] = train_image(read(row["partner_key"]), row["partner_seed"], size)
        out["partner_label"] = row["partner_label"]
      return out

    dataset = tf.data.Dataset.range(first, end).map(step_rows)
    dataset = dataset.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=True)
    dataset = dataset.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def problem_at(step):
      rows = self.train_rows(step=step, **kwargs)
      for name in streams:
        for row, seed_row in zip(rows[name], rows[f"{name}_seed"]):
          problem = _first_problem(
              reader, [row], functools.partial(_train_check, seed=seed_row, size=size))
          if problem is not None:
            return problem
      return None

    return _guarded(dataset.as_numpy_iterator(), first, problem_at)

  # -- evaluation -----------------------------------------------------------

  def eval_split(self, split: str) -> _Split:
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
    return len(eval_positions(len(self.eval_split(split).rows), global_batch))

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
    tf = _tf()
    split_data = self.eval_split(split)
    rows = checked_rows(rows, global_batch)
    local = len(rows)
    positions = eval_positions(len(split_data.rows), global_batch)
    host = positions[:, rows].reshape(-1)
    real = host >= 0
    rows = split_data.rows[np.where(real, host, 0)]
    reader, size = split_data.reader, self.info.image_size
    dataset = tf.data.Dataset.from_tensor_slices({
        "key": reader.keys(rows).astype(np.bytes_) if reader.key_dtype == "string"
               else reader.keys(rows),
        "label": np.where(real, split_data.image_list.labels[rows], 0).astype(np.int32),
        "index": host})

    def decode(row):
      image = tf.cond(row["index"] >= 0, lambda: eval_image(reader.read(row["key"]), size),
                      lambda: tf.zeros([size, size, 3], tf.uint8))
      return {"image": image, "label": row["label"], "index": row["index"]}

    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def problem_at(batch):
      batch_rows = host[batch * local:(batch + 1) * local]
      batch_rows = split_data.rows[batch_rows[batch_rows >= 0]]
      return _first_problem(reader, batch_rows, functools.partial(eval_image, image_size=size))

    return _guarded(dataset.as_numpy_iterator(), 0, problem_at)


def _train_check(data, *, seed, size):
  return train_image(data, _tf().constant(seed, _tf().int64), size)


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------

def _file_readers(cfg, files, train_list, eval_lists):
  """FileReaders over dataset.image_root; small lists checked for existence now.

  A remote root (gs://) is only checked to exist: its images are checked when
  read (see lists.check_paths_exist).
  """
  root = lists.require_image_root(cfg, files.layout)
  for image_list in [train_list, *eval_lists.values()]:
    if len(image_list) <= lists.EXISTENCE_CHECK_MAX_LINES:
      lists.check_paths_exist(image_list, root)
  readers = {s: FileReader(l, root) for s, l in eval_lists.items()}
  return FileReader(train_list, root), readers, f"lists:{files.split_dir} images:{root}"


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


def _eval_splits(eval_lists, readers, num_classes: int, test_subset: int) -> dict:
  """_Split per evaluation list; test_subset keeps the first k/C test images per class."""
  splits = {}
  for split, image_list in eval_lists.items():
    rows = (sources.test_indices(image_list.labels, num_classes, test_subset)
            if split == "test" else np.arange(len(image_list)))
    splits[split] = _Split(image_list, readers[split], rows.astype(np.int64))
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
    train_reader, readers, source, tfds_identity = tfds_source.readers(
        cfg, train_list, eval_lists)
  elif source_name in sources.SOURCES:  # 'auto' / 'offline': lists + image folder.
    train_reader, readers, source = _file_readers(cfg, files, train_list, eval_lists)
    tfds_identity = {}
  else:
    raise ConfigError(f"dataset.source={source_name!r} is unknown; allowed: {sources.SOURCES}.")

  splits = _eval_splits(eval_lists, readers, num_classes, int(cfg.get("test_subset", 0) or 0))
  identity = {**tfds_identity}
  for split, image_list in [("train", train_list), *eval_lists.items()]:
    identity[f"{split}_list"] = image_list.path.name
    identity[f"{split}_list_sha256"] = image_list.sha256
  return StreamingDataset(
      info=dataclasses.replace(info, num_classes=num_classes, image_size=image_size),
      prior=long_tail.class_prior(train_list.labels, num_classes, smoothing),
      train_labels=train_list.labels, test_labels=splits["test"].labels, source=source,
      identity=identity, train_reader=train_reader, splits=splits, missing_splits=missing)
