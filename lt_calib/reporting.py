"""Where results go: the console, JSON files, TensorBoard; process 0 only.

The console shows what a user needs (data, model, devices, steps, workdir),
then progress: a live tqdm bar on a terminal, plain lines in a log file.
Every log interval's training scalars also go to `train_metrics.jsonl` and
every evaluation to `metrics.jsonl`, so scripts never parse the console.
JSON files are written whole and logs appended a line at a time
(lt_calib/storage.py), locally or on gs://.
"""

import json
import logging
import sys
import time

from etils import epath
import tqdm

from lt_calib import storage


class _LoggingWriter:
  """Fallback with clu's writer interface when TensorBoard is off or absent.

  clu's TensorBoard writer imports TensorFlow, which accelerator hosts may
  lack; metrics then still reach the JSON files and summary.json.
  """

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str, tensorboard: bool = True, is_main: bool = True):
  """clu.metric_writers' TensorBoard writer on process 0 when enabled.

  Args:
    workdir: where TensorBoard event files go.
    tensorboard: False skips clu, whose import of TensorFlow costs seconds.
    is_main: only process 0 writes events.
  """
  if not (tensorboard and is_main):
    return _LoggingWriter()
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("clu/TensorFlow not importable: TensorBoard output disabled.")
    return _LoggingWriter()
  return metric_writers.create_default_writer(workdir, just_logging=False)


def write_json(path, record: dict) -> None:
  """Writes `record` as indented JSON, whole (`storage.write_text`)."""
  storage.write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _parse_lines(text: str) -> tuple:
  """(records, complete): a last line cut short by a crash is dropped."""
  records, complete = [], True
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      complete = False  # Only a crash mid-append leaves a partial line.
  return records, complete


class JsonLines:
  """A JSON-lines file of records with a 'step', appended one record at a time.

  On a resumed run, records after the resume step (written by the run that
  was stopped after its last checkpoint) are dropped once, when the file is
  opened, so the file reads as one uninterrupted run; after that every
  `append` writes only its own line (`storage.append_text`).
  """

  def __init__(self, path, resume_step: int = 0, enabled: bool = True):
    self.path, self.enabled = epath.Path(path), enabled
    self.records = []
    if enabled and self.path.exists():
      stored, complete = _parse_lines(self.path.read_text())
      self.records = [r for r in stored if r.get("step", 0) <= resume_step]
      if len(self.records) != len(stored) or not complete:
        storage.write_text(self.path, "".join(_line(r) for r in self.records))

  def append(self, record: dict) -> None:
    if not self.enabled:
      return
    self.records.append(record)
    storage.append_text(self.path, _line(record))


def _line(record: dict) -> str:
  return json.dumps(record, sort_keys=True) + "\n"


class Console:
  """What a user reads: a short header, then progress; silent off process 0.

  Args:
    enabled: False on processes other than 0.
    total_steps: steps of the whole run.
    start_step: the step training starts (or resumes) at.
    batch_size: global batch, for images/s.
    stream: where lines go (stdout).
  """

  def __init__(self, enabled: bool, total_steps: int, start_step: int, batch_size: int,
               stream=None):
    self.enabled, self.stream = enabled, stream or sys.stdout
    self.total, self.batch_size = total_steps, batch_size
    self.bar = None
    self.last_step, self.last_time = start_step, None
    self.intervals, self.timed_steps, self.timed_seconds = 0, 0, 0.0

  def line(self, text: str) -> None:
    """One line of the header or a message; kept above a live bar."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def start(self) -> None:
    """Starts the clock (after set-up) and, on a terminal, the live bar."""
    self.last_time = time.perf_counter()
    if self.enabled and self.stream.isatty():
      self.bar = tqdm.tqdm(total=self.total, initial=self.last_step, unit="step",
                           file=self.stream, dynamic_ncols=True)

  def progress(self, step: int, epoch: int, scalars: dict) -> dict:
    """Records that training reached `step`; returns throughput for the logs.

    The first interval holds compilation and is left out of images/s.
    """
    now = time.perf_counter()
    steps, seconds = step - self.last_step, max(now - self.last_time, 1e-9)
    self.intervals += 1
    if self.intervals > 1:
      self.timed_steps += steps
      self.timed_seconds += seconds
    self.last_step, self.last_time = step, now
    rate = self.images_per_second() or steps * self.batch_size / seconds
    eta = (self.total - step) * self.batch_size / max(rate, 1e-9)
    text = (f"loss {scalars['loss']:.4f} lr {scalars['learning_rate']:.4g} "
            f"{rate:,.0f} img/s")
    if self.bar is not None:
      self.bar.update(steps)
      self.bar.set_postfix_str(f"epoch {epoch} {text}", refresh=True)
    else:
      self.line(f"epoch {epoch} step {step}/{self.total} {text} "
                f"ETA {tqdm.tqdm.format_interval(eta)}")
    return {"images_per_second": rate, "eta_seconds": eta}

  def images_per_second(self):
    """Mean training throughput after the first interval (None if unknown)."""
    if not self.timed_steps:
      return None
    return self.timed_steps * self.batch_size / self.timed_seconds

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
