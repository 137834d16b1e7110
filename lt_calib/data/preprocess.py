"""Decoding and augmentation of streamed images (TensorFlow, imported lazily).

Training: random-resized-crop (torchvision's: area 0.08-1, aspect ratio
3/4-4/3, 10 tries, else the whole image) to S and a horizontal flip, with
stateless seeds, JPEGs decoded only inside the crop window. Evaluation:
shorter side to round(S / 0.875), centre crop S x S. Resizing is bilinear
with antialiasing, like PIL. TensorFlow is imported on first use, with its
GPUs hidden, so that it never takes accelerator memory from JAX and importing
the library needs no TensorFlow.
"""

from lt_calib.errors import MissingDependencyError

# Random-resized-crop of torchvision / classifier-balancing.
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Evaluation: shorter side to image_size / 0.875 (256 for 224), centre crop.
EVAL_CROP_FRACTION = 0.875
# PIL (torchvision's backend) low-pass filters when it shrinks; so do we.
ANTIALIAS = True


_GPUS_HIDDEN = []


def tf_module():
  """TensorFlow, with GPUs hidden (once) so that it never takes JAX's memory."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError("the streaming input pipeline (dataset.name of split "
                                 "lists) needs TensorFlow: pip install -e '.[tfds]'.") from e
  if not _GPUS_HIDDEN:
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices (another module did).
      pass
    _GPUS_HIDDEN.append(True)
  return tf


def _decode_window(tf, data, window_fn=None):
  """Decodes an image, or its window `window_fn(shape)` = (begin [3], size [3]).

  JPEGs are decoded inside the window only (decode_and_crop_jpeg); anything
  else tf.io.decode_image reads (PNG, GIF, BMP files with a .JPEG name exist
  in ImageNet) is decoded whole, then cropped. Always 3 channels (grayscale
  and CMYK images become RGB).
  """
  def jpeg():
    if window_fn is None:
      return tf.io.decode_jpeg(data, channels=3)
    begin, size = window_fn(tf.io.extract_jpeg_shape(data))
    crop = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.io.decode_and_crop_jpeg(data, crop, channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    if window_fn is None:
      return image
    begin, size = window_fn(tf.shape(image))
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _to_uint8(tf, image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def train_image(data, seed, image_size: int):
  """Random-resized-crop (scale (0.08, 1), ratio (3/4, 4/3)) + flip, to uint8.

  As torchvision's RandomResizedCrop: 10 tries of an area fraction and an
  aspect ratio; if none fits, the whole image (torchvision: a centre crop).

  Args:
    data: scalar tf.string, the encoded image.
    seed: int64 [2] stateless seed of this row.
    image_size: output side S.

  Returns:
    uint8 [S, S, 3].
  """
  tf = tf_module()
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=CROP_RATIO,
        area_range=CROP_AREA, max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  image = _decode_window(tf, data, window)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear",
                          antialias=ANTIALIAS)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return _to_uint8(tf, image)


def eval_image(data, image_size: int):
  """Shorter side to round(S / 0.875), centre crop S x S (torchvision Resize + CenterCrop)."""
  tf = tf_module()
  image = _decode_window(tf, data)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  target = int(round(image_size / EVAL_CROP_FRACTION))
  scale = target / tf.cast(tf.minimum(height, width), tf.float32)
  # torchvision truncates the longer side: int(target * long / short).
  new_height = tf.where(height <= width, target,
                        tf.cast(tf.cast(height, tf.float32) * scale, tf.int32))
  new_width = tf.where(width < height, target,
                       tf.cast(tf.cast(width, tf.float32) * scale, tf.int32))
  image = tf.image.resize(image, [new_height, new_width], method="bilinear",
                          antialias=ANTIALIAS)
  top = tf.cast(tf.round(tf.cast(new_height - image_size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - image_size, tf.float32) / 2), tf.int32)
  image = tf.slice(image, [top, left, 0], [image_size, image_size, 3])
  return _to_uint8(tf, image)


def train_check(data, *, seed, size):
  return train_image(data, tf_module().constant(seed, tf_module().int64), size)
