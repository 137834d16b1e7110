"""Evaluation of a model on a split, counted exactly once on any mesh.

One evaluator serves the training loop, `lt_calib.evaluate` and K runs in one
program (population.py). Each global batch is padded to one fixed shape and
carries every row's position in the split (-1 for padding). On the devices,
one jitted function computes the logits and the sums of
`summary_lib.batch_statistics` (counts, per-class hits, calibration bins, NLL,
Brier), all-reduced over the mesh; only these sums (O(C x bins)) reach the
hosts, never the [M, C] logits of the split, so an iNaturalist evaluation
(24,426 x 8,142) moves kilobytes, not gigabytes. The logits stay sharded:
each process keeps only the rows its own devices computed.

ACE and TACE sort each class's predictions over the whole split, so they
need every logit: they are computed when one process holds every row (one
host), and on several hosts only for the final evaluation, whose logits are
then gathered once for the report (`split_logits`).
"""

from typing import Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from lt_calib import parallel
from lt_calib.calibration import metrics
from lt_calib.calibration import summary as summary_lib


class Result(NamedTuple):
  """What one evaluation of a split gives (per member for K runs).

  Attributes:
    statistics: `summary_lib.batch_statistics` summed over the split (numpy);
      each leaf has a leading member axis K when the model has members.
    index: int64 [n] split position of each row this process fed (-1 =
      padding), in feeding order.
    logits: float32 [n, C] (or [n, K, C]) of those rows; None unless kept.
    num_examples: M.
  """
  statistics: dict
  index: np.ndarray
  logits: Optional[np.ndarray]
  num_examples: int


def make_step(logits_fn: Callable, num_classes: int, num_bins: int, mesh,
              members: bool = False) -> Callable:
  """The jitted (state, images, labels, index) -> (statistics, logits) of a batch.

  Args:
    logits_fn: (state, uint8 images [B, H, W, 3]) -> logits [B, C] (or
      [K, B, C] with members).
    num_classes: C.
    num_bins: bins of ECE/MCE/SCE.
    mesh: the mesh the batch is sharded over.
    members: the model holds K runs (a leading member axis).

  Returns:
    The jitted function; statistics come back replicated (sums over the
    mesh), logits as [B, C] or [B, K, C] still sharded on 'data'.
  """
  def statistics_of(logits, labels, valid):
    return summary_lib.batch_statistics(logits, labels, num_classes, num_bins, mask=valid)

  def step(state, images, labels, index):
    logits = logits_fn(state, images)
    valid = index >= 0
    if members:
      stats = jax.vmap(statistics_of, in_axes=(0, None, None))(logits, labels, valid)
      logits = jnp.transpose(logits, (1, 0, 2))  # Rows first, as fed.
    else:
      stats = statistics_of(logits, labels, valid)
    return stats, logits.astype(jnp.float32)

  return jax.jit(step, out_shardings=(parallel.replicated(mesh),
                                      parallel.data_sharding(mesh)))


def run(step: Callable, state, batches: Iterator[dict], num_examples: int, mesh,
        global_batch: int, keep_logits: bool) -> Result:
  """Evaluates every batch of a split.

  Args:
    step: from `make_step`.
    state: the train state (or stacked states of K runs).
    batches: this process's padded batches ({'image', 'label', 'index'}, its
      rows in `parallel.process_rows` order); the same count on every process.
    num_examples: M, the size of the split.
    mesh: the mesh.
    global_batch: rows per global batch.
    keep_logits: keep this process's logits (host memory: its rows x C x 4 B).

  Returns:
    Result.

  Raises:
    RuntimeError: the split was not counted exactly once (a batching bug).
  """
  totals, indices, kept = None, [], []
  for batch in batches:
    index = np.asarray(batch["index"], np.int64)
    fed = parallel.to_global((batch["image"], np.asarray(batch["label"], np.int32),
                              index.astype(np.int32)), mesh, global_batch)
    stats, logits = step(state, *fed)
    totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
    indices.append(index)
    if keep_logits:
      kept.append(parallel.local_rows(logits))
  statistics = jax.tree.map(lambda x: np.asarray(parallel.local_value(x), np.float64),
                            totals)
  if np.any(statistics["count"] != num_examples):
    raise RuntimeError(f"evaluation counted {statistics['count']} images, expected "
                       f"{num_examples}.")
  return Result(statistics, np.concatenate(indices),
                np.concatenate(kept) if keep_logits else None, num_examples)


def split_logits(result: Result) -> np.ndarray:
  """[M, C] (or [K, M, C]) logits in split order, from every process's rows.

  One process needs nothing from others; several all-gather every process's
  rows once (each fed the same number of rows, padding included, so the
  shapes agree). Every process must call it: the decision is global.
  """
  index, logits = result.index, result.logits
  if jax.process_count() > 1:
    index = np.asarray(multihost_utils.process_allgather(index)).reshape(-1)
    logits = np.asarray(multihost_utils.process_allgather(logits))
    logits = logits.reshape((-1,) + logits.shape[2:])
  valid = index >= 0
  out = np.zeros((result.num_examples,) + logits.shape[1:], np.float32)
  out[index[valid]] = logits[valid]
  return np.moveaxis(out, 1, 0) if out.ndim == 3 else out


def summarize(statistics: dict, train_counts, logits=None, labels=None,
              num_bins: int = 15) -> dict:
  """The metrics of `summary.summarize` from a run's statistics.

  Args:
    statistics: `Result.statistics` of one model (no member axis).
    train_counts: int [C].
    logits: float [M, C] of every row, or None: ACE/TACE are then None.
    labels: int [M], with `logits`.
    num_bins: also the ranges of ACE/TACE.

  Returns:
    JSON-ready dict (see `summary.summarize`).
  """
  record = summary_lib.metrics_from_statistics(statistics, train_counts)
  record["ace"] = record["tace"] = None
  if logits is not None:
    ace, tace = metrics.adaptive_calibration_errors(logits, labels, num_bins)
    record["ace"], record["tace"] = ace, tace
  return record


def member(statistics: dict, k: int) -> dict:
  """Member k's statistics from those of K runs."""
  return jax.tree.map(lambda x: x[k], statistics)
