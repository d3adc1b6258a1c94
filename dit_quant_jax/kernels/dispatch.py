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
# DRAM bandwidth per class (datasheet: H100 SXM 3.35 TB/s, A100 SXM 2.04 TB/s; the same numbers
# as bench/roofline.DATASHEET, checked by a test): weighs the split-K partials' bytes.
BANDWIDTH = {"hopper": 3.35e12, "ampere": 2.04e12, "gpu": 2.04e12, "cpu": 2.04e12}
# L2 -> SM bandwidth per class: A100's 5120 B per clock (NVIDIA's A100 whitepaper) at 1.41 GHz;
# H100's is not in a datasheet: A100's bytes per SM per clock scaled to 132 SMs at 1.83 GHz
# (an estimate, to be measured on a GPU).  Every program of a tiled kernel loads its x rows and
# its weight columns over its K range from L2, so thin tiles re-read x: W4A16 fc2 at M = 1024
# in 128 x 64 tiles moves 193 MB through L2 (17 us) where its DRAM bytes are 14 MB and its
# busiest SM's tensor time 20 us unsplit (tile_l2_bytes; the static report raises the Pallas
# GEMMs' floors to it too).
L2_BANDWIDTH = {"hopper": 11.4e12, "ampere": 7.2e12, "gpu": 7.2e12, "cpu": 7.2e12}
# Dense bf16 tensor-core peak per class (H100 SXM 989 TFLOP/s, A100 312): a tensor-bound
# program's K tile takes 2 block_m block_n block_k / (this / SMs) seconds on its SM.
PEAK_BF16_FLOPS = {"hopper": 989e12, "ampere": 312e12, "gpu": 312e12, "cpu": 312e12}
# Seconds one program of a small-M split-K kernel spends on one K tile, on one SM, at its SASS
# issue floor, per output-column width block_n (benchmarks/static_report.md's method at M = 16,
# 1152x3456: the issue floor over (programs on the busiest SM x K tiles per program)).
# Kernels: "vq" (block_k 64; 247 / 165 / 112 SASS per warp-step at block_n 128 / 64 / 32 on
# sm_90a), "fp4_bf16" (fp4_mma's bf16 dot, K tile 128: 501 / 312 / 189), "fp4_8bit" (its int8
# dot: 333 / 191 / 118).  Narrow tiles cost more per weight (the x tile, the MMA setup and the
# loop overhead are paid per column block) but give more tiles, so fewer K splits and fewer
# float32 partials fill the SMs: splitk_launch weighs both.  A lowering test recompiles every
# entry and checks it within 15 %.
SPLITK_BLOCK_NS = (128, 64, 32)
SPLITK_K_TILE_S = {
    "vq": {"hopper": {128: 0.146e-6, 64: 0.094e-6, 32: 0.068e-6},
           "ampere": {128: 0.190e-6, 64: 0.122e-6, 32: 0.088e-6}},
    "fp4_bf16": {"hopper": {128: 0.274e-6, 64: 0.171e-6, 32: 0.103e-6},
                 "ampere": {128: 0.372e-6, 64: 0.232e-6, 32: 0.139e-6}},
    "fp4_8bit": {"hopper": {128: 0.210e-6, 64: 0.107e-6, 32: 0.065e-6},
                 "ampere": {128: 0.274e-6, 64: 0.139e-6, 32: 0.085e-6}},
}

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


def split_parts(k_tiles: int, split: int) -> tuple[int, int]:
  """(K tiles per part, non-empty parts) of ``k_tiles`` split ``split`` ways as
  common.k_tile_range splits them: parts of ceil(k_tiles / split) tiles, the last one shorter
  (18 tiles split 7 ways: parts of 3, only 6 of them non-empty)."""
  per_part = -(-int(k_tiles) // int(split))
  return per_part, -(-int(k_tiles) // per_part)


def _split_costs(tiles: int, k_tiles: int, cls: str, max_split: int, k_tile_s=None,
                 weight_bytes: float = 0.0, partial_bytes: float = 0.0):
  """[(cost, split)] of every K split whose parts are all non-empty (tail_split_k's rule)."""
  sms = SM_COUNT[cls]
  out = []
  for split in range(1, min(int(max_split), max(int(k_tiles), 1)) + 1):
    per_part, parts = split_parts(k_tiles, split)
    if parts != split:
      continue
    cost = -(-int(tiles) * split // sms) * per_part
    if k_tile_s is not None:
      partials = split * partial_bytes if split > 1 else 0.0
      cost = max(cost * k_tile_s,
                 (weight_bytes + partials) / BANDWIDTH.get(cls, BANDWIDTH["gpu"]))
    out.append((cost, split))
  return out


def _lowest(costs):
  """The first (cost, ...) entry whose cost no later one beats by more than 1e-9 relative."""
  best = None
  for entry in costs:
    if best is None or entry[0] < best[0] * (1 - 1e-9):
      best = entry
  return best


def splitk_k_tile_s(kernel: str, cls: str, block_n: int) -> float:
  """SPLITK_K_TILE_S of a kernel at one column width (sm_80's numbers for other classes)."""
  per_class = SPLITK_K_TILE_S[kernel]
  times = per_class.get(cls, per_class["ampere"])
  if int(block_n) not in times:
    raise ValueError(f"no K-tile time for {kernel} at block_n = {block_n}: the split-K widths "
                     f"are {sorted(times)} (measure a new width into SPLITK_K_TILE_S first)")
  return times[int(block_n)]


def tail_split_k(tiles: int, k_tiles: int, cls: str, max_split: int = MAX_SPLIT_K, *,
                 kernel: Optional[str] = None, block_n: int = 128, weight_bytes: float = 0.0,
                 partial_bytes: float = 0.0) -> int:
  """K split (any count up to max_split whose parts are all non-empty) of a launch of ``tiles``
  output tiles that minimises its time: the busiest SM runs ceil(tiles x split / SMs)
  programs of ceil(k_tiles / split) K tiles each (programs are whole units on one SM).

  Without ``kernel`` that count of K tiles is the cost (36 tiles of 18 K tiles on 132 SMs:
  split 3, 108 programs of 6 K tiles, where a power of two does no better than split 2's 9).
  With ``kernel`` (a SPLITK_K_TILE_S key, at ``block_n``) the cost is the larger of those K
  tiles' issue time and the launch's DRAM time: ``weight_bytes`` (what every split reads) plus,
  for split > 1, ``split x partial_bytes`` (each part writes an (M, N) float32 partial; the
  last program of a tile reads them back, from L2: counted once).  Ties (within 1e-9
  relative) go to the smaller split: fewer partials.  A split with empty parts (18 K tiles
  split 7 ways: parts of 3, 6 used) is never taken: its extra programs would only add zero
  partials."""
  k_tile_s = None if kernel is None else splitk_k_tile_s(kernel, cls, block_n)
  return _lowest(_split_costs(tiles, k_tiles, cls, max_split, k_tile_s, weight_bytes,
                              partial_bytes))[1]


def splitk_launch(m_rows: int, n_features: int, k_tiles: int, cls: str, kernel: str, *,
                  block_m: int, weight_bytes: float, block_ns=SPLITK_BLOCK_NS,
                  max_split: int = MAX_SPLIT_K) -> tuple[int, int]:
  """(block_n, K split) of a small-M split-K launch, chosen together: for each column width,
  tail_split_k's cost (the busiest SM's K tiles at that width's K-tile time vs the weights'
  and partials' DRAM time) at its best split; the cheapest width wins, ties to the wider one
  (``block_ns`` is widest first).  Narrow tiles cost more issue per weight but need fewer
  splits to fill the SMs: VQ W2 1152x1152 at M = 16 on H100 takes 64 columns split 6 (108
  programs of 3 K tiles, 0.28 us) over 128 split 9 (0.32 us, 9 partials of 74 KB)."""
  entries = []
  partial_bytes = splitk_bytes(m_rows, n_features, weight_bytes)["partial_bytes"]
  for block_n in block_ns:
    tiles = -(-int(m_rows) // int(block_m)) * -(-int(n_features) // int(block_n))
    costs = _split_costs(tiles, k_tiles, cls, max_split,
                         splitk_k_tile_s(kernel, cls, block_n), weight_bytes, partial_bytes)
    cost, split = _lowest(costs)
    entries.append((cost, int(block_n), split))
  _, block_n, split = _lowest(entries)
  return block_n, split


def splitk_bytes(m_rows: int, n_features: int, weight_bytes: float) -> dict:
  """tail_split_k's byte arguments for an (M, K) x (K, N) split-K launch: the weight (+ x, the
  output) read and written once, and one float32 (M, N) partial per part."""
  return dict(weight_bytes=float(weight_bytes), partial_bytes=4.0 * m_rows * n_features)


SPLIT_MARGIN = 0.05


class TileOption(NamedTuple):
  block_m: int
  block_n: int
  num_warps: int
  num_stages: int
  # whether the option may split K (reduced in the launch): its epilogue's partial store and
  # atomic must leave the option's CTAs per SM as they are
  can_split: bool = True
  # its compiled K loop's time per K tile over its tensor-core time (SASS issue floor / tensor
  # time, static report): 1.0 where tensor-bound; more where decode or the accumulator's
  # promotion issues longer, or where one CTA fills the SM and they take turns with the wgmma
  issue_ratio: float = 1.0
  # whether the option may run stream-K (common.run_stream_k: STREAM_K_CTAS_PER_SM programs
  # per SM share the launch's K iterations evenly); its fix-up, like a split's, must leave the
  # option's CTAs per SM as they are (a lowering test checks the registers)
  can_stream_k: bool = False
  # its stream-K launch finishes whole tiles through the partials' slots too (run_stream_k's
  # staged: fewer registers, a partial's bytes more per whole tile)
  staged_epilogue: bool = False


class TileChoice(NamedTuple):
  """tail_tiles' answer: the option, its K split (1: none) and its stream-K programs (0:
  none; then split_k is 1)."""
  option: TileOption
  split_k: int
  stream_k: int = 0
  # stream-K with whole waves of tiles data-parallel first (common.stream_k_schedule)
  whole_waves: bool = False

  def config(self) -> dict:
    """The launch keywords of the kernels (besides block_k)."""
    return dict(block_m=self.option.block_m, block_n=self.option.block_n, split_k=self.split_k,
                num_warps=self.option.num_warps, num_stages=self.option.num_stages,
                stream_k=self.stream_k, whole_waves=self.whole_waves,
                staged_epilogue=bool(self.stream_k) and self.option.staged_epilogue)


# Programs of a stream-K launch per SM: the 2 CTAs that share an SM (one's decode overlaps the
# other's wgmma, as in the tiled launch).
STREAM_K_CTAS_PER_SM = 2


def stream_k_programs(cls: str) -> int:
  return STREAM_K_CTAS_PER_SM * SM_COUNT[cls]


def tile_l2_bytes(m_rows: int, k_features: int, n_features: int, block_m: int, block_n: int,
                  x_bytes: float, w_bytes: float, split_k: int = 1,
                  partial_tiles: int = 0) -> float:
  """Bytes a tiled (M, K) x (K, N) kernel moves between L2 and the SMs: every output tile's
  program(s) load block_m rows of x (x_bytes per element) and block_n weight columns (w_bytes
  per weight) over K, write the output (bf16), and with a K split each part writes a float32
  partial that the last program reads back; ``partial_tiles``: a stream-K launch's pieces
  (StreamKSchedule.partial_pieces), each a (block_m, block_n) float32 partial written and read
  back."""
  tiles = -(-m_rows // block_m) * -(-n_features // block_n)
  loads = tiles * k_features * (block_m * x_bytes + block_n * w_bytes)
  partials = 2.0 * 4 * m_rows * n_features * split_k if split_k > 1 else 0.0
  partials += 2.0 * 4 * block_m * block_n * partial_tiles
  return float(loads + partials + 2.0 * m_rows * n_features)


def stream_k_schedule(m_rows: int, k_features: int, n_features: int, block_m: int,
                      block_n: int, block_k: int, programs: int,
                      whole_waves: bool = False) -> common.StreamKSchedule:
  """The schedule a stream-K launch of this shape runs (the kernels build the same one)."""
  return common.stream_k_schedule(m_rows, n_features, -(-int(k_features) // int(block_k)),
                                  block_m=block_m, block_n=block_n, programs=programs,
                                  data_parallel=whole_waves)


def stream_k_busiest_k_tiles(schedule: common.StreamKSchedule, cls: str) -> int:
  """K tiles the busiest SM runs in a stream-K launch: its ceil(programs / SMs) programs'
  whole-wave tiles and stream-K shares."""
  per_program = (schedule.whole_tiles // schedule.programs * schedule.k_tiles
                 + schedule.per_program)
  return -(-schedule.programs // SM_COUNT[cls]) * per_program


def tail_tiles(m_rows: int, k_features: int, n_features: int, cls: str, options, *,
               block_k: int, moved_bytes: float = 0.0, max_split: int = 1,
               operand_bytes: tuple = (0.0, 0.0), rate_multiplier: float = 1.0) -> TileChoice:
  """TileChoice (option, split, stream-K programs) of a tensor-bound tiled kernel that
  minimises its launch's time: the busiest SM's tensor time (ceil(programs / SMs) programs of
  ceil(k_tiles / split) K tiles, each 2 block_m block_n block_k FLOPs at the per-SM bf16 peak
  times rate_multiplier (2 for the 8-bit dots), and the option's issue_ratio) or, if larger,
  its DRAM time (``moved_bytes`` + split x the (M, N) float32 partials when split > 1) or its
  L2 time (tile_l2_bytes with ``operand_bytes`` = (x, weight) bytes per element, over
  L2_BANDWIDTH; (0, 0): not counted).  Options with can_stream_k are also weighed as a
  stream-K launch of stream_k_programs(cls) programs (with and without whole data-parallel
  waves first): the busiest SM runs ceil(programs / SMs) programs' whole tiles and shares of
  per_program K tiles, and its partial pieces' bytes (staged_epilogue: every piece's) count in
  DRAM and L2.
  ``options``: the TileOptions whose compiled main loop is tensor-bound at 2 CTAs per SM
  (static report), in order of preference (ties go to the earlier one, then to the smaller
  split, then to the tiled launch, then to plain stream-K).  A split or a stream-K launch
  must save more than SPLIT_MARGIN: the cost leaves out the partials' read-back latency and
  the last program's sum.

  E.g. VQ W2 1152x1152 at M = 4096 on an H100: 288 tiles of 128 x 128 put 3 on the busiest
  SM where the even share is 2.2; 576 of 128 x 64 put 5 half-size ones there (2.5); stream-K
  of 128 x 128 gives each of 264 programs 20 of the 5184 K tiles, 2.2 tiles' worth per SM."""
  sms = SM_COUNT[cls]
  per_sm_flops = PEAK_BF16_FLOPS[cls] / sms
  k_tiles = -(-int(k_features) // int(block_k))

  def launch_cost(option, tensor_s, partial_bytes, split_k=1, partial_tiles=0):
    l2_s = 0.0
    if any(operand_bytes):
      l2_s = tile_l2_bytes(m_rows, k_features, n_features, option.block_m, option.block_n,
                           *operand_bytes, split_k=split_k,
                           partial_tiles=partial_tiles) / L2_BANDWIDTH[cls]
    cost = max(tensor_s, (moved_bytes + partial_bytes) / BANDWIDTH[cls], l2_s)
    if partial_bytes:  # what the cost leaves out: the partials' read-back and the last sum
      cost *= 1.0 + SPLIT_MARGIN
    return cost

  best_cost, best = None, None
  for option in options:
    tiles = -(-m_rows // option.block_m) * -(-n_features // option.block_n)
    k_tile_s = (2.0 * option.block_m * option.block_n * block_k / (per_sm_flops * rate_multiplier)
                * option.issue_ratio)
    candidates = []
    for split in range(1, min(int(max_split) if option.can_split else 1, k_tiles) + 1):
      per_part, parts = split_parts(k_tiles, split)
      if parts != split:
        continue
      tensor_s = -(-tiles * split // sms) * per_part * k_tile_s
      partials = 4.0 * m_rows * n_features * split if split > 1 else 0.0
      candidates.append((launch_cost(option, tensor_s, partials, split_k=split),
                         TileChoice(option, split)))
    for whole_waves in ((False, True) if option.can_stream_k else ()):
      programs = stream_k_programs(cls)
      schedule = stream_k_schedule(m_rows, k_features, n_features, option.block_m,
                                   option.block_n, block_k, programs, whole_waves)
      if whole_waves and not schedule.whole_tiles:
        continue  # fewer tiles than programs: the same schedule as without
      pieces = schedule.partial_pieces(option.staged_epilogue)
      tensor_s = stream_k_busiest_k_tiles(schedule, cls) * k_tile_s
      candidates.append((launch_cost(option, tensor_s,
                                     4.0 * option.block_m * option.block_n * pieces,
                                     partial_tiles=pieces),
                         TileChoice(option, 1, programs, whole_waves)))
    for cost, choice in candidates:
      if best_cost is None or cost < best_cost * (1 - 1e-9):
        best_cost, best = cost, choice
  return best


# vq_tiled on Hopper, both tensor-bound on sm_90a at M = 1024, K x N = 4608 x 1152 (static
# probe, 2+ CTAs per SM, no spills): 128 x 128 with 8 warps (170 SASS per warp-step, 112
# registers, 66 KB) and 128 x 64 with 4 warps (188, 108 registers, 49 KB; with 8 warps it is
# issue-bound, 64 x 128 memory-pipe-bound).  With a K split, 128 x 64 takes 176 registers
# (still 2 CTAs per SM, tensor-bound), 128 x 128 144: one CTA per SM, whose decode and wgmma
# then take turns (static report, 4608x1152 at M = 4096: 80.8 us vs 60.5 unsplit), so only
# 128 x 64 splits.
VQ_TILED_OPTIONS = (TileOption(128, 128, 8, 3, can_split=False, can_stream_k=True),
                    TileOption(128, 64, 4, 3))
VQ_TILED_MAX_SPLIT = 8
VQ_W2_INDEX_BYTES = 0.25  # one 8-bit index per 4 weights (the codebook rows stay in L1)


def without_stream_k(options) -> tuple:
  """The options with stream-K turned off (the tiled launches only: what a benchmark times the
  stream-K choice against)."""
  return tuple(option._replace(can_stream_k=False) for option in options)


def default_config(op: str, path: str, m_rows: int, k_features: int, n_features: int,
                   cls: str = "hopper", stream_k: bool = True,
                   splitk_block_ns=SPLITK_BLOCK_NS) -> dict:
  """Tile config of a Pallas path at one shape (empty for XLA paths); stream_k=False: the
  best tiled launch (no stream-K candidates); splitk_block_ns: the column widths the split-K
  path chooses from (the benchmark's 128-only alternative)."""
  del op
  if path.endswith("_splitk"):
    # Memory-bound: one thin M tile (the weight is streamed once), 64 x block_n decoded tiles
    # in registers, the column width and K split chosen together (splitk_launch): the busiest
    # SM's K tiles at the kernel's SASS-derived K-tile time for that width vs the weights' +
    # partials' DRAM time.
    block_m, block_k = _block(m_rows, 16, 64), 64
    # VQ W2's bytes (8-bit index per 4 weights) + x and the bf16 output.
    moved = k_features * n_features / 4 + 2 * m_rows * (k_features + n_features)
    block_n, split_k = splitk_launch(m_rows, n_features, -(-k_features // block_k), cls, "vq",
                                     block_m=block_m, weight_bytes=moved,
                                     block_ns=splitk_block_ns)
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                num_warps=4, num_stages=3)
  if path.endswith("_tiled"):
    block_m = _block(m_rows, 16, 128)
    if cls == "hopper" and block_m == 128:
      # Token rows: the tile and K split (reduced in the launch) whose busiest SM finishes
      # first (tail_tiles), counting the partials' bytes; 128 x 128 where it ties.
      moved = k_features * n_features / 4 + 2 * m_rows * (k_features + n_features)
      options = VQ_TILED_OPTIONS if stream_k else without_stream_k(VQ_TILED_OPTIONS)
      choice = tail_tiles(m_rows, k_features, n_features, cls, options, block_k=64,
                          moved_bytes=moved, max_split=VQ_TILED_MAX_SPLIT,
                          operand_bytes=(2.0, VQ_W2_INDEX_BYTES))
      return dict(choice.config(), block_k=64)
    # DiT-XL/2 tile config: 128-wide tiles, 8 warps (one or two warpgroups of wgmma on sm_90).
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
