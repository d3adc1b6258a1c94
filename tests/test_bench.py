"""Benchmark library (bench/kernels.py, bench/roofline.py): smoke run on CPU, timing helpers,
roofline closed forms."""

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.bench import kernels
from dit_quant_jax.bench import roofline

H100 = roofline.DATASHEET["hopper"]


def test_rotation_sets_exceed_l2():
  assert kernels.rotation_sets(10 * 2**20, l2_bytes=50 * 2**20) == 10  # 10 x 10 MiB >= 2 x 50
  assert kernels.rotation_sets(1, l2_bytes=50 * 2**20) == kernels.MAX_SETS
  assert kernels.rotation_sets(500 * 2**20, l2_bytes=50 * 2**20) == 1


def test_device_time_runs_every_set():
  calls = []

  def fn(x):
    calls.append(x.shape)  # traced once per set inside the program
    return x * 2.0

  sets = [(jnp.ones((4,)) * i,) for i in range(3)]
  seconds = kernels.device_time(fn, sets, reps=2, trials=1)
  assert seconds > 0 and len(calls) == 3


def _computations(hlo_text):
  """name -> body text of every computation in an HLO module's text."""
  blocks = {}
  for match in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo_text,
                           re.M | re.S):
    blocks[match.group(1)] = match.group(2)
  return blocks


def _reaches_dot(blocks, name, seen=()):
  text = blocks.get(name, "")
  if " dot(" in text:
    return True
  return any(_reaches_dot(blocks, callee, seen + (name,))
             for callee in re.findall(r"(?:calls|to_apply|body)=%?([\w.\-]+)", text)
             if callee not in seen)


def test_repetition_program_keeps_the_call_inside_its_loop():
  """XLA's loop-invariant code motion must not hoist the timed call out of the repetition loop
  (it did before the carry barrier: the loop then re-added one precomputed scalar)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)
  fn = lambda x, y: jnp.dot(x, y)  # noqa: E731
  hlo = kernels.repetition_program(fn, 4).lower([(a, a)]).compile().as_text()
  blocks = _computations(hlo)
  bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
  assert bodies and all(_reaches_dot(blocks, body) for body in bodies), hlo[-3000:]


def test_roofline_closed_forms():
  m, k, n = 16, 1152, 4608
  bf16 = roofline.bf16_dot_floor(m, k, n, H100)
  bytes_moved = 2 * m * k + 2 * k * n + 4 * n + 2 * m * n
  assert bf16["memory_s"] == pytest.approx(bytes_moved / 3.35e12)
  assert bf16["bound"] == "memory"
  vq = roofline.vq_path_floor("vq_splitk", m, k, n, H100)
  # W2: 2 bits per weight -> about 1/8 of the bf16 weight bytes
  assert roofline.vq_weight_bytes(k, n, 256, 4) == k * n // 4 + 256 * 4 * 2
  assert 6 < bf16["floor_s"] / vq["floor_s"] < 8
  big = roofline.vq_path_floor("vq_dequant_dot", 16384, k, n, H100)
  assert big["bound"] == "compute" and big["decode_s"] > 0
  assert big["floor_s"] > roofline.bf16_dot_floor(16384, k, n, H100)["floor_s"]


def test_launch_tail_counts_the_busiest_sm():
  # qkv at M = 4096: 128x128 and 64x128 tiles both leave 7 (14) on the busiest SM where the
  # even share is 6.55 (13.1); the wide tiles 4 of 3.4: the best is 7 / 6.55
  assert roofline.launch_tail(4096, 3456, 132) == pytest.approx(7 * 132 / 864)
  plain = roofline.bf16_dot_floor(4096, 1152, 3456, H100)
  with_tail = roofline.bf16_dot_floor(4096, 1152, 3456, H100, sms=132)
  assert with_tail["compute_s"] == pytest.approx(plain["compute_s"] * 7 * 132 / 864)
  assert with_tail["bound"] == "compute"
  # a whole number of waves: no tail (2 x 132 tiles of 128 x 128)
  assert roofline.launch_tail(128 * 12, 128 * 22, 132) == 1
  # few tiles: a K split spreads them (9 tiles x 4 parts of K = 1152, at least 256 each)
  assert roofline.launch_tail(16, 1152, 132) == pytest.approx(132 / 9)
  assert roofline.launch_tail(16, 1152, 132, 1152) == pytest.approx(132 / 36)
  # token rows: no split (enough tiles); proj at M = 4096: 576 tiles of 64 x 128, 5 / 4.36
  assert roofline.launch_tail(4096, 1152, 132, 1152) == pytest.approx(5 * 132 / 576)
  assert roofline.launch_tail(4096, 3456, 132, 1152) == pytest.approx(7 * 132 / 864)
  # memory-bound shapes keep their byte floor
  small = roofline.bf16_dot_floor(16, 1152, 4608, H100, sms=132)
  assert small["bound"] == "memory" and small["floor_s"] == roofline.bf16_dot_floor(
      16, 1152, 4608, H100)["floor_s"]
  # the design bound's GEMM and the paths' dots pay the same tail: W4A16 qkv's bound is the
  # bf16 dot's floor; the XLA int8 dot's is its FLOP floor at the int8 rate x the same tail
  bound = roofline.two_pass_bound("w4a16", 4096, 1152, 3456, H100, sms=132)
  assert bound["floor_s"] == pytest.approx(with_tail["floor_s"])
  xla = roofline.fp4_path_floor("w4a16", "xla_bf16", 4096, 1152, 3456, H100, sms=132)
  no_tail = roofline.fp4_path_floor("w4a16", "xla_bf16", 4096, 1152, 3456, H100)
  assert xla["floor_s"] - no_tail["floor_s"] == pytest.approx(
      with_tail["floor_s"] - plain["floor_s"])


def test_fp4_roofline_closed_forms():
  # act-quant at K = 1152 with the 36-block: token row as (36, 32), three tokens per 128-row
  # tile; bf16x3 on a bf16 x: one (128, 32) @ (32, 32) dot and, with the Hadamard block's
  # signs (dense_signs), two (128, 128) @ (128, 32) dots per three tokens (three for a general
  # block)
  assert roofline.act_quant_token_flops(1152, 36) == pytest.approx(
      2 * (128 * 32 * 32 + 2 * 128 * 128 * 32) / 3)
  assert roofline.act_quant_token_flops(1152, 36, dense_signs=False) == pytest.approx(
      2 * (128 * 32 * 32 + 3 * 128 * 128 * 32) / 3)
  assert roofline.act_quant_token_flops(1152, 36, "bfloat16") == pytest.approx(
      2 * (128 * 32 * 32 + 128 * 128 * 32) / 3)
  # K = 4608: one token per (36 -> 64, 128) tile
  assert roofline.act_quant_token_flops(4608, 36) == 2 * (64 * 128 * 128 + 2 * 64 * 64 * 128)
  # a general block at K = 4608: bf16 x is split too (act_quant.bf16_signs_fit), three dots
  assert roofline.act_quant_token_flops(4608, 36, dense_signs=False) == 2 * (
      2 * 64 * 128 * 128 + 3 * 64 * 64 * 128)
  assert roofline.act_quant_token_flops(1152, None) == 0
  m, k, n = 4096, 1152, 3456
  act = roofline.act_quant_floor(m, k, 36, H100)
  assert act["memory_s"] == pytest.approx((3 * m * k + 4 * m) / 3.35e12)
  decode = (k * n / 2 + k * n) / 3.35e12  # 4-bit layer read, int8 image written
  dot = max(2 * m * k * n / (2 * 989e12), (m * k + k * n + 4 * n + 2 * m * n) / 3.35e12)
  # decode once + Triton int8 kernel with the scales in its epilogue
  unpacked = roofline.fp4_path_floor("w4a4", "unpacked_triton_int8", m, k, n, H100, 36)
  assert unpacked["floor_s"] == pytest.approx(act["floor_s"] + decode + dot)
  assert unpacked["act_quant_s"] == pytest.approx(act["floor_s"])
  # the XLA int8 dot: the same plus its int32 accumulator written and read back (8 B / output)
  xla = roofline.fp4_path_floor("w4a4", "triton_quant_xla_int8", m, k, n, H100, 36)
  assert xla["floor_s"] - unpacked["floor_s"] == pytest.approx(8 * m * n / 3.35e12)
  # in-loop decode: the 4-bit layer read by the kernel, no decode pass (ALU cost not modelled)
  inloop = roofline.fp4_path_floor("w4a4", "triton_int8", 16, k, n, H100, 36)
  assert inloop["decode_s"] == 0
  assert inloop["floor_s"] - inloop["act_quant_s"] == pytest.approx(
      (16 * k + k * n / 2 + 4 * n + 2 * 16 * n) / 3.35e12)
  # W4A16's XLA path folds the scale into its bf16 layer: no epilogue pass
  assert roofline.fp4_path_floor("w4a16", "xla_bf16", m, k, n, H100)["epilogue_s"] == 0
  # LayerNorm fused into the act-quant: the first dot runs on hi + lo of the float32 rows
  assert roofline.act_quant_token_flops(1152, 36, x_bf16=False) == pytest.approx(
      2 * (2 * 128 * 32 * 32 + 2 * 128 * 128 * 32) / 3)
  fused = roofline.act_quant_floor(m, k, 36, H100, norm_fused=True)
  assert fused["memory_s"] == act["memory_s"]
  assert fused["compute_s"] == pytest.approx(
      m * roofline.act_quant_token_flops(1152, 36, x_bf16=False) / 989e12)
  # the unfused LayerNorm + modulate it replaces: bf16 read + bf16 write
  assert roofline.layer_norm_pass_floor(m, k, H100)["floor_s"] == pytest.approx(
      4 * m * k / 3.35e12)
  with_norm = roofline.fp4_path_floor("w4a4", "unpacked_triton_int8", m, k, n, H100, 36,
                                      norm_fused=True)
  assert with_norm["act_quant_s"] == pytest.approx(fused["floor_s"])
  assert with_norm["gemm_s"] == pytest.approx(unpacked["gemm_s"])


def test_two_pass_bound_closed_forms_and_classification():
  from dit_quant_jax.bench import static_report
  m, k, n = 4096, 1152, 1152
  # W4A4 proj: the act-quant pass at its floor, then the int8 GEMM reading 4-bit weights
  bound = roofline.two_pass_bound("w4a4", m, k, n, H100, 36)
  act = roofline.act_quant_floor(m, k, 36, H100)["floor_s"]
  gemm = max(2 * m * k * n / (2 * 989e12), (m * k + k * n / 2 + 4 * n + 2 * m * n) / 3.35e12)
  assert bound["act_quant_s"] == pytest.approx(act)
  assert bound["floor_s"] == pytest.approx(act + gemm)
  # W4A16 and VQ: the GEMM alone, the weights at their stored width
  assert roofline.two_pass_bound("w4a16", 16, k, n, H100)["floor_s"] == pytest.approx(
      (16 * k * 2 + k * n / 2 + 4 * n + 2 * 16 * n) / 3.35e12)
  vq_bytes = roofline.vq_weight_bytes(k, n, 256, 4)
  assert vq_bytes == k // 4 * n + 256 * 4 * 2
  assert roofline.two_pass_bound("vq", 16, k, n, H100)["floor_s"] == pytest.approx(
      (16 * k * 2 + vq_bytes + 4 * n + 2 * 16 * n) / 3.35e12)
  with pytest.raises(ValueError, match="unknown op"):
    roofline.two_pass_bound("w3a3", m, k, n, H100)
  # Never above a path's floor (the bound has no decode pass and no issue floors) ...
  rows = static_report.target_rows(90, shapes=((1152, 1152), (1152, 3456)))
  assert all(r["bound_s"] <= r["floor_s"] * (1 + 1e-9) for r in rows)
  # ... and the proj miss at M = 4096 is the structure's: even the bound is below 1.6x
  proj = {(r["op"], r["k"], r["n"], r["m"]): r for r in rows}[("w4a4", 1152, 1152, 4096)]
  assert proj["bound_speedup"] < 1.6
  text = "\n".join(static_report.targets_markdown(90, shapes=((1152, 1152),)))
  assert "| no: structure |" in text and "below the target even at the design bound" in text


def test_static_report_l2_term_and_its_sensitivity():
  """The L2 raise only ever raises a floor, grows as the assumed L2 bandwidth shrinks, and is
  gone at l2_scale 0; the markdown states the counts at the other bandwidths."""
  from dit_quant_jax.bench import static_report
  shapes = ((4608, 1152),)
  by_scale = {scale: {(r["op"], r["m"]): r for r in static_report.target_rows(
      90, shapes=shapes, l2_scale=scale)} for scale in (0.0, 0.7, 1.0, 2.0)}
  for key, row in by_scale[1.0].items():
    assert by_scale[0.0][key]["floor_s"] <= row["floor_s"] <= by_scale[0.7][key]["floor_s"]
    assert by_scale[2.0][key]["floor_s"] <= row["floor_s"]
    assert not by_scale[0.0][key]["l2_raised"]
  # fc2 at M = 1024, VQ 128 x 64 split 2: L2-bound at the estimate
  assert by_scale[1.0][("vq", 1024)]["l2_raised"]
  text = "\n".join(static_report.targets_markdown(90, shapes=shapes))
  assert "With the tiles as dispatched and the L2 bandwidth at 0.7x, 1.3x, 2x the estimate" in text


def test_static_report_target_rows():
  from dit_quant_jax.bench import static_report
  rows = static_report.target_rows(90, shapes=((1152, 3456),))
  by_key = {(r["op"], r["m"]): r for r in rows}
  assert by_key[("vq", 16)]["path"] == "vq_splitk" and by_key[("vq", 16)]["speedup"] > 3
  assert by_key[("w4a4", 4096)]["path"] == "triton_int8"
  assert 0 < by_key[("w4a4", 4096)]["act_quant_s"] < by_key[("w4a4", 4096)]["floor_s"]
  # qkv's input is the modulated LayerNorm: fused into the act-quant, and the bf16 side pays
  # the LayerNorm pass
  row = by_key[("w4a4", 4096)]
  norm_s = roofline.layer_norm_pass_floor(4096, 1152, H100)["floor_s"]
  assert row["producer_s"] == pytest.approx(norm_s)
  assert row["bf16_s"] == pytest.approx(
      roofline.bf16_dot_floor(4096, 1152, 3456, H100, sms=132)["floor_s"] + norm_s)
  assert row["speedup"] == pytest.approx(row["bf16_s"] / row["floor_s"])
  text = "\n".join(static_report.targets_markdown(90, shapes=((1152, 3456),)))
  assert ("| w4a4 | >= 1.6x at M >= 4096 | 1152x3456 | 4096 | triton_int8 | LN fused |"
          in text)
  # proj (attention output) keeps a separate act-quant pass
  proj = {(r["op"], r["m"]): r for r in static_report.target_rows(90, shapes=((1152, 1152),))}
  assert proj[("w4a4", 4096)]["producer_s"] == 0


def test_run_rejects_unknown_variant(tmp_path):
  with pytest.raises(ValueError, match="unknown variants"):
    kernels.run(smoke=True, out_dir=str(tmp_path), names=["vq_w9"])


def test_gpu_check_smoke_mode(tmp_path):
  """benchmarks/gpu_check.sh in its CPU smoke mode: every stage logs, the table is written."""
  import subprocess
  import sys
  env = dict(os.environ, SMOKE="1", PYTHON=sys.executable)
  script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")
  run = subprocess.run(["bash", script, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  stages = open(tmp_path / "stages.txt").read()
  assert "device rc=0" in stages and "bench_smoke rc=0" in stages, stages
  # the smoke table (bench/kernels.run via experiments/bench_kernels.py): dispatch, correctness
  # and timed rows of both variants at both smoke shapes
  reports = [name for name in os.listdir(tmp_path) if name.startswith("kernels_smoke_")]
  assert len(reports) == 1, reports
  text = open(tmp_path / reports[0]).read()
  assert "| vq | 64x96 | 8 | vq_splitk |" in text
  assert "- measured L2 reads: " in text  # checks dispatch.L2_BANDWIDTH on a GPU
  rows = [line for line in text.splitlines() if line.startswith("| 64x96 | 8 |")]
  assert {row.split("|")[3].strip() for row in rows} == {"bf16_xla", "vq_w2"}
  assert "| vq_w2 | 8x64x96 | vq_splitk " in text and "| max rel error |" in text
  assert "| NO |" not in text
  speedups = [float(row.split("|")[6]) for row in rows]
  assert all(np.isfinite(speedups)) and speedups[0] == 1.0
  # stage 6: VQ4DiT calibration throughput (tiny DiT here), extrapolated to the budgets
  assert "calibration_smoke rc=0" in stages, stages
  import json
  result = json.load(open(tmp_path / "calibration" / "calibration_throughput.json"))
  assert result["timed_steps"] == 2 and result["steps_per_second"] > 0
  assert result["extrapolated_seconds"]["50000"] == pytest.approx(
      50000 * result["seconds_per_step"])
  assert "steps / s" in open(tmp_path / "calibration" / "calibration_throughput.md").read()


def test_dit_step_estimate_sums_the_block_floors():
  from dit_quant_jax.bench import static_report
  rows = {r["variant"]: r for r in static_report.dit_step_estimate(90)}
  assert rows["bf16"]["speedup"] == 1.0
  # bf16 linears: 28 blocks x (4 token linears at M = 4096 + adaLN at M = 16)
  shapes = [(4096, 1152, 3456), (4096, 1152, 1152), (4096, 1152, 4608), (4096, 4608, 1152),
            (16, 1152, 6912)]
  linears = 28 * sum(roofline.bf16_dot_floor(m, k, n, H100, sms=132)["floor_s"]
                     for m, k, n in shapes)
  assert rows["bf16"]["linears_s"] == pytest.approx(linears)
  assert rows["HQ-DiT W4A4"]["linears_s"] < rows["bf16"]["linears_s"]
  # W4A4 linears: the same blocks through the dispatched paths' floors, qkv / fc1 with the
  # LayerNorm fused into their act-quant
  # LayerNorm fused into their act-quant, each int8 GEMM at least its L2 time
  w4a4 = 0.0
  for m, k, n in shapes:
    floor = roofline.fp4_path_floor(
        "w4a4", "triton_int8", m, k, n, H100, static_report.HADAMARD_ORDER.get(k),
        norm_fused=m == 4096 and (k, n) in static_report.LN_FED_SHAPES, sms=132)
    dot_s = floor["gemm_s"] - floor["decode_s"] - floor["epilogue_s"]
    l2_s = static_report.gemm_l2_seconds("w4a4", "triton_int8", m, k, n, 90)
    w4a4 += 28 * (floor["floor_s"] + max(0.0, l2_s - dot_s))
  assert rows["HQ-DiT W4A4"]["linears_s"] == pytest.approx(w4a4)
  assert all(r["attention_s"] == rows["bf16"]["attention_s"] for r in rows.values())
  # two LayerNorm passes per block, except where the act-quant fuses them
  norm_s = 28 * 2 * roofline.layer_norm_pass_floor(4096, 1152, H100)["floor_s"]
  assert rows["bf16"]["norms_s"] == pytest.approx(norm_s) == rows["VQ W2"]["norms_s"]
  assert rows["HQ-DiT W4A4"]["norms_s"] == 0
  # the GELU pass over fc1's output: paid by bf16 and VQ, in fc1's epilogue on the FP4 paths
  gelu_s = 28 * roofline.gelu_pass_floor(4096, 4608, H100)["floor_s"]
  assert gelu_s == pytest.approx(28 * 4096 * 4608 * 4 / H100.bandwidth)
  assert rows["bf16"]["gelu_s"] == pytest.approx(gelu_s) == rows["VQ W2"]["gelu_s"]
  # FP4: fused into fc1's epilogue, 1 MUFU (tanh) per output element at 16 per SM per clock
  epilogue_s = 28 * 4096 * 4608 / (16 * 132 * 1.83e9)
  assert rows["HQ-DiT W4A4"]["gelu_s"] == pytest.approx(epilogue_s) == rows["HQ-DiT W4A8"]["gelu_s"]
  assert epilogue_s < gelu_s / 2
  assert rows["bf16"]["step_s"] == pytest.approx(
      rows["bf16"]["linears_s"] + rows["bf16"]["attention_s"] + norm_s + gelu_s)


def test_ln_variants_are_timed_at_the_layernorm_fed_shapes_only():
  assert (kernels._times_at("bf16_ln", 4096, 1152, 3456)
          and kernels._times_at("fp4_w4a4_ln", 4096, 1152, 4608))
  assert not kernels._times_at("fp4_w4a4_ln", 4096, 1152, 1152)  # proj: its input is attention's
  assert not kernels._times_at("bf16_ln", 4096, 4608, 1152)  # fc2: GELU's
  assert kernels._times_at("fp4_w4a4_ln", 8, 64, 96)  # any non-DiT shape (smoke runs)
  assert kernels._times_at("vq_w2", 16, 1152, 1152)
  # the GEMM-only variants: token-row M only, Mosaic where it lowers and the tiles fit
  assert not kernels._times_at("gemm_triton_int8", 16, 1152, 1152)
  assert kernels._times_at("gemm_triton_int8", 4096, 1152, 1152)
  from dit_quant_jax.kernels import fp4_mosaic
  assert kernels._times_at("gemm_mosaic_int8", 4096, 1152, 1152) == fp4_mosaic.available()
  assert not kernels._times_at("gemm_mosaic_fp8", 1032, 1152, 1152)  # M not a tile multiple
  # the best tiled launch: timed where the dispatched one runs stream-K (an H100's table)
  from dit_quant_jax.kernels import common
  with common.target_gpu():
    assert kernels._times_at("vq_w2_no_stream_k", 1024, 4608, 1152)
    assert not kernels._times_at("vq_w2_no_stream_k", 16, 4608, 1152)  # the split-K GEMV
    assert not kernels._times_at("vq_w2_no_stream_k", 4096, 1152, 4608)  # 1152 tiles: tiled
    assert kernels._times_at("fp4_w4a16_no_stream_k", 1024, 4608, 1152)
    assert not kernels._times_at("fp4_w4a16_no_stream_k", 4096, 1152, 4608)
    # the 128-column small-M launches: where the dispatched one is narrower (proj at M = 16)
    assert kernels._times_at("vq_w2_splitk_128", 16, 1152, 1152)
    assert kernels._times_at("fp4_w4a16_splitk_128", 16, 1152, 1152)
    assert not kernels._times_at("vq_w2_splitk_128", 16, 1152, 3456)  # 128 columns already
    assert not kernels._times_at("fp4_w4a16_splitk_128", 16, 1152, 6912)
    assert not kernels._times_at("vq_w2_splitk_128", 1024, 1152, 1152)  # the tiled kernel
    assert not kernels._times_at("fp4_w4a16_splitk_128", 1024, 1152, 1152)
  assert not kernels._times_at("vq_w2_no_stream_k", 1024, 4608, 1152)  # CPU: XLA at M > 256


def test_gemm_variants_pass_the_correctness_check():
  """The GEMM-only variants (interpret mode here: Triton's, and Mosaic GPU's interpreter where
  this jax has one) against the XLA dot on the same pre-quantized x."""
  import jax
  from dit_quant_jax.kernels import fp4_mosaic
  rows = kernels.correctness_pass((128, 256, 128), True, jax.random.PRNGKey(3),
                                  names=kernels.GEMM_VARIANTS)
  checked = {row["kernel"] for row in rows}
  assert {"gemm_triton_int8", "gemm_triton_int8_inloop"} <= checked
  assert ("gemm_mosaic_int8" in checked) == fp4_mosaic.available()
  assert all(row["ok"] for row in rows), rows


SASS_LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   LOP3.LUT R6, R7, 0xf, RZ, 0xc0, !PT ;
        /*0028*/                   IMAD.MOV.U32 R11, RZ, RZ, R6 ;
        /*002c*/                   HMUL2.BF16_V2 R12, R11, R11 ;
        /*0030*/                   SHF.R.U32.HI R8, RZ, 0x4, R7 ;
        /*0040*/                   I2F.S16 R9, R6 ;
        /*0050*/                   FADD R10, R9, R9 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0070*/                   UIADD3 UR4, UR4, 0x80, URZ ;
        /*0080*/               @P0 BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
"""


def test_sass_loop_classes_and_issue_floor():
  from dit_quant_jax.bench import triton_ptx
  loop = triton_ptx.sass_loop_classes(SASS_LOOP)
  # the loop: LDGSTS, LOP3, IMAD.MOV, HMUL2, SHF, I2F, FADD, HGMMA, UIADD3, BRA (MOV / EXIT
  # outside it): IMAD on the FMA pipe, not the ALU's "int"; HMUL2 the packed-half class
  assert loop == dict(issue=10, int=2, imad=1, fp32=1, fp16x2=1, convert=1, memory=1, tensor=1,
                      uniform=2)
  floor = triton_ptx.issue_floor_seconds(loop, num_warps=8, programs=264, trips=9, cc=90)
  warp_iterations = 264 * 9 * 8
  # the issue slots bound it: 10 instructions at 4 per clock per SM, vs 1 conversion at 0.5
  assert floor["issue_bound"] == "issue"
  assert floor["issue_floor_s"] == pytest.approx(warp_iterations * 10 / (132 * 4 * 1.83e9))
  assert floor["convert_s"] == pytest.approx(warp_iterations * 1 / (132 * 0.5 * 1.83e9))
  # sm_90's FMA pipes: IMAD + FP32 + 2 x FP16x2 = 4 warp-instructions at 4 per clock
  assert floor["fma_s"] == pytest.approx(warp_iterations * 4 / (132 * 4 * 1.83e9))
  assert floor["int_s"] == pytest.approx(warp_iterations * 2 / (132 * 2 * 1.83e9))
  sm80 = triton_ptx.issue_floor_seconds(loop, num_warps=8, programs=264, trips=9, cc=80)
  warp_iterations = 3 * 108 * 9 * 8  # 264 programs on 108 SMs: the busiest runs 3
  assert sm80["fma_s"] == pytest.approx(warp_iterations * 2 / (108 * 2 * 1.41e9))  # IMAD + FP32
  assert sm80["fp16x2_s"] == pytest.approx(warp_iterations * 1 / (108 * 2 * 1.41e9))
  assert triton_ptx.sass_loop_classes("        /*0000*/                   EXIT ;") == {}  # no loop


NESTED_SASS = """
.L_x_1:
        /*0000*/                   IMAD R2, R3, R4, R5 ;
.L_x_2:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/               @P0 BRA `(.L_x_2) ;
        /*0040*/                   STG.E [R6], R24 ;
.L_x_3:
        /*0050*/                   LDG.E R8, desc[UR4][R10.64] ;
        /*0060*/                   FADD R9, R9, R8 ;
        /*0070*/                   IADD3 R10, R10, 0x4, RZ ;
        /*0080*/                   IADD3 R11, R11, 0x1, RZ ;
        /*0090*/                   ISETP.NE.AND P1, PT, R11, R12, PT ;
        /*00a0*/               @P1 BRA `(.L_x_3) ;
        /*00b0*/               @P2 BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
"""


def test_main_loop_is_the_innermost_tensor_core_loop():
  """A stream-K kernel's SASS / PTX: a loop over tiles holding the K loop (tensor-core
  instructions) and a longer fix-up loop without them: the main loop is the K loop."""
  from dit_quant_jax.bench import triton_ptx
  loop = triton_ptx.sass_loop_classes(NESTED_SASS)
  assert loop["tensor"] == 1 and loop["issue"] == 3, loop  # LDGSTS, HGMMA, BRA
  ptx = "\n".join([
      "$L__BB0_1:", "add.s32 %r1, %r1, 1;",
      "$L__BB0_2:", "cp.async.cg.shared.global [%r2], [%rd1], 16;",
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd2, %rd3;",
      "@%p1 bra $L__BB0_2;",
      "$L__BB0_3:", "ld.global.f32 %f2, [%rd4];", "add.f32 %f3, %f3, %f2;",
      "add.s64 %rd4, %rd4, 4;", "add.s32 %r5, %r5, 1;", "setp.ne.s32 %p2, %r5, %r6;",
      "@%p2 bra $L__BB0_3;",
      "@%p3 bra $L__BB0_1;"])
  body = triton_ptx.k_loop_body(ptx)
  assert "wgmma" in body and "ld.global" not in body, body
  assert triton_ptx.per_k_step_counts(ptx)["step_cp_async"] == 1
  # without tensor-core loops: the longest region, as before
  plain = triton_ptx.sass_loop_classes(NESTED_SASS.replace(
      "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24", "FMUL R24, R24, R25"))
  assert plain["issue"] == 12, plain  # .L_x_1's whole body


def test_alternative_launches_pass_the_correctness_check():
  """The benchmark's tiled launches without stream-K and its 128-column small-M launches
  (timed beside the dispatched choices) compute the same function as their references
  (interpret mode here), and the 128-column ones are the small-M kernels with 128 columns."""
  import jax
  names = ("vq_w2_no_stream_k", "fp4_w4a16_no_stream_k", "vq_w2_splitk_128",
           "fp4_w4a16_splitk_128")
  rows = kernels.correctness_pass((24, 256, 96), True, jax.random.PRNGKey(5), names=names)
  assert {row["kernel"] for row in rows} == set(names)
  assert all(row["ok"] for row in rows), rows
  for row in rows:
    if row["kernel"].endswith("_splitk_128"):
      assert "bn128" in row["path"].split(), row


def test_issue_floor_counts_the_busiest_sm():
  from dit_quant_jax.bench import triton_ptx
  loop = dict(issue=100, int=10, fp32=10, convert=0, memory=10)
  kwargs = dict(num_warps=4, trips=3, cc=90)
  full = triton_ptx.issue_floor_seconds(loop, programs=132, **kwargs)
  one_more = triton_ptx.issue_floor_seconds(loop, programs=133, **kwargs)
  few = triton_ptx.issue_floor_seconds(loop, programs=33, **kwargs)
  # one program per SM, 4 warps x 3 trips x 100 instructions at 4 per clock
  assert full["issue_floor_s"] == pytest.approx(4 * 3 * 100 / (4 * 1.83e9)) and full["tail"] == 1
  # one program over a full wave: one SM runs two, the launch takes twice as long
  assert one_more["issue_floor_s"] == pytest.approx(2 * full["issue_floor_s"])
  # a quarter of the SMs busy: no faster than one program alone
  assert few["issue_floor_s"] == pytest.approx(full["issue_floor_s"]) and few["tail"] == 4


PTX_LOOP = """
$L__BB0_1:
\twgmma.fence.sync.aligned;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, p, 1, 1, 0, 1;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd3, %rd4, p, 1, 1, 0, 1;
\twgmma.commit_group.sync.aligned;
\twgmma.wait_group.sync.aligned 0;
\tmma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32 {%r2}, {%r3}, {%r4}, {%r2};
\t@%p1 bra $L__BB0_1;
"""


UNROLLED_SASS = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   IMMA.16832.S8.S8.SAT R12, R4.ROW, R8.COL, RZ ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64+0x40] ;
        /*0030*/                   IMMA.16832.S8.S8.SAT R12, R4.ROW, R8.COL, R12 ;
        /*0040*/                   STG.E [R6], R12 ;
        /*0050*/                   EXIT ;
.L_x_0:
        /*0060*/                   BRA `(.L_x_0);
"""


def test_an_unrolled_k_loop_counts_the_whole_kernel_once():
  """A K loop with a static trip count that ptxas unrolled (fp4_mma int8 at M = 16, split 1
  of 9 K tiles): no loop holds the tensor-core instructions, so the whole kernel is counted
  (flagged unrolled: the static report counts it as one trip), not the trailing self-branch;
  its PTX body is the whole kernel too (loads and MMA of every step)."""
  from dit_quant_jax.bench import static_report, triton_ptx
  loop = triton_ptx.sass_loop_classes(UNROLLED_SASS)
  assert loop["unrolled"] == 1 and loop["tensor"] == 2 and loop["issue"] == 7, loop
  assert "unrolled" not in triton_ptx.sass_loop_classes(NESTED_SASS)
  ptx = "\n".join(["ld.global.v4.u32 {%r1}, [%rd1];",
                   "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32 {%r2}, {%r3};",
                   "ld.global.v4.u32 {%r1}, [%rd2];",
                   "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32 {%r2}, {%r3};",
                   "$L__BB0_1:", "@%p1 bra $L__BB0_1;"])
  counts = triton_ptx.per_k_step_counts(ptx)
  assert counts["step_mma"] == 2 and counts["step_ld_global_v4"] == 2, counts
  stats = {f"sass_{key}": value for key, value in loop.items()}
  assert "unrolled" in static_report._sass_text(stats)


def test_loop_mma_work_counts_flops_per_cta_and_the_wait():
  from dit_quant_jax.bench import triton_ptx
  work = triton_ptx.loop_mma_work(PTX_LOOP, num_warps=8)
  # 2 wgmma per warpgroup x 2 warpgroups; 1 mma.sync per warp x 8 warps
  assert work["loop_mma_flops_16bit"] == 2 * (2 * 64 * 128 * 16) * 2
  assert work["loop_mma_flops_8bit"] == 8 * (2 * 16 * 8 * 32)
  assert work["loop_wgmma_waits_all"]
  assert not triton_ptx.loop_mma_work(PTX_LOOP.replace("aligned 0", "aligned 1"), 8)[
      "loop_wgmma_waits_all"]


def test_ctas_per_sm_is_the_tighter_of_registers_and_shared_memory():
  from dit_quant_jax.bench import triton_ptx
  assert triton_ptx.ctas_per_sm(104, 8, 98304, 90) == 2  # 104 x 256 threads; 2 x 96 KB
  assert triton_ptx.ctas_per_sm(128, 8, 196608, 90) == 1  # shared memory
  assert triton_ptx.ctas_per_sm(209, 8, 65536, 90) == 1  # registers (> 128 per thread)
  assert triton_ptx.ctas_per_sm(64, 4, 16384, 90) == 8


def test_issue_floor_adds_the_tensor_time_only_when_nothing_overlaps_it():
  from dit_quant_jax.bench import triton_ptx
  loop = dict(issue=200, int=100, fp32=0, convert=0, memory=10)
  mma = dict(loop_mma_flops_16bit=2.0 * 128 * 128 * 128, loop_mma_flops_8bit=0.0,
             loop_wgmma_waits_all=True, ctas_per_sm=1)
  kwargs = dict(num_warps=8, programs=864, trips=9, cc=90)
  plain = triton_ptx.issue_floor_seconds(loop, **kwargs)
  # 864 programs on 132 SMs: the busiest runs 7 (the even share is 6.5)
  tensor_s = 7 * 9 * (2.0 * 128 ** 3) / (989e12 / 1.83e9 / 132) / 1.83e9
  assert plain["tail"] == pytest.approx(7 * 132 / 864)
  serial = triton_ptx.issue_floor_seconds(loop, mma=mma, **kwargs)
  assert serial["tensor_s"] == pytest.approx(tensor_s) and serial["mma_serial"]
  assert serial["issue_floor_s"] == pytest.approx(tensor_s + plain["issue_floor_s"])
  overlapped = triton_ptx.issue_floor_seconds(loop, mma=dict(mma, ctas_per_sm=2), **kwargs)
  assert overlapped["issue_floor_s"] == pytest.approx(max(tensor_s, plain["issue_floor_s"]))
  assert not overlapped["mma_serial"]


def test_l2_time_of_the_pallas_gemms_closed_form():
  """gemm_l2_seconds: every program of the dispatched tiles loads its x rows and weight columns
  over K from L2 (plus the bf16 output and, with a K split, the partials written and read
  back), at dispatch.L2_BANDWIDTH; XLA GEMMs: None."""
  from dit_quant_jax.bench import static_report
  from dit_quant_jax.kernels import dispatch
  from dit_quant_jax.kernels import fp4_matmul
  # W4A4 int8 in-loop kernel, proj at M = 4096: 32 x 9 tiles of 128 x 128, 1 B x, 0.5 B weights
  want = (32 * 9 * 1152 * (128 * 1 + 128 * 0.5) + 2 * 4096 * 1152) / 11.4e12
  got = static_report.gemm_l2_seconds("w4a4", "triton_int8", 4096, 1152, 1152, 90)
  assert got == pytest.approx(want)
  # the decoded-image kernel reads 1 B weights; W4A16's bf16 kernel 2 B x
  got = static_report.gemm_l2_seconds("w4a4", "unpacked_triton_int8", 4096, 1152, 1152, 90)
  assert got == pytest.approx((32 * 9 * 1152 * (128 + 128) + 2 * 4096 * 1152) / 11.4e12)
  # VQ at fc2, M = 1024: 128 x 128 tiles stream-K over 264 programs: 72 tiles x 72 K tiles
  # in shares of 20 (260 programs); every piece that is not a whole tile writes a 128 x 128
  # float32 partial and the tile's last program reads it back
  config = dispatch.default_config("vq", "vq_tiled", 1024, 4608, 1152, "hopper")
  assert (config["block_n"], config["split_k"], config["stream_k"]) == (128, 1, 264)
  pieces = 0
  for program in range(260):
    start, end = 20 * program, min(20 * program + 20, 72 * 72)
    for tile in range(start // 72, (end - 1) // 72 + 1):
      pieces += (max(start, 72 * tile), min(end, 72 * tile + 72)) != (72 * tile, 72 * tile + 72)
  want = (8 * 9 * 4608 * (128 * 2 + 128 * 0.25) + 2 * 4 * 128 * 128 * pieces
          + 2 * 1024 * 1152) / 11.4e12
  got = static_report.gemm_l2_seconds("vq", "vq_tiled", 1024, 4608, 1152, 90)
  assert got == pytest.approx(want)
  # W4A16 there: stream-K too, K tiles of 128 (72 tiles x 36 in shares of 10, 260 programs),
  # staged epilogue: every piece, whole tiles included, goes through a slot
  config = fp4_matmul.default_mma_config(1024, 1152, 4608, "hopper", "bf16", predecode=False)
  assert (config["block_n"], config["stream_k"], config["staged_epilogue"]) == (128, 264, True)
  pieces = 0
  for program in range(260):
    start, end = 10 * program, min(10 * program + 10, 72 * 36)
    pieces += (end - 1) // 36 - start // 36 + 1
  want = (8 * 9 * 4608 * (128 * 2 + 128 * 0.5) + 2 * 4 * 128 * 128 * pieces
          + 2 * 1024 * 1152) / 11.4e12
  got = static_report.gemm_l2_seconds("w4a16", "triton_bf16", 1024, 4608, 1152, 90)
  assert got == pytest.approx(want)
  assert static_report.gemm_l2_seconds("w4a8", "xla_fp8", 4096, 1152, 1152, 90) is None
  assert static_report.gemm_l2_seconds("vq", "vq_dequant_dot", 4096, 1152, 1152, 80) is None
  assert dispatch.L2_BANDWIDTH["ampere"] == pytest.approx(5120 * 1.41e9, rel=0.01)


def test_issue_floors_raise_the_triton_parts_only():
  from dit_quant_jax.bench import static_report
  m, k, n = 4096, 1152, 3456
  base = roofline.fp4_path_floor("w4a4", "unpacked_triton_int8", m, k, n, H100, 36,
                                 norm_fused=True)
  issue = {("quantize_rows_norm_int8", m, k, None): base["act_quant_s"] + 5e-6,
           ("fp4_mma_unpacked_int8", m, k, n): 1e-9}  # below the dot's floor: no change
  raised = static_report.with_issue_floors(base, "w4a4", "unpacked_triton_int8", m, k, n,
                                           True, issue)
  assert raised["issue_raised"]
  assert raised["act_quant_s"] == pytest.approx(base["act_quant_s"] + 5e-6)
  assert raised["gemm_s"] == pytest.approx(base["gemm_s"])
  assert raised["floor_s"] == pytest.approx(base["floor_s"] + 5e-6)
  # an XLA act-quant path (W4A8 xla_fp8) is not raised by the Triton act-quant's floor
  xla = roofline.fp4_path_floor("w4a8", "xla_fp8", m, k, n, H100, 36)
  assert static_report.with_issue_floors(xla, "w4a8", "xla_fp8", m, k, n, False, issue) == xla
  rows = [dict(name=f"quantize_rows_norm_int8 M={m} K={k} a=36", stats=[
      dict(issue_floor_s=3e-6)]), dict(name=f"vq_w2 {k}x{n} M=16", stats=[dict(issue_floor_s=1e-6)]),
      dict(name="fp4_mma_int8 M=16 K=1152 N=3456", stats=[dict(registers=1)])]
  assert static_report.issue_floors(rows) == {("quantize_rows_norm_int8", m, k, None): 3e-6,
                                               ("vq", 16, k, n): 1e-6}
