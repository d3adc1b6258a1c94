"""Round-to-nearest building blocks: per-channel scales, the clipping-range search on a
planted case, per-token activation quantization, and the weight-only baseline transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.quant import formats, hqdit, rtn
from dit_quant_jax.quant.hqdit import FP4Weight


def grid_round_reference(values, fmt_name):
  """float64 nearest grid value (ties to even index), saturating; independent of formats.py."""
  mags = np.asarray(formats.get_format(fmt_name).magnitudes, np.float64)
  a = np.minimum(np.abs(np.asarray(values, np.float64)), mags[-1])
  dist = np.abs(a[..., None] - mags)
  best = dist.min(axis=-1, keepdims=True)
  is_best = dist == best
  # among tied candidates prefer the even index
  idx = np.where(is_best[..., ::2].any(axis=-1) & (is_best.sum(-1) > 1),
                 np.argmax(is_best & (np.arange(len(mags)) % 2 == 0), axis=-1),
                 np.argmax(is_best, axis=-1))
  return np.sign(values) * mags[idx]


def channel_fake_quant_reference(kernel, fmt_name, ratio):
  fmt = formats.get_format(fmt_name)
  scale = ratio * np.abs(kernel).max(axis=0) / fmt.max_value
  return grid_round_reference(kernel / scale, fmt_name) * scale


def test_channel_scales():
  kernel = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
  scales = np.asarray(rtn.channel_scales(kernel, "e2m1"))
  np.testing.assert_allclose(scales, np.abs(kernel).max(0) / 6.0, rtol=1e-6)
  # INT8 RTN: error at most half a step per entry
  scales8 = np.asarray(rtn.channel_scales(kernel, "int8"))
  codes = rtn.quantize_kernel(kernel, "int8", scales8)
  deq = np.asarray(formats.decode(codes, "int8")) * scales8
  assert np.all(np.abs(deq - kernel) <= scales8 / 2 + 1e-7)


@pytest.mark.parametrize("fmt_name", ["int4", "e2m1", "e3m0"])
def test_clip_search_picks_the_mse_optimal_candidate(fmt_name):
  """Planted: column 0 is a Gaussian with one 6-sigma outlier (clipping pays on the uniform
  INT4 grid), column 1 sits exactly on the max-scaled grid (zero error only at ratio 1),
  column 2 is Laplace.  Every column's choice must equal the float64 brute force."""
  rng = np.random.default_rng(1)
  k = 256
  fmt = formats.get_format(fmt_name)
  col0 = rng.standard_normal(k)
  col0[5] = 6.0
  grid = np.asarray(fmt.lut[: fmt.num_codes], np.float64)
  col1 = rng.choice(grid, k) * 0.3
  col1[0] = fmt.max_value * 0.3
  kernel = np.stack([col0, col1, rng.laplace(size=k)], axis=1).astype(np.float32)
  ratios = rtn.clip_ratio_candidates(0.3, 15)
  scales, chosen = rtn.search_channel_scales(kernel, fmt_name, ratios)
  errors = np.stack([((channel_fake_quant_reference(kernel.astype(np.float64), fmt_name, r)
                       - kernel) ** 2).sum(0) for r in ratios.astype(np.float64)])
  expected = ratios[np.argmin(errors, axis=0)]
  np.testing.assert_allclose(np.asarray(chosen), expected)
  assert float(chosen[1]) == 1.0
  if fmt_name == "int4":
    assert float(chosen[0]) < 1.0
  np.testing.assert_allclose(np.asarray(scales),
                             expected * np.abs(kernel).max(0) / fmt.max_value, rtol=1e-6)


def test_clip_candidates_and_errors():
  np.testing.assert_allclose(rtn.clip_ratio_candidates(0.5, 6), [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], atol=1e-7)
  np.testing.assert_array_equal(rtn.clip_ratio_candidates(0.5, 1), [1.0])
  with pytest.raises(ValueError, match="clip_min"):
    rtn.clip_ratio_candidates(0.0, 4)
  with pytest.raises(ValueError, match="kernel"):
    rtn.channel_absmax(jnp.ones((3, 4, 5)))


@pytest.mark.parametrize("fmt_name", ["int8", "int4", "e2m1"])
def test_per_token_fake_quant(fmt_name):
  x = np.random.default_rng(2).standard_normal((2, 5, 16)).astype(np.float32)
  fmt = formats.get_format(fmt_name)
  got = np.asarray(rtn.per_token_fake_quant(x, fmt_name, 0.9))
  scale = 0.9 * np.abs(x).max(-1, keepdims=True) / fmt.max_value
  expected = grid_round_reference(x / scale, fmt_name) * scale
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_activation_clip_search(granularity):
  rng = np.random.default_rng(3)
  x = rng.standard_t(3, (64, 32)).astype(np.float32)
  ratios = rtn.clip_ratio_candidates(0.4, 7)
  best, errs = rtn.search_activation_clip(x, "e2m1", ratios, granularity)
  fmt = formats.get_format("e2m1")
  ref = []
  for r in ratios.astype(np.float64):
    top = np.abs(x).max(-1, keepdims=True) if granularity == "per_token" else np.abs(x).max()
    scale = r * top / fmt.max_value
    ref.append(np.mean((grid_round_reference(x / scale, "e2m1") * scale - x) ** 2))
  np.testing.assert_allclose(errs, ref, rtol=1e-4)
  assert best == pytest.approx(float(ratios[int(np.argmin(ref))]))
  with pytest.raises(ValueError, match="granularity"):
    rtn.search_activation_clip(x, "e2m1", ratios, "per_channel")


def test_activation_fake_quant_dispatch_errors():
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match="static scale"):
    rtn.activation_fake_quant(x, "int8", "per_tensor")
  with pytest.raises(ValueError, match="granularity"):
    rtn.activation_fake_quant(x, "int8", "per_block")
  np.testing.assert_array_equal(rtn.activation_fake_quant(x, "int8", "none"), x)


@pytest.mark.parametrize("weight_format,max_error", [("int3", 0.25), ("int8", 0.01)])
def test_weight_only_baseline_params(weight_format, max_error):
  rng = np.random.default_rng(4)
  params = {"blocks_0": {"mlp": {"fc1": {"kernel": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
                                         "bias": jnp.zeros((24,))}}},
            "final_layer": {"linear": {"kernel": jnp.ones((16, 4))}}}
  qparams, errors = hqdit.quantize_params_rtn(params, weight_format, [r"blocks_\d+/mlp/fc1"])
  weight = qparams["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert isinstance(weight, FP4Weight) and weight.format_name == weight_format
  assert weight.act_granularity == "none"
  assert qparams["final_layer"]["linear"]["kernel"] is params["final_layer"]["linear"]["kernel"]
  assert 0 < errors["blocks_0/mlp/fc1"] < max_error
  kernel = np.asarray(params["blocks_0"]["mlp"]["fc1"]["kernel"], np.float64)
  np.testing.assert_allclose(np.asarray(weight.dequantize()),
                             channel_fake_quant_reference(kernel, weight_format, 1.0), atol=1e-6)
  x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda w, x: w.linear(x, None))(weight, x)),
                             np.asarray(x) @ np.asarray(weight.dequantize()), rtol=1e-5, atol=1e-5)
