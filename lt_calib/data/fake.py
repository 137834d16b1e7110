"""Writes a small fake ImageNet-LT / iNaturalist 2018 in the real on-disk layout.

    python -m lt_calib.data.fake --out=/tmp/fake_imagenet_lt --classes=1000

gives JPEGs under `train/<wnid>/<wnid>_<k>.JPEG` and `val/<wnid>/
ILSVRC2012_val_<k>.JPEG`, and ImageNet_LT_train.txt (long-tailed, the exp
profile from --max_per_class down to --min_per_class), ImageNet_LT_val.txt
(--val_per_class per class, from train/ images not in the training list, as
ImageNet-LT's val) and ImageNet_LT_test.txt (--test_per_class per class from
val/). `--layout=inat2018` writes `train_val2018/<Kingdom>/<c>/<hash>.jpg` with
iNaturalist18_train.txt and iNaturalist18_val.txt (the test set).

Each class has a colour and a stripe pattern (orientation and frequency);
every image adds its own brightness, phase and pixel noise, so a small model
learns the classes from the pixels and a smoke run rises above chance.
`--image_size=400x350` gives JPEGs of a realistic ImageNet size (the input
benchmark uses it).
"""

import functools
import hashlib
import io
import os
import pathlib

from absl import app, flags
import numpy as np
from PIL import Image

from lt_calib.data import long_tail

LAYOUTS = ("imagenet_lt", "inat2018")
_KINGDOMS = ("Animalia", "Plantae", "Fungi", "Insecta", "Aves")
JPEG_QUALITY = 90


def parse_size(text: str) -> tuple:
  """'64' -> (64, 64); '400x350' -> (width 400, height 350)."""
  parts = str(text).lower().split("x")
  if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--image_size={text!r}: expected N or WIDTHxHEIGHT.")
  width = int(parts[0])
  return width, int(parts[-1])


def class_style(num_classes: int, seed: int) -> dict:
  """Per-class colour (RGB in [40, 215]), stripe angle and frequency."""
  rng = np.random.default_rng((seed, 1))
  return {"colour": rng.uniform(40, 215, (num_classes, 3)),
          "angle": rng.uniform(0, np.pi, num_classes),
          "frequency": rng.uniform(1.5, 6.0, num_classes)}


@functools.lru_cache(maxsize=4)
def _grid(size: tuple) -> tuple:
  width, height = size
  y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
  return x, y


def render(label: int, style: dict, size: tuple, rng: np.random.Generator) -> np.ndarray:
  """One uint8 [H, W, 3] image of class `label`."""
  width, height = size
  x, y = _grid(size)
  angle, frequency = style["angle"][label], style["frequency"][label]
  phase = rng.uniform(0, 2 * np.pi)
  stripes = np.sin(np.float32(2 * np.pi * frequency)
                   * (x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle)))
                   + np.float32(phase))
  colour = (style["colour"][label] * rng.uniform(0.85, 1.15)).astype(np.float32)
  noise = rng.standard_normal((height, width, 3), dtype=np.float32)
  image = colour + np.float32(35.0) * stripes[..., None] + np.float32(12.0) * noise
  return np.clip(image, 0, 255).astype(np.uint8)


def _write_jpeg(path: pathlib.Path, image: np.ndarray) -> None:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
  path.write_bytes(buffer.getvalue())


def _names(layout: str, num_classes: int):
  """(train folder of class c, val folder of class c, train file k, val file k)."""
  if layout == "imagenet_lt":
    wnid = [f"n{10_000_000 + c:08d}" for c in range(num_classes)]
    return (lambda c: f"train/{wnid[c]}", lambda c: f"val/{wnid[c]}",
            lambda c, k: f"{wnid[c]}_{k}.JPEG", lambda c, k: f"ILSVRC2012_val_{k:08d}.JPEG")
  folder = lambda c: f"train_val2018/{_KINGDOMS[c % len(_KINGDOMS)]}/{c}"
  # iNaturalist names its files by a 32-hex-digit hash.
  name = lambda kind: lambda c, k: hashlib.md5(f"{kind}:{c}:{k}".encode()).hexdigest() + ".jpg"
  return folder, folder, name("train"), name("val")


def plan(num_classes: int, max_per_class: int, min_per_class: int, val_per_class: int,
         test_per_class: int, layout: str) -> dict:
  """The relative path and label of every image of every list (nothing written).

  Returns:
    list file name -> list of (relative path, label).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"--layout={layout!r}; allowed: {LAYOUTS}.")
  if not 1 <= min_per_class <= max_per_class:
    raise ValueError("need 1 <= --min_per_class <= --max_per_class.")
  counts = long_tail.long_tail_counts(max_per_class, num_classes,
                                      max_per_class / min_per_class, "exp")
  train_dir, val_dir, train_name, val_name = _names(layout, num_classes)
  train, val, test = [], [], []
  serial = 0
  for c, n_c in enumerate(counts):
    train += [(f"{train_dir(c)}/{train_name(c, k)}", c) for k in range(n_c)]
    # ImageNet-LT's val images are other ImageNet-train images of the class.
    val += [(f"{train_dir(c)}/{train_name(c, n_c + k)}", c) for k in range(val_per_class)]
    for _ in range(test_per_class):
      serial += 1
      test.append((f"{val_dir(c)}/{val_name(c, serial)}", c))
  if layout == "imagenet_lt":
    return {"ImageNet_LT_train.txt": train, "ImageNet_LT_val.txt": val,
            "ImageNet_LT_test.txt": test}
  # iNaturalist 2018 has no separate val list: its val list is the test set.
  return {"iNaturalist18_train.txt": train, "iNaturalist18_val.txt": test}


def build(out, num_classes: int = 1000, image_size="64", max_per_class: int = 20,
          min_per_class: int = 2, val_per_class: int = 1, test_per_class: int = 2,
          seed: int = 0, layout: str = "imagenet_lt") -> dict:
  """Writes the images and the list files under `out`.

  Returns:
    list file name -> number of lines written.
  """
  out = pathlib.Path(out)
  size = parse_size(image_size)
  entries = plan(num_classes, max_per_class, min_per_class, val_per_class,
                 test_per_class, layout)
  images = sorted({e for listed in entries.values() for e in listed})
  for folder in {os.path.dirname(path) for path, _ in images}:
    (out / folder).mkdir(parents=True, exist_ok=True)
  style = class_style(num_classes, seed)

  # One loop: images are small, and threads measured slower on 2 cores.
  for index, (path, label) in enumerate(images):
    rng = np.random.default_rng((seed, 2, index))  # Image i alone is reproducible.
    _write_jpeg(out / path, render(label, style, size, rng))
  for name, listed in entries.items():
    (out / name).write_text("".join(f"{path} {label}\n" for path, label in listed))
  return {name: len(listed) for name, listed in entries.items()}


def _define_flags():
  """Flags of the command line only, so that importing this module defines none."""
  flags.DEFINE_string("out", None, "Folder to write (the image root and the split dir).")
  flags.DEFINE_integer("classes", 1000, "Number of classes.")
  flags.DEFINE_string("image_size", "64", "Side N, or WIDTHxHEIGHT (e.g. 400x350).")
  flags.DEFINE_integer("max_per_class", 20, "Training images of class 0.")
  flags.DEFINE_integer("min_per_class", 2, "Training images of the last class.")
  flags.DEFINE_integer("val_per_class", 1, "Val-list images per class (imagenet_lt).")
  flags.DEFINE_integer("test_per_class", 2, "Test-list images per class.")
  flags.DEFINE_integer("seed", 0, "Seed of the class styles and the image noise.")
  flags.DEFINE_enum("layout", "imagenet_lt", LAYOUTS, "Folder and list layout.")


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if not FLAGS.out:
    raise app.UsageError("--out is required.")
  counts = build(FLAGS.out, FLAGS.classes, FLAGS.image_size, FLAGS.max_per_class,
                 FLAGS.min_per_class, FLAGS.val_per_class, FLAGS.test_per_class,
                 FLAGS.seed, FLAGS.layout)
  for name, lines in counts.items():
    print(f"{FLAGS.out}/{name}: {lines} images")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
