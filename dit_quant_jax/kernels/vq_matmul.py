"""VQ weight matmul (W2A16 / W3A16, VQ4DiT): y = x @ W + b from a codebook and packed indices.

Weight layout: a codebook ``(k, d)`` and assignments ``(K / d, N)`` of indices < k, packed along
axis 0 with ``pack_bits(bits=ceil(log2 k))``; ``W[s * d + j, n] = codebook[index[s, n], j]``.

Three paths, chosen per shape by :mod:`dit_quant_jax.kernels.dispatch`:

* ``vq_dequant_dot`` (large M on sm_80, compute-bound): decode the layer into a transient bf16 (K, N)
  buffer with XLA and call the bf16 XLA dot (tensor cores at full rate).  Peak memory grows by
  one layer; the decode costs one pass over the indices and one bf16 write of the weight, which
  the dot amortises over M rows.
* ``vq_tiled`` (mid M; every M > 64 on Hopper, where two CTAs per SM overlap one's decode with
  the other's wgmma; there, where the 128 x 128 tiles leave a short last wave, as a stream-K
  launch: common.run_stream_k): a Pallas kernel; each program owns a (block_m, block_n) output
  tile (stream-K: an even share of the launch's K iterations, across tiles) and
  per K step decodes its (block_k, block_n) weight tile once: the tile's indices are read as a
  contiguous block (rows of N bytes: wide loads), each index gathers its whole d-vector from the
  bf16 codebook (one d * 2-byte load per index, not d loads), and one bf16 ``dot`` with float32
  accumulation consumes the tile.
* ``vq_splitk`` (small M, memory-bound, "GEMV"): the same kernel with one thin M tile (the
  indices are streamed exactly once), narrow N tiles and the K loop split over a third grid
  axis so that enough programs keep the memory system busy; the split is reduced inside the
  same launch: each program writes its float32 partial, counts itself in with an atomic, and the
  last program of an output tile sums the partials in a fixed order (deterministic), adds the
  bias and writes the output.

The in-kernel decode needs d to be a power of two (d-vectors tile the K step); other d (e.g.
d = 3) use :func:`_decode_tile_per_element` (one gather per weight element, the old design).
Any index width 1..16 works (codes that straddle bytes are assembled from two byte loads).
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
from dit_quant_jax.kernels import dispatch
from dit_quant_jax.numerics import packing

PATHS = ("vq_dequant_dot", "vq_tiled", "vq_splitk")


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


def vector_decode_ok(sub_dim: int, block_k: int) -> bool:
  """Whether a K step of block_k holds whole d-vectors (d a power of two, d <= block_k)."""
  return sub_dim & (sub_dim - 1) == 0 and sub_dim <= block_k


# ----------------------------------------------------------------------------------------
# In-kernel decode of one (block_k, block_n) weight tile
# ----------------------------------------------------------------------------------------


def _decode_tile_vectors(codebook_ref, packed_ref, *, bits, sub_dim, k_start, block_k,
                         col_start, block_n, col_mask, n_sub):
  """Weight tile rows [k_start, k_start + block_k), columns [col_start, + block_n) -> bf16.

  The tile's block_k / d indices per column are read once (8-bit indices: one contiguous
  (block_k / d, block_n) byte block; narrower: the bytes holding them, contiguous along N), then
  each index gathers its d-vector ``codebook[index, 0:d]`` in one load.  Masked (out of range)
  sub-vectors decode to codeword 0 (harmless: see below).
  """
  n_tile_sub = block_k // sub_dim
  sub_start = k_start // sub_dim
  subs = sub_start + jnp.arange(n_tile_sub, dtype=jnp.int32)
  sub_mask = subs < n_sub
  index_mask = sub_mask[:, None] & col_mask[None, :]
  if bits == 8:
    indices = common.load_tile(packed_ref, sub_start, n_tile_sub, col_start, block_n, sub_mask,
                               col_mask).astype(jnp.int32)
  else:
    cols = col_start + jnp.arange(block_n, dtype=jnp.int32)
    indices = common.load_packed_codes(packed_ref, bits, subs, cols, index_mask, axis=0)
  lanes = jnp.arange(sub_dim, dtype=jnp.int32)
  # Unmasked: masked indices loaded as 0 address codeword 0 (in range), and their weights meet
  # zero x columns (k >= K) or are never stored (n >= N).  Without a select on the address,
  # triton sees d contiguous, d-aligned elements per index and emits one d * 2-byte load.
  flat = jnp.transpose(indices)[:, :, None] * sub_dim + lanes[None, None, :]  # (bn, S_t, d)
  vectors = plgpu.load(codebook_ref.at[flat])
  # (block_n, S_t, d) -> (block_n, block_k): column k = s * d + j of W^T, contiguous per index
  # (a K-major operand tile: each thread's d values stay together in registers and smem).
  return vectors.reshape(block_n, block_k).astype(jnp.bfloat16)


def _decode_tile_per_element(codebook_ref, packed_ref, *, bits, sub_dim, k_start, block_k,
                             col_start, block_n, col_mask, k_features):
  """Any d: each weight element reads its index and gathers ``codebook[index, k % d]``."""
  ks = k_start + jnp.arange(block_k, dtype=jnp.int32)
  cols = col_start + jnp.arange(block_n, dtype=jnp.int32)
  weight_mask = (ks < k_features)[:, None] & col_mask[None, :]
  sub_vector = lax.div(ks, np.int32(sub_dim))
  within = lax.rem(ks, np.int32(sub_dim))
  indices = common.load_packed_codes(packed_ref, bits, sub_vector, cols, weight_mask, axis=0)
  return common.gather(codebook_ref, indices * sub_dim + within[:, None],
                       weight_mask).astype(jnp.bfloat16)


def vq_matmul_kernel(x_ref, codebook_ref, packed_ref, bias_ref, *refs, bits: int, sub_dim: int,
                     block_m: int, block_n: int, block_k: int, split_k: int, interpret: bool,
                     stream_k: common.StreamKSchedule | None = None,
                     staged_epilogue: bool = False):
  """One (block_m, block_n) tile of y = x @ W + b, or (stream_k) one stream-K program's share.

  x_ref: (M, K); codebook_ref: (k * d,) bf16 flat codebook; packed_ref: (rows, N) uint8;
  bias_ref: (N,) float32.  refs: split_k == 1: (out_ref,); split_k > 1: (counter_ref (N tiles,)
  int32 zeros, out_ref (M, N), partials_ref (split_k * M, N) float32, counter_out_ref);
  stream_k: the refs of common.launch_matmul_stream_k.
  """
  m_rows, k_features = x_ref.shape
  n_features = packed_ref.shape[1]
  vector = vector_decode_ok(sub_dim, block_k)

  def compute(tile, first, end):
    def k_step(k_tile, acc):
      k_start = k_tile * block_k
      k_mask = k_start + jnp.arange(block_k, dtype=jnp.int32) < k_features
      x_tile = common.load_tile(x_ref, tile.row_start, block_m, k_start, block_k,
                                tile.row_mask, k_mask)
      if vector:
        weight_tile = _decode_tile_vectors(
            codebook_ref, packed_ref, bits=bits, sub_dim=sub_dim, k_start=k_start,
            block_k=block_k, col_start=tile.col_start, block_n=block_n,
            col_mask=tile.col_mask, n_sub=k_features // sub_dim)
        # weight_tile is W^T: (block_n, block_k)
        return acc + lax.dot_general(x_tile.astype(jnp.bfloat16), weight_tile,
                                     (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
      weight_tile = _decode_tile_per_element(
          codebook_ref, packed_ref, bits=bits, sub_dim=sub_dim, k_start=k_start,
          block_k=block_k, col_start=tile.col_start, block_n=block_n, col_mask=tile.col_mask,
          k_features=k_features)
      return acc + jnp.dot(x_tile.astype(jnp.bfloat16), weight_tile,
                           preferred_element_type=jnp.float32)

    return lax.fori_loop(first, end, k_step, jnp.zeros((block_m, block_n), jnp.float32))

  def add_bias(acc, tile):
    width = acc.shape[1]
    return acc + common.load_vector(bias_ref, tile.col_start, width, tile.col_mask)[None, :]

  common.run_matmul_program(compute, add_bias, refs, block_m=block_m, block_n=block_n,
                            block_k=block_k, m_rows=m_rows, k_features=k_features,
                            n_features=n_features, split_k=split_k, stream_k=stream_k,
                            staged=staged_epilogue, interpret=interpret)


@functools.partial(jax.jit, static_argnames=["block_m", "block_n", "block_k", "split_k",
                                             "num_warps", "num_stages", "interpret",
                                             "stream_k", "whole_waves", "staged_epilogue"])
def vq_matmul(x, codebook, packed_indices, bias=None, *, block_m: int = 64, block_n: int = 64,
              block_k: int = 64, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
              interpret: bool = False, stream_k: int = 0, whole_waves: bool = False,
              staged_epilogue: bool = False):
  """Pallas VQ matmul (paths vq_tiled / vq_splitk).

  x: (M, K), codebook: (k, d), packed_indices: (packed rows, N) uint8, bias: (N,) or None
  -> (M, N) in x.dtype.  split_k > 1 splits the K loop over a third grid axis, reduced in the
  same launch (see module doc).  stream_k > 0: a stream-K launch of at most that many programs
  (common.run_stream_k; split_k must be 1): each takes an even share of the (tiles x K tiles)
  iterations, so a launch with fewer tiles than SMs x 2 still fills them; whole_waves: whole
  waves of tiles data-parallel first, stream-K for the rest (common.stream_k_schedule);
  staged_epilogue: whole tiles too are finished from a scratch slot in column chunks.
  """
  bits, sub_dim, n_features = _check_vq_operands(x, codebook, packed_indices, bias)
  for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    common.check_block(name, size)
  common.check_split_k(split_k)
  common.check_stream_k(stream_k, split_k, staged_epilogue)
  bias = jnp.zeros((n_features,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  operands = (x, codebook.astype(jnp.bfloat16).reshape(-1), packed_indices, bias)
  kernel = functools.partial(vq_matmul_kernel, bits=bits, sub_dim=sub_dim, block_m=block_m,
                             block_n=block_n, block_k=block_k, split_k=split_k,
                             interpret=interpret)
  if stream_k:
    schedule = common.stream_k_schedule(x.shape[0], n_features, pl.cdiv(x.shape[1], block_k),
                                        block_m=block_m, block_n=block_n, programs=stream_k,
                                        data_parallel=whole_waves)
    return common.launch_matmul_stream_k(
        functools.partial(kernel, stream_k=schedule, staged_epilogue=staged_epilogue), operands,
        schedule=schedule, m_rows=x.shape[0], n_features=n_features, out_dtype=x.dtype,
        block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret, name="vq_matmul_stream_k")
  return common.launch_matmul_reduced_in_kernel(
      kernel, operands, m_rows=x.shape[0], n_features=n_features, out_dtype=x.dtype,
      block_m=block_m, block_n=block_n, split_k=split_k, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, name="vq_matmul")


def vq_dequantize(codebook, packed_indices, k_features: int, dtype=jnp.bfloat16):
  """Dense (K, N) weight in ``dtype`` from a codebook (k, d) and packed assignments (XLA)."""
  n_codewords, sub_dim = codebook.shape
  bits = packing.index_bits(n_codewords)
  indices = packing.unpack_bits(packed_indices, bits, k_features // sub_dim, axis=0,
                                dtype=jnp.int32)  # (K / d, N)
  blocks = jnp.take(codebook.astype(dtype), indices, axis=0)  # (K / d, N, d)
  return jnp.transpose(blocks, (0, 2, 1)).reshape(k_features, indices.shape[1])


@jax.jit
def vq_dequant_dot(x, codebook, packed_indices, bias=None):
  """Path vq_dequant_dot: transient bf16 weight (one layer) + bf16 XLA dot, float32 accumulate.
  Same signature and result as :func:`vq_matmul`."""
  _check_vq_operands(x, codebook, packed_indices, bias)
  weight = vq_dequantize(codebook, packed_indices, x.shape[1], jnp.bfloat16)
  y = lax.dot_general(x.astype(jnp.bfloat16), weight, (((1,), (0,)), ((), ())),
                      preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def vq_dequantize_reference(codebook, packed_indices, k_features: int):
  """Dense (K, N) float32 weight from a codebook (k, d) and packed assignments."""
  return vq_dequantize(codebook.astype(jnp.float32), packed_indices, k_features, jnp.float32)


def vq_matmul_reference(x, codebook, packed_indices, bias=None):
  """Plain jnp: decode the whole weight, then one float32 dot.  Same signature as vq_matmul."""
  _check_vq_operands(x, codebook, packed_indices, bias)
  weight = vq_dequantize_reference(codebook, packed_indices, x.shape[1])
  y = jnp.dot(x.astype(jnp.float32), weight, precision=lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def run_path(path: str, x2d, codebook, packed_indices, bias, config: dict, interpret: bool):
  """Run one named path (PATHS) with its dispatcher config on (M, K) rows."""
  if path == "vq_dequant_dot":
    return vq_dequant_dot(x2d, codebook, packed_indices, bias)
  if path in ("vq_tiled", "vq_splitk"):
    return vq_matmul(x2d, codebook, packed_indices, bias, interpret=interpret, **config)
  raise ValueError(f"unknown VQ path {path!r}; expected one of {PATHS}")


def vq_linear(x, codebook, packed_indices, bias=None, *, impl: str = "auto", path=None,
              **kernel_options):
  """x: (..., K) -> (..., N).  On GPU (or impl="pallas") the path the dispatcher picks for
  (M, K, N, device) runs; elsewhere the plain-jnp reference.

  impl: "auto" | "pallas" (interpret mode off GPU) | "reference".  path: force one of PATHS.
  kernel_options override the dispatcher's tile config (block_m, block_n, block_k, split_k,
  num_warps, num_stages).
  """
  x2d, lead = common.flatten_rows(x, x.shape[-1])
  use_pallas, interpret = common.resolve_impl(impl)
  if use_pallas:
    choice = dispatch.choose("vq", x2d.shape[0], x2d.shape[1], packed_indices.shape[1],
                             sub_dim=codebook.shape[1])
    if path is not None and path != choice.path:
      choice = dispatch.Choice(path, dispatch.default_config("vq", path, x2d.shape[0],
                                                             x2d.shape[1],
                                                             packed_indices.shape[1]))
    config = common.split_replaces_stream_k(choice.config, kernel_options)
    y = run_path(choice.path, x2d, codebook, packed_indices, bias, config, interpret)
  else:
    y = vq_matmul_reference(x2d, codebook, packed_indices, bias)
  return y.reshape(lead + (y.shape[-1],))
