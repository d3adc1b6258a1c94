"""Fused per-token 4-bit activation quantization (HQ-DiT W4A4 inputs), optional rotation.

For x: (M, K) the kernel produces what ``fp4_matmul.w4a4_matmul`` consumes:

1. optional transform (quant/hadamard.py's element layout):
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
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import dispatch
from dit_quant_jax.numerics import fp4
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


def _quantize_codes(y, scale, magnitudes):
  """y: (r, c) float32, scale: (r,) > 0 -> int32 sign-magnitude codes (module doc, step 3)."""
  return fp4.encode_magnitudes(y / scale[:, None], magnitudes)


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

  def quantize_step(k_tile, carry):
    pair = k_tile * half + jnp.arange(half, dtype=jnp.int32)  # packed column = pair index
    codes = []
    for parity in (0, 1):
      ks = 2 * pair + parity
      mask = row_mask[:, None] & (ks < k_features)[None, :]
      values = common.gather(x_ref, (rows[:, None], ks[None, :]), mask).astype(jnp.float32)
      codes.append(_quantize_codes(values, scale, magnitudes))
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

  def quantize_step(i, carry):
    even, odd = transformed_block(i)
    packed = _pack_pair(_quantize_codes(even, scale, magnitudes),
                        _quantize_codes(odd, scale, magnitudes))
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


# ----------------------------------------------------------------------------------------
# Per-token act-quant into the 8-bit images the tensor-core matmuls read (kernels/fp4_mma.py).
# ----------------------------------------------------------------------------------------
#
# Transform split: Q = diag(signs) @ kron(A, H_b / sqrt(b)), A: (a, a) any dense block (h14's
# Hadamard H_a / sqrt(a) or a random orthogonal one), b = K / a a power of two.  With
# c = min(b, MAX_FAST_FACTOR) and H_b = kron(H_{b/c}, H_c) (Sylvester ordering),
# kron(A, H_b) = kron(L, H_c) with the dense factor L = kron(A, H_{b/c} / sqrt(b/c)): (a', a'),
# a' = K / c.  One token's row viewed as X: (a', c) (row-major, a free reshape of x) then gives
# Y = L^T @ (X * signs) @ H_c / sqrt(c): two small tensor-core dots on a tile that holds the
# whole row, so x is read once, the absmax and the codes come from registers, and nothing as
# large as the old (block_m, 512) float32 tiles is held (the largest tile is a'_pad x c, e.g.
# 64 x 128 at K = 4608 = 36 * 128).  H_c enters unnormalized (+-1, exact in bf16) and 1/sqrt(c)
# goes into the row scale.

# A row whose scale is below float32's smallest normal (an all-zero row, or one whose absmax is
# ~1e-38) gets scale 1, so all its codes are 0: a subnormal scale's reciprocal overflows, and
# devices differ in whether they flush it.
MIN_ROW_SCALE = np.float32(np.finfo(np.float32).tiny)
MAX_FAST_FACTOR = 128  # largest power-of-two factor applied as one dense +-1 (c, c) dot
IMAGES = ("int8", "fp8", "packed")
TRANSFORM_DTYPES = ("bf16x3", "float32", "tf32", "bfloat16")
FP8_FORMAT = "fp8_e4m3"


def _check_row_quant(act_format: str, image: str):
  if image not in IMAGES:
    raise ValueError(f"unknown activation image {image!r}; expected one of {IMAGES}")
  if act_format == FP8_FORMAT:
    if image != "fp8":
      raise ValueError("fp8_e4m3 activations only have the 'fp8' image")
    return None
  code = fp4.fp4_code(act_format)
  if image == "fp8" and not code.has_e4m3_image:
    raise ValueError(f"{code.name} activations have no exact E4M3 image; use image='int8'")
  return code


def row_shape(k_features: int, a_order=None) -> tuple[int, int]:
  """(rows per token a', row length c) of the kernel's view of a K-wide token row: with a
  transform block of order a, c = min(K / a, 128) (K / a must be a power of two); without one,
  c = min(128, next power of two of K).  Raises ValueError where the transform does not fit."""
  if a_order is None:
    c_size = min(MAX_FAST_FACTOR, pl.next_power_of_2(k_features))
    return -(-k_features // c_size), c_size
  if k_features % a_order:
    raise ValueError(f"transform block order {a_order} does not divide in_features {k_features}")
  b_size = k_features // a_order
  if b_size & (b_size - 1):
    raise ValueError(f"K / a = {b_size} must be a power of two (K = {k_features}, a = {a_order})")
  c_size = min(b_size, MAX_FAST_FACTOR)
  return k_features // c_size, c_size


def transform_factors(transform, k_features: int):
  """transform (signs (K,), block (a, a)) -> (signs, L (a', a') float32, c) (comment above)."""
  signs, block = transform[0], transform[1]
  a_size = int(block.shape[0])
  if block.shape != (a_size, a_size):
    raise ValueError(f"transform block must be square, got {block.shape}")
  _, c_size = row_shape(k_features, a_size)
  b_size = k_features // a_size
  if signs.shape != (k_features,):
    raise ValueError(f"transform signs must have shape ({k_features},), got {signs.shape}")
  outer = sylvester_unnormalized(b_size // c_size) / np.sqrt(b_size // c_size)
  dense = jnp.kron(jnp.asarray(block, jnp.float32), jnp.asarray(outer, jnp.float32))
  return jnp.asarray(signs, jnp.float32), dense, c_size


def sylvester_unnormalized(n: int) -> np.ndarray:
  """(n, n) +-1 Walsh-Hadamard matrix (Sylvester: H_2n = [[H, H], [H, -H]]), float32."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def _row_images(y, scale, act_format: str, code, image: str, reciprocal: bool = False,
                saturate: bool = True, rounding: str = "search", inverse=None):
  """y: (r, c) float32 transformed values, scale: () > 0 -> the image's stored dtype tile(s).
  reciprocal: y * (1 / scale) (the kernel: one multiply per element where Triton's division
  adds a range fix-up; within an ulp of y / scale, as Triton's division itself).
  rounding: 'search' (the midpoint search, fp4.encode_int8_image's select tree; the XLA path)
  or 'magic' (the kernel: fp4.round_int_units' magic-number add where the format allows, ~2x
  fewer instructions, the same codes); saturate=False (magic only) leaves out the clamp, for
  rows scaled by their own unclipped absmax.
  inverse: 1 / scale, computed by the caller (scale is then unused): the kernel divides once
  per token and broadcasts, where 1 / scale on a per-row scale vector costs a division per row
  each thread holds (Triton's division is a reciprocal and a range fix-up, ~8 instructions)."""
  if inverse is not None:
    reciprocal, scale = True, None
  def times_inverse(v, factor=np.float32(1.0)):
    if inverse is not None:
      return v * (factor * inverse)  # factor: 1 or a power of two, exact
    return v * (factor / scale)
  if code is None:  # FP8 E4M3: saturate, round to nearest even by the cast
    v = times_inverse(y) if reciprocal else y / scale
    v = jnp.clip(v, -fp4.FP8_E4M3_MAX, fp4.FP8_E4M3_MAX)
    return lax.bitcast_convert_type(v.astype(jnp.float8_e4m3fn), jnp.uint8)
  if rounding == "magic" and fp4.rounds_by_magic(code):
    # Compiled, Triton contracts y * r and the magic add into one FMA where no clamp sits
    # between them (clip_ratio >= 1): the exact product is rounded, not its float32 rounding,
    # which moves a code only for a product within half an ulp of a tie.
    multiplier = np.float32(code.multiplier)  # a power of two: folding it in is exact
    t = times_inverse(y, multiplier) if reciprocal else (y / scale) * multiplier
    if image == "int8":  # the narrowing cast keeps the low byte: the two's complement integer
      return fp4.int8_image_bits(t, code, saturate).astype(jnp.int8)
    rounded = fp4.round_int_units(t, code, saturate)
    e4m3 = rounded * np.float32(code.e4m3_factor / code.multiplier)
    return lax.bitcast_convert_type(e4m3.astype(jnp.float8_e4m3fn), jnp.uint8)
  v = times_inverse(y) if reciprocal else y / scale
  if image == "int8":
    return fp4.encode_int8_image(v, code, rounding="search").astype(jnp.int8)
  return fp4.e4m3_bits(fp4.encode_nearest_even(v, code), code).astype(jnp.uint8)


def _image_scale_factor(code, image):
  """stored image value / format value."""
  if code is None:
    return 1.0
  return float(code.multiplier) if image == "int8" else code.e4m3_factor


def _split_bf16(v):
  """float32 v -> (hi, lo) bfloat16 with hi + lo == v to 2^-16 relative: hi is v rounded to bf16
  (half away from zero) on its bits, (bits + 0x8000) & 0xFFFF0000, which is exact in bf16, so
  the residual v - hi (|lo| <= 2^-8 |v|) needs no cast back to float32 (a rounding cast to
  bf16 and back costs a conversion per element); lo is that residual rounded to bf16."""
  bits = lax.bitcast_convert_type(v, jnp.uint32)
  hi = lax.bitcast_convert_type(
      lax.bitwise_and(bits + np.uint32(0x8000), np.uint32(0xFFFF0000)), jnp.float32)
  return hi.astype(jnp.bfloat16), (v - hi).astype(jnp.bfloat16)


def _split_bf16_f16(v):
  """float32 v -> (hi bfloat16, lo float16), hi + lo == v to 2^-18 relative where |lo| is a
  float16 normal (|v| >= 2^-7, i.e. values of a normalized row; below, to 2^-25 absolute):
  hi is v truncated to bf16 on its bits (bits & 0xFFFF0000, exact; its bf16 is the upper half
  of v's bits, a shift that merges into the byte permute packing two per register, not a
  conversion), lo = v - hi (|lo| < 2^-7 |v|) rounded to float16, whose 11-bit significand
  makes up for the truncation.  One instruction per element fewer than :func:`_split_bf16`,
  for rows whose scale is known (the LayerNorm prologue's output); float16 overflows past
  |lo| = 65504 (|v| > 8e6)."""
  bits = lax.bitcast_convert_type(v, jnp.uint32)
  hi = lax.bitcast_convert_type(lax.bitwise_and(bits, np.uint32(0xFFFF0000)), jnp.float32)
  upper = lax.shift_right_logical(bits, np.uint32(16)).astype(jnp.uint16)
  return lax.bitcast_convert_type(upper, jnp.bfloat16), (v - hi).astype(jnp.float16)


def _dot_f32(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def row_quant_kernel(*refs, act_format: str, clip_ratio: float, image: str,
                     rows_per_token: int, rows_pad: int, tokens_per_program: int,
                     transform_dtype: str, row_norm: float, has_transform: bool = True,
                     k_features: int = 0, tokens_per_sample: int = 0, norm_eps: float = 0.0,
                     group: int = 1, dense_signs: bool = False, bf16_signs: bool = True,
                     f16_lo: bool = False, signs_per_token: bool = False):
  """refs: x_ref, signs_ref[, dense_t_ref, hadamard_ref[, dense_scale_ref]][, mul_ref, add_ref],
  out_ref, scale_ref.

  x_ref: (M * a', c) (one token = a' rows); signs_ref: (a'_pad, c) float32; dense_t_ref:
  (a'_pad, a'_pad) = L^T zero-padded; hadamard_ref: (c, c) +-1; with dense_signs, dense_t_ref
  holds sign(L^T) (a Hadamard block: every entry of L has one magnitude) and dense_scale_ref
  (1,) that magnitude, so the second stage is two bf16 dots (y's hi and lo parts), not three;
  mul_ref / add_ref (with tokens_per_sample > 0, the row-norm prologue): (B * a' + pad, c)
  float32, the per-sample affine applied after a LayerNorm of each token row (over its
  k_features values, eps norm_eps), the transform's signs folded in (the kernel then skips its
  sign multiply); out_ref: (M * a', c) 8-bit image (int8 / uint8 bits); scale_ref: (M,)
  float32 row scales (x ~= image * scale).

  group > 1: each step takes ``group`` consecutive tokens as one (a'_pad, c) tile (their rows
  are contiguous in x_ref), the transform's dense factor block-diagonal over them (the
  wrapper's dense_t and signs cover the group), absmax and LayerNorm statistics per token
  segment: a 36-row token padded alone to 64 rows wastes 44 % of the elementwise work, three
  in 128 rows 16 %.

  bf16_signs: bf16 x stays bf16 and takes its signs by a bf16 multiply (exact; two elements
  per instruction, no conversions); off where the wrapper's register budget says it spills.

  signs_per_token (with bf16_signs; the wrapper then passes signs_ref in bfloat16): load the
  sign tile for each token instead of holding it in registers across the token loop
  (:func:`default_signs_per_token`).

  f16_lo (bf16x3 with the row-norm prologue and dense_signs): the two splits put their lo
  parts in float16 (:func:`_split_bf16_f16`, one instruction per element fewer, 2^-18); the
  wrapper scales mul / add by a power of two that keeps every lo part a float16 normal well
  below its overflow (rows_prescale) and divides dense_scale_ref by it, which changes no
  code and no scale."""
  refs = list(refs)
  x_ref, signs_ref = refs[:2]
  rest = refs[2:]
  dense_t_ref = hadamard_ref = mul_ref = add_ref = None
  dense_scale_ref = None
  if has_transform:
    dense_t_ref, hadamard_ref, rest = rest[0], rest[1], rest[2:]
    if dense_signs:
      dense_scale_ref, rest = rest[0], rest[1:]
  has_norm = tokens_per_sample > 0
  if has_norm:
    mul_ref, add_ref, rest = rest[0], rest[1], rest[2:]
  out_ref, scale_ref = rest
  code = None if act_format == FP8_FORMAT else fp4.fp4_code(act_format)
  m_tokens = scale_ref.shape[0]
  c_size = x_ref.shape[1]
  max_value = fp4.FP8_E4M3_MAX if code is None else code.magnitudes[-1]
  cols = jnp.ones((c_size,), jnp.bool_)
  row_valid = jnp.arange(rows_pad, dtype=jnp.int32) < rows_per_token * group
  signs = common.load_tile(signs_ref, 0, rows_pad, 0, c_size, row_valid, cols)
  split = transform_dtype == "bf16x3"
  if transform_dtype == "float32":
    precision, dot_dtype = lax.Precision.HIGHEST, jnp.float32
  elif transform_dtype == "tf32":
    precision, dot_dtype = lax.Precision.DEFAULT, jnp.float32
  else:
    precision, dot_dtype = None, jnp.bfloat16
  dense_t = dense_t_ref[...] if dense_t_ref is not None else None
  hadamard = hadamard_ref[...].astype(dot_dtype) if hadamard_ref is not None else None
  # The transformed rows come out unnormalized: times sqrt(c) (H_c is +-1) and, for the sign
  # form of the dense factor, divided by its magnitude.  row_factor (the true rows / the
  # computed ones) goes into the row scales only.
  row_factor = np.float32(row_norm)
  if dense_scale_ref is not None:
    row_factor = row_factor * jnp.sum(plgpu.load(dense_scale_ref.at[pl.ds(0, 1)]))
  if split and dense_t is not None:
    if dense_signs:  # +-1: exact in bf16
      dense_t_hi, dense_t_lo = dense_t.astype(jnp.bfloat16), None
    else:
      dense_t_hi, dense_t_lo = _split_bf16(dense_t)
  elif dense_t is not None:
    dense_t = dense_t.astype(dot_dtype)
  # x * (+-1) is exact in bf16 for bf16 x (no lo part); the row-norm prologue's output is not.
  # Such x stays bf16 and its signs are applied by a bf16 multiply (two per instruction).
  x_is_bf16 = (x_ref.dtype == jnp.bfloat16 and not has_norm and split and has_transform
               and bf16_signs)
  signs_bf16 = signs.astype(jnp.bfloat16) if x_is_bf16 and not signs_per_token else None
  first_token = pl.program_id(0) * tokens_per_program
  factor = np.float32(_image_scale_factor(code, image))
  # A row scaled by its own absmax without clipping stays within the grid (to a few ulps,
  # which round back to the top value): the clamp is only needed for clip_ratio < 1.
  saturate = clip_ratio < 1.0
  if has_norm:
    flat = ((jnp.arange(rows_pad, dtype=jnp.int32) % rows_per_token)[:, None] * c_size
            + jnp.arange(c_size, dtype=jnp.int32)[None, :])
    element_valid = (flat < k_features) & row_valid[:, None]
    inv_k = np.float32(1.0 / k_features)
    # Elements outside a token's K values: zero-padded columns (ragged K without a transform)
    # and, with one token per tile, the tile's padding rows.  Grouped tiles reduce per token
    # segment, which leaves the padding rows (segment >= group) out already, and the transform
    # meets those rows with zero columns of its block-diagonal dense factor: there only padded
    # columns need the select (one instruction per element, ~1 % of the kernel's main loop).
    padded_columns = rows_per_token * c_size != k_features
    mask_token_tile = padded_columns or rows_pad != rows_per_token

    def affine_tiles(token, live):
      start = (token // tokens_per_sample) * rows_per_token
      mask = row_valid & live
      return (common.load_tile(mul_ref, start, rows_pad, 0, c_size, mask, cols),
              common.load_tile(add_ref, start, rows_pad, 0, c_size, mask, cols))

    # One token per tile (group 1, e.g. K = 4608) and a program's tokens all in one sample
    # (256 tokens per sample, 8 per program): load the sample's affine once per program.
    # Grouped tiles (K = 1152: 3 tokens, 9 per program) gather each row's affine instead.
    hoisted = tokens_per_sample % tokens_per_program == 0 and group == 1
    if hoisted:
      hoisted_tiles = affine_tiles(first_token, first_token < m_tokens)

  def row_norm_prologue(x_tile, token, live):
    """LayerNorm of the token row (float32, biased variance), then x * mul + add."""
    mean = jnp.sum(x_tile) * inv_k
    centred = x_tile - mean
    if mask_token_tile:
      centred = jnp.where(element_valid, centred, np.float32(0.0))
    var = jnp.sum(centred * centred) * inv_k
    normed = centred * lax.rsqrt(var + np.float32(norm_eps))
    mul, add = hoisted_tiles if hoisted else affine_tiles(token, live)
    return normed * mul + add

  def transform(y):
    if hadamard is not None and split:
      # bf16x3: operands split into bf16 hi + lo parts, products summed in float32 (H is
      # +-1, exact in bf16); ~2^-16 relative error, on bf16 tensor cores.
      # f16_lo: lo parts in float16 (the +-1 factors are exact in it too).
      if x_is_bf16:  # x * (+-1) is exact in bf16: no lo part
        if signs_per_token:  # an L1 / L2 hit, 2 B per element beside x's 2 B
          signs_tile = common.load_tile(signs_ref, 0, rows_pad, 0, c_size, row_valid, cols)
        else:
          signs_tile = signs_bf16
        y = _dot_f32(y * signs_tile.astype(jnp.bfloat16), hadamard)
      elif f16_lo:
        hi, lo = _split_bf16_f16(y)
        y = _dot_f32(hi, hadamard) + _dot_f32(lo, hadamard.astype(jnp.float16))
      else:
        hi, lo = _split_bf16(y if has_norm else y * signs)
        y = _dot_f32(hi, hadamard) + _dot_f32(lo, hadamard)
      if f16_lo:
        hi, lo = _split_bf16_f16(y)
        y = _dot_f32(dense_t_hi, hi) + _dot_f32(dense_t_hi.astype(jnp.float16), lo)
      else:
        hi, lo = _split_bf16(y)
        y = _dot_f32(dense_t_hi, hi) + _dot_f32(dense_t_hi, lo)
      if dense_t_lo is not None:
        y = y + _dot_f32(dense_t_lo, hi)
    elif hadamard is not None:
      y = jnp.dot((y if has_norm else y * signs).astype(dot_dtype), hadamard,
                  precision=precision, preferred_element_type=jnp.float32)
      y = jnp.dot(dense_t, y.astype(dot_dtype), precision=precision,
                  preferred_element_type=jnp.float32)
    return y

  def token_step(t, carry):
    token = first_token + t
    live = token < m_tokens
    row_mask = row_valid & live
    x_tile = common.load_tile(x_ref, token * rows_per_token, rows_pad, 0, c_size, row_mask,
                              cols)
    x_tile = x_tile if x_is_bf16 else x_tile.astype(jnp.float32)
    y = transform(row_norm_prologue(x_tile, token, live) if has_norm else x_tile)
    absmax = jnp.max(jnp.abs(y)) * row_factor
    scale = absmax * np.float32(clip_ratio) / np.float32(max_value)
    scale = jnp.where(scale >= MIN_ROW_SCALE, scale, np.float32(1.0))
    values = _row_images(y, None, act_format, code, image, saturate=saturate,
                         rounding="magic", inverse=row_factor / scale)
    common.store_tile(out_ref, values, token * rows_per_token, 0, row_mask, cols)
    plgpu.store(scale_ref.at[pl.ds(token, 1)], jnp.full((1,), scale / factor, jnp.float32),
                mask=jnp.full((1,), live))
    return carry

  # group > 1: per-row segment (token within the group) and helpers for per-segment values.
  segment = jnp.arange(rows_pad, dtype=jnp.int32) // rows_per_token
  group_pad = max(2, pl.next_power_of_2(group))
  slots = jnp.arange(group_pad, dtype=jnp.int32)

  def per_row(values):
    """[v_0 .. v_{g-1}] scalars -> (rows_pad,) with each row's segment value."""
    out = jnp.full((rows_pad,), values[0])
    for i in range(1, group):
      out = jnp.where(segment == i, values[i], out)
    return out

  def segment_reduce(row_values, reduce, fill):
    return [reduce(jnp.where(segment == i, row_values, fill)) for i in range(group)]

  def group_norm(x_tile, row_token):
    sums = segment_reduce(jnp.sum(x_tile, axis=1), jnp.sum, np.float32(0.0))
    mean = per_row([v * inv_k for v in sums])
    centred = x_tile - mean[:, None]
    if padded_columns:
      centred = jnp.where(element_valid, centred, np.float32(0.0))
    sq = segment_reduce(jnp.sum(centred * centred, axis=1), jnp.sum, np.float32(0.0))
    inv_std = per_row([lax.rsqrt(v * inv_k + np.float32(norm_eps)) for v in sq])
    mul, add = sample_tiles(row_token // tokens_per_sample)
    return centred * inv_std[:, None] * mul + add

  def sample_tiles(row_sample):
    """Each row's sample's affine rows (row r reads sample row r % a'): the sample index is
    clamped instead of masked (every address is then in the ref and the column index stays a
    plain range, so the loads vectorize); rows past the last token read the last sample."""
    n_samples = m_tokens // tokens_per_sample
    source = (jnp.minimum(row_sample, n_samples - 1) * rows_per_token
              + jnp.arange(rows_pad, dtype=jnp.int32) % rows_per_token)
    index = (jnp.broadcast_to(source[:, None], (rows_pad, c_size)),
             jnp.broadcast_to(jnp.arange(c_size, dtype=jnp.int32)[None, :], (rows_pad, c_size)))
    return plgpu.load(mul_ref.at[index]), plgpu.load(add_ref.at[index])

  # (Gathering the program's two samples' affine tiles once instead, then selecting per row,
  # saves ~4 % of the instructions at K = 1152 but holds four tiles: it spilled 268-388 B.)

  def group_step(t, carry):
    token0 = first_token + t * group
    row_token = token0 + segment
    row_live = row_valid & (row_token < m_tokens)
    x_tile = common.load_tile(x_ref, token0 * rows_per_token, rows_pad, 0, c_size, row_live,
                              cols)
    x_tile = x_tile if x_is_bf16 else x_tile.astype(jnp.float32)
    y = transform(group_norm(x_tile, row_token) if has_norm else x_tile)
    peaks = segment_reduce(jnp.max(jnp.abs(y), axis=1), jnp.max, np.float32(0.0))
    scales = []
    for peak in peaks:
      scale = peak * row_factor * np.float32(clip_ratio) / np.float32(max_value)
      scales.append(jnp.where(scale >= MIN_ROW_SCALE, scale, np.float32(1.0)))
    # One division per token (scalars), then broadcast to the rows.
    row_inverse = per_row([row_factor / scale for scale in scales])
    values = _row_images(y, None, act_format, code, image, saturate=saturate,
                         rounding="magic", inverse=row_inverse[:, None])
    common.store_tile(out_ref, values, token0 * rows_per_token, 0, row_live, cols)
    stored = jnp.full((group_pad,), scales[0] / factor)
    for i in range(1, group):
      stored = jnp.where(slots == i, scales[i] / factor, stored)
    plgpu.store(scale_ref.at[pl.ds(token0, group_pad)], stored,
                mask=(slots < group) & (token0 + slots < m_tokens))
    return carry

  if group == 1:
    lax.fori_loop(0, tokens_per_program, token_step, 0)
  else:
    lax.fori_loop(0, tokens_per_program // group, group_step, 0)


def _row_view(k_features: int, transform):
  """(rows per token a', row length c) of the kernel's view, and the transform factors."""
  if transform is None:
    return row_shape(k_features) + (None,)
  signs, dense, c_size = transform_factors(transform, k_features)
  return k_features // c_size, c_size, (signs, dense)


MAX_GROUP = 8  # tokens per tile
MAX_GROUP_ROWS = 128
GROUP_ELEMENTS_PER_THREAD = 32  # a grouped f32 tile (with bf16x3's splits) stays in registers
DEFAULT_NUM_WARPS = 4


def default_num_warps(rows: int, c_size: int) -> int:
  """4 warps at every width.  Tried for K = 4608 (one token a 64 x 128 tile, 36 rows used),
  with a 64-elements-per-thread group budget: 3 tokens in a 128 x 128 tile at 8 warps cut the
  SASS issue floor from 35.6 to 25.0 us (M = 4096, sm_90a) but spilled 12 B on sm_90a and
  1.9 KB on sm_80; at 16 warps it spilled on both and issued more (36.7 us on sm_90a).  The
  group budget (GROUP_ELEMENTS_PER_THREAD) is therefore 32, which keeps K = 4608 at one
  token."""
  del rows, c_size
  return DEFAULT_NUM_WARPS


def default_signs_per_token(rows: int, c_size: int, num_warps: int,
                            device: Optional[str] = None) -> bool:
  """Whether quantize_rows reloads its bf16 sign tile per token (row_quant_kernel's
  signs_per_token) on ``device`` (a kernels/dispatch device class; None: the local device).

  On sm_80 the tile of one K = 4608 token (64 x 128 at 4 warps: 64 elements per thread, over
  the GROUP_ELEMENTS_PER_THREAD budget) held the signs in registers across the token loop and
  spilled 244 B (255 registers); loading them per token from a bf16 copy does not spill (255
  registers) and issues fewer SASS instructions per token (1740 vs 1764: no spill traffic).
  On sm_90a the held tile fits (168 registers, 3 CTAs per SM) and the reload would cost a CTA
  per SM (220 registers), so Hopper, the CPU (interpret mode) and tiles within the budget
  (K = 1152: 2 % more SASS on sm_80) keep them held."""
  if device is None:
    device = dispatch.device_class()
  group = token_group(rows, c_size, num_warps)
  return (device in ("ampere", "gpu")
          and tile_rows(rows, group) * c_size > GROUP_ELEMENTS_PER_THREAD * 32 * num_warps)


def bf16_signs_fit(rows_pad: int, c_size: int, num_warps: int, dense_signs: bool) -> bool:
  """Whether the kernel keeps bf16 x in bf16 for its sign multiply (row_quant_kernel's
  bf16_signs).  The bf16 copy of x and the signs take registers: with a tile of 64 elements
  per thread (K = 4608: 64 x 128 at 4 warps) and the three-dot second stage it spilled 44 B on
  sm_90a; with the two-dot stage of dense_signs it did not (247 registers)."""
  return dense_signs or rows_pad * c_size <= GROUP_ELEMENTS_PER_THREAD * 32 * num_warps


def tile_rows(rows: int, group: int) -> int:
  """Rows of the kernel's tile for ``group`` tokens of ``rows`` rows (a power of two >= 16)."""
  return max(common.MIN_BLOCK, pl.next_power_of_2(rows * group))


def token_group(rows: int, c_size: int, num_warps: int = 4) -> int:
  """Tokens per kernel tile: the count (<= MAX_GROUP) with the fewest padded elements per
  token, within MAX_GROUP_ROWS rows and max(GROUP_ELEMENTS_PER_THREAD per thread, one token's
  tile) elements (K = 1152, a' = 36, c = 32, 4 warps: 3 tokens in 128 rows, 1365 elements per
  token instead of 2048; K = 4608, c = 128: at 4 warps 1 token (its 64 x 128 tile fills the
  registers), at 16 warps 3 tokens in a 128 x 128 tile, 32 elements per thread)."""
  single = tile_rows(rows, 1)
  limit = max(GROUP_ELEMENTS_PER_THREAD * 32 * num_warps, single * c_size)
  best, best_cost = 1, single * c_size
  for group in range(2, MAX_GROUP + 1):
    rows_pad = tile_rows(rows, group)
    if rows_pad > max(MAX_GROUP_ROWS, single) or rows_pad * c_size > limit:
      break
    cost = rows_pad * c_size / group
    if cost < best_cost:
      best, best_cost = group, cost
  return best


def main_loop_trips(k_features: int, a_order, tokens_per_program: int,
                    num_warps: Optional[int] = None) -> int:
  """Iterations of quantize_rows' main loop per program (token groups; static report)."""
  rows, c_size = row_shape(k_features, a_order)
  group = token_group(rows, c_size, num_warps or default_num_warps(rows, c_size))
  return -(-tokens_per_program // group)


def quantize_rows_applies(k_features: int, transform=None) -> bool:
  """Whether :func:`quantize_rows` takes rows of width K with this transform (the power-of-two
  factor must fill a 16-wide dot tile; K / a a power of two); else use quantize_rows_xla."""
  try:
    _, c_size = row_shape(k_features, None if transform is None else int(transform[1].shape[0]))
  except ValueError:
    return False
  return c_size >= common.MIN_BLOCK


class RowNorm(NamedTuple):
  """A LayerNorm + per-sample affine prologue of the act-quant step (the adaLN input of a DiT
  linear, fused into the kernel that quantizes it):
  ``x'[m] = LayerNorm(x[m]) * mul[m // tokens_per_sample] + add[m // tokens_per_sample]``,
  LayerNorm without affine parameters (biased variance, eps) over the K features, in float32.
  mul / add: (B, K) float; the modulation ``modulate(LN(x), shift, scale)`` is
  mul = 1 + scale, add = shift (a SmoothQuant factor s multiplies both)."""
  mul: jax.Array
  add: jax.Array
  tokens_per_sample: int
  eps: float

  def kwargs(self) -> dict:
    return dict(norm_mul=self.mul, norm_add=self.add, tokens_per_sample=int(self.tokens_per_sample),
                norm_eps=float(self.eps))


def _check_row_norm(m_tokens: int, k_features: int, norm_mul, norm_add, tokens_per_sample):
  """-> whether a row-norm prologue is given; raises on inconsistent shapes."""
  if norm_mul is None and norm_add is None:
    return False
  if norm_mul is None or norm_add is None:
    raise ValueError("the row-norm prologue needs both norm_mul and norm_add")
  if not isinstance(tokens_per_sample, int) or tokens_per_sample < 1:
    raise ValueError(f"tokens_per_sample must be a positive int, got {tokens_per_sample!r}")
  if m_tokens % tokens_per_sample:
    raise ValueError(f"{m_tokens} token rows are not whole samples of {tokens_per_sample} tokens")
  samples = m_tokens // tokens_per_sample
  for name, value in (("norm_mul", norm_mul), ("norm_add", norm_add)):
    if tuple(value.shape) != (samples, k_features):
      raise ValueError(f"{name} must have shape ({samples}, {k_features}) (samples, K), got "
                       f"{tuple(value.shape)}")
  return True


def apply_row_norm(x, norm_mul, norm_add, tokens_per_sample: int, norm_eps: float):
  """Plain jnp :class:`RowNorm` prologue: x (M, K) -> float32 (M, K)."""
  m_tokens, k_features = x.shape
  _check_row_norm(m_tokens, k_features, norm_mul, norm_add, tokens_per_sample)
  x32 = x.astype(jnp.float32).reshape(-1, tokens_per_sample, k_features)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  normed = (x32 - mean) * lax.rsqrt(var + np.float32(norm_eps))
  y = (normed * norm_mul.astype(jnp.float32)[:, None, :]
       + norm_add.astype(jnp.float32)[:, None, :])
  return y.reshape(m_tokens, k_features)


# The float16 lo parts of f16_lo: the first stage's input v has |v| <= sqrt(K) max|mul| +
# max|add| (a LayerNorm output is at most sqrt(K - 1) in magnitude), its output at most c times
# that.  Scaled so that this bound lies just below 2^F16_LO_TOP, every lo part (< 2^-7 of its
# value) stays below 2^(F16_LO_TOP - 7) = 32768 < 65504, and those of the row's large values
# are float16 normals by many binades.
F16_LO_TOP = 22


def rows_prescale(norm_mul, norm_add, k_features: int, c_size: int):
  """The power of two (a float32 scalar, computed on device from mul / add) by which the
  f16_lo kernel scales its rows (module comment above)."""
  bound = (np.float32(np.sqrt(k_features)) * jnp.max(jnp.abs(norm_mul.astype(jnp.float32)))
           + jnp.max(jnp.abs(norm_add.astype(jnp.float32)))) * np.float32(c_size)
  _, exponent = jnp.frexp(bound)  # bound < 2^exponent (0 for a zero bound)
  shift = jnp.clip(F16_LO_TOP - exponent, -100, 100)
  return jnp.ldexp(np.float32(1.0), shift.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=["act_format", "clip_ratio", "image",
                                             "tokens_per_program", "num_warps", "num_stages",
                                             "interpret", "transform_dtype",
                                             "tokens_per_sample", "norm_eps", "dense_signs",
                                             "signs_per_token"])
def quantize_rows(x, transform=None, *, act_format: str, clip_ratio: float = 1.0,
                  image: str = "int8", tokens_per_program: int = 8,
                  num_warps: Optional[int] = None,
                  num_stages: int = 1, interpret: bool = False,
                  transform_dtype: str = "bf16x3", norm_mul=None, norm_add=None,
                  tokens_per_sample: int = 0, norm_eps: float = 1e-6,
                  dense_signs: bool = False, signs_per_token: Optional[bool] = None):
  """x: (M, K) float -> (image (M, K) int8 or float8_e4m3fn, row_scale (M,) float32) with
  x @ Q ~= image * row_scale[:, None]: transform (optional, (signs (K,), block (a, a)), the
  power-of-two factor implicit), per-token scale clip_ratio * absmax / max_magnitude, codes
  (nearest, ties to even, saturating; FP8 E4M3: saturating cast), all in one pass per token.

  tokens_per_program is rounded up to a multiple of the tokens per tile (token_group).
  num_warps: default default_num_warps.

  norm_mul / norm_add (B, K) with tokens_per_sample, norm_eps (:class:`RowNorm`): quantize
  ``LayerNorm(x) * mul + add`` instead of x (the adaLN-modulated input of a DiT linear), the
  prologue fused: x is read once (2 B per element for bf16) and only the 8-bit image is
  written, where the unfused LayerNorm + modulate would write and re-read a bf16 copy.

  image 'int8': multiplier * value (W4A4 int8 path); 'fp8': the exact E4M3 image (W4A4 fp8
  path, W4A8).  transform_dtype: arithmetic of the two transform dots.  'bf16x3' (default):
  bf16 tensor cores on hi/lo splits of both operands (x @ H_c: one dot for bf16 x without a
  prologue, else two; L^T @ y: three, lo x lo left out): ~2^-16 relative error, so the codes
  are the float32 reference's except at near-ties (~1 code in 10^5 at K = 1152, measured).
  'bfloat16': one bf16 dot each, ~2x fewer tensor-core FLOPs, but the bf16 rounding of y and of
  L moves ~0.5% of the codes by a grid step and the per-token scales by ~0.3% (W4A4 outputs
  then ~2% from the reference; tests/test_kernels_fp4.py).  'float32' IEEE (CUDA cores, slow)
  or 'tf32'.

  dense_signs (static): the caller asserts that every entry of the transform's dense factor
  has one magnitude, as a Hadamard block H_a / sqrt(a) (quant.hadamard kind 'hadamard'); the
  kernel then multiplies by its signs (exact in bf16: two dots in the second stage, not three)
  and puts the magnitude into the row scale.  A block that is not of that form gives wrong
  results: pass it only for such blocks (FP4Weight does for its 'hadamard' kind).

  signs_per_token (static; None: default_signs_per_token for the local device): reload the
  transform's signs per token instead of holding them (the bf16-x kernel only; the same
  function either way).
  """
  if x.ndim != 2:
    raise ValueError(f"x must be (M, K), got shape {x.shape}")
  if image == "packed":
    raise ValueError("quantize_rows writes 8-bit images; packed 4-bit codes: act_quant()")
  if transform_dtype not in TRANSFORM_DTYPES:
    raise ValueError(f"unknown transform dtype {transform_dtype!r}; one of {TRANSFORM_DTYPES}")
  code = _check_row_quant(act_format, image)
  m_tokens, k_features = x.shape
  has_norm = _check_row_norm(m_tokens, k_features, norm_mul, norm_add, tokens_per_sample)
  rows, c_size, factors = _row_view(k_features, transform)
  if c_size < common.MIN_BLOCK:
    raise ValueError(f"the power-of-two factor {c_size} of K = {k_features} is below the "
                     f"smallest dot tile {common.MIN_BLOCK}; use act_quant_rows_xla")
  k_view = rows * c_size
  if k_view != k_features:  # ragged K without a transform: zero columns change no absmax
    x = jnp.pad(x, ((0, 0), (0, k_view - k_features)))
  if num_warps is None:
    num_warps = default_num_warps(rows, c_size)
  group = token_group(rows, c_size, num_warps)
  tokens_per_program = group * -(-tokens_per_program // group)
  rows_pad = tile_rows(rows, group)
  operands = [x.reshape(m_tokens * rows, c_size)]
  if factors is None:
    signs, row_norm = jnp.ones((rows, c_size), jnp.float32), 1.0
  else:
    signs = factors[0].reshape(rows, c_size)
    row_norm = 1.0 / np.sqrt(c_size)
  # Pad the signs to the kernel's tile (a static out-of-bounds block load, even masked, is an
  # error in jax >= 0.12's interpret mode).
  signs = jnp.tile(signs, (group, 1))
  dense_signs = bool(dense_signs) and factors is not None
  bf16_signs = bf16_signs_fit(rows_pad, c_size, num_warps, dense_signs)
  if signs_per_token is None:
    signs_per_token = default_signs_per_token(rows, c_size, num_warps)
  # Only the kernel that keeps bf16 x in bf16 multiplies by the signs in the token loop.
  signs_per_token = bool(signs_per_token) and (
      x.dtype == jnp.bfloat16 and not has_norm and transform_dtype == "bf16x3"
      and factors is not None and bf16_signs)
  signs = jnp.pad(signs, ((0, rows_pad - rows * group), (0, 0)))
  operands.append(signs.astype(jnp.bfloat16) if signs_per_token else signs)
  f16_lo = has_norm and dense_signs and transform_dtype == "bf16x3"
  prescale = rows_prescale(norm_mul, norm_add, k_features, c_size) if f16_lo else None
  if factors is not None:  # block-diagonal over the group's tokens
    dense = factors[1]
    if dense_signs:  # entries of one magnitude (a Hadamard block): signs and that magnitude
      dense_scale = jnp.abs(dense[:1, 0])
      if prescale is not None:  # the rows come out prescale times too large
        dense_scale = dense_scale / prescale
      dense = jnp.sign(dense)
    dense_t = jnp.kron(jnp.eye(group, dtype=jnp.float32), dense.T)
    pad = rows_pad - rows * group  # a pad, not a scatter into zeros: XLA fuses it with the kron
    operands.append(jnp.pad(dense_t, ((0, pad), (0, pad))))
    operands.append(jnp.asarray(sylvester_unnormalized(c_size)))
    if dense_signs:
      operands.append(dense_scale)
  if has_norm:
    for affine in (norm_mul, norm_add):  # (B, K) -> (B * a' + pad rows, c), zero padded
      affine = affine.astype(jnp.float32)
      if factors is not None:  # the transform's signs folded in: (LN(x) mul + add) * signs
        affine = affine * factors[0][None, :]
      if prescale is not None:
        affine = affine * prescale
      affine = jnp.pad(affine, ((0, 0), (0, k_view - k_features)))
      operands.append(jnp.pad(affine.reshape(-1, c_size), ((0, rows_pad - rows), (0, 0))))
  stored_dtype = jnp.int8 if image == "int8" else jnp.uint8
  kernel = functools.partial(
      row_quant_kernel, act_format=act_format, clip_ratio=float(clip_ratio), image=image,
      rows_per_token=rows, rows_pad=rows_pad, tokens_per_program=tokens_per_program,
      transform_dtype=transform_dtype, row_norm=float(row_norm),
      has_transform=factors is not None, k_features=k_features,
      tokens_per_sample=int(tokens_per_sample) if has_norm else 0, norm_eps=float(norm_eps),
      group=group, dense_signs=dense_signs, f16_lo=f16_lo, bf16_signs=bf16_signs,
      signs_per_token=signs_per_token)
  out, scale = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((m_tokens * rows, c_size), stored_dtype),
                 jax.ShapeDtypeStruct((m_tokens,), jnp.float32)),
      grid=(pl.cdiv(m_tokens, tokens_per_program),),
      compiler_params=common.compiler_params(num_warps, num_stages),
      interpret=interpret,
      name=f"quantize_rows_{image}" + ("_norm" if has_norm else ""),
  )(*operands)
  out = out.reshape(m_tokens, k_view)[:, :k_features]
  if image == "fp8":
    out = lax.bitcast_convert_type(out, jnp.float8_e4m3fn)
  return out, scale


def transform_rows_xla(x, transform):
  """x: (M, K) -> x @ Q in float32 with XLA: the same two-factor split as the kernel (a dense
  (c, c) +-1 dot and one (a', a') dot), memory-bound."""
  m_tokens, k_features = x.shape
  rows, c_size, (signs, dense) = _row_view(k_features, transform)
  xs = (x.astype(jnp.float32) * signs).reshape(m_tokens, rows, c_size)
  hadamard = jnp.asarray(sylvester_unnormalized(c_size) / np.sqrt(c_size))
  y = jnp.einsum("mrc,cd,re->med", xs, hadamard, dense, precision=lax.Precision.HIGHEST)
  return y.reshape(m_tokens, k_features)


@functools.partial(jax.jit, static_argnames=["act_format", "clip_ratio", "image",
                                             "tokens_per_sample", "norm_eps"])
def quantize_rows_xla(x, transform=None, *, act_format: str, clip_ratio: float = 1.0,
                      image: str = "int8", norm_mul=None, norm_add=None,
                      tokens_per_sample: int = 0, norm_eps: float = 1e-6):
  """Plain jnp / XLA version of :func:`quantize_rows` (same outputs; float32 transform): the
  reference of the kernel, and the path where the kernel does not apply."""
  if x.ndim != 2:
    raise ValueError(f"x must be (M, K), got shape {x.shape}")
  code = _check_row_quant(act_format, image)
  if _check_row_norm(x.shape[0], x.shape[1], norm_mul, norm_add, tokens_per_sample):
    x = apply_row_norm(x, norm_mul, norm_add, tokens_per_sample, norm_eps)
  y = x.astype(jnp.float32) if transform is None else transform_rows_xla(x, transform)
  max_value = fp4.FP8_E4M3_MAX if code is None else code.magnitudes[-1]
  scale = jnp.max(jnp.abs(y), axis=1) * np.float32(clip_ratio) / np.float32(max_value)
  scale = jnp.where(scale >= MIN_ROW_SCALE, scale, np.float32(1.0))
  values = _row_images(y, scale[:, None], act_format, code, image)
  if image == "fp8":
    values = lax.bitcast_convert_type(values, jnp.float8_e4m3fn)
  return values, scale / np.float32(_image_scale_factor(code, image))
