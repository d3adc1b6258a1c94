"""Writers for samples and results: PNG grids, ADM-evaluator .npz batches, metrics JSON.

Every file is written atomically (temporary name, then rename: dit_quant_jax/utils/atomic.py).

Images arrive in model space, (N, H, W, C) float in [-1, 1].  :func:`to_uint8` maps them to
[0, 255] as the official DiT sampler does (clamp(127.5 x + 128) then truncate, i.e. round to
nearest of 127.5 (x + 1)).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from PIL import Image

from dit_quant_jax.utils import atomic

# Fill of the gaps between grid cells (uint8 gray, distinct from the black Fashion-MNIST background).
GRID_GAP_VALUE = 128
# The ADM evaluation suite (openai/guided-diffusion, evaluations/evaluator.py) feeds batches to
# Inception-v3, which needs 3 channels.
ADM_CHANNELS = 3


def to_uint8(images) -> np.ndarray:
  """(N, H, W, C) float in [-1, 1] -> uint8 [0, 255]: round(127.5 (x + 1)), clipped."""
  images = np.asarray(images, np.float64)
  if not np.all(np.isfinite(images)):
    raise ValueError("to_uint8: images contain NaN or Inf")
  return np.clip(np.floor(127.5 * images + 128.0), 0, 255).astype(np.uint8)


def _check_nhwc(images, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{what}: expected images (N, H, W, C) with C in (1, 3), got {images.shape}")
  return images


def sample_grid(images, labels, num_classes: Optional[int] = None, per_class: Optional[int] = None,
                gap: int = 2, include_empty_rows: bool = False) -> np.ndarray:
  """Arrange samples one row per class, classes ascending, each row's samples in input order.

  images: (N, H, W, C) in [-1, 1]; labels: (N,) ints in [0, num_classes) (num_classes defaults
  to max(label) + 1).  Rows are the classes present in ``labels``; with include_empty_rows
  every class in [0, num_classes) gets a row (row c = class c), blank when it has no sample
  (keep it False for 1000-class models).  per_class (columns) defaults to the largest class
  count; missing cells are gap colour.
  Returns uint8 (rows * (H + gap) + gap, per_class * (W + gap) + gap, C).
  """
  images = _check_nhwc(images, "sample_grid")
  labels = np.asarray(labels).astype(np.int64)
  if labels.shape != (images.shape[0],):
    raise ValueError(f"sample_grid: {images.shape[0]} images but labels of shape {labels.shape}")
  if images.shape[0] == 0:
    raise ValueError("sample_grid: no images")
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"sample_grid: labels must lie in [0, {num_classes}), got "
                     f"[{labels.min()}, {labels.max()}]")
  counts = np.bincount(labels, minlength=num_classes)
  per_class = int(counts.max()) if per_class is None else per_class
  row_classes = np.arange(num_classes) if include_empty_rows else np.flatnonzero(counts)
  pixels = to_uint8(images)
  _, height, width, channels = pixels.shape
  grid = np.full((len(row_classes) * (height + gap) + gap, per_class * (width + gap) + gap, channels),
                 GRID_GAP_VALUE, np.uint8)
  for row, label in enumerate(row_classes):
    for column, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
      top, left = gap + row * (height + gap), gap + column * (width + gap)
      grid[top:top + height, left:left + width] = pixels[index]
  return grid


def write_sample_grid(path: str, images, labels, num_classes: Optional[int] = None,
                      per_class: Optional[int] = None, gap: int = 2, scale: int = 1,
                      include_empty_rows: bool = False) -> str:
  """Write :func:`sample_grid` as a PNG (each pixel repeated ``scale`` times); returns path."""
  grid = sample_grid(images, labels, num_classes, per_class, gap, include_empty_rows)
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)  # uint8: "L" or "RGB"
  return atomic.save_image(path, image, format="PNG")


def write_adm_npz(path: str, images, labels=None, expand_grayscale: bool = True) -> str:
  """Write a sample batch for the ADM evaluation suite (guided-diffusion evaluations/evaluator.py).

  ``arr_0``: uint8 (N, H, W, 3) images, as the suite and the official DiT sampler store them;
  ``arr_1``: int (N,) labels when given (as guided-diffusion's image_sample.py stores them).
  Grayscale (C = 1) images are repeated to 3 channels unless ``expand_grayscale`` is False,
  because the suite's Inception-v3 reads RGB; FID on such batches is an Inception FID of
  Fashion-MNIST, not comparable with ImageNet numbers.
  """
  images = _check_nhwc(images, "write_adm_npz")
  pixels = to_uint8(images)
  if expand_grayscale and pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, ADM_CHANNELS, axis=-1)
  arrays = {"arr_0": pixels}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (pixels.shape[0],):
      raise ValueError(f"write_adm_npz: {pixels.shape[0]} images but labels of shape {labels.shape}")
    arrays["arr_1"] = labels.astype(np.int64)
  return atomic.savez(path, **arrays)


def _json_value(value: Any) -> Any:
  """numpy scalars/arrays -> Python; non-finite floats -> the strings 'inf', '-inf', 'nan'
  (strict JSON has no literal for them)."""
  if isinstance(value, dict):
    return {str(k): _json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  if isinstance(value, np.ndarray):
    return _json_value(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


def write_metrics_json(path: str, metrics: dict, **extra) -> str:
  """Write ``{**metrics, **extra}`` as indented, key-sorted strict JSON, atomically."""
  payload = _json_value({**metrics, **extra})
  return atomic.write_json(path, payload, indent=2, sort_keys=True, allow_nan=False)
