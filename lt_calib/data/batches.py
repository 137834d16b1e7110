"""A step's batch, from training data on the devices or from the input pipeline.

The same rows for the same key either way (`sampling.batch_indices`); the
partner rule (no mixing, manifold mixup's permutation, in-batch pairing, or
the R* batch) is decided once, in `with_partners`. `cfg` is the step's
StepConfig (lt_calib/train/step.py).
"""

import jax
import jax.numpy as jnp

from lt_calib.data import augment
from lt_calib.method import sampling


def with_partners(cfg, key: jax.Array, images, labels, drawn) -> dict:
  """The batch dict of the step: main images and labels, and their partners.

  Args:
    cfg.
    key: the partners' key (manifold mixup's permutation, in-batch pairing).
    images: float [B, H, W, 3] normalised main images.
    labels: int [B].
    drawn: (normalised partner images, partner labels) of the R* batch when
      `cfg.draws_partners` and it was drawn, else None (past T1 a streamed
      run draws none: xi = 1 makes any partner drop out, 1 x + 0 x' = x).

  Returns:
    dict with 'image', 'label', 'partner_label', and 'partner_image' (input
    mixing) or 'partner_position' (positions in the batch, manifold mixup).
  """
  batch = {"image": images, "label": labels}
  if cfg.mix_factor is None or (cfg.draws_partners and drawn is None):
    batch["partner_image"], batch["partner_label"] = images, labels
  elif cfg.mix_space == "hidden":
    # Manifold mixup: the partner's hidden state must come from the same
    # forward pass, so partners are a random permutation of the batch.
    position = jax.random.permutation(key, cfg.batch_size).astype(jnp.int32)
    batch["partner_position"], batch["partner_label"] = position, labels[position]
  elif cfg.pairing == "in_batch":
    # Partners are (already augmented) members of the batch, as in the
    # official code.
    position = sampling.in_batch_partners(key, labels, cfg.log_counts,
                                          cfg.in_batch_exponent)
    batch["partner_image"], batch["partner_label"] = images[position], labels[position]
  else:
    batch["partner_image"], batch["partner_label"] = drawn
  return batch


def prepare_batch(train_images, train_labels, step, key, permutation,
                  cfg) -> dict:
  """Samples and augments one global batch of data held on the devices.

  Args:
    train_images: uint8 [N, H, W, 3], replicated on every device.
    train_labels: int32 [N].
    step: global step (traced).
    key: the step's batch key (`sampling.batch_indices`, augmentation).
    permutation: R's permutation of the step's epoch
      (`sampling.epoch_permutation` of the run's data key and the epoch
      alone: the same for every step of the epoch and after a resume).
    cfg.

  Returns:
    The dict of `with_partners`.
  """
  partner_key, aug_key, partner_aug_key = jax.random.split(key, 3)
  main, partner = sampling.batch_indices(
      key, step, permutation, cfg.class_index, cfg.batch_log_class_probs,
      cfg.partner_log_probs, cfg.batch_size, cfg.steps_per_epoch)

  def augmented(key, rows):
    images = augment.random_crop_flip(key, train_images[rows], cfg.padding)
    return augment.normalize(images, cfg.mean, cfg.std)

  drawn = None if partner is None else (augmented(partner_aug_key, partner),
                                        train_labels[partner])
  return with_partners(cfg, partner_key, augmented(aug_key, main), train_labels[main], drawn)


def streamed_batch(batch: dict, key: jax.Array, cfg) -> dict:
  """The step's batch dict from a batch the tf.data pipeline read and augmented.

  Args:
    batch: 'image' uint8 [B, S, S, 3] and 'label' int32 [B] of the main batch,
      and 'partner_image' / 'partner_label' when the pipeline drew the R*
      partner batch (`cfg.draws_partners`, before the mixing stops).
    key: the step's batch key.
    cfg.

  Returns:
    The dict of `with_partners`, images normalised on the device.
  """
  drawn = None
  if "partner_image" in batch:
    drawn = (augment.normalize(batch["partner_image"], cfg.mean, cfg.std),
             batch["partner_label"])
  return with_partners(cfg, jax.random.split(key, 3)[0],
                       augment.normalize(batch["image"], cfg.mean, cfg.std),
                       batch["label"], drawn)
