"""Which kernel path a quantized linear takes, from (op, M, K, N, device kind): one table.

Every quantized matmul has several implementations ("paths") that win in different regimes:

* small M (adaLN modulation: M = batch; tiny batches): the bf16 dot is memory-bound (its
  arithmetic intensity is about M FLOP per weight byte pair, far below the ~200-300 FLOP/byte
  ridge of an H100/H200), so the path that reads the fewest weight bytes wins: a split-K
  "GEMV-style" kernel that streams the packed weight once;
* large M (token rows: M = batch x 256 for DiT-XL/2 at 256 px): the dot is compute-bound and
  decode work done per M tile competes with the tensor cores, so decoding the weight once
  (per layer, into a transient bf16 buffer) and calling the bf16 dot wins;
* in between: a tiled Pallas kernel that decodes each weight tile once per M tile.

``TABLE`` holds, per op and device class, rows ``(max_m, path)``: the first row with
``M <= max_m`` decides.  The thresholds come from the roofline model in
:mod:`dit_quant_jax.bench.roofline` (see benchmarks/static_report.md for its numbers at the
DiT-XL/2 shapes); they are predictions until a GPU run (benchmarks/gpu_check.sh) measures the
crossovers, and the benchmark prints the path each shape took.  ``default_config`` gives the
tile sizes / warps / stages / K split of each Pallas path for a shape.

Paths are plain strings so that this module imports no kernel (kernels import it).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax

from dit_quant_jax.kernels import common

# Device classes.  "hopper": sm_90 (H100 / H200 / H800 / GH200); "ampere": sm_80 (A100 / A800);
# "gpu": any other CUDA device (treated like ampere: Triton paths only); "cpu": no GPU, the
# Pallas paths run in interpret mode (tests) and the reference runs under impl="auto".
DEVICE_CLASSES = ("hopper", "ampere", "gpu", "cpu")
_HOPPER_NAMES = ("H100", "H200", "H800", "GH200", "H20")
_AMPERE_NAMES = ("A100", "A800", "A30")

# Streaming multiprocessors per class (H100 SXM: 132; A100: 108): sizes the K split.
SM_COUNT = {"hopper": 132, "ampere": 108, "gpu": 108, "cpu": 8}
MAX_SPLIT_K = 16

INF = math.inf

# op -> device class -> ((max_m, path), ...): first row with M <= max_m wins.
TABLE = {
    "vq": {
        # M <= 64: weight bytes dominate (dot intensity < 64 FLOP/B); VQ W2 reads 1/8 of them.
        # 64 < M <= 256: the bf16 dot is still memory-bound on H100 (ridge ~295 FLOP/B); the
        #   tiled kernel reads few bytes and decodes each tile at most 2 x (block_m = 128).
        # M > 256: compute-bound.  Hopper: still the tiled kernel (112 registers, 66 KB of
        #   shared memory: 2 CTAs per SM, so one's decode overlaps the other's wgmma; its
        #   floor is the bf16 dot's FLOP floor, vs 0.76-0.98x for the XLA decode + dot, whose
        #   decode pass writes and reads a bf16 layer).  sm_80: one XLA decode per layer + the
        #   bf16 dot (tensor cores at full rate, decode amortised over M).
        "hopper": ((64, "vq_splitk"), (INF, "vq_tiled")),
        "ampere": ((64, "vq_splitk"), (128, "vq_tiled"), (INF, "vq_dequant_dot")),
        "gpu": ((64, "vq_splitk"), (128, "vq_tiled"), (INF, "vq_dequant_dot")),
        # CPU: the Pallas paths only run in interpret mode (tests); choose them like Hopper so
        # the CPU tests exercise the paths a GPU will take, up to M = 256 (above it, the XLA
        # path keeps model-level tests fast; the tiled kernel's own tests cover its config).
        "cpu": ((64, "vq_splitk"), (256, "vq_tiled"), (INF, "vq_dequant_dot")),
    },
    # FP4 (kernels/fp4_matmul.py PATHS names).  Small M: the Triton kernel that reads the
    # 4-bit weight once (1/4 of the bf16 bytes).  Large M: see each op below.
    # The Mosaic GPU paths stay out until a GPU run verifies them (fp4_matmul.UNVERIFIED).
    # W4A16 on Hopper: the in-loop decode kernel at every M (2 CTAs per SM overlap one's
    #   decode with the other's wgmma: its floor is the bf16 dot's FLOP floor, vs 0.74-0.98x
    #   for the XLA decode pass + bf16 dot, which writes and reads a bf16 image of the layer).
    #   sm_80 (mma.sync, 165 registers, decode issue-bound at 1.7x the FLOP floor) keeps XLA.
    #   CPU keeps the XLA path at large M too: the tests run the Hopper kernel config through
    #   fp4_mma's own tests, not through every model-level test in interpret mode.
    "w4a16": {
        "hopper": ((INF, "triton_bf16"),),
        "ampere": ((64, "triton_bf16"), (INF, "xla_bf16")),
        "gpu": ((64, "triton_bf16"), (INF, "xla_bf16")),
        "cpu": ((64, "triton_bf16"), (INF, "xla_bf16")),
    },
    # W4A8 large M: the bf16 image decoded once + the Triton bf16 kernel (per-token scales in
    # its epilogue; its act-quant is the Triton kernel, so the LayerNorm fuses into it).  On
    # sm_80 (no fp8 tensor cores) its floor is 0.57-0.81x vs 0.47-0.57x for the XLA bf16 dot +
    # scale pass.  On Hopper too: the XLA fp8 dot writes a float32 (M, N) accumulator that a
    # second pass scales, and its act-quant is XLA's (no LayerNorm fusion): H100 floors
    # 0.59-0.77x at M = 4096 vs about 0.73x and 0.80x vs 0.75x for the DiT step (session 20);
    # the Triton fp8 dot lowers to mma.sync f16 (see fp4_matmul.PATHS).  A GPU run decides.
    # Hopper (session 22): the fp8 image decoded once + the Triton fp8 kernel on fp8 wgmma
    # (kernels/fp8_dot.py; 64 x 128 tiles, 2 CTAs per SM), the W4A4 recipe at the 8-bit rate.
    "w4a8": {
        "hopper": ((64, "triton_bf16"), (INF, "unpacked_triton_fp8")),
        "ampere": ((64, "triton_bf16"), (INF, "unpacked_triton_bf16")),
        "gpu": ((64, "triton_bf16"), (INF, "unpacked_triton_bf16")),
        "cpu": ((64, "triton_bf16"), (INF, "xla_fp8")),
    },
    # W4A4 at every M: the Triton int8 kernel reading the 4-bit weight in its K loop, with
    # the row x column scales and bias in its epilogue.  Compiled, it decodes by byte permutes
    # (fp4_mma.packed_8bit_decode_asm, session 24): its SASS main loop stays under its
    # tensor-core time at 128 x 128 tiles on sm_90a (2 CTAs per SM) and 64 x 128 on sm_80, so
    # the layer's int8 image decoded once per call ("unpacked_triton_int8", sessions 18-23:
    # 1.5 B per weight more traffic and a transient (K, N) buffer) is no longer needed.  The
    # XLA int8 dot ("triton_quant_xla_int8") writes an int32 (M, N) accumulator that a second
    # fusion scales (8 B per output element).  Both stay timed alternatives; a GPU run decides.
    "w4a4": {
        "hopper": ((INF, "triton_int8"),),
        "ampere": ((INF, "triton_int8"),),
        "gpu": ((INF, "triton_int8"),),
        "cpu": ((INF, "triton_int8"),),
    },
}


class Choice(NamedTuple):
  path: str
  config: dict


def device_class(device_kind: Optional[str] = None) -> str:
  """Device class of a jax ``device_kind`` string (default: the first local device)."""
  if device_kind is None:
    platform, device_kind = common.local_device_kind()
    if platform != "gpu":
      return "cpu"
  kind = device_kind.upper()
  if kind == "CPU":
    return "cpu"
  if any(name in kind for name in _HOPPER_NAMES):
    return "hopper"
  if any(name in kind for name in _AMPERE_NAMES):
    return "ampere"
  return "gpu"


def register(op: str, rows_by_class: dict) -> None:
  """Add (or replace) an op's rows, e.g. the FP4 kernels' table in kernels/fp4_matmul.py."""
  for cls, rows in rows_by_class.items():
    if cls not in DEVICE_CLASSES:
      raise ValueError(f"unknown device class {cls!r}; expected one of {DEVICE_CLASSES}")
    if not rows or rows[-1][0] != INF:
      raise ValueError(f"the last row of {op}/{cls} must have max_m = inf, got {rows}")
  TABLE[op] = dict(rows_by_class)


def path_for(op: str, m_rows: int, cls: str) -> str:
  if op not in TABLE:
    raise ValueError(f"no dispatch table for op {op!r}; known: {sorted(TABLE)}")
  rows = TABLE[op].get(cls) or TABLE[op]["gpu"]
  for max_m, path in rows:
    if m_rows <= max_m:
      return path
  raise AssertionError("unreachable: the last row has max_m = inf")


def _next_power_of_2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _block(extent: int, lo: int, hi: int) -> int:
  return int(min(hi, max(lo, _next_power_of_2(max(int(extent), 1)))))


def tail_split_k(tiles: int, k_tiles: int, cls: str, max_split: int = MAX_SPLIT_K) -> int:
  """Power-of-two K split of a launch of ``tiles`` output tiles that minimises its busiest SM's
  work: ceil(tiles x split / SMs) programs there, each ceil(k_tiles / split) K tiles long
  (programs are whole units on one SM; ties go to the smaller split, fewer partial sums).
  E.g. 27 tiles of 18 K tiles on 132 SMs: split 4 (busiest SM 1 x 5 K tiles; split 8: 2 x 3)."""
  sms = SM_COUNT[cls]
  best_cost, best = None, 1
  split = 1
  while split <= min(max_split, max(int(k_tiles), 1)):
    cost = -(-int(tiles) * split // sms) * -(-int(k_tiles) // split)
    if best_cost is None or cost < best_cost:
      best_cost, best = cost, split
    split *= 2
  return best


def default_config(op: str, path: str, m_rows: int, k_features: int, n_features: int,
                   cls: str = "hopper") -> dict:
  """Tile config of a Pallas path at one shape (empty for XLA paths)."""
  del op
  if path.endswith("_splitk"):
    # Memory-bound: one thin M tile (the weight is streamed once), 64 x 128 decoded tiles in
    # registers (sm_90a at M = 16: 263 SASS per warp-step vs 165 for 64 x 64, 0.8x per weight,
    # 72-80 registers), K split by the busiest SM's work (tail_split_k; the static report's
    # issue floors at the DiT-XL/2 shapes pick the same splits).
    block_m, block_n, block_k = _block(m_rows, 16, 64), 128, 64
    tiles = -(-m_rows // block_m) * -(-n_features // block_n)
    split_k = tail_split_k(tiles, -(-k_features // block_k), cls)
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                num_warps=4, num_stages=3)
  if path.endswith("_tiled"):
    # DiT-XL/2 tile config: 128-wide tiles, 8 warps (one or two warpgroups of wgmma on sm_90).
    block_m = _block(m_rows, 16, 128)
    return dict(block_m=block_m, block_n=128, block_k=64, split_k=1,
                num_warps=8 if block_m >= 64 else 4, num_stages=3)
  return {}


def choose(op: str, m_rows: int, k_features: int, n_features: int, *,
           device_kind: Optional[str] = None, sub_dim: Optional[int] = None) -> Choice:
  """The path and its config for one shape.  sub_dim: the VQ sub-vector length (the tiled
  decode needs block_k to hold whole d-vectors; other d get a per-element decode)."""
  del sub_dim  # every config's block_k (64) holds d in {1, 2, 4, 8, 16, 32, 64}
  for name, value in (("M", m_rows), ("K", k_features), ("N", n_features)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  cls = device_class(device_kind)
  path = path_for(op, m_rows, cls)
  return Choice(path, default_config(op, path, m_rows, k_features, n_features, cls))


def describe(op: str, shapes, tokens, device_kind: Optional[str] = None) -> list[dict]:
  """Rows (op, K, N, M, path, config) for a table of shapes: what the benchmark prints."""
  rows = []
  for k_features, n_features in shapes:
    for m_rows in tokens:
      choice = choose(op, m_rows, k_features, n_features, device_kind=device_kind)
      rows.append(dict(op=op, k=k_features, n=n_features, m=m_rows, path=choice.path,
                       config=choice.config))
  return rows
