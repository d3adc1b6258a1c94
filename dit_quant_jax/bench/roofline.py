"""Roofline floors of the quantized linears at a shape: FLOPs / peak vs bytes / bandwidth.

A kernel's floor is ``max(flops / matmul_peak, bytes / bandwidth)`` with ``bytes`` the fewest it
must move (each operand read once, the output written once).  The ratio of the bf16 dot's floor
to a kernel's floor is the speedup a perfect kernel would reach; real kernels land below it.
Datasheet peaks (dense, no sparsity) are the defaults; the benchmark replaces them with peaks it
measures in the same run.
"""

from __future__ import annotations

from typing import NamedTuple


class Peaks(NamedTuple):
  matmul_flops: float  # dense bf16 tensor-core FLOP/s (int8 / fp8: twice this)
  bandwidth: float  # device memory bytes/s
  name: str


# NVIDIA datasheets: H100 SXM 989 TFLOP/s bf16, 3.35 TB/s; H200 SXM same compute, 4.8 TB/s;
# A100 SXM 312 TFLOP/s bf16, 2.04 TB/s.
DATASHEET = {
    "hopper": Peaks(989e12, 3.35e12, "H100 SXM (datasheet)"),
    "h200": Peaks(989e12, 4.8e12, "H200 SXM (datasheet)"),
    "ampere": Peaks(312e12, 2.04e12, "A100 SXM (datasheet)"),
}
BF16_BYTES = 2
FP32_BYTES = 4

# Weight storage of each op in bits per weight (+ per-column float32 scale for FP4).
VQ_W2 = dict(codewords=256, sub_dim=4)  # 8-bit index per 4 weights: 2 bits / weight
VQ_W3 = dict(codewords=64, sub_dim=2)  # 6-bit index per 2 weights: 3 bits / weight


def vq_weight_bytes(k_features: int, n_features: int, codewords: int, sub_dim: int) -> int:
  bits = max(1, (codewords - 1).bit_length())
  index_bytes = -(-(k_features // sub_dim) * bits // 8) * n_features
  return index_bytes + codewords * sub_dim * BF16_BYTES


def linear_bytes(m_rows: int, k_features: int, n_features: int, weight_bytes: int,
                 x_bytes_per_element: float = BF16_BYTES) -> float:
  """x read once + weight read once + bias + bf16 output written once."""
  return (m_rows * k_features * x_bytes_per_element + weight_bytes + n_features * FP32_BYTES
          + m_rows * n_features * BF16_BYTES)


def floor_seconds(flops: float, moved_bytes: float, peaks: Peaks,
                  flop_rate_multiplier: float = 1.0) -> dict:
  """Both times and the floor.  flop_rate_multiplier: 2 for int8 / fp8 tensor cores."""
  compute = flops / (peaks.matmul_flops * flop_rate_multiplier)
  memory = moved_bytes / peaks.bandwidth
  return dict(compute_s=compute, memory_s=memory, floor_s=max(compute, memory),
              bound="compute" if compute >= memory else "memory")


# Output tiles and K splits a library GEMM (cuBLAS) picks among (launch_tail).  It splits K
# only when the tiles alone leave SMs idle (a split's partial sums cost M x N x 4 B per part,
# more than a tail at token-row M), keeping at least LIBRARY_MIN_SPLIT_K K elements per part.
LIBRARY_TILES = ((64, 128), (128, 128), (128, 256), (256, 128))
LIBRARY_SPLITS = (1, 2, 4, 8, 16)
LIBRARY_MIN_SPLIT_K = 256


def launch_tail(m_rows: int, n_features: int, sms: int, k_features: int | None = None,
                tiles=LIBRARY_TILES) -> float:
  """How much longer than its even share a GEMM's tensor-core time is when its work units
  (output tiles, or tiles x K parts) run whole, one per SM at a time: the busiest SM computes
  ceil(units / SMs) where the even share is units / SMs, at the best of ``tiles`` and (with
  k_features) of the K splits where the tiles are fewer than the SMs (864 tiles of 128 x 128,
  qkv at M = 4096, on 132 SMs: 7 / 6.55 = 1.07; a whole number of waves: 1; 9 tiles at
  M = 16, K = 1152 split 4 ways: 132 / 36)."""
  best = None
  for block_m, block_n in tiles:
    count = -(-m_rows // block_m) * -(-n_features // block_n)
    splits = [s for s in LIBRARY_SPLITS if s == 1 or (
        count < sms and k_features is not None and k_features // s >= LIBRARY_MIN_SPLIT_K)]
    for split in splits:
      units = count * split
      tail = -(-units // sms) * sms / units
      best = tail if best is None else min(best, tail)
  return best


def gemm_floor(m_rows: int, k_features: int, n_features: int, moved_bytes: float, peaks: Peaks,
               flop_rate_multiplier: float = 1.0, sms: int | None = None) -> dict:
  """floor_seconds of an (M, K) x (K, N) GEMM; sms: its compute time pays launch_tail."""
  floor = floor_seconds(2 * m_rows * k_features * n_features, moved_bytes, peaks,
                        flop_rate_multiplier)
  if not sms:
    return floor
  compute = floor["compute_s"] * launch_tail(m_rows, n_features, sms, k_features)
  return dict(floor, compute_s=compute, floor_s=max(compute, floor["memory_s"]),
              bound="compute" if compute >= floor["memory_s"] else "memory")


def bf16_dot_floor(m_rows: int, k_features: int, n_features: int, peaks: Peaks,
                   sms: int | None = None) -> dict:
  """sms: count the launch's tail (launch_tail over LIBRARY_TILES) in the compute time."""
  moved = linear_bytes(m_rows, k_features, n_features, k_features * n_features * BF16_BYTES)
  return gemm_floor(m_rows, k_features, n_features, moved, peaks, sms=sms)


def split_partial_bytes(m_rows: int, n_features: int, split_k: int) -> float:
  """DRAM bytes of a split-K launch's float32 partial sums: each of the split_k parts writes an
  (M, N) partial once (L2 writes it back); the last program of a tile reads them back from L2,
  not counted.  0 without a split."""
  return 0.0 if split_k <= 1 else float(split_k * m_rows * n_features * FP32_BYTES)


def vq_path_floor(path: str, m_rows: int, k_features: int, n_features: int, peaks: Peaks,
                  codewords: int = 256, sub_dim: int = 4, sms: int | None = None,
                  split_k: int = 1, partial_bytes: float | None = None) -> dict:
  """Floor of one VQ path.  vq_dequant_dot adds its decode pass (indices read, bf16 weight
  written) to the bf16 dot's floor (the dot then reads the bf16 weight: already counted).
  sms: the GEMM pays its launch tail (gemm_floor).  split_k: the Pallas kernel's K split, whose
  partials' bytes count (split_partial_bytes; partial_bytes: those of another schedule, e.g. a
  stream-K launch's pieces, instead)."""
  weight = vq_weight_bytes(k_features, n_features, codewords, sub_dim)
  if partial_bytes is None:
    partial_bytes = split_partial_bytes(m_rows, n_features, split_k)
  if path == "vq_dequant_dot":
    decode = (weight + k_features * n_features * BF16_BYTES) / peaks.bandwidth
    dot = bf16_dot_floor(m_rows, k_features, n_features, peaks, sms=sms)
    return dict(dot, decode_s=decode, floor_s=decode + dot["floor_s"])
  moved = linear_bytes(m_rows, k_features, n_features, weight) + partial_bytes
  return gemm_floor(m_rows, k_features, n_features, moved, peaks, sms=sms)


# ----------------------------------------------------------------------------------------
# FP4 paths: act-quant step, decode pass, dot (kernels/fp4_matmul.py PATHS names).
# ----------------------------------------------------------------------------------------

# DiT-XL/2 linears whose input is a block's modulated LayerNorm (qkv 1152 -> 3456, fc1 1152 ->
# 4608): where a quantized path can take that LayerNorm into its act-quant step.
LN_FED_SHAPES = ((1152, 3456), (1152, 4608))
def act_quant_token_flops(k_features: int, a_order, transform_dtype: str = "bf16x3",
                          x_bf16: bool = True, dense_signs: bool = True) -> float:
  """Tensor-core FLOPs per token of act_quant.quantize_rows' transform (0 without one), from the
  kernel's own tile rules: a token is an (a', c) tile (act_quant.row_shape), g tokens share a
  (t, c) tile of t = act_quant.tile_rows(a', g) rows (act_quant.token_group), and each tile
  runs one (t, c) @ (c, c) +-1 dot and one (t, t) @ (t, c) block-diagonal dot; bf16x3 runs the
  first on hi + lo (lo skipped for bf16 x, not after a fused LayerNorm: pass x_bf16=False) and
  the second on y's hi and lo parts: twice for a Hadamard block (quantize_rows' dense_signs,
  the model's transform), three times for a general one (dense_signs=False)."""
  from dit_quant_jax.kernels import act_quant
  if not a_order:
    return 0.0
  rows, c_size = act_quant.row_shape(k_features, int(a_order))
  group = act_quant.token_group(rows, c_size)
  rows_pad = act_quant.tile_rows(rows, group)
  first = rows_pad * c_size * c_size / group
  second = rows_pad * rows_pad * c_size / group
  if transform_dtype == "bf16x3":
    warps = act_quant.default_num_warps(rows, c_size)
    # bf16 x keeps bf16 (one dot) only where the kernel's register rule lets it
    x_bf16 = x_bf16 and act_quant.bf16_signs_fit(rows_pad, c_size, warps, dense_signs)
    first *= 1 if x_bf16 else 2
    second *= 2 if dense_signs else 3
  return 2.0 * (first + second)


def act_quant_floor(m_rows: int, k_features: int, a_order, peaks: Peaks,
                    transform_dtype: str = "bf16x3", norm_fused: bool = False) -> dict:
  """quantize_rows: read x (bf16) once, write its 8-bit image and a float32 scale per token;
  the transform dots at the bf16 tensor-core rate.  norm_fused: the LayerNorm + modulate
  prologue (act_quant.RowNorm) runs in the same pass: the same bytes (the per-sample affine is
  a few KB per sample, L2-resident), the first transform dot on hi + lo of the float32 rows."""
  flops = m_rows * act_quant_token_flops(k_features, a_order, transform_dtype,
                                         x_bf16=not norm_fused)
  moved = m_rows * k_features * (BF16_BYTES + 1) + m_rows * FP32_BYTES
  return floor_seconds(flops, moved, peaks)


def layer_norm_pass_floor(m_rows: int, k_features: int, peaks: Peaks) -> dict:
  """The unfused LayerNorm + modulate of a DiT block (one XLA fusion): bf16 x read, bf16
  modulated rows written (4 B per element); the pass a fused act-quant prologue removes."""
  return floor_seconds(0.0, m_rows * k_features * 2 * BF16_BYTES, peaks)


def gelu_pass_floor(m_rows: int, n_features: int, peaks: Peaks) -> dict:
  """The unfused GELU of fc1's output (one XLA fusion: bf16 read, bf16 written); the FP4
  paths apply it in fc1's matmul epilogue instead (numerics/activation.py)."""
  return floor_seconds(0.0, m_rows * n_features * 2 * BF16_BYTES, peaks)


def _decode_pass_s(k_features: int, n_features: int, image_bytes: int, peaks: Peaks) -> float:
  """XLA unpack of a 4-bit layer into a transient (K, N) image: K N / 2 read, K N x image written."""
  return (k_features * n_features / 2 + k_features * n_features * image_bytes) / peaks.bandwidth


def fp4_path_floor(op: str, path: str, m_rows: int, k_features: int, n_features: int,
                   peaks: Peaks, a_order=None, norm_fused: bool = False,
                   sms: int | None = None, split_k: int = 1,
                   partial_bytes: float | None = None) -> dict:
  """Floor of one FP4 path (kernels/fp4_matmul.py PATHS names): act-quant + decode pass + dot,
  each at its own floor, run one after the other (sms: the dot pays its launch tail; split_k:
  a Triton kernel's K split, whose partials' bytes count: split_partial_bytes; partial_bytes:
  another schedule's partials, e.g. a stream-K launch's pieces, instead).
  -> dict(floor_s, act_quant_s, gemm_s (the rest), decode_s, epilogue_s, bound of the dot).

  * act-quant (w4a4 / w4a8): :func:`act_quant_floor` with the Hadamard block of order a_order
    (norm_fused: with the LayerNorm + modulate prologue, :func:`act_quant_floor`);
    the ``*_bf16`` W4A8 paths also convert the fp8 image to bf16 (M K read at 1 B, written at 2);
  * ``xla_*``, ``triton_quant_xla_*``, ``unpacked_*``: the layer decoded once per call into a
    transient (K, N) image (K N / 2 read, K N x image bytes written), the dot reads the image;
    the Triton in-loop paths (``triton_*``) read the 4-bit weight directly;
  * epilogue: the XLA dots with per-row (token) or 8-bit per-column scales write their int32 /
    float32 (M, N) accumulator and a second fusion reads it back (8 B per output element): XLA
    does not fuse vector scales into the cuBLAS GEMM.  W4A16's XLA path folds the column scale
    into its bf16 image (dot + bias, as the bf16 baseline); the Triton kernels scale in their
    epilogue.
  """
  act_s = 0.0
  if op in ("w4a4", "w4a8"):
    act_s = act_quant_floor(m_rows, k_features, a_order, peaks,
                            norm_fused=norm_fused)["floor_s"]
    if path.endswith("bf16"):  # fp8 image -> bf16 operand
      act_s += m_rows * k_features * (1 + BF16_BYTES) / peaks.bandwidth
  x_bytes = 1 if op in ("w4a4", "w4a8") and not path.endswith("bf16") else BF16_BYTES
  image = BF16_BYTES if path.endswith("bf16") else 1
  rate = 1.0 if image == BF16_BYTES else 2.0
  xla = path.startswith(("xla", "triton_quant_xla"))
  if xla or path.startswith("unpacked"):
    decode_s = _decode_pass_s(k_features, n_features, image, peaks)
    weight_bytes = k_features * n_features * image
  else:  # a Triton kernel decoding the 4-bit tiles in its K loop
    decode_s = 0.0
    weight_bytes = k_features * n_features // 2
  moved = linear_bytes(m_rows, k_features, n_features, weight_bytes, x_bytes)
  if not xla:
    moved += (split_partial_bytes(m_rows, n_features, split_k) if partial_bytes is None
              else partial_bytes)
  dot = gemm_floor(m_rows, k_features, n_features, moved, peaks, rate, sms)
  epilogue_s = 0.0
  if xla and not (op == "w4a16"):
    epilogue_s = 2 * m_rows * n_features * FP32_BYTES / peaks.bandwidth
  gemm_s = decode_s + dot["floor_s"] + epilogue_s
  return dict(floor_s=act_s + gemm_s, act_quant_s=act_s, gemm_s=gemm_s, decode_s=decode_s,
              epilogue_s=epilogue_s, bound=dot["bound"])


def two_pass_bound(op: str, m_rows: int, k_features: int, n_features: int, peaks: Peaks,
                   a_order=None, norm_fused: bool = False, sms: int | None = None) -> dict:
  """The floor of the best kernels this design admits, whatever their code: the weights read
  once at their stored width inside the GEMM (no decode pass: 4 bits for FP4, VQ_W2's
  indices + codebook), the GEMM at its tensor-core or memory floor (8-bit
  tensor cores for W4A4 / W4A8, bf16 for W4A16 / VQ), and for W4A4 / W4A8 the act-quant as a
  pass of its own at :func:`act_quant_floor` (the transform at the kernel's precision; fused
  with the LayerNorm where ``norm_fused``), run before the GEMM that reads its image.  A
  target above ``bf16 floor / this`` needs a different structure (a producer that emits the
  quantized image), not better kernels.  sms: the GEMM pays its launch tail (gemm_floor).
  -> dict(floor_s, act_quant_s, gemm_s)."""

  def stored_gemm(weight, x_bytes=BF16_BYTES, rate=1.0):
    return gemm_floor(m_rows, k_features, n_features,
                      linear_bytes(m_rows, k_features, n_features, weight, x_bytes), peaks, rate,
                      sms)

  if op == "vq":
    gemm = stored_gemm(vq_weight_bytes(k_features, n_features, **VQ_W2))
    return dict(floor_s=gemm["floor_s"], act_quant_s=0.0, gemm_s=gemm["floor_s"])
  if op not in ("w4a4", "w4a8", "w4a16"):
    raise ValueError(f"unknown op {op!r}; expected vq, w4a4, w4a8 or w4a16")
  weight = k_features * n_features // 2  # as fp4_path_floor's in-loop paths count it
  if op == "w4a16":
    gemm = stored_gemm(weight)
    return dict(floor_s=gemm["floor_s"], act_quant_s=0.0, gemm_s=gemm["floor_s"])
  act_s = act_quant_floor(m_rows, k_features, a_order, peaks, norm_fused=norm_fused)["floor_s"]
  gemm = stored_gemm(weight, 1, 2.0)
  return dict(floor_s=act_s + gemm["floor_s"], act_quant_s=act_s, gemm_s=gemm["floor_s"])

