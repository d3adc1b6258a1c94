"""Round-to-nearest quantization on any grid of ``quant.formats``: the baselines and the
building blocks the HQ-DiT transform (``quant.hqdit``) composes.

Weights: one scale per output channel, ``scale[n] = clip_ratio[n] * max_k |W[k, n]| /
format.max``, codes by round-to-nearest (ties to even) on the grid.  The clip ratio is 1
(max scaling) or picked per channel among candidate ratios by the smallest squared error
(:func:`search_channel_scales`).

Activations: fake quantization (quantize, then dequantize; the matmul runs on the grid
values) either per token with a dynamic scale ``clip_ratio * max_k |x[m, k]| / format.max``
computed at run time, or per tensor with a static calibrated scale.

This module holds numerics only (it imports ``quant.formats`` and nothing of HQ-DiT); the
RTN baseline over a whole params pytree, which builds ``FP4Weight`` nodes, lives in
``quant.hqdit`` (:func:`dit_quant_jax.quant.hqdit.quantize_params_rtn`), so the dependency
points one way: hqdit -> rtn.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_quant_jax.quant import formats

GRANULARITIES = ("per_token", "per_tensor", "none")


def clip_ratio_candidates(clip_min: float, count: int) -> np.ndarray:
  """``count`` clip ratios evenly spaced in [clip_min, 1] (count = 1 -> [1.0]), float32."""
  if not 0 < clip_min <= 1:
    raise ValueError(f"clip_min must be in (0, 1], got {clip_min}")
  if count < 1:
    raise ValueError(f"need at least one clip candidate, got {count}")
  if count == 1:
    return np.ones((1,), np.float32)
  return np.linspace(clip_min, 1.0, count).astype(np.float32)


# ------------------------------------------------------------------------------- weights
def channel_absmax(kernel) -> jax.Array:
  """kernel: (K, N) -> (N,) max_k |W[k, n]|."""
  _check_kernel(kernel)
  return jnp.max(jnp.abs(jnp.asarray(kernel, jnp.float32)), axis=0)


def channel_scales(kernel, fmt, clip_ratio=1.0) -> jax.Array:
  """Per-output-channel scales (N,) mapping clip_ratio * channel absmax to the format max."""
  return formats.absmax_scale(channel_absmax(kernel), fmt, clip_ratio)


def search_channel_scales(kernel, fmt, ratios) -> tuple[jax.Array, jax.Array]:
  """Per output channel, the candidate ratio with the smallest sum_k (W - Q(W))^2.

  kernel: (K, N); ratios: (C,).  Returns (scales (N,), chosen ratios (N,)).  Ties go to the
  earliest candidate."""
  fmt = formats.get_format(fmt)
  return _search_channel_scales(jnp.asarray(kernel, jnp.float32),
                                jnp.asarray(ratios, jnp.float32), fmt.name)


def _search_channel_scales_impl(kernel, ratios, fmt_name):
  absmax = jnp.max(jnp.abs(kernel), axis=0)

  def errors(ratio):
    scale = formats.absmax_scale(absmax, fmt_name, ratio)
    deq = formats.fake_quantize(kernel, fmt_name, scale[None, :])
    return jnp.sum(jnp.square(kernel - deq), axis=0)

  errs = jax.lax.map(errors, ratios)  # (C, N)
  best = jnp.argmin(errs, axis=0)
  chosen = ratios[best]
  return formats.absmax_scale(absmax, fmt_name, chosen), chosen


_search_channel_scales = jax.jit(_search_channel_scales_impl, static_argnums=2)


def quantize_kernel(kernel, fmt, scales) -> jax.Array:
  """Round-to-nearest codes (K, N) uint8 of W / scale[n] on the format's grid."""
  _check_kernel(kernel)
  scales = jnp.asarray(scales, jnp.float32)
  return formats.encode(jnp.asarray(kernel, jnp.float32) / scales[None, :], fmt)


# --------------------------------------------------------------------------- activations
def per_token_fake_quant(x, fmt, clip_ratio=1.0):
  """Dynamic per-token (per row of the last axis) fake quantization.  x: (..., K)."""
  x = jnp.asarray(x)
  absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
  return formats.fake_quantize(x, fmt, formats.absmax_scale(absmax, fmt, clip_ratio))


def per_tensor_fake_quant(x, fmt, scale):
  """Static per-tensor fake quantization with a calibrated scalar scale."""
  return formats.fake_quantize(x, fmt, scale)


def activation_fake_quant(x, fmt, granularity: str, clip_ratio=1.0, static_scale=None):
  """Dispatch on granularity: 'per_token' (dynamic), 'per_tensor' (static_scale) or 'none'."""
  if granularity == "none" or fmt is None:
    return x
  if granularity == "per_token":
    return per_token_fake_quant(x, fmt, clip_ratio)
  if granularity == "per_tensor":
    if static_scale is None:
      raise ValueError("per_tensor activation quantization needs a calibrated static scale")
    return per_tensor_fake_quant(x, fmt, static_scale)
  raise ValueError(f"unknown activation granularity {granularity!r}; known: {GRANULARITIES}")


def search_activation_clip(samples, fmt, ratios, granularity: str = "per_token",
                           absmax: Optional[float] = None) -> tuple[float, np.ndarray]:
  """Clip ratio minimizing the fake-quantization MSE of calibration rows.

  samples: (R, K) layer inputs; ratios: (C,).  'per_token': the ratio scales every row's own
  absmax; 'per_tensor': it scales ``absmax`` (default: the samples' absmax).  Returns
  (best ratio, mse per candidate (C,))."""
  fmt = formats.get_format(fmt)
  samples = jnp.asarray(samples, jnp.float32)
  ratios = jnp.asarray(ratios, jnp.float32)
  if granularity == "per_token":
    errs = _per_token_clip_errors(samples, ratios, fmt.name)
  elif granularity == "per_tensor":
    top = jnp.max(jnp.abs(samples)) if absmax is None else jnp.asarray(absmax, jnp.float32)
    errs = _per_tensor_clip_errors(samples, ratios, top, fmt.name)
  else:
    raise ValueError(f"clip search needs granularity 'per_token' or 'per_tensor', got "
                     f"{granularity!r}")
  errs = np.asarray(errs)
  return float(np.asarray(ratios)[int(np.argmin(errs))]), errs


def _per_token_clip_errors_impl(samples, ratios, fmt_name):
  return jax.lax.map(
      lambda r: jnp.mean(jnp.square(samples - per_token_fake_quant(samples, fmt_name, r))),
      ratios)


def _per_tensor_clip_errors_impl(samples, ratios, absmax, fmt_name):
  def mse(r):
    scale = formats.absmax_scale(absmax, fmt_name, r)
    return jnp.mean(jnp.square(samples - per_tensor_fake_quant(samples, fmt_name, scale)))
  return jax.lax.map(mse, ratios)


_per_token_clip_errors = jax.jit(_per_token_clip_errors_impl, static_argnums=2)
_per_tensor_clip_errors = jax.jit(_per_tensor_clip_errors_impl, static_argnums=3)


def _check_kernel(kernel) -> None:
  if jnp.ndim(kernel) != 2:
    raise ValueError(f"expected a (in_features, out_features) kernel, got shape {jnp.shape(kernel)}")
