"""The comparison table of a grid: mean ± std over seeds per (mix, loss), and deltas.

Written as table.md (the paper's Table 4 layout) and table.csv from the
cells' summary.json files (lt_calib/experiments/grid.py).
"""

import csv
import io
import json
import math
import pathlib
import statistics
from typing import Dict

from lt_calib.experiments.presets import grid_pairs

# (summary key, column title, factor to the unit shown).
METRICS = (("top1", "Top-1 (%)", 100.0), ("many_acc", "Many (%)", 100.0),
           ("medium_acc", "Medium (%)", 100.0), ("few_acc", "Few (%)", 100.0),
           ("ece", "ECE (%)", 100.0), ("nll", "NLL", 1.0),
           # Highest test top-1 over the evaluations (every eval_every_epochs):
           # model selection on the test set, what the official code reports.
           ("best_top1", "Best-epoch top-1 (%, test-set selection)", 100.0))


def _mean_std(values: list) -> tuple:
  """(mean, sample std) of the non-None values; std None below two values."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  std = statistics.stdev(values) if len(values) > 1 else None
  return statistics.fmean(values), std


def aggregate(grid, finals: Dict[tuple, list]) -> list:
  """One row per (mix, loss): mean/std of each metric and the top-1 deltas.

  Args:
    grid: grid config (mixes, losses, pairs, baseline).
    finals: (mix, loss) -> list of `summary['final']` dicts, one per seed,
      with 'best_top1' added (the best-epoch top-1; None if unknown).

  Returns:
    list of dicts, in table order (grouped by loss as in Table 4): 'mix',
    'loss', 'seeds', '<metric>_mean' / '<metric>_std' in the shown unit,
    'delta_same_loss' (vs the 'none' row of the same loss, Table 4's delta)
    and 'delta_baseline' (vs `grid.baseline`); None where undefined.
  """
  rows = []
  for mix, loss in grid_pairs(grid):
    runs = finals.get((mix, loss), [])
    row = {"mix": mix, "loss": loss, "seeds": len(runs)}
    for key, _, unit in METRICS:
      mean, std = _mean_std([None if r.get(key) is None else unit * r[key] for r in runs])
      row[f"{key}_mean"], row[f"{key}_std"] = mean, std
    rows.append(row)
  top1 = {(r["mix"], r["loss"]): r["top1_mean"] for r in rows}
  baseline = tuple(grid.baseline)

  def delta(row, reference):
    if (row["mix"], row["loss"]) == reference:
      return None
    mine, theirs = row["top1_mean"], top1.get(reference)
    return None if mine is None or theirs is None else mine - theirs

  for row in rows:
    row["delta_same_loss"] = delta(row, ("none", row["loss"]))
    row["delta_baseline"] = delta(row, baseline)
  return rows


def _number(value, digits=2, signed=False) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell_text(mean, std, digits) -> str:
  if mean is None:
    return "-"
  return _number(mean, digits) if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_markdown(grid, rows: list) -> str:
  """The comparison as a Markdown table, with what it measures above it."""
  base = grid.base
  baseline = " + ".join(grid.baseline)
  lines = [
      f"# {grid.get('title', 'Grid')}",
      "",
      f"{base.dataset.name}-LT, rho = {base.dataset.imbalance_ratio:g}; "
      f"ResNet-{base.model.depth} (width {base.model.width}), "
      f"{base.num_epochs} epoch{'s' if base.num_epochs != 1 else ''}, batch "
      f"{base.batch_size}; seeds {list(grid.seeds)}.",
      "Final-epoch test metrics, mean ± sample std over the seeds that finished "
      "(no std with one seed). Δ: top-1 minus the `none` row of the same loss "
      f"(the paper's Table 4); Δ {baseline}: minus that row. Few is '-' when no "
      "class has fewer than 20 training images (e.g. CIFAR-10-LT at rho = 100). "
      "Best-epoch top-1: the highest test top-1 over evaluations every "
      f"{base.eval_every_epochs} epoch(s), i.e. selected on the test set as the "
      "official code reports it; not an unbiased estimate.",
      "",
      "| Mix | Loss | " + " | ".join(
          [METRICS[0][1], "Δ", f"Δ {baseline}"] + [t for _, t, _ in METRICS[1:]])
      + " | Seeds |",
      "|" + "---|" * (len(METRICS) + 5),
  ]
  for row in rows:
    cells = [row["mix"], row["loss"], _cell_text(row["top1_mean"], row["top1_std"], 2),
             _number(row["delta_same_loss"], signed=True),
             _number(row["delta_baseline"], signed=True)]
    for key, _, _ in METRICS[1:]:
      digits = 3 if key == "nll" else 2
      cells.append(_cell_text(row[f"{key}_mean"], row[f"{key}_std"], digits))
    cells.append(str(row["seeds"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def table_csv(rows: list) -> str:
  """The rows as CSV; accuracies and ECE in %, NLL in nats; empty = undefined."""
  columns = ["mix", "loss", "seeds", "top1_mean", "top1_std", "delta_same_loss",
             "delta_baseline"]
  for key, _, _ in METRICS[1:]:
    columns += [f"{key}_mean", f"{key}_std"]
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore",
                          lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({c: "" if row[c] is None else f"{row[c]:.6g}"
                     if isinstance(row[c], float) else row[c] for c in columns})
  return text.getvalue()


def best_top1(cell_dir: pathlib.Path, summary: dict) -> float | None:
  """Highest test top-1 of a finished cell over all its evaluations.

  Read from metrics.jsonl where there is one, since a resumed run's summary
  only knows the evaluations made after the restart.
  """
  values = [(summary.get("best_epoch_top1") or {}).get("top1")]
  path = cell_dir / "metrics.jsonl"
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        values.append(json.loads(line).get("top1"))
  values = [v for v in values if v is not None]
  return max(values) if values else None
