"""Sample and result writers (dit_quant_jax/eval/writers.py): files read back as written."""

import json

import numpy as np
import pytest
from PIL import Image

from dit_quant_jax.eval import writers


def test_to_uint8_endpoints_and_rounding():
  np.testing.assert_array_equal(writers.to_uint8(np.array([-1.0, 0.0, 1.0, -3.0, 2.5])),
                                [0, 128, 255, 0, 255])
  rng = np.random.default_rng(20)
  values = rng.uniform(-1, 1, (4, 5, 5, 1))
  expected = [min(255, max(0, int(np.floor(127.5 * (v + 1) + 0.5)))) for v in values.ravel()]
  np.testing.assert_array_equal(writers.to_uint8(values).ravel(), expected)
  with pytest.raises(ValueError, match="NaN"):
    writers.to_uint8(np.array([np.nan]))


def test_sample_grid_rows_are_classes(tmp_path):
  rng = np.random.default_rng(21)
  height, width, gap = 6, 5, 2
  images = rng.uniform(-1, 1, (9, height, width, 1))
  labels = np.array([2, 0, 2, 1, 0, 2, 2, 1, 0])
  grid = writers.sample_grid(images, labels, num_classes=4, gap=gap, include_empty_rows=True)
  per_class = 4  # class 2 has 4 samples
  assert grid.shape == (4 * (height + gap) + gap, per_class * (width + gap) + gap, 1)
  pixels = writers.to_uint8(images)
  for label in range(3):
    for column, index in enumerate(np.flatnonzero(labels == label)):
      top, left = gap + label * (height + gap), gap + column * (width + gap)
      np.testing.assert_array_equal(grid[top:top + height, left:left + width], pixels[index])
  # Class 3 has no samples: its row is all gap colour, as is the last cell of row 0.
  assert np.all(grid[gap + 3 * (height + gap):] == writers.GRID_GAP_VALUE)
  assert np.all(grid[gap:gap + height, gap + 3 * (width + gap):] == writers.GRID_GAP_VALUE)
  # By default only classes with samples get rows: (classes 5 and 9 of 1000) -> 2 rows.
  sparse = writers.sample_grid(images[:5], np.array([9, 5, 9, 9, 5]), num_classes=1000, gap=gap)
  assert sparse.shape == (2 * (height + gap) + gap, 3 * (width + gap) + gap, 1)
  np.testing.assert_array_equal(sparse[gap:gap + height, gap:gap + width], pixels[1])  # class 5 first
  np.testing.assert_array_equal(sparse[2 * gap + height:2 * gap + 2 * height, gap:gap + width], pixels[0])

  path = writers.write_sample_grid(str(tmp_path / "sub" / "grid.png"), images, labels, num_classes=4,
                                   gap=gap, scale=3, include_empty_rows=True)
  with Image.open(path) as image:
    assert image.format == "PNG" and image.mode == "L"
    assert image.size == (3 * grid.shape[1], 3 * grid.shape[0])  # PIL size is (width, height)
    read = np.asarray(image)
  np.testing.assert_array_equal(read[::3, ::3], grid[..., 0])

  rgb_path = writers.write_sample_grid(str(tmp_path / "rgb.png"), np.repeat(images, 3, axis=-1), labels)
  with Image.open(rgb_path) as image:
    assert image.mode == "RGB"


def test_sample_grid_errors():
  images = np.zeros((3, 4, 4, 1)) + 0.5
  with pytest.raises(ValueError, match="labels of shape"):
    writers.sample_grid(images, np.array([0, 1]))
  with pytest.raises(ValueError, match="labels must lie"):
    writers.sample_grid(images, np.array([0, 1, 5]), num_classes=3)
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    writers.sample_grid(images[..., 0], np.array([0, 1, 2]))


def test_adm_npz_layout(tmp_path):
  rng = np.random.default_rng(22)
  images = rng.uniform(-1, 1, (7, 32, 32, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 7)
  path = writers.write_adm_npz(str(tmp_path / "samples.npz"), images, labels)
  with np.load(path) as stored:
    assert sorted(stored.files) == ["arr_0", "arr_1"]
    arr = stored["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 32, 32, 3)
    for channel in range(3):
      np.testing.assert_array_equal(arr[..., channel], writers.to_uint8(images)[..., 0])
    np.testing.assert_array_equal(stored["arr_1"], labels)
  gray = writers.write_adm_npz(str(tmp_path / "gray.npz"), images, expand_grayscale=False)
  with np.load(gray) as stored:
    assert stored.files == ["arr_0"] and stored["arr_0"].shape == (7, 32, 32, 1)
  with pytest.raises(ValueError, match="labels of shape"):
    writers.write_adm_npz(str(tmp_path / "bad.npz"), images, labels[:3])


def test_metrics_json_round_trip(tmp_path):
  metrics = {"fd": np.float64(12.5), "is": np.float32(7.25), "class_acc": 0.875,
             "per_step_mse": np.array([0.1, 0.2]), "psnr": float("inf"), "num_samples": np.int64(100)}
  path = writers.write_metrics_json(str(tmp_path / "out" / "metrics.json"), metrics, method="rtn")
  with open(path) as f:
    read = json.load(f)
  assert read == {"fd": 12.5, "is": 7.25, "class_acc": 0.875, "per_step_mse": [0.1, 0.2],
                  "psnr": "inf", "num_samples": 100, "method": "rtn"}
  assert list(tmp_path.joinpath("out").iterdir()) == [tmp_path / "out" / "metrics.json"]
