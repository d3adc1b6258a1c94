"""Fashion-MNIST from MNIST-format IDX files (as installed by Debian's dataset-fashion-mnist).

Images are returned NHWC, padded from 28x28 to 32x32 with the background value, scaled to
[-1, 1] float32; labels int32 in [0, 10).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Optional

import numpy as np

from dit_quant_jax.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FASHION_MNIST_DIR"
INSTALL_HINT = ("install Debian's package with 'apt-get install dataset-fashion-mnist' (as root), "
                f"or point ${ENV_VAR} / the config's data_dir at a folder holding the IDX files")
REINSTALL_HINT = "reinstall it ('apt-get install --reinstall dataset-fashion-mnist') or replace the file"
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
IMAGE_SIZE = 32  # 28x28 padded by 2 on each side, so that patch sizes 2, 4 and 8 divide it
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def data_dir(override: Optional[str] = None) -> str:
  """The directory to read: explicit override, else $FASHION_MNIST_DIR, else the Debian path."""
  return override or os.environ.get(ENV_VAR) or DEFAULT_DIR


def _find(directory: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {directory!r}: {INSTALL_HINT}")


def read_idx(path: str) -> np.ndarray:
  """Read an IDX file (gzipped or not) into a numpy array of its stored shape and dtype."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{path}: damaged or truncated gzip file ({e}); {REINSTALL_HINT}") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DataError(f"{path}: not an IDX file (bad magic number {data[:4]!r}); {REINSTALL_HINT}")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise DataError(f"{path}: unknown IDX element type 0x{type_code:02x}; {REINSTALL_HINT}")
  header_end = 4 + 4 * ndim
  if len(data) < header_end:
    raise DataError(f"{path}: truncated IDX header; {REINSTALL_HINT}")
  shape = struct.unpack(">" + "I" * ndim, data[4:header_end])
  dtype = np.dtype(_IDX_DTYPES[type_code])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header_end != expected:
    raise DataError(f"{path}: header says shape {shape} ({expected} bytes of data), file has "
                    f"{len(data) - header_end} (truncated or damaged); {REINSTALL_HINT}")
  return np.frombuffer(data, dtype, offset=header_end).reshape(shape)


def check_labels(labels: np.ndarray, where: str, num_classes: int = NUM_CLASSES,
                 fix: str = REINSTALL_HINT) -> None:
  """Labels must be integers in [0, num_classes): an out-of-range label indexes past the
  class-embedding table and trains to NaN."""
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise DataError(f"{where}: {bad.size} labels lie outside [0, {num_classes}) (first at index "
                    f"{bad[0]}: {labels[bad[0]]}); {fix}")


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
  """(N, 28, 28) uint8 -> (N, 32, 32, 1) float32 in [-1, 1], zero-padded (background = -1)."""
  x = images_uint8.astype(np.float32) / 127.5 - 1.0
  pad = (IMAGE_SIZE - x.shape[1]) // 2
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)
  return x[..., None]


def load_split(split: str = "train", directory: Optional[str] = None, limit: Optional[int] = None):
  """Returns (images (N, 32, 32, 1) float32 in [-1, 1], labels (N,) int32)."""
  if split not in SPLITS:
    raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(SPLITS)}")
  directory = data_dir(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Fashion-MNIST directory {directory!r} does not exist: {INSTALL_HINT}")
  image_stem, label_stem, count = SPLITS[split]
  image_path, label_path = _find(directory, image_stem), _find(directory, label_stem)
  images, labels = read_idx(image_path), read_idx(label_path)
  if images.ndim != 3 or images.shape[1:] != (28, 28):
    raise DataError(f"{image_path}: expected images of shape (N, 28, 28), got {images.shape}")
  if labels.shape != (images.shape[0],):
    raise DataError(f"{split}: {image_path} holds {images.shape[0]} images but {label_path} "
                    f"holds labels of shape {labels.shape}; the two files must come from the same "
                    f"release")
  check_labels(labels, label_path)
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  return to_model_range(images), labels.astype(np.int32)
