"""Predictions under estimated test priors, on Table D2's resampled test sets.

For each test imbalance factor rho' (`posthoc.resample_test_set`) and each
prior named in `PRIORS`, the model's logits are moved to that prior and
scored (top-1, mean per-class accuracy, ECE, NLL), with the prior's
estimation error against the resampled set's true label proportions:

| prior   | pi' used                          | logits scored                      |
|---------|-----------------------------------|------------------------------------|
| oracle  | the true proportions (no user has them) | z + log pi' - log pi_ref     |
| uniform | 1 / C                             | z + log pi' - log pi_ref           |
| train   | pi_train                          | z + log pi' - log pi_ref           |
| em      | EM on softmax(z), source pi_ref   | z + log pi' - log pi_ref           |
| bbse    | BBSE, hard counts, held-out split | z + log pi' - log pi_ref           |
| bcts_em | BCTS on the held-out split + EM   | z / T + b + log pi' - log pi_val   |

pi_ref is the prior the raw logits refer to (`posthoc.reference_log_prior`:
pi_train for CE, pi_t, uniform by default, for Bayias). bcts_em scores its own
calibrated posteriors, as Alexandari et al. adapt them. The same works for a
CE and a Bayias model, so one command compares them under estimated priors.
"""

from typing import NamedTuple

import numpy as np
import scipy.special

from lt_calib.calibration import posthoc
from lt_calib.calibration import prior_estimation as estimation
from lt_calib.calibration import summary as summary_lib
from lt_calib.errors import ConfigError

PRIORS = ("oracle", "uniform", "train", "em", "bbse", "bcts_em")
NEEDS_HELD_OUT = ("bbse", "bcts_em")


class Model(NamedTuple):
  """What the table needs of a trained model."""
  test_logits: np.ndarray     # [M, C] raw logits of the full test set.
  test_labels: np.ndarray     # [M]
  train_counts: np.ndarray    # [C]
  log_reference: np.ndarray   # [C] log pi_ref.
  validation: tuple | None    # (logits [N, C], labels [N]) of a held-out split.


def check_priors(names, has_held_out: bool) -> list:
  """The validated prior names, in the given order.

  Raises:
    ConfigError: an unknown name, or bbse / bcts_em without a held-out split.
  """
  unknown = [n for n in names if n not in PRIORS]
  if unknown:
    raise ConfigError(f"--test_prior has unknown entries {unknown}; allowed: {PRIORS}.")
  needing = [n for n in names if n in NEEDS_HELD_OUT]
  if needing and not has_held_out:
    raise ConfigError(f"--test_prior={','.join(needing)} needs a labelled held-out split: "
                      "give --val_per_class > 0 for a dataset with unused training "
                      "images or a validation list.")
  return list(names)


def _check_held_out_classes(priors, validation, num_classes: int) -> None:
  """bbse / bcts_em weigh every class by its held-out examples: none may lack them."""
  needing = [n for n in priors if n in NEEDS_HELD_OUT]
  if not needing or validation is None:
    return
  missing = np.flatnonzero(np.bincount(validation[1], minlength=num_classes) == 0)
  if missing.size:
    raise ConfigError(
        f"--test_prior={','.join(needing)} needs held-out examples of every class, but "
        f"classes {missing.tolist()[:10]} have none (a long-tailed split may use every "
        "training image of its head classes); use a dataset with a validation list, or "
        "the estimators that need no held-out split (em).")


def estimate(name: str, model: Model, logits: np.ndarray, true_prior: np.ndarray,
             bcts=None) -> tuple:
  """(pi', logits to score, EM iterations) of one prior on one test set."""
  num_classes = logits.shape[1]
  reference = np.exp(model.log_reference)
  if name == "bcts_em":
    temperature, bias = bcts
    val_labels = model.validation[1]
    val_prior = np.bincount(val_labels, minlength=num_classes) / len(val_labels)
    calibrated = logits / temperature + bias
    result = estimation.em_prior(scipy.special.softmax(calibrated, axis=1), val_prior)
    return result.prior, posthoc.prior_correction(
        calibrated, np.log(val_prior), np.log(np.maximum(result.prior, 1e-300))), \
        result.iterations
  iterations = 0
  if name == "oracle":
    prior = true_prior
  elif name == "uniform":
    prior = np.full(num_classes, 1.0 / num_classes)
  elif name == "train":
    prior = model.train_counts / model.train_counts.sum()
  elif name == "em":
    result = estimation.em_prior(scipy.special.softmax(logits, axis=1), reference)
    prior, iterations = result.prior, result.iterations
  else:  # bbse
    val_logits, val_labels = model.validation
    prior = estimation.bbse_prior(scipy.special.softmax(logits, axis=1),
                                  scipy.special.softmax(val_logits, axis=1), val_labels).prior
  shifted = posthoc.prior_correction(logits, model.log_reference,
                                     np.log(np.maximum(prior, 1e-300)))
  return prior, shifted, iterations


def rows(model: Model, rhos, priors, seed: int = 0, num_bins: int = 15) -> list:
  """One row per (prior, rho'): metrics of the shifted predictions and the prior's error.

  Args:
    model: the trained model's logits and priors.
    rhos: test imbalance factors rho'.
    priors: names from PRIORS (`check_priors`).
    seed: seed of the resampled test sets.
    num_bins: ECE bins.

  Returns:
    list of dicts: prior, test_rho, num_images, top1, mean_class_acc, ece,
    nll, l1 and kl (estimate vs truth), em_iterations.
  """
  labels = np.asarray(model.test_labels)
  num_classes = model.test_logits.shape[1]
  _check_held_out_classes(priors, model.validation, num_classes)
  bcts = (estimation.fit_bcts(*model.validation) if "bcts_em" in priors else None)
  out = []
  for rho in rhos:
    idx = posthoc.resample_test_set(labels, rho, num_classes, seed)
    true_prior = np.bincount(labels[idx], minlength=num_classes) / len(idx)
    for name in priors:
      prior, shifted, iterations = estimate(name, model, model.test_logits[idx],
                                            true_prior, bcts)
      s = summary_lib.summarize(shifted, labels[idx], model.train_counts, num_bins)
      out.append({"prior": name, "test_rho": rho, "num_images": len(idx),
                  **{k: s[k] for k in ("top1", "mean_class_acc", "ece", "nll")},
                  **estimation.prior_errors(prior, true_prior),
                  "em_iterations": iterations})
  return out


METRICS = ("top1", "mean_class_acc", "ece", "nll", "l1", "kl")


def mean_over_runs(row_lists: list) -> list:
  """`rows` of several runs (seeds) -> one row per (prior, rho'): mean and sample std.

  Args:
    row_lists: each run's `rows` (the same priors and rho').

  Returns:
    list of dicts: prior, test_rho, num_images, runs, and for each of
    METRICS its mean and `<metric>_std` (NaN with one run).
  """
  runs = {}
  for table_rows in row_lists:
    for row in table_rows:
      runs.setdefault((row["prior"], row["test_rho"]), []).append(row)
  out = []
  for (prior, rho), group in runs.items():
    row = {"prior": prior, "test_rho": rho, "num_images": group[0]["num_images"],
           "runs": len(group)}
    for key in METRICS:
      values = np.array([r[key] for r in group], np.float64)
      row[key] = float(values.mean())
      row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    out.append(row)
  return out


def _cell(row, key: str, scale: float) -> str:
  digits = 3 if key == "l1" else 2
  text = f"{scale * row[key]:.{digits}f}"
  if f"{key}_std" in row and np.isfinite(row[f"{key}_std"]):
    text += f" ± {scale * row[f'{key}_std']:.{digits}f}"
  return text


def markdown(table_rows, description: str = "") -> str:
  """Tables (prior x rho') of top-1 %, ECE %, NLL and the L1 error of pi' (± std if averaged)."""
  rhos = list(dict.fromkeys(r["test_rho"] for r in table_rows))
  names = list(dict.fromkeys(r["prior"] for r in table_rows))
  cell = {(r["prior"], r["test_rho"]): r for r in table_rows}
  sizes = {r["test_rho"]: r["num_images"] for r in table_rows}
  text = [description, ""] if description else []
  for key, title, scale in (("top1", "Top-1 accuracy (%)", 100), ("ece", "ECE (%)", 100),
                            ("nll", "NLL", 1), ("l1", "L1 error of the prior", 1)):
    text += [f"**{title}**", "", "| prior | " + " | ".join(
        f"rho'={r:g} (n={sizes[r]})" for r in rhos) + " |",
             "| --- |" + " ---: |" * len(rhos)]
    for name in names:
      text.append(f"| {name} | " + " | ".join(_cell(cell[(name, r)], key, scale)
                                            for r in rhos) + " |")
    text.append("")
  return "\n".join(text)



def write_mean_table(run_dirs, out, description: str = "") -> list:
  """prior_estimation_mean.md / .csv in `out`: `mean_over_runs` of the runs' tables.

  Args:
    run_dirs: folders where `lt_calib.evaluate --test_prior=...` wrote
      evaluation.json (one per seed).
    out: output folder.
    description: a line above the tables (what was averaged).

  Returns:
    the averaged rows.

  Raises:
    ConfigError: a folder without an evaluation.json holding such a table.
  """
  import json  # pylint: disable=g-import-not-at-top
  from lt_calib import storage  # pylint: disable=g-import-not-at-top
  row_lists = []
  for run in run_dirs:
    path = storage.as_path(run) / "evaluation.json"
    rows_of_run = json.loads(path.read_text()).get("prior_estimation") if path.exists() else None
    if not rows_of_run:
      raise ConfigError(f"{path} holds no prior_estimation table; run lt_calib.evaluate "
                        f"--workdir={run} --test_prior=... first.")
    row_lists.append(rows_of_run)
  averaged = mean_over_runs(row_lists)
  out = storage.as_path(out)
  out.mkdir(parents=True, exist_ok=True)
  storage.write_text(out / "prior_estimation_mean.md", markdown(averaged, description))
  storage.write_csv(out / "prior_estimation_mean.csv", averaged)
  return averaged


def main(argv):
  """python -m lt_calib.calibration.prior_table --runs=A,B,C --out=DIR."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS
  rows_written = write_mean_table(values.runs, values.out, values.description)
  print(f"{values.out}/prior_estimation_mean.md: {len(rows_written)} rows, "
        f"{rows_written[0]['runs']} runs each")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from lt_calib import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("runs", None, "Folders with lt_calib.evaluate's evaluation.json.")
  flags.DEFINE_string("out", None, "Where prior_estimation_mean.md / .csv go.")
  flags.DEFINE_string("description", "", "A line above the tables.")
  flags.mark_flags_as_required(["runs", "out"])
  cli.run(main)
