"""The shape/device dispatch table (kernels/dispatch.py)."""

import math

import pytest

from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import dispatch
from dit_quant_jax.kernels import fp4_matmul

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
A100 = "NVIDIA A100-SXM4-80GB"
DIT_XL2_SHAPES = ((1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152), (1152, 6912))


def test_device_classes():
  assert dispatch.device_class(H100) == "hopper"
  assert dispatch.device_class(H200) == "hopper"
  assert dispatch.device_class(A100) == "ampere"
  assert dispatch.device_class("Tesla V100-SXM2-16GB") == "gpu"
  assert dispatch.device_class("cpu") == "cpu"


@pytest.mark.parametrize("device_kind", [H100, A100])
def test_vq_paths_by_m(device_kind):
  # Large M: the tiled kernel on Hopper (2 CTAs per SM), XLA decode + bf16 dot on sm_80.
  large = "vq_tiled" if device_kind == H100 else "vq_dequant_dot"
  expected = {16: "vq_splitk", 64: "vq_splitk", 128: "vq_tiled", 1024: large, 16384: large}
  for m_rows, path in expected.items():
    assert dispatch.choose("vq", m_rows, 1152, 4608, device_kind=device_kind).path == path
  # M = 256 sits on the H100 side of the ridge (memory-bound dot) but not on the A100's.
  hopper_256 = dispatch.choose("vq", 256, 1152, 1152, device_kind=H100).path
  ampere_256 = dispatch.choose("vq", 256, 1152, 1152, device_kind=A100).path
  assert (hopper_256, ampere_256) == ("vq_tiled", "vq_dequant_dot")


def test_configs_are_valid_tiles_and_fill_the_gpu():
  for k_features, n_features in DIT_XL2_SHAPES:
    for m_rows in (1, 16, 32, 64, 100, 256):
      choice = dispatch.choose("vq", m_rows, k_features, n_features, device_kind=H100)
      config = choice.config
      for name in ("block_m", "block_n", "block_k"):
        common.check_block(name, config[name])
      k_tiles = math.ceil(k_features / config["block_k"])
      assert 1 <= config["split_k"] <= min(k_tiles, dispatch.MAX_SPLIT_K)
      if choice.path == "vq_splitk":
        assert config["block_m"] >= min(m_rows, 64) or m_rows > 64
        per_part, parts = dispatch.split_parts(k_tiles, config["split_k"])
        assert parts == config["split_k"]  # no empty part
  # Token rows on Hopper: 128 x 128 / 8 warps or 128 x 64 / 4 warps, by the launch tail.
  for m_rows in (1024, 4096, 16384):
    for k_features, n_features in DIT_XL2_SHAPES:
      config = dispatch.choose("vq", m_rows, k_features, n_features, device_kind=H100).config
      assert ((config["block_m"], config["block_n"], config["num_warps"])
              in ((128, 128, 8), (128, 64, 4))), config
      assert config["block_n"] == 64 or config["split_k"] == 1  # 128 x 128 never splits
      assert config["block_n"] == 128 or config["stream_k"] == 0  # only 128 x 128 streams
  tiled = dispatch.choose("vq", 4096, 1152, 4608, device_kind=H100).config
  assert (tiled["block_m"], tiled["block_n"], tiled["num_warps"], tiled["split_k"]) == (
      128, 128, 8, 1)  # 1152 tiles: 9 waves (8.7), 128 x 64 only ties
  # 1152x1152 at M = 4096: 288 tiles (3 on the busiest SM, even share 2.2; 15.1 us of tensor
  # time); 576 of 128 x 64 would even the tail (12.6 us) but re-read x through L2: 180 MB,
  # 15.8 us at dispatch.L2_BANDWIDTH, vs 96 MB for 128 x 128.  Stream-K of 128 x 128 with a
  # data-parallel wave (264 tiles whole, then 24 tiles' 432 K tiles in shares of 2) evens it.
  proj = dispatch.choose("vq", 4096, 1152, 1152, device_kind=H100).config
  assert (proj["block_n"], proj["num_warps"], proj["split_k"]) == (128, 8, 1)
  assert (proj["stream_k"], proj["whole_waves"]) == (264, True)
  l2 = {bn: dispatch.tile_l2_bytes(4096, 1152, 1152, 128, bn, 2.0, 0.25) for bn in (64, 128)}
  bandwidth = dispatch.L2_BANDWIDTH["hopper"]
  assert l2[64] / bandwidth > 15.1e-6 > l2[128] / bandwidth
  # fc2 at M = 1024: 72 tiles of 128 x 128 leave 60 SMs idle; 144 of 128 x 64 split 2 ways
  # (15.1 us of tensor time) stay L2-bound (194 MB: 17 us); stream-K of 128 x 128 (every
  # tile in 3-5 pieces) has 2 x 20 K tiles on the busiest SM (11.2 us)
  fc2 = dispatch.choose("vq", 1024, 4608, 1152, device_kind=H100).config
  assert (fc2["block_n"], fc2["split_k"], fc2["stream_k"], fc2["whole_waves"]) == (
      128, 1, 264, False)
  assert dispatch.choose("vq", 4096, 1152, 4608, device_kind=A100).config == {}


def test_split_k_rule_minimises_the_busiest_sm():
  # busiest SM's K tiles: ceil(tiles x split / 132) x ceil(k_tiles / split), any split
  assert dispatch.tail_split_k(27, 18, "hopper") == 9  # 2 x 2 = 4; split 4: 1 x 5
  assert dispatch.tail_split_k(9, 18, "hopper") == 9  # 1 x 2; split 8: 1 x 3
  assert dispatch.tail_split_k(36, 18, "hopper") == 3  # 1 x 6; split 2: 1 x 9
  assert dispatch.tail_split_k(9, 72, "hopper") == 12  # 1 x 6; split 8: 1 x 9
  assert dispatch.tail_split_k(264, 72, "hopper") == 1  # 2 per SM already: a split only ties
  assert dispatch.tail_split_k(300, 72, "hopper") == 3  # 7 x 24 = 168 < 3 x 72 (split 12 ties)
  assert dispatch.tail_split_k(9, 1, "hopper") == 1  # nothing to split
  assert dispatch.tail_split_k(9, 18, "hopper", max_split=4) == 4  # 1 x 5
  assert dispatch.tail_split_k(27, 18, "ampere") == 4  # 108 SMs: 1 x 5; split 9: 3 x 2 = 6
  # 18 K tiles: splits 7, 8 would leave empty parts (parts of 3: 6 used); never chosen
  assert dispatch.split_parts(18, 7) == (3, 6) and dispatch.split_parts(18, 6) == (3, 6)
  for split in range(1, 17):
    per_part, parts = dispatch.split_parts(18, split)
    assert per_part * (parts - 1) < 18 <= per_part * parts
  # With a kernel's K-tile time, the partials' DRAM bytes weigh in: VQ 1152x3456 at M = 16
  # (27 tiles of 18 K tiles) keeps split 4 (1 x 5 K tiles = 0.73 us) over split 9 (2 x 2 K
  # tiles = 0.58 us of issue, but 9 x 221 KB of partials + 1.1 MB of weights = 0.94 us).
  moved = 1152 * 3456 / 4 + 2 * 16 * (1152 + 3456)
  assert dispatch.tail_split_k(27, 18, "hopper", kernel="vq",
                               **dispatch.splitk_bytes(16, 3456, moved)) == 4
  assert dispatch.choose("vq", 16, 1152, 3456, device_kind=H100).config["split_k"] == 4


def test_small_m_launch_picks_the_column_width_with_the_split():
  """splitk_launch against a brute force over (block_n, split): the busiest SM's K tiles at the
  width's K-tile time vs the weights' + split's partials' DRAM bytes, the cheapest pair
  (ties to the wider tile, then the smaller split)."""
  bandwidth = dispatch.BANDWIDTH["hopper"]

  def brute(kernel, m, k, n, block_k, weight_bytes):
    k_tiles = math.ceil(k / block_k)
    best = None
    for block_n in (128, 64, 32):
      for split in range(1, min(dispatch.MAX_SPLIT_K, k_tiles) + 1):
        per_part = math.ceil(k_tiles / split)
        if math.ceil(k_tiles / per_part) != split:
          continue
        tiles = math.ceil(m / 16) * math.ceil(n / block_n)
        issue = (math.ceil(tiles * split / 132) * per_part
                 * dispatch.SPLITK_K_TILE_S[kernel]["hopper"][block_n])
        memory = (weight_bytes + (4 * m * n * split if split > 1 else 0)) / bandwidth
        cost = max(issue, memory)
        if best is None or cost < best[0] * (1 - 1e-9):
          best = (cost, block_n, split)
    return best[1:]

  for k, n in DIT_XL2_SHAPES:
    for m in (1, 8, 16):
      vq_bytes = k * n / 4 + 2 * m * (k + n)
      config = dispatch.choose("vq", m, k, n, device_kind=H100).config
      assert (config["block_n"], config["split_k"]) == brute("vq", m, k, n, 64, vq_bytes)
      fp4_bytes = k * n / 2 + m * (2 * k + 2 * n)
      config = fp4_matmul.default_mma_config(m, n, k, "hopper", "bf16", predecode=False)
      assert (config["block_n"], config["split_k"]) == brute("fp4_bf16", m, k, n, 128, fp4_bytes)
  # 1152x1152 at M = 16 (9 tiles of 128 columns): VQ W2 takes 64 columns split 6 (108 programs
  # of 3 K tiles: 0.28 us) over 128 split 9 (0.32 us: 9 x 74 KB of partials beside 0.41 MB);
  # W4A16 takes 32 columns split 3 (0.31 us) over 128 split 9 (0.42 us).
  vq_proj = dispatch.choose("vq", 16, 1152, 1152, device_kind=H100).config
  assert (vq_proj["block_n"], vq_proj["split_k"]) == (64, 6)
  w4_proj = fp4_matmul.default_mma_config(16, 1152, 1152, "hopper", "bf16", predecode=False)
  assert (w4_proj["block_n"], w4_proj["split_k"]) == (32, 3)
  with pytest.raises(ValueError, match="block_n = 16"):
    dispatch.splitk_launch(16, 1152, 18, "hopper", "vq", block_m=16, weight_bytes=1.0,
                           block_ns=(16,))
  # a wide layer keeps the 128-column tile: qkv fills the SMs with 27 tiles split 4
  assert dispatch.splitk_launch(16, 3456, 18, "hopper", "vq", block_m=16,
                                weight_bytes=1152 * 3456 / 4) == (128, 4)


def test_tail_tiles_closed_forms():
  options = dispatch.VQ_TILED_OPTIONS
  # 864 tiles of 128 x 128 (qkv at M = 4096): 7 on the busiest SM (6.55); 1728 of 128 x 64:
  # 14 half-size ones (13.1): a tie, the first option wins
  option, split, _, _ = dispatch.tail_tiles(4096, 1152, 3456, "hopper", options, block_k=64)
  assert (option, split) == (options[0], 1)
  # the time is the busiest SM's tensor time: 3 tiles x 18 K tiles x 2 x 128 x 128 x 64 FLOP
  # at 989 / 132 TFLOP/s per SM (1152x1152, M = 4096, 128 x 128) vs 5 half-size tiles
  tiled = tuple(o._replace(can_stream_k=False) for o in options)
  option, split, _, _ = dispatch.tail_tiles(4096, 1152, 1152, "hopper", tiled[:1], block_k=64)
  assert (option, split) == (tiled[0], 1)
  option, split, _, _ = dispatch.tail_tiles(4096, 1152, 1152, "hopper", tiled, block_k=64)
  assert (option, split) == (tiled[1], 1)
  # fc2 at M = 1024 (72 tiles of 72 K tiles), 128 x 128 only, closed form per split: tensor
  # time of the busiest SM vs DRAM time of 13 MB + the split's (1024, 1152) float32 partials
  k_tile_s = 2 * 128 * 128 * 64 / (989e12 / 132)

  def cost(split):
    per_part = math.ceil(72 / split)
    tensor = math.ceil(72 * split / 132) * per_part * k_tile_s
    memory = (13e6 + (4 * 1024 * 1152 * split if split > 1 else 0)) / 3.35e12
    return max(tensor, memory) * (1.05 if split > 1 else 1.0)

  splits = [s for s in range(1, 10) if math.ceil(72 / math.ceil(72 / s)) == s]
  expected = min(splits, key=lambda s: (round(cost(s), 15), s))
  unsplit = options[0]._replace(can_split=True, can_stream_k=False)
  option, split, _, _ = dispatch.tail_tiles(1024, 4608, 1152, "hopper", (unsplit,), block_k=64,
                                            moved_bytes=13e6, max_split=9)
  assert split == expected and 1 < split < 9  # 9 ways: 5 x 8 K tiles, but 42 MB of partials
  assert cost(expected) < cost(1) / 1.3
  # the dispatcher's constants are the roofline's datasheet peaks
  from dit_quant_jax.bench import roofline
  for cls in ("hopper", "ampere"):
    assert dispatch.BANDWIDTH[cls] == roofline.DATASHEET[cls].bandwidth
    assert dispatch.PEAK_BF16_FLOPS[cls] == roofline.DATASHEET[cls].matmul_flops


def test_w4a16_token_rows_split_only_the_128x64_tile():
  """W4A16's in-loop kernel on Hopper: fc2 at M = 1024 (36 K tiles of 128, 72 tiles of
  128 x 128 for 132 SMs), by the closed form of tail_tiles (the busiest SM's tensor time vs
  4-bit weights + x + output + partials in DRAM and the tiles' loads through L2): 128 x 64
  with a K split evens the tail but stays L2-bound; 128 x 128 never splits (with a split it
  drops to one CTA per SM) but runs stream-K with the staged epilogue (2 CTAs per SM: every
  piece, whole tiles included, through a slot), which wins; fc1 at M = 4096 (enough tiles)
  keeps the tiled launch."""
  import math

  from dit_quant_jax.kernels import fp4_matmul
  options = fp4_matmul.W4A16_TILED_OPTIONS
  assert not options[0].can_split and options[1].can_split
  assert options[0].can_stream_k and options[0].staged_epilogue and not options[1].can_stream_k
  config = fp4_matmul.default_mma_config(1024, 1152, 4608, "hopper", "bf16", predecode=False)
  moved = 4608 * 1152 / 2 + 2 * 1024 * (4608 + 1152)

  def bound(block_n, tensor, partial_bytes, loads_tiles):
    memory = (moved + partial_bytes) / 3.35e12
    # through L2: each tile's 128 x rows (2 B) and block_n 4-bit columns over K, the output,
    # and the partials written and read back
    l2 = (loads_tiles * 4608 * (128 * 2 + block_n * 0.5) + 2 * 1024 * 1152
          + 2 * partial_bytes) / 11.4e12
    return max(tensor, memory, l2) * (1.05 if partial_bytes else 1.0)

  def cost(block_n, split):
    k_tile_s = 2 * 128 * block_n * 128 / (989e12 / 132)
    tiles = 8 * (1152 // block_n)
    tensor = math.ceil(tiles * split / 132) * math.ceil(36 / split) * k_tile_s
    return bound(block_n, tensor, 4 * 1024 * 1152 * split if split > 1 else 0, tiles)

  candidates = [(128, 1)] + [(64, s) for s in range(1, 9) if math.ceil(36 / math.ceil(36 / s)) == s]
  best_tiled = min(candidates, key=lambda c: round(cost(*c), 15))
  assert best_tiled[0] == 64 and best_tiled[1] > 1
  assert cost(*best_tiled) < cost(128, 1)
  # stream-K: 72 x 36 K tiles over 264 programs in shares of 10 (260 programs, 2 on the
  # busiest SM); staged: each program writes one slot per tile it touches
  pieces = 0
  for program in range(260):
    start, end = 10 * program, min(10 * program + 10, 72 * 36)
    pieces += (end - 1) // 36 - start // 36 + 1
  stream = bound(128, 2 * 10 * 2 * 128 * 128 * 128 / (989e12 / 132), 4 * 128 * 128 * pieces, 72)
  assert stream < cost(*best_tiled)
  assert (config["block_n"], config["split_k"], config["stream_k"], config["whole_waves"],
          config["staged_epilogue"]) == (128, 1, 264, False, True)
  big = fp4_matmul.default_mma_config(4096, 4608, 1152, "hopper", "bf16", predecode=False)
  assert big["split_k"] == 1 and big["stream_k"] == 0


def test_w4a8_fp8_tiles_weigh_the_l2_reads_against_one_cta_per_sm():
  """W4A8's decoded-image fp8 kernel on Hopper: 64 x 128 (2 CTAs per SM, 1.04x its tensor
  time) or 128 x 128 (one CTA, 1.64x) by the busiest SM's K-loop time vs the tiles' reads
  through L2 (1 B x, 1 B image): closed forms at qkv and proj, M = 4096."""
  import math

  from dit_quant_jax.kernels import fp4_matmul

  def cost(block_m, ratio, k, n, m=4096):
    tiles = math.ceil(m / block_m) * math.ceil(n / 128)
    k_tile_s = 2 * block_m * 128 * 128 / (2 * 989e12 / 132) * ratio
    tensor = math.ceil(tiles / 132) * math.ceil(k / 128) * k_tile_s
    l2 = (tiles * k * (block_m + 128) + 2 * m * n) / 11.4e12
    dram = (k * n + m * k + 2 * m * n) / 3.35e12
    return max(tensor, l2, dram)

  for (k, n), want in (((1152, 3456), 128), ((1152, 1152), 64)):
    config = fp4_matmul.default_mma_config(4096, n, k, "hopper", "fp8", predecode=True)
    costs = {64: cost(64, 1.04, k, n), 128: cost(128, 1.64, k, n)}
    assert min(costs, key=costs.get) == want == config["block_m"], (k, n, costs, config)
  assert cost(128, 1.64, 1152, 3456) < cost(64, 1.04, 1152, 3456) / 1.2  # L2-bound 64 x 128


def test_register_and_errors():
  with pytest.raises(ValueError, match="no dispatch table"):
    dispatch.choose("w9a9", 16, 64, 64, device_kind=H100)
  with pytest.raises(ValueError, match="positive int"):
    dispatch.choose("vq", 0, 64, 64, device_kind=H100)
  with pytest.raises(ValueError, match="max_m = inf"):
    dispatch.register("toy", {"hopper": ((16, "toy_a"),)})
  with pytest.raises(ValueError, match="unknown device class"):
    dispatch.register("toy", {"tpu": ((math.inf, "toy_a"),)})
  dispatch.register("toy", {"gpu": ((16, "toy_splitk"), (math.inf, "toy_xla"))})
  try:
    assert dispatch.choose("toy", 8, 64, 64, device_kind=H100).path == "toy_splitk"  # falls
    assert dispatch.choose("toy", 17, 64, 64, device_kind=A100).path == "toy_xla"  # back to gpu
  finally:
    del dispatch.TABLE["toy"]


def test_describe_lists_every_shape():
  rows = dispatch.describe("vq", DIT_XL2_SHAPES, (16, 4096), device_kind=A100)
  assert len(rows) == 10
  assert {row["path"] for row in rows} == {"vq_splitk", "vq_dequant_dot"}


def test_fp4_paths_exist_and_are_verified():
  """Every FP4 path the table names is in kernels/fp4_matmul.PATHS and not UNVERIFIED."""
  from dit_quant_jax.kernels import fp4_matmul
  for op in ("w4a16", "w4a8", "w4a4"):
    for cls in dispatch.DEVICE_CLASSES:
      for _, path in dispatch.TABLE[op][cls]:
        assert path in fp4_matmul.PATHS[op], (op, cls, path)
        assert (op, path) not in fp4_matmul.UNVERIFIED, (op, path)
  assert dispatch.choose("w4a8", 4096, 1152, 4608, device_kind=A100).path == "unpacked_triton_bf16"
  assert dispatch.choose("w4a8", 4096, 1152, 4608, device_kind=H100).path == "unpacked_triton_fp8"
  assert dispatch.choose("w4a4", 16, 1152, 4608, device_kind=H100).config == {}
  # W4A16: the in-loop decode kernel at every M on Hopper; XLA decode + dot at large M on sm_80.
  assert dispatch.choose("w4a16", 4096, 1152, 4608, device_kind=H100).path == "triton_bf16"
  assert dispatch.choose("w4a16", 16, 1152, 4608, device_kind=H100).path == "triton_bf16"
  assert dispatch.choose("w4a16", 4096, 1152, 4608, device_kind=A100).path == "xla_bf16"
  hopper_loop = fp4_matmul.default_mma_config(4096, 4608, 1152, "hopper", "bf16", predecode=False)
  assert hopper_loop["num_stages"] == 2 and hopper_loop["block_m"] == 128  # 2 CTAs per SM
  assert fp4_matmul.default_mma_config(4096, 4608, 1152, "hopper", "bf16")["num_stages"] == 3


def test_target_gpu_traces_as_that_device_and_restores():
  import jax
  local = dispatch.device_class()
  with common.target_gpu("NVIDIA A100-SXM4-80GB"):
    assert common.on_gpu() and common.resolve_impl("auto") == (True, False)
    assert dispatch.device_class() == "ampere"
    with common.target_gpu():  # the default: an H100
      assert dispatch.device_class() == "hopper"
    assert dispatch.device_class() == "ampere"
  assert dispatch.device_class() == local
  assert common.local_device_kind()[0] == jax.devices()[0].platform


def test_stream_k_cost_closed_form():
  """tail_tiles' stream-K candidate for VQ 128 x 128 tiles on an H100, fc2 at M = 1024: 72
  tiles x 72 K tiles over 264 programs in shares of 20 (260 programs, 2 on the busiest SM:
  40 K tiles); each piece that is not a whole tile moves a 128 x 128 float32 partial through
  DRAM and L2 (written, read back); the cost is the largest of tensor, DRAM and L2 time with
  the 5 % margin, and it beats the tiled options, whose best is 128 x 64 split 2."""
  import math
  k_tile_s = 2 * 128 * 128 * 64 / (989e12 / 132)
  pieces = 0
  for program in range(260):
    start, end = 20 * program, min(20 * program + 20, 72 * 72)
    for tile in range(start // 72, (end - 1) // 72 + 1):
      pieces += (max(start, 72 * tile), min(end, 72 * tile + 72)) != (72 * tile, 72 * tile + 72)
  schedule = dispatch.stream_k_schedule(1024, 4608, 1152, 128, 128, 64, 264)
  assert (schedule.per_program, schedule.programs, schedule.partial_pieces()) == (20, 260, pieces)
  assert dispatch.stream_k_busiest_k_tiles(schedule, "hopper") == 40
  moved = 4608 * 1152 / 4 + 2 * 1024 * (4608 + 1152)
  tensor = 40 * k_tile_s
  dram = (moved + 4 * 128 * 128 * pieces) / 3.35e12
  l2 = (72 * 4608 * (128 * 2 + 128 * 0.25) + 2 * 4 * 128 * 128 * pieces
        + 2 * 1024 * 1152) / 11.4e12
  stream_cost = max(tensor, dram, l2) * 1.05
  tiled_only = tuple(o._replace(can_stream_k=False) for o in dispatch.VQ_TILED_OPTIONS)
  args = dict(block_k=64, moved_bytes=moved, max_split=8, operand_bytes=(2.0, 0.25))
  tiled = dispatch.tail_tiles(1024, 4608, 1152, "hopper", tiled_only, **args)
  assert (tiled.option.block_n, tiled.split_k) == (64, 2)
  tiled_cost = max(math.ceil(144 * 2 / 132) * 36 * k_tile_s / 2,
                   (8 * 18 * 4608 * (128 * 2 + 64 * 0.25) + 2 * 4 * 1024 * 1152 * 2
                    + 2 * 1024 * 1152) / 11.4e12) * 1.05
  assert stream_cost < tiled_cost
  chosen = dispatch.tail_tiles(1024, 4608, 1152, "hopper", dispatch.VQ_TILED_OPTIONS, **args)
  assert (chosen.option.block_n, chosen.split_k, chosen.stream_k, chosen.whole_waves) == (
      128, 1, 264, False)
  # a data-parallel wave needs at least as many tiles as programs: at 72 tiles it is the same
  # schedule, so only the plain one is weighed
  assert dispatch.stream_k_schedule(1024, 4608, 1152, 128, 128, 64, 264, True).whole_tiles == 0
