"""IDX reader and Fashion-MNIST loader (dit_quant_jax/data/fashion_mnist.py)."""

import gzip
import os
import re
import struct

import numpy as np
import pytest

from dit_quant_jax.data import fashion_mnist
from dit_quant_jax.errors import DataError

# IDX element-type codes (LeCun's MNIST page): 0x08 unsigned byte, 0x0C big-endian int32,
# 0x0D big-endian float32.
IDX_UBYTE, IDX_INT32, IDX_FLOAT32 = 0x08, 0x0C, 0x0D


def write_idx(path, array, type_code, compress=False):
  """Independent IDX writer: 2 zero bytes, type code, ndim, big-endian uint32 dims, data."""
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
  payload = header + array.tobytes()
  with (gzip.open if compress else open)(path, "wb") as f:
    f.write(payload)
  return str(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
  rng = np.random.default_rng(1)
  cases = [
      (rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), IDX_UBYTE),
      (rng.integers(-2**31, 2**31 - 1, (4, 6)).astype(">i4"), IDX_INT32),
      (rng.standard_normal((9,)).astype(">f4"), IDX_FLOAT32),
  ]
  for index, (array, type_code) in enumerate(cases):
    path = write_idx(tmp_path / (f"a{index}" + (".gz" if compress else "")), array, type_code, compress)
    read = fashion_mnist.read_idx(path)
    assert read.shape == array.shape
    np.testing.assert_array_equal(read, array)


def test_read_idx_rejects_malformed_files(tmp_path):
  bad_magic = tmp_path / "bad_magic"
  bad_magic.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
  with pytest.raises(ValueError, match="not an IDX file"):
    fashion_mnist.read_idx(str(bad_magic))

  unknown_type = tmp_path / "unknown_type"
  unknown_type.write_bytes(bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"\x00")
  with pytest.raises(ValueError, match="unknown IDX element type"):
    fashion_mnist.read_idx(str(unknown_type))

  truncated = tmp_path / "truncated"
  array = np.arange(12, dtype=np.uint8).reshape(3, 4)
  write_idx(truncated, array, IDX_UBYTE)
  truncated.write_bytes(truncated.read_bytes()[:-2])
  with pytest.raises(ValueError, match="header says shape"):
    fashion_mnist.read_idx(str(truncated))

  short_header = tmp_path / "short_header"
  short_header.write_bytes(bytes([0, 0, IDX_UBYTE, 3]) + b"\x00\x00")
  with pytest.raises(ValueError, match="truncated IDX header"):
    fashion_mnist.read_idx(str(short_header))


def _fake_dataset(directory, num_images, compress, seed=2):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_images, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, (num_images,), dtype=np.uint8)
  suffix = ".gz" if compress else ""
  write_idx(os.path.join(directory, "t10k-images-idx3-ubyte" + suffix), images, IDX_UBYTE, compress)
  write_idx(os.path.join(directory, "t10k-labels-idx1-ubyte" + suffix), labels, IDX_UBYTE, compress)
  return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_load_split_pads_and_scales(tmp_path, compress):
  images, labels = _fake_dataset(str(tmp_path), 6, compress)
  loaded_images, loaded_labels = fashion_mnist.load_split("test", str(tmp_path))
  assert loaded_images.shape == (6, 32, 32, 1) and loaded_images.dtype == np.float32
  assert loaded_labels.dtype == np.int32
  np.testing.assert_array_equal(loaded_labels, labels)
  # Independent reference: pixel p -> 2 p / 255 - 1 in the centre, -1 (black) in a 2-pixel border.
  expected = np.full((6, 32, 32), -1.0)
  expected[:, 2:30, 2:30] = 2.0 * images / 255.0 - 1.0
  np.testing.assert_allclose(loaded_images[..., 0], expected, atol=1e-6)
  limited, limited_labels = fashion_mnist.load_split("test", str(tmp_path), limit=4)
  np.testing.assert_array_equal(limited, loaded_images[:4])
  np.testing.assert_array_equal(limited_labels, labels[:4])


def test_load_split_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown Fashion-MNIST split"):
    fashion_mnist.load_split("validation", str(tmp_path))
  missing = str(tmp_path / "does_not_exist")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    fashion_mnist.load_split("test", missing)
  # Directory present but files absent: the error names the file and the install hint.
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*apt-get install"):
    fashion_mnist.load_split("test", str(tmp_path))
  # Labels that do not match the images.
  _fake_dataset(str(tmp_path), 5, compress=False)
  write_idx(os.path.join(str(tmp_path), "t10k-labels-idx1-ubyte"), np.zeros(4, np.uint8), IDX_UBYTE)
  with pytest.raises(ValueError, match="5 images but .*t10k-labels-idx1-ubyte holds labels of shape"):
    fashion_mnist.load_split("test", str(tmp_path))


def test_labels_out_of_range_are_refused(tmp_path):
  _fake_dataset(str(tmp_path), 5, compress=False)
  write_idx(os.path.join(str(tmp_path), "t10k-labels-idx1-ubyte"),
            np.array([0, 3, 10, 9, 255], np.uint8), IDX_UBYTE)
  with pytest.raises(DataError, match=r"2 labels lie outside \[0, 10\) \(first at index 2: 10\)"):
    fashion_mnist.load_split("test", str(tmp_path))


def test_truncated_gzip_names_its_path(tmp_path):
  _fake_dataset(str(tmp_path), 6, compress=True)
  path = os.path.join(str(tmp_path), "t10k-images-idx3-ubyte.gz")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])  # cut off mid-stream
  with pytest.raises(DataError, match=re.escape(path) + ".*truncated"):
    fashion_mnist.load_split("test", str(tmp_path))
  with open(path, "wb") as f:
    f.write(b"\x1f\x8b" + b"garbage" * 10)  # gzip magic, then no valid stream
  with pytest.raises(DataError, match=re.escape(path)):
    fashion_mnist.load_split("test", str(tmp_path))


def test_environment_variable_selects_directory(tmp_path, monkeypatch):
  images, _ = _fake_dataset(str(tmp_path), 3, compress=True)
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
  loaded, _ = fashion_mnist.load_split("test")
  assert loaded.shape[0] == 3
  np.testing.assert_allclose(loaded[:, 2:30, 2:30, 0], 2.0 * images / 255.0 - 1.0, atol=1e-6)


def test_installed_dataset_shapes():
  directory = fashion_mnist.data_dir()
  if not os.path.isdir(directory):
    pytest.skip(f"Fashion-MNIST not installed at {directory}")
  images, labels = fashion_mnist.load_split("test", limit=100)
  assert images.shape == (100, 32, 32, 1)
  assert images.min() == -1.0 and images.max() == 1.0
  assert set(np.unique(labels)) <= set(range(fashion_mnist.NUM_CLASSES))
  # The padding border is background everywhere.
  assert np.all(images[:, :2] == -1.0) and np.all(images[:, :, -2:] == -1.0)
