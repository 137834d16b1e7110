"""Data: in-memory and streamed datasets behind one interface.

`load(config.dataset)` returns either kind; the trainer, the evaluator, the
grid and K-runs-in-one-program use only what both provide:

- `info` (DatasetInfo), `prior` (class counts, pi, log pi), `train_labels`,
  `test_labels`, `source` (one line), `identity` (for resume checks),
  `image_shape` (H, W, 3) of what the model sees;
- `make_feed(mesh=, step_cfg=, seed=, start_step=, global_batch=, members=)`:
  the training input, a feed with `resident` (arrays put on every device
  once), `on_device` (whether whole stretches of steps run without the
  host), `fed(step, run_keys)` (what the host hands over per dispatch) and
  `batch(resident, fed, step, key, cfg)` (the step's batch, traced);
- `eval_batches(global_batch=, rows=, split=)`: this process's rows of every
  padded evaluation batch, each with its position in the split (-1 padding);
- `validation_batches(per_class=, global_batch=, rows=)`: (labels, batches)
  of a held-out split for temperature scaling, or MissingDataError.

In memory (`sources.Dataset`: CIFAR, Tiny-ImageNet-LT): the arrays live on
the devices and are sampled there. Streamed (`streaming.StreamingDataset`:
ImageNet-LT, iNaturalist, image lists): tf.data reads each process's rows;
imported only then, so in-memory training needs no TensorFlow.
"""

from lt_calib.data import sources


def load(cfg):
  """Loads `config.dataset` (the ConfigDict) as the dataset of its kind."""
  if sources.get_info(cfg.name).streaming:
    from lt_calib.data import streaming  # pylint: disable=g-import-not-at-top
    return streaming.load_streaming_dataset(cfg)
  return sources.load_dataset(cfg)
