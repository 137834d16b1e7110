"""A second lossy generation of an offline image set: what one more JPEG pass costs.

    python -m lt_calib.data.degrade --src=../shared/data/cifar10_jpeg.npz \
        --out=data/cifar10_jpeg_gen2.npz [--quality=35] [--shift=4]

The offline CIFAR-10 is itself a JPEG copy (quality ~75, colour at 16 x 16)
of images nobody here has clean. Re-encoding it on the same 8 x 8 grid at the
same quality changes almost nothing (the second pass finds what the first
left), so the second generation encodes each image on a grid shifted by
`shift` pixels (edge pixels repeated above and left, cropped away after
decoding), like a fresh encode of a new image. Training on the stored images
and on this copy, all else equal, estimates what one lossy generation costs.

The copy keeps the stored format (an .npz of image bytes, labels and class
names; lt_calib.data.sources reads it): the images are PNG, lossless, so
what was degraded is exactly what is trained on. Printed and written beside
it (`<out>.json`): the PSNR of the second generation against the stored
images, of a same-grid re-encode against them, and of a fresh encode against
the closest thing to clean 32 x 32 images available here (Tiny-ImageNet's
64 x 64 pool averaged down 2 x 2, which removes most of its own JPEG error).
"""

import io
import json
import pathlib

from absl import app, flags
import numpy as np
from PIL import Image

from lt_calib.data import offline, sources

# The quality the stored offline CIFAR-10 was encoded at (its README).
STORED_QUALITY = 75


def jpeg_roundtrip(image: np.ndarray, quality: int, shift: int = 0) -> np.ndarray:
  """One JPEG generation of a uint8 [H, W, 3] image (4:2:0), its 8 x 8 grid shifted by `shift`."""
  padded = np.pad(image, ((shift, 0), (shift, 0), (0, 0)), mode="edge")
  buffer = io.BytesIO()
  Image.fromarray(padded).save(buffer, format="JPEG", quality=quality, subsampling=2)
  decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
  return decoded[shift:, shift:]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """10 log10(255^2 / MSE) over whole sets of uint8 images."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / mse))


def decode_split(archive: dict, split: str) -> np.ndarray:
  labels = archive[f"{split}_labels"]
  size = np.asarray(Image.open(io.BytesIO(
      archive[f"{split}_jpeg"][archive[f"{split}_offsets"][0]:
                               archive[f"{split}_offsets"][1]].tobytes()))).shape[0]
  return offline.decode_jpegs(archive[f"{split}_jpeg"], archive[f"{split}_offsets"],
                              np.arange(len(labels)), size)


def png_blob(images: np.ndarray) -> tuple:
  """(uint8 blob, int64 offsets [N + 1]) of the images as PNG files."""
  files = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    files.append(buffer.getvalue())
  offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
  return np.frombuffer(b"".join(files), np.uint8), offsets


def clean_reference(pool_file, count: int = 2000) -> np.ndarray:
  """Near-clean 32 x 32 images: Tiny-ImageNet images averaged down 2 x 2."""
  archive = offline.read_npz(pool_file)
  images = offline.decode_jpegs(archive["train_jpeg"], archive["train_offsets"],
                                np.arange(count), 64).astype(np.float64)
  small = images.reshape(count, 32, 2, 32, 2, 3).mean(axis=(2, 4))
  return np.clip(np.round(small), 0, 255).astype(np.uint8)


def build(src, out, quality: int, shift: int, reference_pool=None) -> dict:
  """Writes the second generation of `src` to `out`; returns the PSNRs (dB)."""
  archive = offline.read_npz(pathlib.Path(src))
  stored = {split: decode_split(archive, split) for split in ("train", "test")}
  second = {split: np.stack([jpeg_roundtrip(x, quality, shift) for x in images])
            for split, images in stored.items()}
  same_grid = np.stack([jpeg_roundtrip(x, STORED_QUALITY, 0) for x in stored["test"]])
  record = {"quality": quality, "shift": shift, "subsampling": "4:2:0",
            "reference_quality": STORED_QUALITY,
            "psnr_second_generation_vs_stored": {
                split: psnr(second[split], stored[split]) for split in second},
            "psnr_same_grid_reencode_vs_stored_test": psnr(same_grid, stored["test"])}
  if reference_pool is not None and pathlib.Path(reference_pool).is_file():
    clean = clean_reference(reference_pool)
    fresh = np.stack([jpeg_roundtrip(x, STORED_QUALITY, 0) for x in clean])
    record["psnr_fresh_encode_vs_clean_proxy"] = psnr(fresh, clean)
  arrays = {k: v for k, v in archive.items() if not k.startswith(("train_", "test_"))}
  for split in ("train", "test"):
    arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"] = png_blob(second[split])
    arrays[f"{split}_labels"] = archive[f"{split}_labels"]
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez(out, **arrays)
  out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
  return record


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("src", str(offline.candidate_paths(sources.get_info("cifar10"))[-1]),
                      "The stored offline .npz.")
  flags.DEFINE_string("out", "data/cifar10_jpeg_gen2.npz", "Where the copy goes.")
  flags.DEFINE_integer("quality", 35, "JPEG quality of the second generation (35: its "
                       "error against the stored images matches a fresh q75 encode's "
                       "against near-clean ones, docs/results.md).")
  flags.DEFINE_integer("shift", 4, "Shift of the 8 x 8 grid, pixels (0-7).")
  flags.DEFINE_string("reference_pool",
                      str(offline.candidate_paths(sources.get_info("tiny_imagenet_lt"))[-1]),
                      "Tiny-ImageNet pool for the clean-proxy PSNR ('' to skip).")


def main(argv):
  del argv
  record = build(FLAGS.src, FLAGS.out, FLAGS.quality, FLAGS.shift,
                 FLAGS.reference_pool or None)
  print(json.dumps(record, indent=2))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
