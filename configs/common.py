"""The paper's CIFAR-LT protocol (Appendix C.1) shared by the CIFAR configs.

Every method of docs/methods.md is chosen here by name (`mix.name`,
`loss.name`, `loss.schedule`, `sampler.name`, `model.head`); its settings
default to the values of its own paper.
"""

import ml_collections
from ml_collections import config_dict


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
      name="resnet_cifar", depth=32, width=16, dtype="float32",
      head="linear",           # 'linear' or 'normalized' (cosine head; LDAM needs it).
      head_scale=30.0,         # s of the normalised head (LDAM-DRW).
  ))
  config.mix = ml_collections.ConfigDict(dict(
      # 'none', 'mixup', 'remix', 'manifold_mixup', 'unimix', and UniMix's
      # halves 'unimix_factor' and 'unimix_sampler' (lt_calib/mixing.py).
      name="unimix",
      # Beta(alpha, alpha); None = the method's default: 0.5 for UniMix
      # (Appendix C.1), 1.0 for mixup and Remix, 2.0 for manifold mixup.
      alpha=config_dict.placeholder(float),
      tau=tau,                 # Eq. 9; Fig. 4: -1 on CIFAR-10-LT, 0 on CIFAR-100-LT.
      pairing="sampler",       # 'sampler' (Eq. 9, R*) or 'in_batch' (official code).
      # Algorithm 1's T1. Appendix C.1: mixup-style methods are fine-tuned
      # without mixing after epoch 120 (the official code never stops).
      stop_epoch=120,
      remix_kappa=3.0,         # Remix (Chou et al. 2020): kappa = 3, tau = 0.5.
      remix_tau=0.5,
      manifold_layers=(0, 1, 2),  # Manifold mixup: input, after stage 1, 2.
  ))
  config.loss = ml_collections.ConfigDict(dict(
      # 'ce', 'bayias', 'logit_adjusted', 'focal', 'class_balanced', 'cdt',
      # 'ldam' (lt_calib/losses.py).
      name="bayias",
      test_prior="uniform",    # pi' of Bayias: 'uniform' or C comma-separated weights.
      la_tau=1.0,              # Logit adjustment (Menon et al. 2021).
      focal_gamma=1.0,         # Focal, also under class_balanced (LDAM-DRW's code).
      cb_beta=0.9999,          # Effective number (Cui et al. 2019), CB and DRW.
      base="focal",            # class_balanced on 'focal' (Table 1) or 'ce' (Table 3).
      cdt_gamma=0.2,           # CDT (Ye et al. 2020).
      ldam_max_margin=0.5,     # LDAM (Cao et al. 2019); needs model.head='normalized'.
      schedule="none",         # 'drw': effective-number weights from drw_epoch on.
      drw_epoch=160,           # DRW's epoch in LDAM-DRW (of 200).
  ))
  # Main-batch sampler: 'random' (the epoch permutation R), 'class_balanced'
  # or 'square_root' (class-level re-sampling).
  config.sampler = ml_collections.ConfigDict(dict(name="random"))
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
    config.loss.drw_epoch = 1
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
    config.loss.drw_epoch = 4  # At the first decay, as DRW's 160 of 200.
    config.optim.warmup_epochs = 1
    config.optim.decay_epochs = (4, 5)
    config.eval_every_epochs = config.checkpoint_every_epochs = 2
    config.log_every_steps = 24
    return config
  raise ValueError(f"unknown config variant {arg!r}; allowed: '', 'smoke', 'quick'.")
