"""VQ weight matmul (W2A16 / W3A16, VQ4DiT): y = x @ W + b with W decoded tile by tile.

Weight layout (notes/interfaces.md, "VQ weights"): a codebook ``(k, d)`` and assignments
``(K / d, N)`` of indices < k, packed along axis 0 with ``pack_bits(bits=ceil(log2 k))``;
``W[s * d + j, n] = codebook[index[s, n], j]``.

Each program owns a ``(block_m, block_n)`` output tile and walks K in ``block_k`` steps.  Per
step it decodes only its ``(block_k, block_n)`` weight tile: it reads the bytes holding the
indices of rows ``k // d`` (gather loads), extracts the ``bits``-wide indices, gathers
``codebook[index, k % d]`` from the small codebook (kept flat in bf16, L1/L2 resident), and runs a
bf16 ``tl.dot`` with float32 accumulation.  The dense weight never exists in device memory.
Any index width 1..16 and any sub-vector length d work (8-bit k=256 and 6-bit k=64 are tested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dit_quant_jax.kernels import common
from dit_quant_jax.quant import packing


def _check_vq_operands(x, codebook, packed_indices, bias):
  if x.ndim != 2:
    raise ValueError(f"x must be (M, K), got shape {x.shape}")
  if codebook.ndim != 2:
    raise ValueError(f"codebook must be (k, d), got shape {codebook.shape}")
  k_features = x.shape[1]
  n_codewords, sub_dim = codebook.shape
  if k_features % sub_dim:
    raise ValueError(
        f"in_features {k_features} is not a multiple of the sub-vector length {sub_dim}")
  bits = packing.index_bits(n_codewords)
  n_sub = k_features // sub_dim
  expected_rows = packing.packed_length(n_sub, bits)
  if packed_indices.ndim != 2 or packed_indices.shape[0] != expected_rows:
    raise ValueError(
        f"packed assignments must be ({expected_rows}, N) uint8 for {n_sub} sub-vectors of "
        f"{bits}-bit indices, got shape {packed_indices.shape}")
  if packed_indices.dtype != jnp.uint8:
    raise ValueError(f"packed assignments must be uint8, got {packed_indices.dtype}")
  n_features = packed_indices.shape[1]
  if bias is not None and bias.shape != (n_features,):
    raise ValueError(f"bias must have shape ({n_features},), got {bias.shape}")
  return bits, sub_dim, n_features


def vq_matmul_kernel(x_ref, codebook_ref, packed_ref, bias_ref, out_ref, *, bits: int,
                     sub_dim: int, block_m: int, block_n: int, block_k: int, split_k: int):
  """One (block_m, block_n) tile of y = x @ W + b (or its K-split partial, without bias).

  x_ref: (M, K) activations; codebook_ref: (k * d,) bf16 flat codebook; packed_ref: (rows, N)
  uint8 packed indices; bias_ref: (N,) float32; out_ref: (M, N), or (split_k * M, N) float32.
  """
  m_rows, k_features = x_ref.shape
  n_features = out_ref.shape[1]
  row_start = pl.program_id(0) * block_m
  col_start = pl.program_id(1) * block_n
  rows = row_start + jnp.arange(block_m, dtype=jnp.int32)
  cols = col_start + jnp.arange(block_n, dtype=jnp.int32)
  row_mask = rows < m_rows
  col_mask = cols < n_features

  def k_step(k_tile, acc):
    k_start = k_tile * block_k
    ks = k_start + jnp.arange(block_k, dtype=jnp.int32)
    k_mask = ks < k_features
    x_tile = common.load_tile(x_ref, row_start, block_m, k_start, block_k, row_mask, k_mask)
    weight_mask = k_mask[:, None] & col_mask[None, :]
    sub_vector = lax.div(ks, np.int32(sub_dim))
    within = lax.rem(ks, np.int32(sub_dim))
    indices = common.load_packed_codes(packed_ref, bits, sub_vector, cols, weight_mask, axis=0)
    weight_tile = common.gather(codebook_ref, indices * sub_dim + within[:, None], weight_mask)
    return acc + jnp.dot(x_tile.astype(jnp.bfloat16), weight_tile.astype(jnp.bfloat16),
                         preferred_element_type=jnp.float32)

  first, end = common.k_tile_range(k_features, block_k, split_k)
  acc = lax.fori_loop(first, end, k_step, jnp.zeros((block_m, block_n), jnp.float32))

  def add_bias(acc):
    return acc + common.load_vector(bias_ref, col_start, block_n, col_mask)[None, :]

  common.finish_tile(out_ref, acc, add_bias, split_k=split_k, m_rows=m_rows,
                     row_start=row_start, col_start=col_start, row_mask=row_mask,
                     col_mask=col_mask)


@functools.partial(jax.jit, static_argnames=["block_m", "block_n", "block_k", "split_k",
                                             "num_warps", "num_stages", "interpret"])
def vq_matmul(x, codebook, packed_indices, bias=None, *, block_m: int = 64, block_n: int = 64,
              block_k: int = 64, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
              interpret: bool = False):
  """x: (M, K), codebook: (k, d), packed_indices: (packed rows, N) uint8, bias: (N,) or None
  -> (M, N) in x.dtype.  split_k > 1 splits the K loop over a third grid axis (small M)."""
  bits, sub_dim, n_features = _check_vq_operands(x, codebook, packed_indices, bias)
  for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    common.check_block(name, size)
  common.check_split_k(split_k)
  bias = jnp.zeros((n_features,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  kernel = functools.partial(vq_matmul_kernel, bits=bits, sub_dim=sub_dim, block_m=block_m,
                             block_n=block_n, block_k=block_k, split_k=split_k)
  return common.launch_matmul(
      kernel, (x, codebook.astype(jnp.bfloat16).reshape(-1), packed_indices, bias),
      m_rows=x.shape[0], n_features=n_features, out_dtype=x.dtype, acc_dtype=jnp.float32,
      block_m=block_m, block_n=block_n, split_k=split_k, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, name="vq_matmul",
      epilogue=lambda acc: acc + bias[None, :])


def vq_dequantize_reference(codebook, packed_indices, k_features: int):
  """Dense (K, N) float32 weight from a codebook (k, d) and packed assignments."""
  n_codewords, sub_dim = codebook.shape
  bits = packing.index_bits(n_codewords)
  indices = packing.unpack_bits(packed_indices, bits, k_features // sub_dim, axis=0,
                                dtype=jnp.int32)  # (K / d, N)
  n_features = indices.shape[1]
  blocks = codebook.astype(jnp.float32)[indices]  # (K / d, N, d)
  return jnp.transpose(blocks, (0, 2, 1)).reshape(k_features, n_features)


def vq_matmul_reference(x, codebook, packed_indices, bias=None):
  """Plain jnp: decode the whole weight, then one float32 dot.  Same signature as vq_matmul."""
  _check_vq_operands(x, codebook, packed_indices, bias)
  weight = vq_dequantize_reference(codebook, packed_indices, x.shape[1])
  y = jnp.dot(x.astype(jnp.float32), weight, precision=lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def vq_linear(x, codebook, packed_indices, bias=None, *, impl: str = "auto", **kernel_options):
  """Dispatcher: x: (..., K) -> (..., N).  Pallas kernel on GPU, reference elsewhere.

  impl: "auto" | "pallas" (interpret mode off GPU) | "reference".  kernel_options override
  :func:`common.default_matmul_blocks` (block_m, block_n, block_k, split_k, num_warps,
  num_stages).
  """
  x2d, lead = common.flatten_rows(x, x.shape[-1])
  use_pallas, interpret = common.resolve_impl(impl)
  if use_pallas:
    options = common.default_matmul_blocks(x2d.shape[0], packed_indices.shape[1], x2d.shape[1])
    options.update(kernel_options)
    y = vq_matmul(x2d, codebook, packed_indices, bias, interpret=interpret, **options)
  else:
    y = vq_matmul_reference(x2d, codebook, packed_indices, bias)
  return y.reshape(lead + (y.shape[-1],))
