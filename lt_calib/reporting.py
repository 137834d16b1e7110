"""Where results go: TensorBoard/logging writer, metrics.jsonl, summary.json."""

import json
import logging
import pathlib
import time


class _LoggingWriter:
  """Fallback with clu's writer interface when TensorFlow is absent.

  clu's TensorBoard writer imports TensorFlow, which accelerator hosts may
  lack; metrics then still reach the log, metrics.jsonl and summary.json.
  """

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str, tensorboard: bool = True):
  """clu.metric_writers default writer (TensorBoard + logging) when available.

  Args:
    workdir: where TensorBoard event files go.
    tensorboard: False skips clu, whose import of TensorFlow costs seconds.
  """
  if not tensorboard:
    return _LoggingWriter()
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.info("clu/TensorFlow not importable: TensorBoard output disabled.")
    return _LoggingWriter()
  return metric_writers.create_default_writer(workdir, just_logging=False)


def append_jsonl(path: pathlib.Path, record: dict) -> None:
  """Appends one JSON line (one evaluation) to `path`."""
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def write_json(path: pathlib.Path, record: dict) -> None:
  """Writes `record` atomically, so a crash never leaves half a summary."""
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)


class Progress:
  """Throughput and ETA over log intervals (the first one holds compilation)."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.last_step, self.last_time = start_step, time.time()
    self.timed_steps, self.timed_seconds, self.intervals = 0, 0.0, 0

  def update(self, step: int) -> tuple:
    """Returns (images/s of this interval, ETA seconds) at global `step`."""
    now = time.time()
    steps, seconds = step - self.last_step, max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    self.intervals += 1
    if self.intervals > 1:  # Leave compilation out of the average.
      self.timed_steps += steps
      self.timed_seconds += seconds
    rate = steps / seconds
    return rate * self.batch_size, (self.total_steps - step) / max(rate, 1e-9)

  def images_per_second(self):
    """Mean training throughput after the first interval (None if unknown)."""
    if not self.timed_steps:
      return None
    return self.timed_steps * self.batch_size / self.timed_seconds
