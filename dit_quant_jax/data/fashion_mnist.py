"""Fashion-MNIST from MNIST-format IDX files (as installed by Debian's dataset-fashion-mnist).

Images are returned NHWC, padded from 28x28 to 32x32 with the background value, scaled to
[-1, 1] float32; labels int32 in [0, 10).
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Optional

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FASHION_MNIST_DIR"
INSTALL_HINT = ("install Debian's package with 'apt-get install dataset-fashion-mnist' (as root), "
                f"or point ${ENV_VAR} / the config's data_dir at a folder holding the IDX files")
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
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
  header_end = 4 + 4 * ndim
  if len(data) < header_end:
    raise ValueError(f"{path}: truncated IDX header")
  shape = struct.unpack(">" + "I" * ndim, data[4:header_end])
  dtype = np.dtype(_IDX_DTYPES[type_code])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header_end != expected:
    raise ValueError(f"{path}: header says shape {shape} ({expected} bytes of data), "
                     f"file has {len(data) - header_end}")
  return np.frombuffer(data, dtype, offset=header_end).reshape(shape)


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
  images = read_idx(_find(directory, image_stem))
  labels = read_idx(_find(directory, label_stem))
  if images.ndim != 3 or images.shape[1:] != (28, 28):
    raise ValueError(f"{split} images: expected shape (N, 28, 28), got {images.shape}")
  if labels.shape != (images.shape[0],):
    raise ValueError(f"{split}: {images.shape[0]} images but labels of shape {labels.shape}")
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  return to_model_range(images), labels.astype(np.int32)
