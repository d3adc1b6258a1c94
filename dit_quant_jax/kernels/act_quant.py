"""Fused per-token 4-bit activation quantization (HQ-DiT W4A4 inputs), optional rotation.

For x: (M, K) the kernel produces what ``fp4_matmul.w4a4_matmul`` consumes:

1. optional transform (notes/interfaces.md, "Hadamard / orthogonal transform"):
   ``xq[m, i*b + j] = sum_{i', j'} x[m, i'*b + j'] * signs[i'*b + j'] * A[i', i] * B[j', j]``,
   i.e. ``xq = x @ diag(signs) @ kron(A, B)`` with A: (a, a), B: (b, b), K = a * b;
2. per-token scale ``s[m] = clip_ratio * max_k |xq[m, k]| / magnitudes[-1]`` (the clipped
   absmax maps to the format's largest magnitude; an all-zero row gets s = 1, as
   ``quant.formats.absmax_scale``);
3. codes: magnitude index = nearest of the 8 sorted ``magnitudes`` to ``|xq| / s``, ties to the
   even index (round-to-nearest-even on the format grid: the index's low bit is the mantissa's
   low bit for E2M1 / E1M2 and the integer's for INT4); values past the largest magnitude
   saturate; sign bit 3 set for negative values with a non-zero magnitude (zero is always code 0);
4. pack along K with the project's 4-bit layout (``pack_bits(codes, 4, axis=1)``) -> uint8
   (M, ceil(K/2)), and the scales (M,) float32.

Kernel structure (one program per ``block_m`` rows; the per-token absmax needs the whole row
before any code can be chosen, so each program makes two passes and recomputes the transform in
the second instead of writing and re-reading float activations):

* with a transform, output block i (b columns) is
  ``(sum_{i'} A[i', i] * (x_{i'} * signs_{i'})) @ B``: ``a`` scaled adds of (block_m, b) input
  blocks then one (b x b) matmul, split as ``B[:, 0::2]`` / ``B[:, 1::2]`` so the even and odd
  output columns (the two nibbles of a packed byte) come out of separate dots; cost
  2 * M * K * (a + b) flops per pass;
* without one, the row is read in (block_m, block_k) tiles; the quantizing pass gathers the even
  and odd columns of each tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dit_quant_jax.kernels import common
from dit_quant_jax.numerics import packing

CODE_BITS = 4
NUM_MAGNITUDES = 8
SIGN_BIT = 8  # code bit 3


def check_magnitudes(magnitudes) -> tuple:
  """A format's 8 non-negative magnitudes, ascending, the first 0 -> tuple of floats."""
  magnitudes = tuple(float(v) for v in magnitudes)
  if len(magnitudes) != NUM_MAGNITUDES:
    raise ValueError(f"a 4-bit format has {NUM_MAGNITUDES} magnitudes, got {len(magnitudes)}")
  if magnitudes[0] != 0.0 or any(b <= a for a, b in zip(magnitudes, magnitudes[1:])):
    raise ValueError(f"magnitudes must start at 0 and increase strictly, got {magnitudes}")
  return magnitudes


def _midpoints(magnitudes) -> list:
  return [np.float32((lo + hi) / 2) for lo, hi in zip(magnitudes, magnitudes[1:])]


def _check_transform(transform, k_features):
  if transform is None:
    return None
  signs, a_matrix, b_matrix = transform
  a_size, b_size = a_matrix.shape[0], b_matrix.shape[0]
  if a_matrix.shape != (a_size, a_size) or b_matrix.shape != (b_size, b_size):
    raise ValueError(
        f"transform matrices must be square, got A {a_matrix.shape}, B {b_matrix.shape}")
  if a_size * b_size != k_features:
    raise ValueError(
        f"transform kron(A, B) is {a_size * b_size} wide but in_features is {k_features}")
  if signs.shape != (k_features,):
    raise ValueError(f"transform signs must have shape ({k_features},), got {signs.shape}")
  return a_size, b_size


def _quantize_codes(y, scale, midpoints):
  """y: (r, c) float32, scale: (r,) > 0 -> int32 sign-magnitude codes (module doc, step 3)."""
  v = jnp.abs(y) / scale[:, None]
  magnitude_index = jnp.zeros(y.shape, jnp.int32)
  for t, mid in enumerate(midpoints):
    # Between magnitudes t and t+1 a tie goes to whichever index is even.
    above = (v > mid) if t % 2 == 0 else (v >= mid)
    magnitude_index = magnitude_index + above.astype(jnp.int32)
  negative = (y < 0) & (magnitude_index > 0)
  return jnp.where(negative, magnitude_index + SIGN_BIT, magnitude_index)


def _token_scale(absmax, magnitudes, clip_ratio):
  scale = absmax * np.float32(clip_ratio) / np.float32(magnitudes[-1])
  return jnp.where(scale > 0, scale, 1.0)


def _pack_pair(even_codes, odd_codes):
  return lax.bitwise_or(even_codes, lax.shift_left(odd_codes, np.int32(4))).astype(jnp.uint8)


def act_quant_kernel(x_ref, packed_ref, scale_ref, *, magnitudes: tuple, clip_ratio: float,
                     block_m: int, block_k: int):
  """No transform.  x_ref: (M, K); packed_ref: (M, ceil(K/2)) uint8; scale_ref: (M,) float32."""
  m_rows, k_features = x_ref.shape
  packed_cols = packed_ref.shape[1]
  half = block_k // 2
  row_start = pl.program_id(0) * block_m
  rows = row_start + jnp.arange(block_m, dtype=jnp.int32)
  row_mask = rows < m_rows
  n_tiles = pl.cdiv(k_features, block_k)

  def absmax_step(k_tile, absmax):
    k_start = k_tile * block_k
    k_mask = k_start + jnp.arange(block_k, dtype=jnp.int32) < k_features
    tile = common.load_tile(x_ref, row_start, block_m, k_start, block_k, row_mask, k_mask)
    return jnp.maximum(absmax, jnp.max(jnp.abs(tile.astype(jnp.float32)), axis=1))

  absmax = lax.fori_loop(0, n_tiles, absmax_step, jnp.zeros((block_m,), jnp.float32))
  scale = _token_scale(absmax, magnitudes, clip_ratio)
  plgpu.store(scale_ref.at[pl.ds(row_start, block_m)], scale, mask=row_mask)
  midpoints = _midpoints(magnitudes)

  def quantize_step(k_tile, carry):
    pair = k_tile * half + jnp.arange(half, dtype=jnp.int32)  # packed column = pair index
    codes = []
    for parity in (0, 1):
      ks = 2 * pair + parity
      mask = row_mask[:, None] & (ks < k_features)[None, :]
      values = common.gather(x_ref, (rows[:, None], ks[None, :]), mask).astype(jnp.float32)
      codes.append(_quantize_codes(values, scale, midpoints))
    common.store_tile(packed_ref, _pack_pair(*codes), row_start, k_tile * half, row_mask,
                      pair < packed_cols)
    return carry

  lax.fori_loop(0, n_tiles, quantize_step, 0)


def act_quant_transform_kernel(x_ref, signs_ref, a_ref, b_even_ref, b_odd_ref, packed_ref,
                               scale_ref, *, magnitudes: tuple, clip_ratio: float,
                               block_m: int, transform_dtype):
  """With transform.  x_ref: (M, K); signs_ref: (K,) float32; a_ref: (a, a) float32;
  b_even_ref, b_odd_ref: (b, b/2) (columns 0::2 and 1::2 of B); outputs as act_quant_kernel."""
  m_rows, k_features = x_ref.shape
  a_size = a_ref.shape[0]
  b_size = b_even_ref.shape[0]
  half = b_size // 2
  row_start = pl.program_id(0) * block_m
  rows = row_start + jnp.arange(block_m, dtype=jnp.int32)
  row_mask = rows < m_rows
  all_cols = jnp.arange(b_size, dtype=jnp.int32) < b_size
  precision = lax.Precision.HIGHEST if transform_dtype == jnp.float32 else None

  def transformed_block(i):
    """Columns [i*b, (i+1)*b) of x @ diag(signs) @ kron(A, B), as (even, odd) halves."""

    def mix_step(i_in, acc):
      x_block = common.load_tile(x_ref, row_start, block_m, i_in * b_size, b_size, row_mask,
                                 all_cols).astype(jnp.float32)
      signs = common.load_vector(signs_ref, i_in * b_size, b_size, all_cols)
      coefficient = plgpu.load(a_ref.at[i_in, i])
      return acc + coefficient * (x_block * signs[None, :])

    mixed = lax.fori_loop(0, a_size, mix_step, jnp.zeros((block_m, b_size), jnp.float32))
    mixed = mixed.astype(transform_dtype)
    halves = []
    for b_ref in (b_even_ref, b_odd_ref):
      halves.append(jnp.dot(mixed, b_ref[...].astype(transform_dtype), precision=precision,
                            preferred_element_type=jnp.float32))
    return halves

  def absmax_step(i, absmax):
    even, odd = transformed_block(i)
    block_max = jnp.maximum(jnp.max(jnp.abs(even), axis=1), jnp.max(jnp.abs(odd), axis=1))
    return jnp.maximum(absmax, block_max)

  absmax = lax.fori_loop(0, a_size, absmax_step, jnp.zeros((block_m,), jnp.float32))
  scale = _token_scale(absmax, magnitudes, clip_ratio)
  plgpu.store(scale_ref.at[pl.ds(row_start, block_m)], scale, mask=row_mask)
  midpoints = _midpoints(magnitudes)

  def quantize_step(i, carry):
    even, odd = transformed_block(i)
    packed = _pack_pair(_quantize_codes(even, scale, midpoints),
                        _quantize_codes(odd, scale, midpoints))
    all_pairs = jnp.arange(half, dtype=jnp.int32) < half
    common.store_tile(packed_ref, packed, row_start, i * half, row_mask, all_pairs)
    return carry

  lax.fori_loop(0, a_size, quantize_step, 0)


@functools.partial(jax.jit, static_argnames=["magnitudes", "clip_ratio", "block_m", "block_k",
                                             "num_warps", "num_stages", "interpret",
                                             "transform_dtype"])
def act_quant(x, transform=None, *, magnitudes: tuple, clip_ratio: float = 1.0,
              block_m: int = 16, block_k: int = 128, num_warps: int = 4, num_stages: int = 2,
              interpret: bool = False, transform_dtype=jnp.float32):
  """x: (M, K), transform: None or (signs (K,), A (a, a), B (b, b)) ->
  (packed codes (M, ceil(K/2)) uint8, scale (M,) float32).

  magnitudes: the format's 8 sorted magnitudes (static); clip_ratio: fraction of the row absmax
  mapped to the largest magnitude (static, HQ-DiT's activation clipping).  block_k: row tile width without a
  transform (with one, the tile is b wide: b must be a power of two >= 32).  transform_dtype:
  float32 (IEEE dot, the default) or bfloat16 (tensor cores; codes may then differ from the
  reference at near-ties).
  """
  if x.ndim != 2:
    raise ValueError(f"x must be (M, K), got shape {x.shape}")
  magnitudes = check_magnitudes(magnitudes)
  m_rows, k_features = x.shape
  common.check_block("block_m", block_m)
  out_shape = (jax.ShapeDtypeStruct((m_rows, packing.packed_length(k_features, CODE_BITS)),
                                    jnp.uint8),
               jax.ShapeDtypeStruct((m_rows,), jnp.float32))
  sizes = _check_transform(transform, k_features)
  if sizes is None:
    common.check_block("block_k", block_k, minimum=2 * common.MIN_BLOCK)
    kernel = functools.partial(act_quant_kernel, magnitudes=magnitudes,
                               clip_ratio=float(clip_ratio), block_m=block_m, block_k=block_k)
    operands = (x,)
  else:
    _, b_size = sizes
    common.check_block("transform block b", b_size, minimum=2 * common.MIN_BLOCK)
    signs, a_matrix, b_matrix = transform
    b_matrix = b_matrix.astype(jnp.float32)
    kernel = functools.partial(act_quant_transform_kernel, magnitudes=magnitudes,
                               clip_ratio=float(clip_ratio), block_m=block_m,
                               transform_dtype=transform_dtype)
    operands = (x, signs.astype(jnp.float32), a_matrix.astype(jnp.float32), b_matrix[:, 0::2],
                b_matrix[:, 1::2])
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(pl.cdiv(m_rows, block_m),),
      compiler_params=common.compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="act_quant",
  )(*operands)


def transform_reference(x, transform):
  """x: (M, K) -> x @ diag(signs) @ kron(A, B) in float32 (einsum on the (a, b) view)."""
  signs, a_matrix, b_matrix = transform
  m_rows, k_features = x.shape
  a_size, b_size = a_matrix.shape[0], b_matrix.shape[0]
  x3 = (x.astype(jnp.float32) * signs.astype(jnp.float32)).reshape(m_rows, a_size, b_size)
  y = jnp.einsum("mij,ia,jb->mab", x3, a_matrix.astype(jnp.float32),
                 b_matrix.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  return y.reshape(m_rows, k_features)


def nearest_even_codes_reference(y, scale, magnitudes):
  """Codes by explicit nearest-magnitude search (ties -> even index, saturating):
  y (M, K), scale (M,) > 0."""
  grid = jnp.asarray(magnitudes, jnp.float32)
  v = jnp.abs(y) / scale[:, None]
  distance = jnp.abs(v[..., None] - grid)  # (M, K, 8)
  nearest = distance == jnp.min(distance, axis=-1, keepdims=True)
  even = (jnp.arange(NUM_MAGNITUDES) % 2) == 0
  has_even = jnp.any(nearest & even, axis=-1, keepdims=True)
  choice = jnp.where(has_even, nearest & even, nearest)
  magnitude_index = jnp.argmax(choice, axis=-1).astype(jnp.int32)
  return jnp.where((y < 0) & (magnitude_index > 0), magnitude_index + SIGN_BIT, magnitude_index)


def act_quant_reference(x, transform=None, *, magnitudes: tuple, clip_ratio: float = 1.0):
  """Plain jnp version of :func:`act_quant` (same outputs)."""
  magnitudes = check_magnitudes(magnitudes)
  _check_transform(transform, x.shape[1])
  y = x.astype(jnp.float32) if transform is None else transform_reference(x, transform)
  scale = _token_scale(jnp.max(jnp.abs(y), axis=1), magnitudes, clip_ratio)
  codes = nearest_even_codes_reference(y, scale, magnitudes)
  return packing.pack_bits(codes, CODE_BITS, axis=1), scale


def dequantize_activations_reference(packed, scale, lut, k_features: int):
  """(M, ceil(K/2)) codes, (M,) scale, (16,) lut -> (M, K) float32."""
  codes = packing.unpack_bits(packed, CODE_BITS, k_features, axis=1, dtype=jnp.int32)
  return jnp.asarray(lut, jnp.float32)[codes] * scale[:, None]


def quantize_activations(x, magnitudes, transform=None, *, clip_ratio: float = 1.0,
                         impl: str = "auto", **kernel_options):
  """Dispatcher: x: (..., K) -> (packed (..., ceil(K/2)) uint8, scale (...,) float32)."""
  x2d, lead = common.flatten_rows(x, x.shape[-1])
  magnitudes = check_magnitudes(magnitudes)
  use_pallas, interpret = common.resolve_impl(impl)
  if use_pallas:
    options = dict(block_m=common.block_size_for(x2d.shape[0], 16, 32),
                   block_k=common.block_size_for(x2d.shape[1], 32, 128))
    options.update(kernel_options)
    packed, scale = act_quant(x2d, transform, magnitudes=magnitudes, clip_ratio=clip_ratio,
                              interpret=interpret, **options)
  else:
    packed, scale = act_quant_reference(x2d, transform, magnitudes=magnitudes,
                                        clip_ratio=clip_ratio)
  return packed.reshape(lead + (packed.shape[-1],)), scale.reshape(lead)
