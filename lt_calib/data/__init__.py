"""Data: offline/TFDS sources, the long-tail rule, samplers, augmentation."""

from lt_calib.data import sources


def load(cfg):
  """Loads `config.dataset`: in memory (CIFAR, Tiny-ImageNet-LT) or streamed.

  Args:
    cfg: the `config.dataset` ConfigDict.

  Returns:
    `sources.Dataset` (arrays in host memory, sampled on the device) or, for
    datasets too large for memory (ImageNet-LT, iNaturalist, image lists),
    `pipeline.StreamingDataset` (tf.data; imported only then, so in-memory
    training needs no TensorFlow).
  """
  if getattr(sources.get_info(cfg.name), "streaming", False):
    from lt_calib.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.load_streaming_dataset(cfg)
  return sources.load_dataset(cfg)
