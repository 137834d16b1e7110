"""Evaluates a checkpoint: calibration report, temperature scaling, label shift.

  python -m lt_calib.evaluate --workdir=DIR [--checkpoint=STEP] \
      [--test_rho=100,10,1,0.1,0.01] [--val_per_class=50] [--out=DIR] \
      [--bayias_runs=100:DIR_A,0.01:DIR_B] [--compare_runs=DIR_C] \
      [--test_prior=oracle,uniform,train,em,bbse,bcts_em]

The model is rebuilt from DIR/config.json and the checkpoint restored; the
logits of the FULL balanced test set are computed once (a smoke run's
`test_subset` is overridden by --test_subset, default 0 = all), then every
test prior reuses them through `posthoc.resample_test_set` indices.

Writes to --out (default DIR): the PNGs and report.md of `report.write_report`
for the first rho' of --test_rho (rho' = 1 if listed), evaluation.json, and
with several rho' the Table D2-style label_shift.md / label_shift.csv: rows
'<loss> raw' (logits as trained) and '<loss> prior-corrected' (z + log pi' -
log pi_ref, `posthoc.reference_log_prior`) for this run and each of
--compare_runs, and, per rho' given in --bayias_runs, the raw
logits of a model trained with Bayias against that rho' prior
(`--config.loss.test_prior=$(python -c "from lt_calib.calibration import posthoc;
print(posthoc.test_prior_spec(RHO, C))")`). With --test_prior, per rho' and
prior the predictions under that prior, known or estimated from the
unlabelled test set (calibration/prior_table.py): prior_estimation.md /
.csv / .png.
"""

import dataclasses
import json
import logging
from typing import Callable, Iterator, Optional

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from lt_calib import checkpointing, cli, compilation, evaluation, models, parallel, storage
from lt_calib import data as data_lib
from lt_calib.calibration import posthoc, prior_table, report
from lt_calib.calibration import summary as summary_lib
from lt_calib.data import offline
from lt_calib.errors import ConfigError, MissingDataError
from lt_calib.method import losses
from lt_calib.train import setup as setup_lib
from lt_calib.train import state as state_lib

FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags; called only when run as a program.

  Importing this module next to `lt_calib.main`, which also defines
  --workdir, therefore stays safe.
  """
  flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_list("test_rho", ["1"], "Test imbalance factors rho' (comma list).")
  flags.DEFINE_integer("val_per_class", 50, "Validation images per class for "
                       "temperature scaling (unused training-pool images); 0 = off.")
  flags.DEFINE_integer("test_subset", 0, "Test subset size; 0 = the full test set.")
  flags.DEFINE_integer("resample_seed", 0, "Seed of the resampled test sets.")
  flags.DEFINE_list("bayias_runs", [], "RHO:WORKDIR pairs of Bayias runs trained "
                    "for the rho' test prior (Table D2's 'Bayias' row).")
  flags.DEFINE_list("compare_runs", [], "Further WORKDIRs (same data) whose raw and "
                    "prior-corrected rows join the label-shift table.")
  flags.DEFINE_list("test_prior", [], "Priors to predict under on each --test_rho set "
                    f"(prior_estimation.md / .csv / .png), of {prior_table.PRIORS}: the "
                    "true one, fixed ones, and ones estimated from the unlabelled test "
                    "set (bbse, bcts_em need --val_per_class > 0).")
  flags.DEFINE_string("out", None, "Output folder; default: --workdir.")


@dataclasses.dataclass
class Run:
  """A restored run: its config, data, checkpoint step and a logits function."""
  config: ml_collections.ConfigDict
  dataset: object  # lt_calib/data/__init__.py's interface.
  step: int
  logits_fn: Callable[[Iterator[dict], int], np.ndarray]
  test_logits: np.ndarray


def load_run(workdir, checkpoint: Optional[int] = None, test_subset: int = 0) -> Run:
  """Rebuilds a run's model from config.json and restores a checkpoint.

  Args:
    workdir: training workdir (local or gs://).
    checkpoint: step to restore; None = the latest.
    test_subset: overrides dataset.test_subset (0 = full test set).

  Returns:
    Run, with the raw logits of the test set already computed.
  """
  workdir = storage.as_path(workdir)
  if not (workdir / "config.json").exists():
    raise MissingDataError(f"{workdir / 'config.json'} not found: --workdir must be "
                            "the folder of a training run.")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  config.dataset.test_subset = test_subset
  dataset = data_lib.load(config.dataset)
  model = models.create_model(config.model, dataset.info.num_classes)
  tx, _ = state_lib.make_optimizer(config, len(dataset.train_labels) // config.batch_size)
  mesh = parallel.make_mesh()
  state = parallel.replicate(state_lib.create_train_state(
      jax.random.key(0), model, dataset.image_shape, tx), mesh)
  manager = checkpointing.make_manager(workdir, max_to_keep=1, read_only=True)
  step = manager.latest_step() if checkpoint is None else checkpoint
  if step is None or step not in manager.all_steps():
    raise MissingDataError(f"checkpoint {step} not in {workdir / 'checkpoints'}; "
                           f"available: {list(manager.all_steps())}.")
  state = checkpointing.restore(manager, step, state)
  manager.close()
  eval_step = evaluation.make_step(setup_lib.eval_logits_fn(dataset),
                                   dataset.info.num_classes, config.calibration_bins, mesh)
  batch = config.eval_batch_size
  rows = parallel.process_rows(mesh, batch)

  def logits_fn(batches, num_examples):
    result = evaluation.run(eval_step, state, batches, num_examples, mesh, batch,
                            keep_logits=True)
    return evaluation.split_logits(result)

  test_logits = logits_fn(dataset.eval_batches(global_batch=batch, rows=rows),
                          len(dataset.test_labels))
  return Run(config, dataset, int(step), logits_fn, test_logits)


def validation_logits(run: Run, per_class: int):
  """(logits, labels) of the dataset's held-out split for temperature scaling, or None."""
  batch = run.config.eval_batch_size
  try:
    labels, batches = run.dataset.validation_batches(
        per_class=per_class, global_batch=batch,
        rows=parallel.process_rows(parallel.make_mesh(), batch))
  except FileNotFoundError as e:
    logging.warning("temperature scaling skipped: %s", e)
    return None
  return run.logits_fn(batches, len(labels)), labels


def shifted_log_prior(labels, indices, num_classes) -> np.ndarray:
  """log pi' of a resampled test set: its exact label proportions.

  A class the resampling left out (a steep rho' with few test images per
  class) has pi' = 0: log 0 = -inf, which moves its probability to 0.
  """
  counts = np.bincount(np.asarray(labels)[indices], minlength=num_classes)
  with np.errstate(divide="ignore"):  # The -inf is meant; no warning for the user.
    return np.log(counts / counts.sum())


def run_name(run: Run) -> str:
  """Row label of a run: its loss, and its Bayias test prior if not uniform."""
  loss = run.config.loss
  prior = loss.get("test_prior", "uniform")
  return loss.name if loss.name != "bayias" or prior == "uniform" else f"bayias[{prior}]"


def label_shift_rows(run: Run, rhos, seed=0, bayias_logits=None, others=()) -> list:
  """Table D2 rows: top-1/ECE/NLL per method and rho'.

  Args:
    run: the evaluated run (full test set logits).
    rhos: test imbalance factors rho'.
    seed: seed of `posthoc.resample_test_set`.
    bayias_logits: optional {rho': full test logits of a Bayias model trained
      for that test prior}.
    others: further runs (same test set) given raw and prior-corrected rows.

  Returns:
    list of dicts (method, test_rho, num_images, top1, mean_class_acc, ece, nll);
    methods '<run> raw', '<run> prior-corrected' (`run_name`) and
    "Bayias trained for pi'".
  """
  labels, counts = run.dataset.test_labels, run.dataset.prior.counts
  num_classes = run.test_logits.shape[1]
  bins = run.config.calibration_bins
  rows = []
  for rho in rhos:
    idx = posthoc.resample_test_set(labels, rho, num_classes, seed)
    log_test = shifted_log_prior(labels, idx, num_classes)
    methods = {}
    for r in (run, *others):
      log_ref = reference_of(r)
      methods[f"{run_name(r)} raw"] = r.test_logits[idx]
      if log_ref is not None:  # Losses with no closed-form reference: raw only.
        methods[f"{run_name(r)} prior-corrected"] = posthoc.prior_correction(
            r.test_logits[idx], log_ref, log_test)
    if bayias_logits and rho in bayias_logits:
      methods["Bayias trained for pi'"] = bayias_logits[rho][idx]
    for method, logits in methods.items():
      s = summary_lib.summarize(logits, labels[idx], counts, bins)
      rows.append({"method": method, "test_rho": rho, "num_images": len(idx),
                   **{k: s[k] for k in ("top1", "mean_class_acc", "ece", "nll")}})
  return rows


def reference_of(run):
  """log pi_ref of a run's raw logits (`posthoc.reference_log_prior`), or None."""
  config = run.config
  return posthoc.reference_log_prior(config.loss, run.dataset.prior.prior,
                                     config.get("sampler", {}).get("name", "random"))


def label_shift_markdown(rows, description="") -> str:
  """Tables (methods x rho') of top-1 %, ECE % and NLL."""
  rhos = list(dict.fromkeys(r["test_rho"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  cell = {(r["method"], r["test_rho"]): r for r in rows}
  sizes = {r["test_rho"]: r["num_images"] for r in rows}
  text = [description, ""] if description else []
  for key, name, scale in (("top1", "Top-1 accuracy (%)", 100),
                           ("ece", "ECE (%, 15 bins)", 100), ("nll", "NLL", 1)):
    text += [f"**{name}**", "", "| method | " + " | ".join(
        f"rho'={r:g} (n={sizes[r]})" for r in rhos) + " |",
             "| --- |" + " ---: |" * len(rhos)]
    for m in methods:
      values = [cell.get((m, r), {}).get(key) for r in rhos]
      text.append(f"| {m} | " + " | ".join(
          "" if v is None else f"{scale * v:.2f}" for v in values) + " |")
    text.append("")
  return "\n".join(text)


def _parse_runs(pairs) -> dict:
  runs = {}
  for pair in pairs:
    rho, sep, path = pair.partition(":")
    if not sep:
      raise app.UsageError(f"--bayias_runs entry {pair!r} is not RHO:WORKDIR.")
    runs[float(rho)] = path
  return runs


def _check_bayias_run(run: Run, rho, n_per_class):
  expected = posthoc.shifted_counts(n_per_class, run.test_logits.shape[1], rho)
  trained = losses.parse_test_prior(run.config.loss.get("test_prior", "uniform"),
                                    len(expected))
  if run.config.loss.name != "bayias" or not np.allclose(
      trained, expected / expected.sum(), atol=1e-6):
    logging.warning("run for rho'=%g was not trained with Bayias for that test "
                    "prior (loss %s, test_prior %s).", rho, run.config.loss.name,
                    run.config.loss.get("test_prior"))


def _label_shift_section(run, workdir, test_rhos, seed, bayias_runs, compare_runs,
                         test_subset, out) -> tuple:
  """label_shift.md / .csv of this run, --bayias_runs and --compare_runs: (rows, table)."""
  labels, num_classes = run.dataset.test_labels, run.test_logits.shape[1]
  bayias_logits = {}
  n_per_class = int(np.bincount(labels, minlength=num_classes).min())
  for rho, path in (bayias_runs or {}).items():
    other = load_run(path, None, test_subset)
    _check_bayias_run(other, rho, n_per_class)
    bayias_logits[rho] = other.test_logits
  others = [load_run(path, None, test_subset) for path in compare_runs]
  rows = label_shift_rows(run, test_rhos, seed, bayias_logits, others)
  description = "\n".join(
      [f"Test sets resampled from the full test set with seed {seed} "
       "(`posthoc.resample_test_set`). Prior correction: z + log pi' - log pi_ref, "
       "pi_ref = pi_train for ce, pi_t = loss.test_prior (uniform: 1/C) for bayias.", ""]
      + [f"- {run_name(r)}: {path} step {r.step}" for r, path in
         [(run, workdir)] + list(zip(others, compare_runs))]
      + [f"- Bayias trained for pi' (rho'={rho:g}): {path}"
         for rho, path in (bayias_runs or {}).items()])
  table = label_shift_markdown(rows, description)
  storage.write_text(out / "label_shift.md",
                     "# Test label shift (Table D2 protocol)\n\n" + table)
  storage.write_csv(out / "label_shift.csv", rows)
  return rows, table


def evaluate_workdir(workdir, checkpoint=None, test_rhos=(1.0,), val_per_class=50,
                     out=None, test_subset=0, seed=0, bayias_runs=None,
                     compare_runs=(), test_priors=()) -> dict:
  """Everything the CLI does; returns what it writes to evaluation.json."""
  prior_table.check_priors(test_priors, has_held_out=val_per_class > 0)  # Before any work.
  out = storage.as_path(out or workdir)
  out.mkdir(parents=True, exist_ok=True)
  run = load_run(workdir, checkpoint, test_subset)
  labels, counts = run.dataset.test_labels, run.dataset.prior.counts
  num_classes = run.test_logits.shape[1]
  main_rho = 1.0 if 1.0 in test_rhos else test_rhos[0]
  idx = posthoc.resample_test_set(labels, main_rho, num_classes, seed)
  logits = run.test_logits[idx]
  config = run.config
  title = (f"{config.dataset.name} rho={config.dataset.imbalance_ratio:g} "
           f"{config.mix.name}+{config.loss.name} step {run.step} test rho'={main_rho:g}")
  temperature = None
  validation = validation_logits(run, val_per_class) if val_per_class > 0 else None
  if validation is not None:
    temperature = report.temperature_section(*validation, logits, labels[idx], counts,
                                             config.calibration_bins)
  extra, columns = [], {}
  # z + log pi' - log pi_ref; shown when it changes anything (not for a
  # Bayias-uniform model on the balanced set).
  log_ref = reference_of(run)
  log_test = shifted_log_prior(labels, idx, num_classes)
  if log_ref is not None and not np.allclose(log_ref, log_test):
    columns["prior-corrected"] = summary_lib.summarize(
        posthoc.prior_correction(logits, log_ref, log_test), labels[idx], counts,
        config.calibration_bins)
  result = {"workdir": str(workdir), "checkpoint_step": run.step, "test_rho": main_rho,
            "num_test_images": len(idx), "resample_seed": seed}
  if len(test_rhos) > 1 or bayias_runs or compare_runs:
    rows, table = _label_shift_section(run, workdir, test_rhos, seed, bayias_runs,
                                       compare_runs, test_subset, out)
    extra.append(("Test label shift (label_shift.md)", table))
    result["label_shift"] = rows
  if test_priors:
    if log_ref is None:
      raise ConfigError(f"--test_prior: the logits of a loss.name={config.loss.name!r} "
                        f"run (schedule {config.loss.get('schedule', 'none')!r}) refer to no "
                        "prior in closed form; it works for ce, las, bayias and "
                        "logit_adjusted runs.")
    prior_table.check_priors(test_priors, has_held_out=validation is not None)
    model = prior_table.Model(run.test_logits, labels, counts, log_ref, validation)
    rows = prior_table.rows(model, test_rhos, test_priors, seed, config.calibration_bins)
    table = prior_table.markdown(rows, (
        "Predictions moved to each prior (calibration/prior_table.py); l1: the "
        "estimate's L1 distance to the resampled set's true label proportions."))
    storage.write_text(out / "prior_estimation.md",
                       "# Unknown test prior: estimated from the test set\n\n" + table)
    storage.write_csv(out / "prior_estimation.csv", rows)
    from lt_calib.calibration import plots  # pylint: disable=g-import-not-at-top  # matplotlib.
    plots.accuracy_against_test_rho(rows, out / "prior_estimation.png", title)
    extra.append(("Estimated test priors (prior_estimation.md)", table))
    result["prior_estimation"] = rows
  summary = report.write_report(out, logits, labels[idx], counts, config.calibration_bins,
                                title, extra, temperature,
                                offline.load_class_names(run.dataset.info, config.dataset),
                                extra_columns=columns)
  result["summary"] = summary
  if columns:
    result["prior_corrected"] = columns["prior-corrected"]
  if temperature is not None:
    result["temperature"] = temperature
  storage.write_text(out / "evaluation.json", json.dumps(result, indent=2) + "\n")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  compilation.enable_persistent_cache()
  result = evaluate_workdir(
      FLAGS.workdir, FLAGS.checkpoint, [float(r) for r in FLAGS.test_rho],
      FLAGS.val_per_class, FLAGS.out, FLAGS.test_subset, FLAGS.resample_seed,
      _parse_runs(FLAGS.bayias_runs), FLAGS.compare_runs, FLAGS.test_prior)
  s = result["summary"]
  print(f"step {result['checkpoint_step']} rho'={result['test_rho']:g}: top1 "
        f"{100 * s['top1']:.2f}% ECE {100 * s['ece']:.2f}% NLL {s['nll']:.4f}; report in "
        f"{storage.as_path(FLAGS.out or FLAGS.workdir) / 'report.md'}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
