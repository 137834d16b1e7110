"""CIFAR augmentation on the accelerator: pad-and-crop, flip, normalise.

Same order as the torchvision pipeline of the reference code: zero-pad the
uint8 image (black border), crop, flip, then scale to [0, 1] and normalise.
"""

import jax
import jax.numpy as jnp


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """Random `padding`-pixel pad-and-crop and horizontal flip, per image.

  Args:
    key: PRNG key.
    images: [B, H, W, 3] (any dtype).
    padding: pixels of zero padding on each side (4 for CIFAR).

  Returns:
    [B, H, W, 3] augmented images, same dtype.
  """
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (height, width, channels))

  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
  return jnp.where(flip, cropped[:, :, ::-1, :], cropped)


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 [0, 255] -> per-channel standardised floats."""
  images = images.astype(dtype) / 255.0
  return (images - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)
