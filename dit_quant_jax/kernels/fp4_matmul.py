"""4-bit weight matmuls (HQ-DiT): W4A16, W4A8 (FP8 E4M3 activations) and W4A4.

**Paths by name (the dispatcher's contract)**: ``PATHS[op][name]`` for op in
{"w4a16", "w4a8", "w4a4"}, one uniform signature per op (documented above ``PATHS`` below):
the weight is a :class:`fp4_mma.PackedFp4Weight` (4-bit codes in the tiled K-major layout,
``fp4_mma.pack_weight``, packed offline), activations are float ``(M, K)`` and every W4A8 /
W4A4 path includes its act-quant step (:func:`act_quant.quantize_rows`: transform, per-token
scale with the calibrated clip ratio, codes into the 8-bit image the matmul reads).
``lowering_cases()`` gives (name, jitted fn, ShapeDtypeStructs, config) per kernel at the
DiT-XL/2 shapes for the static report.  ``quantize_fp8_per_token`` is the W4A8 activation
quantizer with the clip ratio (x ~= fp8 * scale).

**Older entry points** (kept for quant/hqdit.py and the benchmark; the pack_bits layout):
weight codes ``(K, N)`` packed along K with ``pack_bits(codes, 4, axis=0)`` -> uint8
``(ceil(K/2), N)``, a 16-entry ``lut`` and a per-output-channel ``scale (N,)``:
``W[k, n] = lut[code[k, n]] * scale[n]``.  These kernels decode each weight element through a
gather from the lut per M tile (slow: the issue-11 analysis); the paths above replace them.

* W4A16: bf16 activations, bf16 ``tl.dot``, float32 accumulation.
* W4A8: activations are FP8 E4M3 codes ``(M, K)`` with a per-token scale ``(M,)``:
  ``X[m, k] = fp8[m, k] * x_scale[m]``, decoded to bf16 exactly with integer ops.
* W4A4: activations are 4-bit codes packed along K ``(M, ceil(K/2))`` with a per-token scale
  ``(M,)``; both sides are decoded through *integer* luts (``int_lut = lut * multiplier``, int8)
  and multiplied with an int8 x int8 -> int32 dot, exact; then ``acc * x_scale[m] * w_scale[n]``
  (+ bias) in float32, where the scales passed in are already divided by the multipliers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dit_quant_jax.kernels import act_quant
from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import dispatch
from dit_quant_jax.kernels import fp4_mma
from dit_quant_jax.numerics import activation as activation_fn
from dit_quant_jax.numerics import fp4
from dit_quant_jax.numerics import packing

CODE_BITS = 4
LUT_SIZE = 16
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn (OCP FP8 spec)
STATIC_KERNEL_ARGS = ["block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages",
                      "interpret", "out_dtype"]


def _check_weight(packed_weight, w_scale, lut, k_features, lut_dtype_kind="float"):
  if packed_weight.ndim != 2 or packed_weight.shape[0] != packing.packed_length(k_features, 4):
    raise ValueError(f"packed weight must be ({packing.packed_length(k_features, 4)}, N) uint8 for "
                     f"in_features {k_features}, got shape {packed_weight.shape}")
  if packed_weight.dtype != jnp.uint8:
    raise ValueError(f"packed weight must be uint8, got {packed_weight.dtype}")
  n_features = packed_weight.shape[1]
  if w_scale.shape != (n_features,):
    raise ValueError(f"weight scale must have shape ({n_features},), got {w_scale.shape}")
  if lut.shape != (LUT_SIZE,):
    raise ValueError(f"lut must have shape ({LUT_SIZE},), got {lut.shape}")
  if lut_dtype_kind == "int" and lut.dtype != jnp.int8:
    raise ValueError(f"integer lut must be int8, got {lut.dtype}")
  return n_features


def _check_rows(name, array, m_rows):
  if array.shape != (m_rows,):
    raise ValueError(f"{name} must have shape ({m_rows},), got {array.shape}")


def _check_bias(bias, n_features):
  if bias is not None and bias.shape != (n_features,):
    raise ValueError(f"bias must have shape ({n_features},), got {bias.shape}")


def _check_blocks(block_m, block_n, block_k, split_k, min_block_k=common.MIN_BLOCK):
  common.check_block("block_m", block_m)
  common.check_block("block_n", block_n)
  common.check_block("block_k", block_k, minimum=min_block_k)
  common.check_split_k(split_k)


def _tile_coordinates(block_m, block_n, m_rows, n_features):
  row_start = pl.program_id(0) * block_m
  col_start = pl.program_id(1) * block_n
  rows = row_start + jnp.arange(block_m, dtype=jnp.int32)
  cols = col_start + jnp.arange(block_n, dtype=jnp.int32)
  return row_start, col_start, rows < m_rows, cols, cols < n_features


def _weight_tile(packed_weight_ref, lut_ref, ks, k_mask, cols, col_mask):
  """(block_k, block_n) lut values of the weight codes (masked entries 0)."""
  mask = k_mask[:, None] & col_mask[None, :]
  codes = common.load_packed_codes(packed_weight_ref, CODE_BITS, ks, cols, mask, axis=0)
  return common.gather(lut_ref, codes, mask)


def _scale_and_bias(acc, row_scale, col_scale, bias):
  """acc * row_scale[:, None] * col_scale[None, :] + bias, in this order (kernel and split-K
  epilogue alike); row_scale may be None."""
  if row_scale is not None:
    acc = acc * row_scale[:, None]
  return acc * col_scale[None, :] + bias[None, :]


def _kernel_epilogue(x_scale_ref, w_scale_ref, bias_ref, row_start, col_start, row_mask,
                     col_mask, block_m, block_n):
  """In-kernel epilogue reading this tile's scales and bias (x_scale_ref may be None)."""

  def epilogue(acc):
    row_scale = None
    if x_scale_ref is not None:
      row_scale = common.load_vector(x_scale_ref, row_start, block_m, row_mask)
    col_scale = common.load_vector(w_scale_ref, col_start, block_n, col_mask)
    bias = common.load_vector(bias_ref, col_start, block_n, col_mask)
    return _scale_and_bias(acc.astype(jnp.float32), row_scale, col_scale, bias)

  return epilogue


def _bias_or_zeros(bias, n_features):
  return jnp.zeros((n_features,), jnp.float32) if bias is None else bias.astype(jnp.float32)


def dequantize_fp4_reference(packed_weight, lut, scale, k_features: int):
  """Dense (K, N) float32 weight: W[k, n] = lut[code[k, n]] * scale[n]."""
  codes = packing.unpack_bits(packed_weight, CODE_BITS, k_features, axis=0, dtype=jnp.int32)
  return lut.astype(jnp.float32)[codes] * scale.astype(jnp.float32)[None, :]


# ----------------------------------------------------------------------------------------
# W4A16
# ----------------------------------------------------------------------------------------


def w4a16_matmul_kernel(x_ref, packed_weight_ref, lut_ref, w_scale_ref, bias_ref, out_ref, *,
                        block_m: int, block_n: int, block_k: int, split_k: int):
  """x_ref: (M, K); packed_weight_ref: (ceil(K/2), N) uint8; lut_ref: (16,) bf16;
  w_scale_ref, bias_ref: (N,) float32; out_ref: (M, N), or (split_k * M, N) float32 partials."""
  m_rows, k_features = x_ref.shape
  n_features = out_ref.shape[1]
  row_start, col_start, row_mask, cols, col_mask = _tile_coordinates(block_m, block_n, m_rows,
                                                                     n_features)

  def k_step(k_tile, acc):
    k_start = k_tile * block_k
    ks = k_start + jnp.arange(block_k, dtype=jnp.int32)
    k_mask = ks < k_features
    x_tile = common.load_tile(x_ref, row_start, block_m, k_start, block_k, row_mask, k_mask)
    weight_tile = _weight_tile(packed_weight_ref, lut_ref, ks, k_mask, cols, col_mask)
    return acc + jnp.dot(x_tile.astype(jnp.bfloat16), weight_tile.astype(jnp.bfloat16),
                         preferred_element_type=jnp.float32)

  first, end = common.k_tile_range(k_features, block_k, split_k)
  acc = lax.fori_loop(first, end, k_step, jnp.zeros((block_m, block_n), jnp.float32))
  epilogue = _kernel_epilogue(None, w_scale_ref, bias_ref, row_start, col_start, row_mask,
                              col_mask, block_m, block_n)
  common.finish_tile(out_ref, acc, epilogue, split_k=split_k, m_rows=m_rows,
                     row_start=row_start, col_start=col_start, row_mask=row_mask,
                     col_mask=col_mask)


@functools.partial(jax.jit, static_argnames=STATIC_KERNEL_ARGS)
def w4a16_matmul(x, packed_weight, lut, w_scale, bias=None, *, block_m: int = 64,
                 block_n: int = 64, block_k: int = 64, split_k: int = 1, num_warps: int = 4,
                 num_stages: int = 3, interpret: bool = False, out_dtype=None):
  """x: (M, K) -> (M, N) in out_dtype (default x.dtype).  Weight per module docstring."""
  if x.ndim != 2:
    raise ValueError(f"x must be (M, K), got shape {x.shape}")
  n_features = _check_weight(packed_weight, w_scale, lut, x.shape[1])
  _check_bias(bias, n_features)
  _check_blocks(block_m, block_n, block_k, split_k)
  kernel = functools.partial(w4a16_matmul_kernel, block_m=block_m, block_n=block_n,
                             block_k=block_k, split_k=split_k)
  w_scale, bias = w_scale.astype(jnp.float32), _bias_or_zeros(bias, n_features)
  return common.launch_matmul(
      kernel, (x, packed_weight, lut.astype(jnp.bfloat16), w_scale, bias), m_rows=x.shape[0],
      n_features=n_features, out_dtype=out_dtype or x.dtype, acc_dtype=jnp.float32,
      block_m=block_m, block_n=block_n, split_k=split_k, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, name="w4a16_matmul",
      epilogue=lambda acc: _scale_and_bias(acc, None, w_scale, bias))


def w4a16_matmul_reference(x, packed_weight, lut, w_scale, bias=None, out_dtype=None):
  """Plain jnp: full decode, one float32 dot."""
  weight = dequantize_fp4_reference(packed_weight, lut, w_scale, x.shape[1])
  y = jnp.dot(x.astype(jnp.float32), weight, precision=lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------
# W4A8 (FP8 E4M3 activations)
# ----------------------------------------------------------------------------------------


def w4a8_matmul_kernel(x_bits_ref, x_scale_ref, packed_weight_ref, lut_ref, w_scale_ref,
                       bias_ref, out_ref, *, block_m: int, block_n: int, block_k: int,
                       split_k: int):
  """x_bits_ref: (M, K) uint8 E4M3 bit patterns; x_scale_ref: (M,) float32; the rest as W4A16."""
  m_rows, k_features = x_bits_ref.shape
  n_features = out_ref.shape[1]
  row_start, col_start, row_mask, cols, col_mask = _tile_coordinates(block_m, block_n, m_rows,
                                                                     n_features)

  def k_step(k_tile, acc):
    k_start = k_tile * block_k
    ks = k_start + jnp.arange(block_k, dtype=jnp.int32)
    k_mask = ks < k_features
    x_bits = common.load_tile(x_bits_ref, row_start, block_m, k_start, block_k, row_mask, k_mask)
    x_tile = common.decode_e4m3_bits(x_bits.astype(jnp.int32))  # exact; bf16 holds E4M3
    weight_tile = _weight_tile(packed_weight_ref, lut_ref, ks, k_mask, cols, col_mask)
    return acc + jnp.dot(x_tile.astype(jnp.bfloat16), weight_tile.astype(jnp.bfloat16),
                         preferred_element_type=jnp.float32)

  first, end = common.k_tile_range(k_features, block_k, split_k)
  acc = lax.fori_loop(first, end, k_step, jnp.zeros((block_m, block_n), jnp.float32))
  epilogue = _kernel_epilogue(x_scale_ref, w_scale_ref, bias_ref, row_start, col_start, row_mask,
                              col_mask, block_m, block_n)
  common.finish_tile(out_ref, acc, epilogue, split_k=split_k, m_rows=m_rows,
                     row_start=row_start, col_start=col_start, row_mask=row_mask,
                     col_mask=col_mask)


@functools.partial(jax.jit, static_argnames=STATIC_KERNEL_ARGS)
def w4a8_matmul(x_fp8, x_scale, packed_weight, lut, w_scale, bias=None, *, block_m: int = 64,
                block_n: int = 64, block_k: int = 64, split_k: int = 1, num_warps: int = 4,
                num_stages: int = 3, interpret: bool = False, out_dtype=jnp.float32):
  """x_fp8: (M, K) float8_e4m3fn, x_scale: (M,) -> (M, N) out_dtype."""
  if x_fp8.ndim != 2 or x_fp8.dtype != jnp.float8_e4m3fn:
    raise ValueError(f"x_fp8 must be (M, K) float8_e4m3fn, got {x_fp8.shape} {x_fp8.dtype}")
  m_rows, k_features = x_fp8.shape
  _check_rows("x_scale", x_scale, m_rows)
  n_features = _check_weight(packed_weight, w_scale, lut, k_features)
  _check_bias(bias, n_features)
  _check_blocks(block_m, block_n, block_k, split_k)
  kernel = functools.partial(w4a8_matmul_kernel, block_m=block_m, block_n=block_n,
                             block_k=block_k, split_k=split_k)
  x_scale, w_scale = x_scale.astype(jnp.float32), w_scale.astype(jnp.float32)
  bias = _bias_or_zeros(bias, n_features)
  operands = (lax.bitcast_convert_type(x_fp8, jnp.uint8), x_scale, packed_weight,
              lut.astype(jnp.bfloat16), w_scale, bias)
  return common.launch_matmul(
      kernel, operands, m_rows=m_rows, n_features=n_features, out_dtype=out_dtype,
      acc_dtype=jnp.float32, block_m=block_m, block_n=block_n, split_k=split_k,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret, name="w4a8_matmul",
      epilogue=lambda acc: _scale_and_bias(acc, x_scale, w_scale, bias))


def w4a8_matmul_reference(x_fp8, x_scale, packed_weight, lut, w_scale, bias=None,
                          out_dtype=jnp.float32):
  """Plain jnp: X = fp8 * x_scale, full weight decode, one float32 dot."""
  x = x_fp8.astype(jnp.float32) * x_scale.astype(jnp.float32)[:, None]
  return w4a16_matmul_reference(x, packed_weight, lut, w_scale, bias, out_dtype=out_dtype)


def quantize_fp8_per_token_reference(x):
  """x: (M, K) -> (float8_e4m3fn (M, K), scale (M,)) with scale = absmax / 448 per row."""
  x = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=1)
  scale = absmax / FP8_E4M3_MAX
  safe = jnp.where(scale > 0, scale, 1.0)
  return (x / safe[:, None]).astype(jnp.float8_e4m3fn), scale


# ----------------------------------------------------------------------------------------
# W4A4 (integer)
# ----------------------------------------------------------------------------------------


def w4a4_matmul_kernel(packed_x_ref, x_scale_ref, x_int_lut_ref, packed_weight_ref,
                       w_int_lut_ref, w_scale_ref, bias_ref, out_ref, *, k_features: int,
                       block_m: int, block_n: int, block_k: int, split_k: int):
  """packed_x_ref: (M, ceil(K/2)) uint8 (codes packed along K); x_scale_ref: (M,) float32;
  x_int_lut_ref, w_int_lut_ref: (16,) int8; packed_weight_ref: (ceil(K/2), N) uint8;
  w_scale_ref, bias_ref: (N,) float32; out_ref: (M, N), or (split_k * M, N) int32 partials."""
  m_rows = packed_x_ref.shape[0]
  n_features = out_ref.shape[1]
  row_start, col_start, row_mask, cols, col_mask = _tile_coordinates(block_m, block_n, m_rows,
                                                                     n_features)
  rows = row_start + jnp.arange(block_m, dtype=jnp.int32)

  def k_step(k_tile, acc):
    ks = k_tile * block_k + jnp.arange(block_k, dtype=jnp.int32)
    k_mask = ks < k_features
    x_mask = row_mask[:, None] & k_mask[None, :]
    x_codes = common.load_packed_codes(packed_x_ref, CODE_BITS, ks, rows, x_mask, axis=1)
    x_int = common.gather(x_int_lut_ref, x_codes, x_mask)  # (block_m, block_k) int8
    w_int = _weight_tile(packed_weight_ref, w_int_lut_ref, ks, k_mask, cols, col_mask)
    return acc + jnp.dot(x_int, w_int, preferred_element_type=jnp.int32)

  first, end = common.k_tile_range(k_features, block_k, split_k)
  acc = lax.fori_loop(first, end, k_step, jnp.zeros((block_m, block_n), jnp.int32))
  epilogue = _kernel_epilogue(x_scale_ref, w_scale_ref, bias_ref, row_start, col_start, row_mask,
                              col_mask, block_m, block_n)
  common.finish_tile(out_ref, acc, epilogue, split_k=split_k, m_rows=m_rows,
                     row_start=row_start, col_start=col_start, row_mask=row_mask,
                     col_mask=col_mask)


def _check_w4a4(packed_x, x_scale, x_int_lut, packed_weight, w_int_lut, w_scale, bias,
                k_features):
  if packed_x.ndim != 2 or packed_x.shape[1] != packing.packed_length(k_features, CODE_BITS):
    raise ValueError(f"packed activations must be (M, {packing.packed_length(k_features, 4)}) "
                     f"for in_features {k_features}, got shape {packed_x.shape}")
  if packed_x.dtype != jnp.uint8:
    raise ValueError(f"packed activations must be uint8, got {packed_x.dtype}")
  _check_rows("x_scale", x_scale, packed_x.shape[0])
  if x_int_lut.shape != (LUT_SIZE,) or x_int_lut.dtype != jnp.int8:
    raise ValueError(f"x_int_lut must be (16,) int8, got {x_int_lut.shape} {x_int_lut.dtype}")
  n_features = _check_weight(packed_weight, w_scale, w_int_lut, k_features, "int")
  _check_bias(bias, n_features)
  return n_features


@functools.partial(jax.jit, static_argnames=STATIC_KERNEL_ARGS + ["k_features"])
def w4a4_matmul(packed_x, x_scale, x_int_lut, packed_weight, w_int_lut, w_scale, bias=None, *,
                k_features: int, block_m: int = 64, block_n: int = 64, block_k: int = 64,
                split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
                interpret: bool = False, out_dtype=jnp.float32):
  """packed_x: (M, ceil(K/2)), x_scale: (M,) -> (M, N) out_dtype.

  y[m, n] = (sum_k x_int_lut[xc[m, k]] * w_int_lut[wc[k, n]]) * x_scale[m] * w_scale[n] + b[n],
  the sum exact in int32 (also across a K split: int32 partials are summed before scaling);
  k_features (K) is static because ceil(K/2) does not determine it.
  """
  n_features = _check_w4a4(packed_x, x_scale, x_int_lut, packed_weight, w_int_lut, w_scale, bias,
                           k_features)
  # int8 MMA instructions reduce over 32 (m16n8k32), hence block_k >= 32.
  _check_blocks(block_m, block_n, block_k, split_k, min_block_k=32)
  kernel = functools.partial(w4a4_matmul_kernel, k_features=k_features, block_m=block_m,
                             block_n=block_n, block_k=block_k, split_k=split_k)
  x_scale, w_scale = x_scale.astype(jnp.float32), w_scale.astype(jnp.float32)
  bias = _bias_or_zeros(bias, n_features)
  operands = (packed_x, x_scale, x_int_lut, packed_weight, w_int_lut, w_scale, bias)
  return common.launch_matmul(
      kernel, operands, m_rows=packed_x.shape[0], n_features=n_features, out_dtype=out_dtype,
      acc_dtype=jnp.int32, block_m=block_m, block_n=block_n, split_k=split_k,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret, name="w4a4_matmul",
      epilogue=lambda acc: _scale_and_bias(acc.astype(jnp.float32), x_scale, w_scale, bias))


def w4a4_int_accumulator_reference(packed_x, x_int_lut, packed_weight, w_int_lut,
                                   k_features: int):
  """The exact int32 sum_k x_int[m, k] * w_int[k, n] by full decode (plain jnp)."""
  x_codes = packing.unpack_bits(packed_x, CODE_BITS, k_features, axis=1, dtype=jnp.int32)
  w_codes = packing.unpack_bits(packed_weight, CODE_BITS, k_features, axis=0, dtype=jnp.int32)
  x_int = x_int_lut.astype(jnp.int32)[x_codes]
  w_int = w_int_lut.astype(jnp.int32)[w_codes]
  return jnp.dot(x_int, w_int, preferred_element_type=jnp.int32)


def w4a4_matmul_reference(packed_x, x_scale, x_int_lut, packed_weight, w_int_lut, w_scale,
                          bias=None, *, k_features: int, out_dtype=jnp.float32):
  """Plain jnp: exact int32 accumulator, then the same float scaling as the kernel."""
  _check_w4a4(packed_x, x_scale, x_int_lut, packed_weight, w_int_lut, w_scale, bias, k_features)
  acc = w4a4_int_accumulator_reference(packed_x, x_int_lut, packed_weight, w_int_lut, k_features)
  y = acc.astype(jnp.float32) * x_scale.astype(jnp.float32)[:, None]
  y = y * w_scale.astype(jnp.float32)[None, :]
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(out_dtype)


# ----------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------


def _options(m_rows, n_features, k_features, kernel_options, min_block_k=32):
  options = common.default_matmul_blocks(m_rows, n_features, k_features, min_block_k)
  options.update(kernel_options)
  return options


def w4a16_linear(x, packed_weight, lut, w_scale, bias=None, *, impl: str = "auto",
                 **kernel_options):
  """x: (..., K) -> (..., N) in x.dtype; Pallas on GPU, reference elsewhere (see common)."""
  x2d, lead = common.flatten_rows(x, x.shape[-1])
  use_pallas, interpret = common.resolve_impl(impl)
  if use_pallas:
    options = _options(x2d.shape[0], packed_weight.shape[1], x2d.shape[1], kernel_options)
    y = w4a16_matmul(x2d, packed_weight, lut, w_scale, bias, interpret=interpret, **options)
  else:
    y = w4a16_matmul_reference(x2d, packed_weight, lut, w_scale, bias)
  return y.reshape(lead + (y.shape[-1],))


def w4a8_linear(x_fp8, x_scale, packed_weight, lut, w_scale, bias=None, *, impl: str = "auto",
                out_dtype=jnp.float32, **kernel_options):
  """x_fp8: (..., K) float8_e4m3fn, x_scale: (...,) -> (..., N)."""
  x2d, lead = common.flatten_rows(x_fp8, x_fp8.shape[-1], "x_fp8")
  scale1d = x_scale.reshape(-1)
  use_pallas, interpret = common.resolve_impl(impl)
  if use_pallas:
    options = _options(x2d.shape[0], packed_weight.shape[1], x2d.shape[1], kernel_options)
    y = w4a8_matmul(x2d, scale1d, packed_weight, lut, w_scale, bias, interpret=interpret,
                    out_dtype=out_dtype, **options)
  else:
    y = w4a8_matmul_reference(x2d, scale1d, packed_weight, lut, w_scale, bias, out_dtype)
  return y.reshape(lead + (y.shape[-1],))


def w4a4_linear(packed_x, x_scale, x_int_lut, packed_weight, w_int_lut, w_scale, bias=None, *,
                k_features: int, impl: str = "auto", out_dtype=jnp.float32, **kernel_options):
  """packed_x: (..., ceil(K/2)), x_scale: (...,) -> (..., N)."""
  x2d, lead = common.flatten_rows(packed_x, packed_x.shape[-1], "packed_x")
  scale1d = x_scale.reshape(-1)
  use_pallas, interpret = common.resolve_impl(impl)
  if use_pallas:
    options = _options(x2d.shape[0], packed_weight.shape[1], k_features, kernel_options)
    y = w4a4_matmul(x2d, scale1d, x_int_lut, packed_weight, w_int_lut, w_scale, bias,
                    k_features=k_features, interpret=interpret, out_dtype=out_dtype, **options)
  else:
    y = w4a4_matmul_reference(x2d, scale1d, x_int_lut, packed_weight, w_int_lut, w_scale, bias,
                              k_features=k_features, out_dtype=out_dtype)
  return y.reshape(lead + (y.shape[-1],))


# ----------------------------------------------------------------------------------------
# Paths by name (the dispatcher's contract; kernels/fp4_mma.py holds the new kernels).
# ----------------------------------------------------------------------------------------
#
# Uniform signatures, one per op (x: (M, K) float activations, weight: fp4_mma.PackedFp4Weight,
# bias: (N,) or None; config: the path's launch options (dict: block_m, block_n, split_k,
# num_warps, num_stages for Triton paths; tokens_per_program, num_warps, transform_dtype for
# "quant" options of the act-quant kernel) or None for the defaults; returns (M, N)):
#
#   PATHS["w4a16"][name](x, weight, bias=None, *, config=None) -> x.dtype
#   PATHS["w4a8"][name](x, weight, bias=None, *, clip_ratio=1.0, transform=None, config=None,
#                       out_dtype=float32) -> out_dtype (bf16 halves the output bytes);
#       activations: per-token FP8 E4M3, scale = clip_ratio * absmax / 448, saturating (the
#       calibrated clip ratio is honoured on every path)
#   PATHS["w4a4"][name](x, weight, bias=None, *, act_format, clip_ratio=1.0, transform=None,
#                       config=None, out_dtype=float32) -> out_dtype;
#       act_format 'e1m2' | 'e2m1' | 'e3m0' | 'int4'
#
# transform: None or (signs (K,), block (a, a)) for Q = diag(signs) kron(block, H_b / sqrt(b)),
# b = K / a a power of two (quant/hadamard.py's layout); the act-quant step (transform,
# per-token scale, codes) is included in every w4a8 / w4a4 path.  Every path computes the same
# function as "reference" (the int8 / fp8 images are exact; the bf16 transform dots of the
# Triton act-quant may flip a code at a near-tie, "float32" config avoids that).
#
# Path names: "reference" (plain jnp, float32, table decode), "xla_int8" / "xla_fp8" /
# "xla_bf16" (act-quant with XLA, the weight unpacked once per call, lax.dot_general with an
# int32 / float32 accumulator), "triton_int8" / "triton_fp8" / "triton_bf16" (the Pallas-Triton
# act-quant kernel + fp4_mma kernel decoding 4-bit tiles in its K loop; interpret mode off
# GPU), "unpacked_triton_*" (the same, but the layer's 8-bit / bf16 image is decoded once per
# call with XLA and the kernel only loads it: the large-M choice, see fp4_mma.fp4_mma).
# The fp8 kernels compiled for a GPU ask for fp8_dot.FAST_ACCUM (Pallas alone leaves tt.dot's
# maxNumImpreciseAcc at 0, and Triton then upcasts to f16 mma.sync): Hopper fp8 wgmma, the
# products summed in the tensor core over each 128-wide K tile and added into a float32
# accumulator per tile (interpret mode: exact float32 dots).
# "mosaic_int8" / "mosaic_fp8" (Hopper, jax >= 0.11; M, N multiples of 128):
# kernels/fp4_mosaic.py, lowered off-GPU only (wgmma s8 / e4m3 in its Mosaic GPU MLIR), never
# run: GPU-test before dispatching.
#
# Roofline (H100 SXM, static SASS counts, benchmarks/static_report.md): decoding 4-bit tiles
# inside the K loop to int8 / fp8 costs 400+ integer instructions per warp per 128-wide K step,
# above the 8-bit tensor-core time, so those in-loop paths are for small M only; the bf16 one
# (packed decode, 223) hides under the bf16 wgmma with 2 CTAs per SM (W4A16 at every M on
# Hopper); at large M the unpacked_* paths (decode once, ~100 instructions per step) and the
# XLA dots are the 8-bit candidates.  The XLA dots write an int32 /
# float32 (M, N) accumulator and scale it in a second fusion unless XLA fuses that epilogue into
# the GEMM: measure before preferring them to unpacked_triton_*.
# UNVERIFIED = the path names no test has run (the dispatcher must skip them until a GPU run).


def _interpret() -> bool:
  return not common.on_gpu()


# fp4_mma's bf16 in-loop tiles on Hopper (sm_90a, K x N = 4608 x 1152, M = 1024, 2 stages):
# 128 x 128, 8 warps: 326 SASS per warp-step, 128 registers, 104 KB; 128 x 64, 4 warps: 360,
# 123 registers, 84 KB; both tensor-bound at 2 CTAs per SM (128 x 64 with 3 stages: 120 KB,
# 1 CTA, decode and wgmma take turns).  With a K split (summed in the launch) 128 x 64 takes
# 164-181 registers and keeps 2 CTAs per SM (325 SASS per warp-step); 128 x 128 takes 138-147
# and drops to 1 CTA, so only 128 x 64 splits (as vq_tiled's options).  (128 x 32, 4 warps:
# 261 SASS per warp-step, 3 CTAs per SM, issue floor 1.02x its tensor time at 1152 x 1152,
# M = 1024, would even out the launch tail, but its programs re-read x through L2 4x as often
# as 128 x 128's: 93 MB there, 8.1 us at dispatch.L2_BANDWIDTH against 3.9 us of tensor time.)
# 128 x 128 may also run stream-K (fp4_mma(stream_k=...)), with the staged epilogue: sm_90a,
# 126 registers, 2 CTAs per SM, tensor-bound; with the whole-tile epilogue in registers its
# stream-K launch took 184-188 (one CTA per SM: decode and wgmma take turns, issue floor 1.6x
# its tensor time), where the tiled kernel sits at 128 and VQ's stream-K at 122-124.
W4A16_TILED_OPTIONS = (dispatch.TileOption(128, 128, 8, 2, can_split=False, can_stream_k=True,
                                           staged_epilogue=True),
                       dispatch.TileOption(128, 64, 4, 2))
W4A16_TILED_MAX_SPLIT = 8
# W4A8's decoded-image fp8 kernel on Hopper (fp8_dot.FAST_ACCUM), sm_90a, 1152 x 3456 at
# M = 4096: 64 x 128 (8 warps, 3 stages): 122 registers, 64 KB, 2 CTAs per SM, issue floor
# 1.04x its tensor time; 128 x 128: 185 registers, 1 CTA per SM, the per-step float32
# promotion and the wgmma take turns (1.64x).  64 x 128 re-reads x through L2 twice as often:
# 36.0 us of L2 time there against 28.9 us for 128 x 128's issue floor (24.8 us of L2), so
# tail_tiles weighs both (128 x 256 spills 540 B).
FP8_PREDECODED_OPTIONS = (dispatch.TileOption(64, 128, 8, 3, can_split=False, issue_ratio=1.04),
                          dispatch.TileOption(128, 128, 8, 3, can_split=False, issue_ratio=1.64))


SPLITK_MAX_M = 64  # default_mma_config's small-M (split-K) launch up to this many rows


def default_mma_config(m_rows: int, n_features: int, k_features: int,
                       device: str | None = None, dot_kind: str | None = None,
                       predecode: bool = True, stream_k: bool = True,
                       splitk_block_ns=dispatch.SPLITK_BLOCK_NS) -> dict:
  """Tiles for fp4_mma.  Token rows: 128 x 128, 8 warps, 3 stages on Hopper (PTX checked: wgmma
  s8 / bf16 on sm_90a, no spills); 64 x 128, 8 warps elsewhere (sm_80: 128 x 128 spills; 64 x 128
  with 8 warps: int8 100 and bf16 165 registers, no spills; with 4 warps bf16 spilled).  The
  fp8 dot on Hopper (fp8_dot.FAST_ACCUM), decoded image: 64 x 128 (122 registers, 64 KB, 2 CTAs
  per SM: one's per-step float32 promotion overlaps the other's wgmma) or 128 x 128 (185
  registers, 1 CTA: promotion and wgmma take turns, but half the L2 reads of x), whichever
  tail_tiles finds faster (FP8_PREDECODED_OPTIONS); the in-loop fp8 kernel keeps 64 x 128.
  Small M: a thin M tile with a K split (GEMV-like: weights streamed once), its column width
  (splitk_block_ns) and split chosen together (dispatch.splitk_launch).
  The bf16 kernel decoding 4-bit tiles in its K loop (predecode=False) on Hopper takes 2
  stages: 104 KB of shared memory and 128 registers let 2 CTAs share an SM, so one decodes
  while the other's wgmma runs (Triton waits for a wgmma whose operand the loop itself wrote to
  shared memory before the next K step; with 3 stages, 144 KB, one CTA fills the SM and decode
  and tensor cores take turns: static report).  So does the int8 one (its packed decode: 239
  SASS per warp-step, 128 registers, 56 KB; 245 and 80 KB with 3 stages).
  device: 'hopper' | 'ampere' | None (None: the local device; CPU counts as hopper so the tests
  exercise the Hopper configs).  stream_k=False: the best tiled launch (W4A16's stream-K
  candidate left out: what the benchmark times it against)."""
  if device is None:
    device = "ampere" if common.on_gpu() and not _local_is_hopper() else "hopper"
  if m_rows > SPLITK_MAX_M:
    if device == "hopper" and dot_kind == "bf16" and not predecode:
      # W4A16 in-loop: 128 x 128 (8 warps) or 128 x 64 (4 warps, 123 registers, 84 KB), both
      # tensor-bound at 2 CTAs per SM on sm_90a, and 128 x 64's K split (summed in the
      # launch): the choice whose busiest SM finishes first (dispatch.tail_tiles), counting the
      # weights' 4-bit bytes, x, the bf16 output and the split's float32 partials in DRAM, and
      # each tile's x rows and 4-bit columns through L2.
      moved = k_features * n_features / 2 + 2 * m_rows * (k_features + n_features)
      options = (W4A16_TILED_OPTIONS if stream_k
                 else dispatch.without_stream_k(W4A16_TILED_OPTIONS))
      return dispatch.tail_tiles(
          m_rows, k_features, n_features, device, options, block_k=fp4_mma.TILE_K,
          moved_bytes=moved, max_split=W4A16_TILED_MAX_SPLIT, operand_bytes=(2.0, 0.5)).config()
    if device == "hopper" and dot_kind == "fp8" and predecode:
      # the E4M3 image (1 B) and x's (1 B) through L2 against each option's K-loop time
      moved = k_features * n_features + m_rows * k_features + 2 * m_rows * n_features
      option = dispatch.tail_tiles(m_rows, k_features, n_features, device,
                                   FP8_PREDECODED_OPTIONS, block_k=fp4_mma.TILE_K,
                                   moved_bytes=moved, operand_bytes=(1.0, 1.0),
                                   rate_multiplier=2.0).option
      return dict(block_m=option.block_m, block_n=option.block_n, split_k=1,
                  num_warps=option.num_warps, num_stages=option.num_stages)
    if device == "hopper" and dot_kind == "int8" and not predecode:
      return dict(block_m=128, block_n=128, split_k=1, num_warps=8, num_stages=2)
    if device == "hopper" and dot_kind != "fp8":
      return dict(block_m=128, block_n=128, split_k=1, num_warps=8, num_stages=3)
    return dict(block_m=64, block_n=128, split_k=1, num_warps=8, num_stages=3)
  # Small M: a thin M tile; the column width and the K split chosen together by the busiest
  # SM's work against the weights' and partials' bytes (dispatch.splitk_launch; at 128
  # columns the bf16 dot issues 501 SASS per warp-step on sm_90a at M = 16, at 32 columns 189).
  block_m = common.block_size_for(m_rows, 16, 128)
  x_bytes = 2 if dot_kind in (None, "bf16") else 1
  moved = k_features * n_features / 2 + m_rows * (x_bytes * k_features + 2 * n_features)
  block_n, split_k = dispatch.splitk_launch(
      m_rows, n_features, -(-k_features // fp4_mma.TILE_K), device,
      "fp4_bf16" if dot_kind in (None, "bf16") else "fp4_8bit", block_m=block_m,
      weight_bytes=moved, block_ns=splitk_block_ns)
  return dict(block_m=block_m, block_n=block_n, split_k=split_k, num_warps=4, num_stages=3)


def _local_is_hopper() -> bool:
  kind = common.local_device_kind()[1].upper()
  return any(name in kind for name in ("H100", "H200", "H800", "GH200", "H20"))


def _mma_options(x, weight, config, dot_kind=None, predecode=True):
  """fp4_mma's launch options for this call: default_mma_config for the dot kind (the fp8
  dot gets its own Hopper tiles), overridden by the config's entries."""
  options = default_mma_config(x.shape[0], weight.n_features, weight.k_features,
                               dot_kind=dot_kind, predecode=predecode)
  return common.split_replaces_stream_k(
      options, {k: v for k, v in (config or {}).items() if k in options})


def _quant_options(config):
  keys = ("tokens_per_program", "num_warps", "transform_dtype", "dense_signs", "signs_per_token")
  return {k[len("quant_"):]: v for k, v in (config or {}).items()
          if k.startswith("quant_") and k[len("quant_"):] in keys}


def _w4a16_reference(x, weight, bias=None, *, config=None, activation=None):
  del config
  y = jnp.dot(x.astype(jnp.float32), fp4_mma.dequantize_reference(weight),
              precision=lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return activation_fn.fused(activation, y).astype(x.dtype)


def _w4a16_xla(x, weight, bias=None, *, config=None, activation=None):
  del config
  return fp4_mma.xla_dot_folded(x, weight, bias, out_dtype=x.dtype, activation=activation)


def _w4a16_triton_path(predecode: bool):

  def path(x, weight, bias=None, *, config=None, activation=None):
    ones = jnp.ones((x.shape[0],), jnp.float32)
    return fp4_mma.fp4_mma(x.astype(jnp.bfloat16), ones, weight, bias, dot_kind="bf16",
                           predecode=predecode, interpret=_interpret(), out_dtype=x.dtype,
                           activation=activation,
                           **_mma_options(x, weight, config, "bf16", predecode))

  return path


def _norm_kwargs(norm):
  """act_quant.RowNorm (or None) -> the act-quant functions' prologue keywords."""
  return {} if norm is None else norm.kwargs()


def _quantized_reference(x, weight, bias, act_format, clip_ratio, transform, norm=None,
                         activation=None):
  """Plain jnp: the float32 fake-quantized activations times the dequantized weight."""
  image = "fp8" if act_format == act_quant.FP8_FORMAT else "int8"
  values, row_scale = act_quant.quantize_rows_xla(x, transform, act_format=act_format,
                                                  clip_ratio=float(clip_ratio), image=image,
                                                  **_norm_kwargs(norm))
  xq = values.astype(jnp.float32) * row_scale[:, None]
  y = jnp.dot(xq, fp4_mma.dequantize_reference(weight), precision=lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return activation_fn.fused(activation, y)


def _quantized_path(act_impl: str, dot_impl: str, dot_kind: str, fixed_format=None,
                    predecode: bool = False):
  """A w4a8 / w4a4 path: act-quant (XLA or Triton) into the dot kind's image, then the matmul
  (XLA unpack + dot_general, or the fp4_mma kernel)."""

  def path(x, weight, bias=None, *, act_format=fixed_format, clip_ratio=1.0, transform=None,
           config=None, out_dtype=jnp.float32, norm=None, activation=None):
    if x.ndim != 2:
      raise ValueError(f"x must be (M, K), got shape {x.shape}")
    image = "int8" if dot_kind == "int8" else "fp8"
    if act_impl == "xla":
      values, row_scale = act_quant.quantize_rows_xla(
          x, transform, act_format=act_format, clip_ratio=float(clip_ratio), image=image,
          **_norm_kwargs(norm))
    else:
      values, row_scale = act_quant.quantize_rows(
          x, transform, act_format=act_format, clip_ratio=float(clip_ratio), image=image,
          interpret=_interpret(), **_quant_options(config), **_norm_kwargs(norm))
    if dot_kind == "bf16":
      values = values.astype(jnp.bfloat16)
    if dot_impl == "xla":
      return fp4_mma.xla_dot(values, row_scale, weight, bias, dot_kind=dot_kind,
                             out_dtype=out_dtype, activation=activation)
    return fp4_mma.fp4_mma(values, row_scale, weight, bias, dot_kind=dot_kind,
                           predecode=predecode, interpret=_interpret(), out_dtype=out_dtype,
                           activation=activation,
                           **_mma_options(x, weight, config, dot_kind, predecode))

  return path


def _mosaic_path(dot_kind: str, fixed_format=None):
  """Triton act-quant + the Mosaic GPU (Hopper) matmul.  Lowering checked off-GPU only (see
  kernels/fp4_mosaic.py): the dispatcher must not pick it before a GPU test passes."""

  def path(x, weight, bias=None, *, act_format=fixed_format, clip_ratio=1.0, transform=None,
           config=None, out_dtype=jnp.float32, norm=None, activation=None):
    from dit_quant_jax.kernels import fp4_mosaic  # jax >= 0.11 only
    values, row_scale = act_quant.quantize_rows(
        x, transform, act_format=act_format, clip_ratio=float(clip_ratio), image=dot_kind,
        interpret=_interpret(), **_quant_options(config), **_norm_kwargs(norm))
    options = {k: v for k, v in (config or {}).items()
               if k in ("block_m", "block_n", "max_concurrent_steps")}
    y = fp4_mosaic.fp4_mosaic_matmul(values, row_scale, weight, bias, dot_kind=dot_kind,
                                     out_dtype=out_dtype, **options)
    if activation is None:
      return y
    # not fused: the Mosaic kernel has no activation epilogue yet (a pass on its rounded output)
    return activation_fn.fused(activation, y.astype(jnp.float32)).astype(out_dtype)

  return path


def _w4a8_reference(x, weight, bias=None, *, clip_ratio=1.0, transform=None, config=None,
                    out_dtype=jnp.float32, norm=None, activation=None):
  del config
  y = _quantized_reference(x, weight, bias, act_quant.FP8_FORMAT, clip_ratio, transform, norm,
                           activation)
  return y.astype(out_dtype)


def _w4a4_reference(x, weight, bias=None, *, act_format, clip_ratio=1.0, transform=None,
                    config=None, out_dtype=jnp.float32, norm=None, activation=None):
  del config
  y = _quantized_reference(x, weight, bias, act_format, clip_ratio, transform, norm,
                           activation)
  return y.astype(out_dtype)


_FP8 = act_quant.FP8_FORMAT
PATHS = {
    "w4a16": {
        "reference": _w4a16_reference,
        "xla_bf16": _w4a16_xla,
        "triton_bf16": _w4a16_triton_path(False),
        "unpacked_triton_bf16": _w4a16_triton_path(True),
    },
    "w4a8": {
        "reference": _w4a8_reference,
        "xla_fp8": _quantized_path("xla", "xla", "fp8", _FP8),
        "xla_bf16": _quantized_path("xla", "xla", "bf16", _FP8),
        "triton_fp8": _quantized_path("triton", "triton", "fp8", _FP8),
        "triton_bf16": _quantized_path("triton", "triton", "bf16", _FP8),
        "unpacked_triton_bf16": _quantized_path("triton", "triton", "bf16", _FP8, True),
        # The layer's E4M3 image decoded once + the Triton fp8 kernel: Hopper fp8 wgmma
        # (kernels/fp8_dot.py), products summed in the tensor core over each 128-wide K tile.
        "unpacked_triton_fp8": _quantized_path("triton", "triton", "fp8", _FP8, True),
        "mosaic_fp8": _mosaic_path("fp8", _FP8),
    },
    "w4a4": {
        "reference": _w4a4_reference,
        "xla_int8": _quantized_path("xla", "xla", "int8"),
        "xla_fp8": _quantized_path("xla", "xla", "fp8"),
        "triton_int8": _quantized_path("triton", "triton", "int8"),
        "triton_fp8": _quantized_path("triton", "triton", "fp8"),
        # Triton act-quant kernel feeding the XLA int8 dot (large M: decode once per call).
        "triton_quant_xla_int8": _quantized_path("triton", "xla", "int8"),
        "unpacked_triton_int8": _quantized_path("triton", "triton", "int8", None, True),
        "mosaic_int8": _mosaic_path("int8"),
        "mosaic_fp8": _mosaic_path("fp8"),
    },
}
FP4_PATHS = PATHS
# Paths whose act-quant step is act_quant.quantize_rows (the Triton kernel): fuses_row_norm.
_TRITON_ACT_QUANT = {
    "w4a8": ("triton_fp8", "triton_bf16", "unpacked_triton_bf16", "unpacked_triton_fp8",
             "mosaic_fp8"),
    "w4a4": ("triton_int8", "triton_fp8", "triton_quant_xla_int8", "unpacked_triton_int8",
             "mosaic_int8", "mosaic_fp8"),
}
UNVERIFIED = {("w4a8", "mosaic_fp8"), ("w4a4", "mosaic_int8"), ("w4a4", "mosaic_fp8")}


def quantize_fp8_per_token(x, clip_ratio: float = 1.0):
  """x: (M, K) -> (float8_e4m3fn (M, K), scale (M,)), scale = clip_ratio * absmax / 448,
  values saturated at +-448 (the same function as quant/rtn's per-token FP8 fake quant)."""
  return act_quant.quantize_rows_xla(x, None, act_format=_FP8, clip_ratio=float(clip_ratio),
                                     image="fp8")


def _quantize_case(x, transform, **kwargs):
  return act_quant.quantize_rows(x, transform, **kwargs)


def _quantize_norm_case(x, transform, norm_mul, norm_add, **kwargs):
  return act_quant.quantize_rows(x, transform, norm_mul=norm_mul, norm_add=norm_add,
                                 tokens_per_sample=256, **kwargs)


def lowering_cases(shapes=None, device: str = "hopper"):
  """(name, jitted_fn, arg ShapeDtypeStructs, config) per FP4 kernel at DiT-XL/2 shapes, for
  the static report (lower with triton_static.capture_ttir(jitted_fn, *args)).

  shapes: iterable of (M, K, N); default: M in {16, 4096} x the DiT-XL/2 linears
  (qkv 1152->3456, proj 1152->1152, fc1 1152->4608, fc2 4608->1152).  Config: the launch
  options the paths use at that shape (num_warps / num_stages for ptx_stats)."""
  if shapes is None:
    layers = ((1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152))
    shapes = [(m, k, n) for m in (16, 4096) for k, n in layers]
  kinds = ("int8", "bf16") if device != "hopper" else ("int8", "fp8", "bf16")
  cases = []
  quantized_widths = set()  # one act-quant case per (M, K)
  for m_rows, k_features, n_features in shapes:
    weight = fp4_mma.PackedFp4Weight(
        jax.ShapeDtypeStruct((n_features, fp4_mma.padded_k(k_features) // 2), jnp.uint8),
        jax.ShapeDtypeStruct((n_features,), jnp.float32), "e2m1", k_features)
    row_scale = jax.ShapeDtypeStruct((m_rows,), jnp.float32)
    for kind in kinds:
      x = jax.ShapeDtypeStruct((m_rows, k_features), fp4_mma.x_dtype_for(kind))
      for predecode in ((False, True) if m_rows > 64 else (False,)):
        config = default_mma_config(m_rows, n_features, k_features, device, kind, predecode)
        fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind=kind, predecode=predecode,
                                       out_dtype=jnp.bfloat16, **config))
        prefix = "fp4_mma_unpacked" if predecode else "fp4_mma"
        cases.append((f"{prefix}_{kind} M={m_rows} K={k_features} N={n_features}", fn,
                      (x, row_scale, weight), dict(config, predecode=predecode)))
    a_order = {384: 12, 768: 12, 1152: 36, 4608: 36}.get(k_features)
    if a_order is not None and m_rows > 64 and (m_rows, k_features) not in quantized_widths:
      quantized_widths.add((m_rows, k_features))
      transform = (jax.ShapeDtypeStruct((k_features,), jnp.float32),
                   jax.ShapeDtypeStruct((a_order, a_order), jnp.float32))
      rows, c_size = act_quant.row_shape(k_features, a_order)
      warps = act_quant.default_num_warps(rows, c_size)
      # The model's transform: a Hadamard block (FP4Weight.hadamard_kind 'hadamard').
      quant_config = dict(tokens_per_program=8, num_warps=warps, num_stages=1, dense_signs=True,
                          signs_per_token=act_quant.default_signs_per_token(
                              rows, c_size, warps, device))
      # W4A4's int8 image (E2M1 codes); on Hopper also W4A8's E4M3 image (its fp8 kernel).
      images = (("int8", "e2m1"), ("fp8", _FP8)) if device == "hopper" else (("int8", "e2m1"),)
      for image, act_format in images:
        fn = jax.jit(functools.partial(_quantize_case, act_format=act_format, image=image,
                                       **quant_config))
        cases.append((f"quantize_rows_{image} M={m_rows} K={k_features} a={a_order}", fn,
                      (jax.ShapeDtypeStruct((m_rows, k_features), jnp.bfloat16), transform),
                      dict(quant_config)))
        if k_features == 1152 and m_rows % 256 == 0:  # qkv / fc1 input: LayerNorm fused
          norm_fn = jax.jit(functools.partial(_quantize_norm_case, act_format=act_format,
                                              image=image, **quant_config))
          affine = jax.ShapeDtypeStruct((m_rows // 256, k_features), jnp.float32)
          cases.append((f"quantize_rows_norm_{image} M={m_rows} K={k_features} a={a_order}",
                        norm_fn, (jax.ShapeDtypeStruct((m_rows, k_features), jnp.bfloat16),
                                  transform, affine, affine), dict(quant_config)))
  return cases


# ----------------------------------------------------------------------------------------
# The quantized linear's entry: dispatch by shape, fall back where a kernel does not apply.
# ----------------------------------------------------------------------------------------

# Paths whose act-quant step is the Triton kernel (act_quant.quantize_rows) -> the path with
# the same dot but XLA act-quant, for widths the kernel does not take (power-of-two factor of K
# below a 16-wide dot tile, e.g. the tiny test models).
_XLA_QUANT_FALLBACK = {
    ("w4a8", "triton_fp8"): "xla_fp8", ("w4a8", "triton_bf16"): "xla_bf16",
    ("w4a8", "unpacked_triton_bf16"): "xla_bf16", ("w4a8", "unpacked_triton_fp8"): "xla_fp8",
    ("w4a8", "mosaic_fp8"): "xla_fp8",
    ("w4a4", "triton_int8"): "xla_int8", ("w4a4", "triton_fp8"): "xla_fp8",
    ("w4a4", "triton_quant_xla_int8"): "xla_int8", ("w4a4", "unpacked_triton_int8"): "xla_int8",
    ("w4a4", "mosaic_int8"): "xla_int8", ("w4a4", "mosaic_fp8"): "xla_fp8",
}


def choose_path(op: str, m_rows: int, k_features: int, n_features: int, *, transform=None,
                act_format=None, weight_format=None, device_kind=None) -> dispatch.Choice:
  """dispatch.choose for an FP4 op, adjusted to what applies at this shape: the XLA act-quant
  where the Triton one does not take K, no fp8 image where the weight's (or the 4-bit
  activations') format has no exact E4M3 image (INT4: int8 for W4A4, bf16 for W4A8), and no
  path in UNVERIFIED."""
  choice = dispatch.choose(op, m_rows, k_features, n_features, device_kind=device_kind)
  path = choice.path
  if (op, path) in UNVERIFIED:
    raise ValueError(f"the dispatch table picked {op}/{path}, which no GPU run has verified")
  if path.endswith("fp8"):
    codes = [weight_format] + ([act_format] if op == "w4a4" else [])
    if not all(fp4.fp4_code(c).has_e4m3_image for c in codes if c is not None):
      path = path[:-3] + ("int8" if op == "w4a4" else "bf16")
  if ((op, path) in _XLA_QUANT_FALLBACK
      and not act_quant.quantize_rows_applies(k_features, transform)):
    path = _XLA_QUANT_FALLBACK[(op, path)]
  if path not in PATHS[op]:
    raise AssertionError(f"dispatch chose {op}/{path}, not in fp4_matmul.PATHS[{op!r}]")
  return dispatch.Choice(path, choice.config)


def fuses_row_norm(op: str, path: str) -> bool:
  """Whether a path's act-quant step is the Triton kernel (act_quant.quantize_rows), which runs a
  RowNorm prologue in the pass it already makes over x.  The XLA act-quant paths (W4A8's
  xla_fp8 on Hopper, the _XLA_QUANT_FALLBACK targets) and W4A16 get the normalized rows
  materialized instead, as the unfused model computes them."""
  return op in ("w4a4", "w4a8") and path in _TRITON_ACT_QUANT.get(op, ())


def linear(op: str, x, weight: fp4_mma.PackedFp4Weight, bias=None, *, act_format=None,
           clip_ratio: float = 1.0, transform=None, path=None, device_kind=None,
           out_dtype=None, norm=None, transform_kind=None, activation=None):
  """x: (..., K) -> (..., N) through the path the dispatcher picks for (M, K, N, device)
  (``choose_path``), or the named ``path``.  op: 'w4a16' (x already transformed and, for
  fake-quantized activations, quantized), 'w4a8' (per-token FP8 E4M3 activations) or 'w4a4'
  (per-token 4-bit ``act_format``); for these two, transform (signs (K,), block (a, a)) and
  clip_ratio are applied by the path's act-quant step.  out_dtype: default x.dtype.

  norm (act_quant.RowNorm, rows of x grouped in samples of norm.tokens_per_sample): the layer
  input is ``LayerNorm(x) * mul + add`` (a DiT block's adaLN-modulated input).  Paths whose
  act-quant is the Triton kernel (:func:`fuses_row_norm`) run it as the kernel's prologue (x
  read once, no copy of the modulated rows); the others take it materialized in x's dtype
  (act_quant.apply_row_norm), as the unfused model does.

  transform_kind: the transform block's kind (quant.hadamard); 'hadamard' (every entry of the
  block of one magnitude) lets the Triton act-quant multiply by its signs (quantize_rows'
  dense_signs).  None or another kind: the general dense factor.

  activation (None or 'gelu_tanh', numerics/activation.py): applied to the float32 output
  before the cast, in the matmul's epilogue on the kernel paths (DiT's fc1 -> GELU: no separate
  pass over the output)."""
  activation_fn.check(activation)
  if op not in PATHS:
    raise ValueError(f"unknown FP4 op {op!r}; expected one of {sorted(PATHS)}")
  if op == "w4a4" and act_format is None:
    raise ValueError("w4a4 needs act_format ('e1m2' | 'e2m1' | 'e3m0' | 'int4')")
  x2d, lead = common.flatten_rows(x, weight.k_features)
  out_dtype = x.dtype if out_dtype is None else out_dtype
  if path is None:
    choice = choose_path(op, x2d.shape[0], weight.k_features, weight.n_features,
                         transform=transform, act_format=act_format,
                         weight_format=weight.format_name, device_kind=device_kind)
    path, config = choice.path, choice.config or None
  else:
    if path not in PATHS[op]:
      raise ValueError(f"unknown {op} path {path!r}; known: {sorted(PATHS[op])}")
    config = None
  fn = PATHS[op][path]
  if transform_kind == "hadamard" and transform is not None and op != "w4a16":
    config = dict(config or {}, quant_dense_signs=True)  # read by quantize_rows only
  if norm is not None and not (fuses_row_norm(op, path)
                               or (op != "w4a16" and path == "reference")):
    x2d = act_quant.apply_row_norm(x2d, norm.mul, norm.add, int(norm.tokens_per_sample),
                                   float(norm.eps)).astype(x.dtype)
    norm = None
  if op == "w4a16":
    y = fn(x2d, weight, bias, config=config, activation=activation).astype(out_dtype)
  else:
    extra = dict(act_format=act_format) if op == "w4a4" else {}
    if norm is not None:
      extra["norm"] = norm
    y = fn(x2d, weight, bias, clip_ratio=clip_ratio, transform=transform, config=config,
           out_dtype=out_dtype, activation=activation, **extra)
  return y.reshape(lead + (weight.n_features,))
