"""The paper's CIFAR-LT protocol (Appendix C.1) shared by the CIFAR configs."""

import ml_collections


def paper_config(dataset: str, num_classes: int, tau: float) -> ml_collections.ConfigDict:
  """ResNet-32, 200 epochs, UniMix (alpha 0.5) + Bayias, rho = 100."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict(dict(
      name=dataset, num_classes=num_classes,
      source="auto",           # 'auto': offline file if found, else TFDS.
      data_file="",            # Explicit offline .npz path (tried first).
      tfds_data_dir="",
      cache_dir="",            # Decoded-image cache; default ~/.cache/lt_calib.
      imbalance_ratio=100.0,   # rho = n_max / n_min.
      imbalance_type="exp",    # 'exp' or 'step'.
      lt_seed=0,               # np.random.seed of the standard CIFAR-LT rule.
      zero_count_smoothing=0.0,
      test_subset=0,           # 0 = whole balanced test set.
      # Held-out images per class for temperature scaling, drawn from the
      # training pool images the long-tailed split leaves out (0 = none).
      val_per_class=0,
      crop_padding=4,
  ))
  config.model = ml_collections.ConfigDict(dict(
      name="resnet_cifar", depth=32, width=16, dtype="float32"))
  config.mix = ml_collections.ConfigDict(dict(
      name="unimix",
      alpha=0.5,               # Appendix C.1: 0.5 for UniMix (1.0 for others).
      tau=tau,                 # Eq. 9; Fig. 4: -1 on CIFAR-10-LT, 0 on CIFAR-100-LT.
      pairing="sampler",       # 'sampler' (Eq. 9, R*) or 'in_batch' (official code).
      # Algorithm 1's T1. Appendix C.1: mixup-style methods are fine-tuned
      # without mixing after epoch 120 (the official code never stops).
      stop_epoch=120,
  ))
  config.loss = ml_collections.ConfigDict(dict(
      name="bayias",
      test_prior="uniform",    # pi' of Bayias: 'uniform' or C comma-separated weights.
  ))
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=2e-4,
      warmup_epochs=5, decay_epochs=(160, 180), decay_factors=(0.01, 0.0001)))
  config.batch_size = 128
  config.num_epochs = 200
  config.eval_batch_size = 512
  config.eval_every_epochs = 10
  config.checkpoint_every_epochs = 10
  config.keep_checkpoints = 3
  config.log_every_steps = 100
  config.calibration_bins = 15
  config.tensorboard = True    # TensorBoard events through clu (imports TensorFlow).
  return config


def apply_variant(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Shrinks the config for `arg` in {'', 'smoke', 'quick'}."""
  if arg in ("", None):
    return config
  if arg == "smoke":
    # Tiny ResNet-8 (width 8), 2 epochs of batch 512 = 48 steps, mixing on
    # for the first epoch only, 1,000 test images: a CPU end-to-end check.
    config.model.depth, config.model.width = 8, 8
    config.batch_size, config.num_epochs = 512, 2
    config.mix.stop_epoch = 1
    config.optim.warmup_epochs = 1
    config.optim.decay_epochs, config.optim.decay_factors = (), ()
    config.dataset.test_subset = 1000
    config.eval_every_epochs = config.checkpoint_every_epochs = 1
    config.log_every_steps = 8
    config.tensorboard = False
    return config
  if arg == "quick":
    # ResNet-32 for 6 epochs: the paper's schedule compressed (warm-up 1,
    # mixing stops after 4, decays at 4 and 5), for CPU comparisons.
    config.num_epochs = 6
    config.mix.stop_epoch = 4
    config.optim.warmup_epochs = 1
    config.optim.decay_epochs = (4, 5)
    config.eval_every_epochs = config.checkpoint_every_epochs = 2
    config.log_every_steps = 24
    return config
  raise ValueError(f"unknown config variant {arg!r}; allowed: '', 'smoke', 'quick'.")
