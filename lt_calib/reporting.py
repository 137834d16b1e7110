"""Where results go: the console, JSON files, TensorBoard; process 0 only.

The console shows what a user needs (data, model, devices, steps, workdir),
then progress: a live tqdm bar on a terminal, plain lines in a log file.
Every log interval's training scalars also go to `train_metrics.jsonl` and
every evaluation to `metrics.jsonl`, so scripts never parse the console.
Files are written whole (temporary file, then rename where the filesystem
has one), so a crash never leaves half a JSON file and gs:// works.
"""

import json
import logging
import os
import sys
import time

from etils import epath
import tqdm


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


def write_text(path, text: str) -> None:
  """Writes `text` whole: via a temporary file and rename on local disks.

  The temporary file is per process, so processes writing the same file
  (grid workers sharing a workdir) never mix their bytes.
  """
  path = epath.Path(path)
  if str(path).startswith("gs://"):  # GCS objects appear whole anyway.
    path.write_text(text)
    return
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  tmp.replace(path)


def write_json(path, record: dict) -> None:
  """Writes `record` as indented JSON, atomically."""
  write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


class JsonLines:
  """A JSON-lines file of records with a 'step', rewritten whole on append.

  On a resumed run, records after the resume step (written by the run that
  was stopped after its last checkpoint) are dropped, so the file reads as
  one uninterrupted run.
  """

  def __init__(self, path, resume_step: int = 0, enabled: bool = True):
    self.path, self.enabled = epath.Path(path), enabled
    self.records = []
    if enabled and self.path.exists():
      self.records = [json.loads(line) for line in self.path.read_text().splitlines()
                      if line.strip()]
      self.records = [r for r in self.records if r.get("step", 0) <= resume_step]

  def append(self, record: dict) -> None:
    if not self.enabled:
      return
    self.records.append(record)
    write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                  for r in self.records))


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
