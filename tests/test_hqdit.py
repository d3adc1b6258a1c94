"""HQ-DiT transform end to end on a tiny DiT, calibration statistics, the FP4Weight type,
format selection and the configs."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.calibrate import act_stats
from dit_quant_jax.models.dit import create_model, init_params
from dit_quant_jax.models.layers import LINEAR_INPUTS
from dit_quant_jax.quant import formats, hadamard, hqdit, qtensor, rules

CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "hqdit.py"
STEPS, BATCH = 2, 2


def load_config(arg):
  spec = importlib.util.spec_from_file_location("hqdit_config", CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def grid_round_reference(values, fmt_name):
  mags = np.asarray(formats.get_format(fmt_name).magnitudes, np.float64)
  a = np.minimum(np.abs(values), mags[-1])
  idx = np.argmin(np.abs(a[..., None] - mags), axis=-1)  # random data: no exact ties
  return np.sign(values) * mags[idx]


@pytest.fixture(scope="module")
def tiny():
  model = create_model("DiT-S/4", input_size=16, in_channels=1, num_classes=10, depth=2)
  params = jax.jit(lambda key: init_params(model, key))(jax.random.PRNGKey(0))
  # adaLN-Zero initialises modulation and final layer to zero: perturb every leaf so that
  # every layer carries signal (numpy: no per-shape compilation).
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(np.asarray(leaf) + 0.02 * rng.standard_normal(leaf.shape), jnp.float32),
      params)
  traj = dict(x=rng.standard_normal((STEPS, BATCH, 16, 16, 1)).astype(np.float32),
              t=np.repeat(np.array([[900], [100]], np.int32), BATCH, axis=1),
              y=rng.integers(0, 11, (STEPS, BATCH)).astype(np.int32))
  stats = act_stats.collect_layer_stats(model, params, traj, hessian=True, samples_per_step=48,
                                        max_samples=80)
  apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  inputs = tuple(jnp.asarray(traj[k][0]) for k in ("x", "t", "y"))
  reference = apply(params, *inputs)
  return dict(model=model, params=params, traj=traj, stats=stats, apply=apply, inputs=inputs,
              reference=reference)


def relative_output_error(tiny, qparams):
  out = tiny["apply"](qparams, *tiny["inputs"])
  assert np.all(np.isfinite(np.asarray(out)))
  return float(jnp.linalg.norm(out - tiny["reference"]) / jnp.linalg.norm(tiny["reference"]))


def test_act_stats_match_direct_computation(tiny):
  model, params, traj = tiny["model"], tiny["params"], tiny["traj"]
  path = "blocks_1/mlp/fc2"
  rows = []
  for s in range(STEPS):
    _, state = model.apply({"params": params}, *(jnp.asarray(traj[k][s]) for k in ("x", "t", "y")),
                           mutable=[LINEAR_INPUTS])
    x = np.asarray(rules.get_path(state[LINEAR_INPUTS], path)["x"][0], np.float64)
    rows.append(x.reshape(-1, x.shape[-1]))
  stats = tiny["stats"][path]
  all_rows = np.concatenate(rows)
  assert stats.num_rows == all_rows.shape[0]
  # (jit vs eager float32: last-bit differences)
  np.testing.assert_allclose(stats.channel_absmax, np.abs(all_rows).max(0), rtol=1e-5)
  np.testing.assert_allclose(stats.step_absmax, [np.abs(r).max() for r in rows], rtol=1e-5)
  np.testing.assert_allclose(stats.hessian, 2 * all_rows.T @ all_rows / all_rows.shape[0],
                             rtol=1e-4, atol=1e-4 * np.abs(stats.hessian).max())
  per_step = min(48, all_rows.shape[0] // STEPS)  # samples_per_step capped by rows per step
  assert stats.samples.shape == (min(80, STEPS * per_step), 1536)
  # every kept sample is one of the layer's input rows
  distance = np.abs(stats.samples[:, None, :] - all_rows[None, :, :].astype(np.float32)).max(-1).min(1)
  assert distance.max() < 1e-5 * np.abs(all_rows).max()
  np.testing.assert_array_equal(stats.step_timesteps, [900, 100])
  drift = act_stats.drift_report(tiny["stats"])
  assert drift["max"] >= drift["median"] >= 1.0
  assert stats.drift == pytest.approx(max(stats.step_absmax) / min(stats.step_absmax))


@pytest.mark.parametrize("setting,bound", [("w8a8", 0.03)])
def test_eight_bit_close_to_fp(tiny, setting, bound):
  qparams, report = hqdit.quantize_from_config(tiny["model"], tiny["params"], load_config(setting),
                                               tiny["stats"])
  assert relative_output_error(tiny, qparams) < bound
  assert report["quantized_layers_bytes"] < 0.3 * report["quantized_layers_fp32_bytes"]


def test_w4a4_pipeline_types_and_report(tiny):
  """Full W4A4 on every block linear (GPTQ off here to save compile time; GPTQ inside
  quantize_layer is tested on a synthetic layer below)."""
  config = load_config("w4a4")
  config.attn_quant.enabled = True
  config.gptq.enabled = False
  qparams, report = hqdit.quantize_from_config(tiny["model"], tiny["params"], config, tiny["stats"])
  paths = rules.select_layers(tiny["params"])
  assert len(paths) == 10
  for path in paths:
    weight = rules.get_path(qparams, path + "/kernel")
    assert isinstance(weight, hqdit.FP4Weight)
    assert weight.format_name in formats.FP4_FORMATS
    assert weight.act_format in formats.FP4_FORMATS and weight.act_granularity == "per_token"
    assert weight.hadamard_signs is not None and weight.hadamard_seed is not None
    assert weight.hadamard_kind == "hadamard"  # the default block: the kernel's sign form
    assert weight.packed_codes.dtype == jnp.uint8
    assert weight.layout == "k_tiles"  # the FP4 kernels' tiled layout, K padded to 128
    assert weight.packed_codes.shape == (weight.shape[1], -(-weight.shape[0] // 128) * 64)
    assert report["layers"][path]["gptq"] is False
    assert 0 < report["layers"][path]["output_rel_error"] < 0.5
  for block in ("blocks_0", "blocks_1"):
    for name in hqdit.ATTN_QUANT_NAMES:
      assert isinstance(qparams[block]["attn"][name], hqdit.AttnActQuantizer)
  # untouched layers keep dense kernels
  assert isinstance(qparams["final_layer"]["linear"]["kernel"], jax.Array)
  assert isinstance(qparams["t_embedder"]["mlp_0"]["kernel"], jax.Array)
  error = relative_output_error(tiny, qparams)
  assert 0 < error < 0.5
  assert sum(report["weight_formats"].values()) == 10
  assert "act_drift" in report and report["mean_output_rel_error"] > 0
  # 4-bit codes + per-channel scales: about 1/8 of float32
  assert report["quantized_layers_bytes"] < 0.15 * report["quantized_layers_fp32_bytes"]


def test_fp4_weight_linear_matches_reference():
  rng = np.random.default_rng(5)
  k, n = 384, 16
  kernel = rng.standard_normal((k, n)).astype(np.float32) * 0.05
  x = rng.standard_normal((7, k)).astype(np.float32)
  x[:, 3] *= 30  # an outlier channel
  config = load_config("w4a4")
  config.gptq.enabled = False
  config.act.format = "e2m1"
  config.weight.format = "e2m1"
  config.act.clip_search = False
  weight, _ = hqdit.quantize_layer(kernel, config, None, layer_seed=9)
  transform = hadamard.make_transform(k, 9)
  q = hadamard.dense_matrix(transform)
  np.testing.assert_array_equal(np.asarray(weight.hadamard_signs), transform.signs)
  stored = np.asarray(weight.dequantize(), np.float64)
  np.testing.assert_allclose(np.asarray(weight.effective_kernel()), q @ stored, atol=1e-5)
  xq = x.astype(np.float64) @ q
  scale = np.abs(xq).max(-1, keepdims=True) / 6.0
  expected = (grid_round_reference(xq / scale, "e2m1") * scale) @ stored
  got = np.asarray(jax.jit(lambda w, x: w.linear(x, None))(weight, x))
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
  # the stored kernel is Q^T W quantized: close to the original in the original basis
  assert np.linalg.norm(q @ stored - kernel) < 0.2 * np.linalg.norm(kernel)


def test_gptq_with_hadamard_beats_rtn_with_hadamard():
  """GPTQ inside quantize_layer uses the Hessian of the transformed inputs Q^T H Q; with a
  wrong transform it would not beat RTN on the same (transformed) grid."""
  from dit_quant_jax.calibrate.act_stats import LayerStats

  rng = np.random.default_rng(8)
  k, n, rows = 64, 32, 256
  x = rng.standard_normal((rows, k)) @ (rng.standard_normal((k, k)) / 8 + np.eye(k))
  x[:, :2] *= 5
  kernel = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
  stats = LayerStats(np.abs(x).max(0).astype(np.float32), np.ones(2, np.float32), np.arange(2),
                     x.astype(np.float32), (2 * x.T @ x / rows).astype(np.float32), rows)
  config = load_config("w4a16")
  config.weight.format = "e2m1"
  config.gptq.block_size = 16
  _, with_gptq = hqdit.quantize_layer(kernel, config, stats, layer_seed=1)
  config.gptq.enabled = False
  _, without = hqdit.quantize_layer(kernel, config, stats, layer_seed=1)
  assert with_gptq["output_rel_error"] < 0.8 * without["output_rel_error"]
  assert with_gptq["hadamard_block"] == "hadamard 1x1"


def test_fp4_weight_pytree_and_registry():
  weight = hqdit.FP4Weight.from_codes(jnp.asarray(np.random.default_rng(6).integers(0, 16, (6, 3)), jnp.uint8),
                                      jnp.ones((3,)), "e3m0", act_format="e2m1",
                                      act_granularity="per_token")
  assert qtensor.QUANTIZED_TYPES["FP4Weight"] is hqdit.FP4Weight
  assert qtensor.QUANTIZED_TYPES["AttnActQuantizer"] is hqdit.AttnActQuantizer
  assert isinstance(weight, qtensor.QuantizedWeight)
  leaves, treedef = jax.tree_util.tree_flatten(weight)
  assert len(leaves) == 2  # packed codes, scale (no Hadamard, no static activation scale)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.format_name == "e3m0" and rebuilt.shape == (6, 3)
  static = {f: getattr(weight, f) for f in ("shape", "format_name", "hadamard_seed", "act_format",
                                            "act_granularity", "act_clip_ratio")}
  json.dumps(static)
  # stored bytes: K = 6 pads to one 128-code tile, 64 bytes per output channel
  assert weight.nbytes_breakdown() == {"codes": 3 * 64, "scale": 12}
  with pytest.raises(ValueError, match="granularity"):
    hqdit.FP4Weight.from_codes(jnp.zeros((4, 2), jnp.uint8), jnp.ones((2,)), "e2m1",
                               act_granularity="per_block")
  with pytest.raises(ValueError, match="unknown number format"):
    hqdit.FP4Weight.from_codes(jnp.zeros((4, 2), jnp.uint8), jnp.ones((2,)), "e7m7")


@pytest.mark.parametrize("spread,expected", [(5.0, "e1m2"), (10.0, "e2m1"), (40.0, "e3m0")])
def test_ratio_format_selection(spread, expected):
  """Channels k peak at c_k in [1, spread] in every token: the statistic is spread exactly."""
  rng = np.random.default_rng(7)
  peaks = np.linspace(1.0, spread, 12)
  tokens = peaks[None, :] * rng.uniform(0.2, 1.0, (30, 12))
  tokens[np.arange(30) % 12, np.arange(30) % 12] = 0  # keep shapes irregular
  tokens[0] = peaks  # every channel reaches its peak in token 0 ...
  tokens[1:, -1] = peaks[-1]  # ... and the strongest channel sets every token's max
  ratio = hqdit.max_min_ratio(tokens * rng.choice([-1, 1], tokens.shape), group_axis=0)
  assert ratio == pytest.approx(spread)
  assert hqdit.select_by_ratio(ratio, formats.FP4_FORMATS) == expected
  # a kernel (K, N) with output columns as groups: the same statistic on the transpose
  assert hqdit.max_min_ratio(tokens.T, group_axis=1) == pytest.approx(spread)
  with pytest.raises(ValueError, match="thresholds"):
    hqdit.select_by_ratio(ratio, formats.FP4_FORMATS, thresholds=(12.0, 7.0))


def test_mse_selection_and_static_activation_scales(tiny):
  config = load_config("w4a4")
  config.layer_patterns = [r"blocks_\d/attn/proj"]
  config.weight.select = "mse"
  config.act.select = "mse"
  config.act.granularity = "per_tensor"
  config.gptq.enabled = False
  qparams, report = hqdit.quantize_params(tiny["params"], tiny["model"], config, tiny["stats"])
  for path in ("blocks_0/attn/proj", "blocks_1/attn/proj"):
    layer = report["layers"][path]
    assert layer["weight_format"] == min(layer["weight_format_mse"], key=layer["weight_format_mse"].get)
    assert layer["act_format"] == min(layer["act_format_mse"], key=layer["act_format_mse"].get)
    weight = rules.get_path(qparams, path + "/kernel")
    assert weight.act_granularity == "per_tensor" and weight.act_scale.shape == ()
    assert layer["act_drift"] >= 1.0
  assert relative_output_error(tiny, qparams) < 0.3


def test_data_free_and_errors(tiny):
  config = load_config("w4a4")
  with pytest.raises(ValueError, match="Hessian"):
    hqdit.quantize_params(tiny["params"], tiny["model"], config, None)
  config.gptq.enabled = False
  config.layer_patterns = [r"blocks_1/attn/proj"]
  qparams, report = hqdit.quantize_params(tiny["params"], tiny["model"], config, None)
  layer = report["layers"]["blocks_1/attn/proj"]
  assert layer["act_format"] == "e2m1" and "no calibration" in layer["act_format_note"]
  config.layer_patterns = [r"nothing/\d+"]
  with pytest.raises(ValueError, match="no linear layer"):
    hqdit.quantize_params(tiny["params"], tiny["model"], config, None)
  config.layer_patterns = [r"blocks_1/attn/proj"]
  config.weight.select = "median"
  with pytest.raises(ValueError, match="selection method"):
    hqdit.quantize_params(tiny["params"], tiny["model"], config, None)


def test_configs():
  spec = importlib.util.spec_from_file_location("hqdit_config", CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for setting in module.SETTINGS:
    config = load_config(setting)
    assert config.name == setting
  assert load_config("sq_w4a8").smooth.enabled and load_config("sq_w4a8").weight.format == "int4"
  assert load_config("svdq_w4a4").lowrank.rank > 0 and load_config("svdq_w4a4").hadamard.enabled
  assert load_config("w4a8").act.format == "fp8_e4m3"
  assert load_config("int4_had").hadamard.enabled and load_config("int4_had").weight.format == "int4"
  assert not load_config("fp4_noh").hadamard.enabled
  with pytest.raises(ValueError, match="unknown HQ-DiT setting"):
    load_config("w3a3")


def test_quantize_from_trajectory_equals_from_stats(tiny):
  """The entry point collects statistics itself from trajectory inputs."""
  config = load_config("int4")
  config.layer_patterns = [r"blocks_0/attn/proj"]
  config.act.granularity = "per_tensor"
  config.calib.samples_per_step = 48
  config.calib.max_samples = 80
  from_traj, report = hqdit.quantize_from_config(tiny["model"], tiny["params"], config, tiny["traj"])
  from_stats, _ = hqdit.quantize_from_config(tiny["model"], tiny["params"], config, tiny["stats"])
  a = rules.get_path(from_traj, "blocks_0/attn/proj/kernel")
  b = rules.get_path(from_stats, "blocks_0/attn/proj/kernel")
  np.testing.assert_array_equal(np.asarray(a.packed_codes), np.asarray(b.packed_codes))
  np.testing.assert_allclose(float(a.act_scale), float(b.act_scale), rtol=1e-5)
  assert report["act_drift"]["per_layer"]["blocks_0/attn/proj"] >= 1.0


def test_dead_channel_does_not_force_widest_format():
  """A channel that is zero everywhere encodes exactly on every grid: it is left out of the
  ratio (it used to hit the 1e-12 floor and send the layer to E3M0)."""
  rng = np.random.default_rng(4)
  tokens = np.linspace(1.0, 5.0, 10)[None, :] * rng.uniform(0.5, 1.0, (20, 10))
  tokens[:, -1] = 5.0
  before = hqdit.max_min_ratio(tokens, group_axis=0)
  tokens[:, 3] = 0.0
  after = hqdit.max_min_ratio(tokens, group_axis=0)
  assert after <= before < 7.0
  assert hqdit.select_by_ratio(after, formats.FP4_FORMATS) == "e1m2"
  assert hqdit.max_min_ratio(np.zeros((4, 6)), group_axis=1) == 1.0


def test_both_rules_reported_per_layer(tiny):
  config = load_config("w4a4")
  config.gptq.enabled = False
  config.layer_patterns = [r"blocks_0/.*"]
  _, ratio_report = hqdit.quantize_params(tiny["params"], tiny["model"], config, tiny["stats"])
  config.weight.select = config.act.select = "mse"
  _, report = hqdit.quantize_params(tiny["params"], tiny["model"], config, tiny["stats"])
  picks = report["format_picks"]
  assert len(picks) == 5
  for path, p in picks.items():
    layer, ratio_p = report["layers"][path], ratio_report["format_picks"][path]
    assert p["weight_mse"] == min(layer["weight_format_mse"], key=layer["weight_format_mse"].get)
    assert p["act_mse"] == min(layer["act_format_mse"], key=layer["act_format_mse"].get)
    assert p["act_ratio"] == hqdit.select_by_ratio(layer["act_ratio"], formats.FP4_FORMATS)
    assert p["weight"] == p["weight_mse"] and p["act"] == p["act_mse"]  # select='mse'
    assert ratio_p["weight"] == p["weight_ratio"] and ratio_p["weight_mse"] is None
  table = hqdit.format_picks_markdown(report)
  assert table.count("\n") == 1 + len(picks) and "blocks_0/mlp/fc2" in table


def test_calibration_groups():
  order = ["t_embedder/mlp_0", "blocks_0/adaLN_modulation_1", "blocks_0/attn/qkv",
           "blocks_0/attn/proj", "blocks_1/adaLN_modulation_1", "blocks_1/attn/qkv"]
  paths = sorted(order[1:])
  assert hqdit.calibration_groups(order, paths, "fp", "block") == [order[1:]]
  assert hqdit.calibration_groups(order, paths, "quantized", "block") == [order[1:4], order[4:]]
  assert hqdit.calibration_groups(order, paths, "quantized", "layer") == [[p] for p in order[1:]]
  with pytest.raises(ValueError, match="calib.inputs"):
    hqdit.calibration_groups(order, paths, "noisy", "block")
  with pytest.raises(ValueError, match="not called"):
    hqdit.calibration_groups(order[:2], paths, "fp", "block")


def test_sequential_calibration_uses_quantized_inputs(tiny):
  """Block 1 is calibrated on what the model with block 0 quantized feeds it: its codes
  equal those from statistics collected on that partially quantized model directly, and
  differ from FP-input calibration; block 0 is the same either way."""
  config = load_config("w4a4")
  config.calib.samples_per_step = 48
  config.calib.max_samples = 80
  sequential, report = hqdit.quantize_from_config(tiny["model"], tiny["params"], config, tiny["traj"])
  assert report["calibration_groups"] == 2
  config.calib.inputs = "fp"
  fp_inputs, fp_report = hqdit.quantize_from_config(tiny["model"], tiny["params"], config, tiny["traj"])
  assert fp_report["calibration_groups"] == 1
  codes = lambda qp, path: np.asarray(rules.get_path(qp, path + "/kernel").packed_codes)
  block0 = [p for p in report["layers"] if p.startswith("blocks_0/")]
  block1 = [p for p in report["layers"] if p.startswith("blocks_1/")]
  for path in block0:
    np.testing.assert_array_equal(codes(sequential, path), codes(fp_inputs, path))
  assert any(not np.array_equal(codes(sequential, p), codes(fp_inputs, p)) for p in block1)
  # Independent reference for block 1: statistics on the model with only block 0 quantized.
  partial = tiny["params"]
  for path in block0:
    partial = rules.set_path(partial, path + "/kernel", rules.get_path(sequential, path + "/kernel"))
  stats = act_stats.collect_layer_stats(tiny["model"], partial, tiny["traj"], block1, hessian=True,
                                        samples_per_step=48, max_samples=80)
  all_paths = list(report["layers"])
  for path in block1:
    weight, _ = hqdit.quantize_layer(rules.get_path(tiny["params"], path + "/kernel"), config,
                                     stats[path], layer_seed=all_paths.index(path))
    np.testing.assert_array_equal(np.asarray(weight.packed_codes), codes(sequential, path))


@pytest.mark.parametrize("kind,block", [("hadamard", "hadamard 12x12"), ("random", "random 3x3")])
def test_hadamard_block_kind_in_layer(kind, block):
  rng = np.random.default_rng(2)
  kernel = (rng.standard_normal((384, 8)) * 0.05).astype(np.float32)
  config = load_config("w4a16")
  config.gptq.enabled = False
  config.hadamard.block = kind
  weight, report = hqdit.quantize_layer(kernel, config, None, layer_seed=3)
  assert report["hadamard_block"] == block
  transform = hadamard.make_transform(384, 3, kind)
  np.testing.assert_array_equal(np.asarray(weight.hadamard_block), transform.block)


def test_pack_bits_checkpoint_is_converted_to_the_kernel_layout_on_load(tmp_path):
  """A 4-bit FP4Weight saved in the older 'pack_bits' layout loads (pipeline.load_dit) in the
  kernels' 'k_tiles' layout with the same codes, so the kernels never relayout per call."""
  from dit_quant_jax import pipeline
  from dit_quant_jax.utils import checkpoint as ckpt_lib
  from tiny_model import tiny_model_and_params
  model, params = tiny_model_and_params()
  rng = np.random.default_rng(3)
  k_in, n_out = params["blocks_0"]["mlp"]["fc1"]["kernel"].shape
  codes = rng.integers(0, 16, (k_in, n_out)).astype(np.uint8)
  old = hqdit.FP4Weight.from_codes(codes, rng.uniform(0.5, 2, n_out), "e2m1", layout="pack_bits")
  params = rules.set_path(params, "blocks_0/mlp/fc1/kernel", old)
  path = ckpt_lib.save_checkpoint(str(tmp_path / "ckpt"), params, model.config_dict())
  _, loaded, _ = pipeline.load_dit(path)
  weight = rules.get_path(loaded, "blocks_0/mlp/fc1/kernel")
  assert weight.layout == "k_tiles" and old.layout == "pack_bits"
  np.testing.assert_array_equal(np.asarray(weight.codes()), codes)
  np.testing.assert_array_equal(np.asarray(weight.dequantize()), np.asarray(old.dequantize()))
