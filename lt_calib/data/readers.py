"""Readers of streamed images, and errors that name the file.

A reader maps rows of a split list to keys (full paths, or TFDS record
numbers) and keys to encoded bytes; tf.data decodes them
(lt_calib/data/preprocess.py). tf.data's own errors name no file, so when a
batch fails, `first_problem` reads its rows again one at a time and names the
first that is missing or cannot be decoded, with its list line.
"""

import dataclasses
import itertools
import os
import re
from typing import Optional

import numpy as np

from lt_calib import storage
from lt_calib.data import lists
from lt_calib.data.preprocess import tf_module
from lt_calib.errors import DataError, MissingDataError


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
    tf = tf_module()
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
class Split:
  """An evaluation split: its list, reader and the rows evaluated."""
  image_list: lists.ImageList
  reader: object
  rows: np.ndarray  # int64 [M]: list rows in evaluation order (test_subset applied).

  @property
  def labels(self) -> np.ndarray:
    return self.image_list.labels[self.rows]


def op_message(error) -> str:
  """The first line of a TensorFlow error without its graph-node decorations."""
  text = str(getattr(error, "message", error)).strip().splitlines()[0]
  text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|name: *$", "", text)
  return " ".join(text.split())


def first_problem(reader, rows, decode_fn) -> Optional[Exception]:
  """Re-reads `rows` one by one (eagerly) to name the image that broke a batch."""
  tf = tf_module()
  for row in dict.fromkeys(int(r) for r in rows):  # Unique, in order.
    missing = reader.missing(row)
    if missing is not None:
      return missing
    try:  # Reading apart from decoding: a gs:// permission error is no bad JPEG.
      data = reader.read(tf.constant(reader.keys(np.array([row]))[0]))
    except tf.errors.OpError as e:
      cause = op_message(e).rstrip(".")
      return DataError(f"cannot read image {reader.describe(row)}: {cause}. Check "
                       "dataset.image_root and that this host may read it.")
    try:
      decode_fn(data)
    except (tf.errors.OpError, ValueError) as e:
      return DataError(f"cannot decode image {reader.describe(row)}: {op_message(e)} "
                       "Replace the file or remove its line from the list.")
  return None


def guarded(iterator, first, problem_at):
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
                            f"{op_message(e)}")
      raise problem from e
    yield element
