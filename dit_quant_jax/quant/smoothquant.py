"""SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", Eq. 4): migrate activation outliers into the weights.

For a layer ``y = x @ W`` (x: (..., K), W: (K, N)) and a per-input-channel smoothing factor
``s: (K,)``, ``x @ W = (x / s) @ (diag(s) @ W)`` exactly.  The paper's factor is

  ``s_k = max|X_k|^alpha / max_n |W_kn|^(1 - alpha)``,

with ``max|X_k|`` the calibration absmax of input channel k: alpha = 0 leaves the
activations alone, alpha = 1 moves their whole range into the weights.  The paper fixes alpha
per model (0.5 for most LLMs); here alpha is searched per layer among a config list by the
smallest output error ``||X W - Q(X / s) Q(diag(s) W)||^2`` on calibration rows.  Channels
with zero activation or zero weight range keep ``s_k = 1``.

In deployment ``1 / s`` folds into the operation that produces x (a LayerNorm's affine
parameters in the paper; in a DiT, the adaLN shift/scale of ``modulate`` for qkv/fc1).  This
project applies ``x * (1 / s)`` online inside the quantized weight's ``linear`` (one
per-channel multiply), so that the model code stays unchanged; the numbers are the same.
Everything here is float64 numpy.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # around the paper's default 0.5


def smoothing_factors(act_absmax, kernel, alpha: float) -> np.ndarray:
  """s: (K,) from act_absmax (K,) and kernel (K, N) (the Eq. 4 rule above), float64."""
  act_absmax = np.asarray(act_absmax, np.float64)
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2 or act_absmax.shape != (kernel.shape[0],):
    raise ValueError(f"need act_absmax (K,) and kernel (K, N); got {act_absmax.shape} and "
                     f"{kernel.shape}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
  weight_absmax = np.max(np.abs(kernel), axis=1)
  live = (act_absmax > 0) & (weight_absmax > 0)
  s = np.ones_like(act_absmax)
  s[live] = act_absmax[live] ** alpha / weight_absmax[live] ** (1.0 - alpha)
  return s


def smooth(samples, kernel, factors):
  """(samples / s, diag(s) @ kernel): the exact rewrite.  samples: (R, K); kernel: (K, N)."""
  factors = np.asarray(factors, np.float64)
  return np.asarray(samples, np.float64) / factors[None, :], np.asarray(kernel, np.float64) * factors[:, None]


def search_alpha(samples, kernel, act_absmax, output_error: Callable[[np.ndarray, np.ndarray], float],
                 alphas: Sequence[float] = DEFAULT_ALPHAS) -> tuple[float, np.ndarray, dict]:
  """alpha with the smallest ``output_error(smoothed samples, smoothed kernel)``.

  output_error quantizes both as the layer will be quantized and returns the squared error
  of the outputs against ``samples @ kernel``.  Returns (alpha, s (K,), {alpha: error}); ties
  go to the earliest alpha."""
  if len(alphas) == 0:
    raise ValueError("SmoothQuant alpha search needs at least one candidate alpha")
  errors = {}
  best = None
  for alpha in alphas:
    factors = smoothing_factors(act_absmax, kernel, float(alpha))
    xs, ws = smooth(samples, kernel, factors)
    errors[float(alpha)] = float(output_error(xs, ws))
    if best is None or errors[float(alpha)] < errors[best[0]]:
      best = (float(alpha), factors)
  return best[0], best[1], errors
