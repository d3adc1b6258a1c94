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
        tiles = math.ceil(m_rows / config["block_m"]) * math.ceil(n_features / config["block_n"])
        # no other power-of-two split gives the busiest SM less work
        def busiest(split):
          return math.ceil(tiles * split / dispatch.SM_COUNT["hopper"]) * math.ceil(k_tiles / split)
        splits = [2 ** i for i in range(5) if 2 ** i <= min(k_tiles, dispatch.MAX_SPLIT_K)]
        assert busiest(config["split_k"]) == min(busiest(s) for s in splits)
  tiled = dispatch.choose("vq", 256, 1152, 4608, device_kind=H100).config
  assert (tiled["block_m"], tiled["block_n"], tiled["num_warps"]) == (128, 128, 8)
  assert dispatch.choose("vq", 4096, 1152, 4608, device_kind=H100).config == tiled
  assert dispatch.choose("vq", 4096, 1152, 4608, device_kind=A100).config == {}


def test_split_k_rule_minimises_the_busiest_sm():
  # busiest SM's K tiles: ceil(tiles x split / 132) x ceil(k_tiles / split)
  assert dispatch.tail_split_k(27, 18, "hopper") == 4  # 1 x 5; split 8: 2 x 3 = 6
  assert dispatch.tail_split_k(9, 18, "hopper") == 8  # 1 x 3; split 16: 2 x 2 = 4
  assert dispatch.tail_split_k(36, 18, "hopper") == 2  # 1 x 9 = 9; split 4: 2 x 5 = 10
  assert dispatch.tail_split_k(9, 72, "hopper") == 8  # 1 x 9; split 16: 2 x 5 = 10
  assert dispatch.tail_split_k(264, 72, "hopper") == 1  # 2 per SM already: a split only ties
  assert dispatch.tail_split_k(300, 72, "hopper") == 8  # 19 x 9 = 171 beats 3 x 72 = 216 (the tail)
  assert dispatch.tail_split_k(9, 1, "hopper") == 1  # nothing to split
  assert dispatch.tail_split_k(9, 18, "hopper", max_split=4) == 4
  assert dispatch.tail_split_k(27, 18, "ampere") == 4  # 108 SMs: split 8 -> 2 x 3 = 6 vs 5


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
