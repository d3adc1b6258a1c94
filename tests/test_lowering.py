"""Kernels lowered for an abstract GPU and compiled with triton for sm_90a / sm_80 (no GPU):
every compute-bound config the dispatcher picks at the DiT-XL/2 shapes must run on tensor cores
(wgmma on sm_90a, mma.sync on sm_80) without spilling; the split-K path must reduce with one
atomic per program.  Needs the triton package (the Python 3.12 leg installs it); skipped
otherwise."""

import jax
import pytest

from dit_quant_jax.bench import static_report
from dit_quant_jax.bench import triton_ptx
from dit_quant_jax.kernels import vq_matmul as vq

AVAILABLE, WHY = triton_ptx.lowering_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)

# One shape per kind of layer is enough to cover every distinct config (configs depend on M
# and the tile counts): fc1 (1152 x 4608) and fc2 (4608 x 1152).
SHAPES = ((1152, 4608), (4608, 1152))


@pytest.mark.parametrize("cc", [90, 80])
def test_vq_configs_use_tensor_cores_without_spills(cc):
  seen = set()
  for name, path, fn, avals, config, _ in static_report.vq_lowering_cases(SHAPES, (16, 128, 1024), cc):
    if fn is None:
      continue
    (stats,) = static_report.case_stats(fn, avals, config, cc)
    assert "compile_error" not in stats, (name, stats)
    assert stats["ptxas_ok"], (name, stats.get("ptxas_error"))
    assert stats["spill_store_bytes"] == 0 and stats["local"] == 0, (name, stats)
    if path == "vq_tiled":  # compute-bound config: the intended tensor-core instruction
      if cc == 90:
        assert stats["wgmma"] > 0 and "f32.bf16.bf16" in stats["wgmma_types"], (name, stats)
      else:
        assert stats["mma"] > 0 and stats["wgmma"] == 0, (name, stats)
      # one atomic where a K split or a stream-K launch is reduced in the launch (Hopper's
      # tail-aware configs)
      reduced = config["split_k"] > 1 or config.get("stream_k", 0) > 0
      assert stats["atom"] == (1 if reduced else 0), (name, stats)
      if cc == 90:  # both tile options are tensor-bound (dispatch.VQ_TILED_OPTIONS)
        assert stats["issue_bound"] == "tensor", (name, stats)
    else:  # split-K GEMV: mma.sync on a 16-row tile, one atomic for the in-launch reduction
      assert stats["mma"] > 0 and stats["atom"] == 1, (name, stats)
    assert stats["ld_global_8bit"] == 0, (name, stats)  # indices and codebook: vector loads
    if path == "vq_tiled":  # the K step's loads are pipelined async copies, no scalar gathers
      assert stats["step_cp_async"] >= 2 and stats["step_ld_global"] <= 2, (name, stats)
    seen.add(path)
  assert seen == {"vq_splitk", "vq_tiled"}


@pytest.mark.parametrize("cc", [90, 80])
def test_split_k_tile_times_match_the_compiled_kernels(cc):
  """dispatch.SPLITK_K_TILE_S (what splitk_launch weighs against the partials' bytes) against
  the compiled small-M kernels at M = 16, 1152x3456, at every column width it chooses from:
  issue floor / (programs on the busiest SM x K tiles per program), within 15 %; and the
  narrowest tile costs more per weight than the widest (what makes the choice a trade)."""
  import functools
  import math

  import jax.numpy as jnp
  from dit_quant_jax.kernels import dispatch, fp4_mma
  cls = static_report.CLASS_OF_CC[cc]
  m, k, n = 16, 1152, 3456

  def k_tile_seconds(fn, avals, config, name):
    (stats,) = static_report.case_stats(fn, avals, config, cc, name)
    assert stats["spill_store_bytes"] == 0 and stats["local"] == 0, (name, stats)
    trips = static_report.main_loop_trips(name, config, avals)
    return stats["issue_floor_s"] / (stats["tail"] * math.prod(stats["grid"])
                                     / triton_ptx.SM_COUNT[cc] * trips)

  weight = fp4_mma.PackedFp4Weight(jax.ShapeDtypeStruct((n, fp4_mma.padded_k(k) // 2), jnp.uint8),
                                   jax.ShapeDtypeStruct((n,), jnp.float32), "e2m1", k)
  measured = {}
  for block_n in dispatch.SPLITK_BLOCK_NS:
    config = dict(block_m=16, block_n=block_n, block_k=64, split_k=2, num_warps=4, num_stages=3)
    measured["vq", block_n] = k_tile_seconds(
        jax.jit(functools.partial(vq.vq_matmul, **config)), static_report.vq_avals(m, k, n),
        config, f"vq_w2 {k}x{n} M={m}")
    for key, kind in (("fp4_bf16", "bf16"), ("fp4_8bit", "int8")):
      config = dict(block_m=16, block_n=block_n, split_k=3, num_warps=4, num_stages=3)
      fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind=kind, predecode=False,
                                     out_dtype=jnp.bfloat16, **config))
      avals = (jax.ShapeDtypeStruct((m, k), fp4_mma.x_dtype_for(kind)),
               jax.ShapeDtypeStruct((m,), jnp.float32), weight)
      measured[key, block_n] = k_tile_seconds(fn, avals, config,
                                              f"fp4_mma_{kind} M={m} K={k} N={n}")
  for (key, block_n), value in measured.items():
    assert value == pytest.approx(dispatch.splitk_k_tile_s(key, cls, block_n), rel=0.15), (
        key, block_n, value)
  widest, narrowest = max(dispatch.SPLITK_BLOCK_NS), min(dispatch.SPLITK_BLOCK_NS)
  for key in dispatch.SPLITK_K_TILE_S:
    assert (measured[key, narrowest] / narrowest > 1.2 * measured[key, widest] / widest), key


def test_export_for_abstract_gpu_has_the_triton_call():
  avals = static_report.vq_avals(16, 256, 128)
  fn = jax.jit(lambda *a: vq.vq_matmul(*a, block_m=16, block_n=64, block_k=64, split_k=2))
  text = triton_ptx.export_for_gpu(fn, *avals).mlir_module()
  assert any(target in text for target in triton_ptx.TRITON_CALL_TARGETS)


@pytest.mark.parametrize("cc", [90, 80])
def test_w4a4_large_m_kernels_use_tensor_cores_without_spills(cc):
  """The W4A4 path at M = 4096 (fc1 1152 x 4608): the int8 kernel decoding its 4-bit tiles in
  the K loop (the dispatched one; its packed decode: prmt, no table loads, and its SASS loop
  under its tensor-core time), the int8 kernel on a decoded image (the alternative), the
  act-quant kernel, and the act-quant with the block's LayerNorm + modulate fused (qkv / fc1
  input): int8 / bf16 tensor cores; no FP4 kernel at this shape spills."""
  wanted = {"fp4_mma_int8": "s8.s8", "fp4_mma_unpacked_int8": "s8.s8",
            "quantize_rows_int8": "bf16.bf16", "quantize_rows_norm_int8": "bf16.bf16"}
  seen = set()
  for name, kernel, fn, avals, config, _ in static_report.fp4_lowering_cases(
      ((1152, 4608),), (4096,), cc):
    (stats,) = static_report.case_stats(fn, avals, config, cc)
    assert stats["ptxas_ok"], (name, stats.get("ptxas_error"))
    # every FP4 kernel at this shape, the undispatched fp8 / bf16 variants included
    assert stats["spill_store_bytes"] == 0 and stats["local"] == 0, (name, stats)
    if kernel not in wanted:
      continue
    types = stats["wgmma_types"] if cc == 90 else stats["mma_types"]
    assert (stats["wgmma"] if cc == 90 else stats["mma"]) > 0, (name, stats)
    assert any(wanted[kernel] in t for t in types), (name, types)
    if cc == 90 and kernel.startswith("fp4_mma"):
      # Triton waits for an int32-accumulator wgmma every K step; a second CTA per SM is what
      # keeps the tensor cores busy meanwhile (the static report's estimate assumes it).
      assert stats["loop_wgmma_waits_all"] and stats["ctas_per_sm"] >= 2, (name, stats)
    if kernel == "fp4_mma_int8":
      # 2 x 16 B of packed codes per thread per K step = 8 words, 6 permutes each
      assert stats["prmt"] >= 6 * 8, (name, stats)
      assert stats["issue_bound"] == "tensor", (name, stats)
      assert stats["issue_floor_s"] == pytest.approx(stats["tensor_s"]), (name, stats)
    seen.add(kernel)
  assert seen == set(wanted)


@pytest.mark.parametrize("cc", [90, 80])
def test_act_quant_at_fc2_width_does_not_spill(cc):
  """The act-quant kernel at K = 4608 (fc2's input, one 36-row token per 64 x 128 tile), with
  the dispatcher's config for the device: bf16 tensor cores, no spills (sm_80 reloads its sign
  tile per token: held across the token loop it spilled 244 B), and on sm_90a 3 CTAs per SM."""
  cases = [case for case in static_report.fp4_lowering_cases(((4608, 1152),), (4096,), cc)
           if case[1] == "quantize_rows_int8"]
  assert len(cases) == 1
  name, _, fn, avals, config, _ = cases[0]
  assert config["signs_per_token"] == (cc == 80), config
  (stats,) = static_report.case_stats(fn, avals, config, cc)
  assert stats["ptxas_ok"], stats.get("ptxas_error")
  assert stats["spill_store_bytes"] == 0 and stats["local"] == 0, (name, stats)
  assert (stats["wgmma"] if cc == 90 else stats["mma"]) > 0, (name, stats)
  if cc == 90:
    assert stats["ctas_per_sm"] >= 3, stats


@pytest.mark.parametrize("m_rows,k_features,n_features", [(512, 512, 256), (1024, 4608, 1152)])
def test_hopper_w4a16_large_m_kernel_fits_two_ctas_per_sm(m_rows, k_features, n_features):
  """The W4A16 kernel the table picks at large M on Hopper (4-bit tiles decoded in the K loop):
  its wgmma waits every step, so the config must leave room for a second CTA per SM (shared
  memory and registers), on bf16 wgmma, without spills; fc2 at M = 1024 (72 tiles of 128 x
  128 for 132 SMs) runs stream-K with the staged epilogue (one atomic, 126 registers)."""
  import functools

  import jax.numpy as jnp
  from dit_quant_jax.kernels import fp4_matmul
  from dit_quant_jax.kernels import fp4_mma
  config = fp4_matmul.default_mma_config(m_rows, n_features, k_features, "hopper", "bf16",
                                         predecode=False)
  weight = fp4_mma.PackedFp4Weight(
      jax.ShapeDtypeStruct((n_features, k_features // 2), jnp.uint8),
      jax.ShapeDtypeStruct((n_features,), jnp.float32), "e2m1", k_features)
  fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind="bf16", predecode=False, **config))
  avals = (jax.ShapeDtypeStruct((m_rows, k_features), jnp.bfloat16),
           jax.ShapeDtypeStruct((m_rows,), jnp.float32), weight)
  (stats,) = static_report.case_stats(fn, avals, config, 90, f"fp4_mma_bf16 M={m_rows}")
  assert stats["wgmma"] > 0 and any("bf16" in t for t in stats["wgmma_types"]), stats
  assert stats["spill_store_bytes"] == 0 and stats["local"] == 0, stats
  assert stats["ctas_per_sm"] >= 2, stats
  reduced = config["split_k"] > 1 or config.get("stream_k", 0) > 0
  assert stats["atom"] == (1 if reduced else 0), (config, stats)
  if k_features == 4608:  # stream-K, whole tiles through the slots too (registers: 2 CTAs)
    assert (config["block_n"], config["stream_k"] > 0, config["staged_epilogue"]) == (
        128, True, True), config
    assert stats["issue_bound"] == "tensor", stats


def test_hopper_fp8_kernel_uses_fp8_wgmma():
  """W4A8's large-M kernel on Hopper (the layer's E4M3 image, fp8_dot.FAST_ACCUM): the TTIR's
  tt.dot carries maxNumImpreciseAcc and the PTX has wgmma e4m3 (without it Triton upcasts to
  f16 mma.sync), no spills, 2 CTAs per SM."""
  import functools

  import jax.numpy as jnp
  from dit_quant_jax.kernels import fp4_matmul
  from dit_quant_jax.kernels import fp4_mma
  from dit_quant_jax.kernels import fp8_dot
  assert fp8_dot.INSTALLED
  m_rows, k_features, n_features = 4096, 1152, 1152  # proj at 256 px, batch 16 (registers
  # depend on K's tile count through the software pipeline: test the DiT width)
  config = fp4_matmul.default_mma_config(m_rows, n_features, k_features, "hopper", "fp8")
  weight = fp4_mma.PackedFp4Weight(
      jax.ShapeDtypeStruct((n_features, k_features // 2), jnp.uint8),
      jax.ShapeDtypeStruct((n_features,), jnp.float32), "e2m1", k_features)
  fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind="fp8", predecode=True, **config))
  avals = (jax.ShapeDtypeStruct((m_rows, k_features), jnp.float8_e4m3fn),
           jax.ShapeDtypeStruct((m_rows,), jnp.float32), weight)
  (module,) = triton_ptx.lower_for_gpu(fn, *avals, cc=90)
  assert f"maxNumImpreciseAcc = {fp8_dot.FAST_ACCUM_INTERVAL}" in module["ttir"]
  stats = triton_ptx.kernel_stats(module["ttir"], num_warps=config["num_warps"],
                                  num_stages=config["num_stages"], cc=90)
  assert stats["wgmma"] > 0 and stats["wgmma_types"] == ["f32.e4m3.e4m3"], stats
  assert stats["mma"] == 0 and stats["spill_store_bytes"] == 0, stats
  assert stats["ctas_per_sm"] >= 2, stats


def test_fp8_tile_options_issue_ratios_match_the_compiled_kernels():
  """fp4_matmul.FP8_PREDECODED_OPTIONS' issue_ratio (what tail_tiles charges per K tile over
  the fp8 tensor time) against the compiled decoded-image fp8 kernel at 1152x3456, M = 4096:
  its issue floor / tensor time within 10 %; 64 x 128 keeps 2 CTAs per SM, 128 x 128 one,
  neither spills."""
  import functools

  import jax.numpy as jnp
  from dit_quant_jax.kernels import fp4_matmul
  from dit_quant_jax.kernels import fp4_mma
  m_rows, k_features, n_features = 4096, 1152, 3456
  weight = fp4_mma.PackedFp4Weight(
      jax.ShapeDtypeStruct((n_features, k_features // 2), jnp.uint8),
      jax.ShapeDtypeStruct((n_features,), jnp.float32), "e2m1", k_features)
  avals = (jax.ShapeDtypeStruct((m_rows, k_features), jnp.float8_e4m3fn),
           jax.ShapeDtypeStruct((m_rows,), jnp.float32), weight)
  for option in fp4_matmul.FP8_PREDECODED_OPTIONS:
    config = dict(block_m=option.block_m, block_n=option.block_n, split_k=1,
                  num_warps=option.num_warps, num_stages=option.num_stages)
    fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind="fp8", predecode=True,
                                   out_dtype=jnp.bfloat16, **config))
    (stats,) = static_report.case_stats(fn, avals, dict(config, predecode=True), 90,
                                        f"fp4_mma_unpacked_fp8 M={m_rows} K={k_features} "
                                        f"N={n_features}")
    assert stats["spill_store_bytes"] == 0 and stats["local"] == 0, (option, stats)
    assert stats["ctas_per_sm"] == (2 if option.block_m == 64 else 1), (option, stats)
    ratio = stats["issue_floor_s"] / stats["tensor_s"]
    assert ratio == pytest.approx(option.issue_ratio, rel=0.1), (option, ratio)


def test_ttir_stage_makes_the_decoded_image_dot_asynchronous():
  """The bf16 kernel on a decoded image (W4A8's large-M path): one dot per K step, compiled
  through triton's TTIR passes as XLA does, keeps its wgmma in flight across steps; the raw
  Pallas TTIR (acc + dot, not folded) would wait for every wgmma and add on the FP32 pipe."""
  import functools

  import jax.numpy as jnp
  from dit_quant_jax.kernels import fp4_mma
  m_rows, k_features, n_features = 512, 512, 256
  weight = fp4_mma.PackedFp4Weight(
      jax.ShapeDtypeStruct((n_features, k_features // 2), jnp.uint8),
      jax.ShapeDtypeStruct((n_features,), jnp.float32), "e2m1", k_features)
  fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind="bf16", predecode=True, block_m=128,
                                 block_n=128, num_warps=8, num_stages=3))
  avals = (jax.ShapeDtypeStruct((m_rows, k_features), jnp.bfloat16),
           jax.ShapeDtypeStruct((m_rows,), jnp.float32), weight)
  (module,) = triton_ptx.lower_for_gpu(fn, *avals, cc=90)
  waits = {}
  for staged in (True, False):
    kernel = triton_ptx.compile_ttir(module["ttir"], num_warps=8, num_stages=3, cc=90,
                                     run_ttir_stage=staged)
    waits[staged] = triton_ptx.loop_mma_work(kernel.asm["ptx"], 8)["loop_wgmma_waits_all"]
  assert waits == {True: False, False: True}


@pytest.mark.parametrize("cc", [90, 80])
def test_fc1_gelu_epilogue_uses_the_hardware_tanh(cc):
  """fc1's fused GELU (fp4_mma activation='gelu_tanh', compiled): one tanh.approx.f32 per output
  element in the epilogue, no exp2 / division, no spills, the int8 tensor cores unchanged."""
  import functools
  import jax.numpy as jnp
  from dit_quant_jax.kernels import fp4_matmul, fp4_mma
  m, k, n = 4096, 1152, 4608
  weight = fp4_mma.PackedFp4Weight(jax.ShapeDtypeStruct((n, fp4_mma.padded_k(k) // 2), jnp.uint8),
                                   jax.ShapeDtypeStruct((n,), jnp.float32), "e2m1", k)
  config = fp4_matmul.default_mma_config(m, n, k, "hopper" if cc == 90 else "ampere", "int8")
  avals = (jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32), weight)
  texts = {}
  for activation in (None, "gelu_tanh"):
    fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind="int8", predecode=True,
                                   out_dtype=jnp.bfloat16, activation=activation, **config))
    module = triton_ptx.lower_for_gpu(fn, *avals, cc=cc)[-1]
    kernel = triton_ptx.compile_ttir(module["ttir"], num_warps=config["num_warps"],
                                     num_stages=config["num_stages"], cc=cc)
    texts[activation] = kernel.asm["ptx"]
    resources = triton_ptx.ptxas_resources(kernel.asm["ptx"], cc)
    assert resources["ptxas_ok"] and resources["spill_store_bytes"] == 0, resources
  plain, fused = texts[None], texts["gelu_tanh"]
  assert "tanh.approx.f32" not in plain
  # one tanh per output element of the thread's share of the tile (128 x 128 over 8 warps on
  # sm_90a: 64)
  per_thread = config["block_m"] * config["block_n"] // (32 * config["num_warps"])
  assert fused.count("tanh.approx.f32") == per_thread, fused.count("tanh.approx.f32")
  assert "ex2.approx" not in fused and "div.full" not in fused and "div.rn" not in fused
  assert triton_ptx.ptx_counts(fused)["mma" if cc == 80 else "wgmma"] == \
      triton_ptx.ptx_counts(plain)["mma" if cc == 80 else "wgmma"]


@pytest.mark.parametrize("cc", [90, 80])
def test_small_m_bf16_kernel_uses_the_packed_decode(cc):
  """W4A16 at M = 16 (fc1): the compiled kernel decodes its 4-bit tiles with the packed bf16
  asm (prmt / lop3 / fma.rn.bf16x2, two weights per instruction group), without spills; its
  SASS main loop issues under half of what the jnp decode did per weight (672 per warp-step
  at 64-column tiles, session 19)."""
  import functools
  import jax.numpy as jnp
  from dit_quant_jax.kernels import fp4_matmul, fp4_mma
  m, k, n = 16, 1152, 4608
  weight = fp4_mma.PackedFp4Weight(jax.ShapeDtypeStruct((n, fp4_mma.padded_k(k) // 2), jnp.uint8),
                                   jax.ShapeDtypeStruct((n,), jnp.float32), "e2m1", k)
  config = fp4_matmul.default_mma_config(m, n, k, "hopper" if cc == 90 else "ampere", "bf16")
  fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind="bf16", out_dtype=jnp.bfloat16,
                                 **config))
  avals = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((m,), jnp.float32),
           weight)
  (stats,) = static_report.case_stats(fn, avals, config, cc, name="fp4_mma_bf16")
  assert stats["ptxas_ok"] and stats["spill_store_bytes"] == 0, stats
  assert stats["mma"] > 0, stats
  fresh = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind="bf16", out_dtype=jnp.bfloat16,
                                    **config))  # (a traced function lowers once)
  module = triton_ptx.lower_for_gpu(fresh, *avals, cc=cc)[0]
  ptx = triton_ptx.compile_ttir(module["ttir"], num_warps=config["num_warps"],
                                num_stages=config["num_stages"], cc=cc).asm["ptx"]
  # a (block_n, 64) byte tile per K step, 4 bytes per asm block, 2 planes, 2 FMAs each
  per_thread = config["block_n"] * 64 // (32 * config["num_warps"])
  assert ptx.count("fma.rn.bf16x2") == 2 * 2 * per_thread // 4, ptx.count("fma.rn.bf16x2")
  # per weight: the jnp decode's 672 per warp-step were for 64-column tiles
  assert stats["sass_issue"] * 64 / config["block_n"] < 672 / 2, stats["sass_issue"]


# One DiT-XL/2 block in the real shapes (batch 8 with CFG: M = 4096 token rows, 16 adaLN rows),
# traced as on an H100 (kernels.common.target_gpu): the Pallas calls of one sampling step, in
# order adaLN, qkv, proj, fc1, fc2.  qkv and fc1 take their modulated LayerNorm into the
# act-quant (the "_norm" kernels); every quantized linear has its act-quant kernel.
DIT_BLOCK_CALLS = {
    # VQ: stream-K where the 128 x 128 tiles would leave a short last wave (qkv: 864 tiles,
    # proj and fc2: 288, on 264 CTA slots), the tiled launch at fc1 (1152 tiles)
    "vq_w2": ["vq_matmul", "vq_matmul_stream_k", "vq_matmul_stream_k", "vq_matmul",
              "vq_matmul_stream_k"],
    "hqdit_w4a4": ["quantize_rows_int8", "fp4_mma_int8", "quantize_rows_int8_norm", "fp4_mma_int8",
                   "quantize_rows_int8", "fp4_mma_int8", "quantize_rows_int8_norm", "fp4_mma_int8",
                   "quantize_rows_int8", "fp4_mma_int8"],
    # W4A8's adaLN (M = 16): its fp8 image converted to bf16 for the in-loop bf16 kernel
    "hqdit_w4a8": ["quantize_rows_fp8", "fp4_mma_bf16", "quantize_rows_fp8_norm", "fp4_mma_fp8",
                   "quantize_rows_fp8", "fp4_mma_fp8", "quantize_rows_fp8_norm", "fp4_mma_fp8",
                   "quantize_rows_fp8", "fp4_mma_fp8"],
    "fp_bf16": [],
}


@pytest.fixture(scope="module")
def dit_block_step():
  from dit_quant_jax.bench import kernels as bench_kernels
  return bench_kernels.dit_step_variants(False, depth=1)


@pytest.mark.parametrize("variant", sorted(DIT_BLOCK_CALLS))
def test_dit_xl2_step_lowers_for_h100_with_the_dispatched_kernels(dit_block_step, variant):
  """The sampling step a GPU run times (bench/kernels.dit_step_variants) exports for an abstract
  H100 with every dispatched kernel compiled (no interpret mode): integration errors show here,
  not in a GPU session's minutes."""
  from dit_quant_jax.kernels import common
  step, args = dit_block_step[variant]
  with common.target_gpu():
    assert triton_ptx.pallas_call_names(step, *args) == DIT_BLOCK_CALLS[variant]
    text = triton_ptx.export_for_gpu(step, *args).mlir_module()
  has_triton = any(target in text for target in triton_ptx.TRITON_CALL_TARGETS)
  assert has_triton == bool(DIT_BLOCK_CALLS[variant])


@pytest.mark.parametrize("op,m_rows,k_features,n_features,whole_waves", [
    ("vq", 1024, 4608, 1152, False), ("vq", 4096, 1152, 1152, True),
    ("w4a16", 1024, 4608, 1152, False), ("w4a16", 4096, 1152, 1152, True)])
def test_stream_k_kernels_keep_two_ctas_per_sm(op, m_rows, k_features, n_features,
                                               whole_waves):
  """The stream-K launches on sm_90a (plain, and after whole data-parallel waves): bf16 wgmma,
  no spills, one atomic (the fix-up), 2 CTAs per SM (VQ's fix-up sums 32 columns at a time;
  W4A16's whole tiles go through the slots too), tensor-bound, and the main loop found is the
  K loop inside the tile loop (its async copies, no scalar loads)."""
  import functools

  import jax.numpy as jnp
  from dit_quant_jax.kernels import dispatch, fp4_matmul, fp4_mma
  config = dict(block_m=128, block_n=128, split_k=1, num_warps=8, stream_k=264,
                whole_waves=whole_waves)
  if op == "vq":
    config.update(block_k=64, num_stages=3)
    fn = jax.jit(functools.partial(vq.vq_matmul, **config))
    avals = static_report.vq_avals(m_rows, k_features, n_features)
    name = f"vq_w2 {k_features}x{n_features} M={m_rows}"
  else:
    config.update(num_stages=2, staged_epilogue=True)
    weight = fp4_mma.PackedFp4Weight(
        jax.ShapeDtypeStruct((n_features, k_features // 2), jnp.uint8),
        jax.ShapeDtypeStruct((n_features,), jnp.float32), "e2m1", k_features)
    fn = jax.jit(functools.partial(fp4_mma.fp4_mma, dot_kind="bf16", predecode=False,
                                   out_dtype=jnp.bfloat16, **config))
    avals = (jax.ShapeDtypeStruct((m_rows, k_features), jnp.bfloat16),
             jax.ShapeDtypeStruct((m_rows,), jnp.float32), weight)
    name = f"fp4_mma_bf16 M={m_rows} K={k_features} N={n_features}"
    # the option the dispatcher weighs is this one
    assert fp4_matmul.W4A16_TILED_OPTIONS[0].staged_epilogue
  (stats,) = static_report.case_stats(fn, avals, config, 90, name)
  assert stats["wgmma"] > 0 and any("bf16" in t for t in stats["wgmma_types"]), stats
  assert stats["spill_store_bytes"] == 0 and stats["local"] == 0, stats
  assert stats["ctas_per_sm"] >= 2 and stats["atom"] == 1, stats
  assert stats["issue_bound"] == "tensor", stats
  assert stats["step_cp_async"] >= 2 and stats["step_ld_global"] <= 2, stats
  schedule = dispatch.stream_k_schedule(m_rows, k_features, n_features, 128, 128,
                                        config.get("block_k", fp4_mma.TILE_K), 264, whole_waves)
  assert stats["grid"] == (schedule.programs,) and bool(schedule.whole_tiles) == whole_waves
