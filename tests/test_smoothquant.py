"""SmoothQuant: the Eq. 4 factors against a direct formula, X W unchanged before rounding
(float64), dead channels, the alpha search, and a smoothed layer through FP4Weight.linear."""

import jax
import numpy as np
import pytest

from dit_quant_jax.calibrate.act_stats import LayerStats
from dit_quant_jax.quant import formats, hqdit, smoothquant
from test_hqdit import load_config


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(3)
  k, n, rows = 48, 20, 200
  x = rng.standard_normal((rows, k))
  x[:, [2, 17]] *= 30.0  # activation outlier channels
  w = rng.standard_normal((k, n)) * 0.1
  return x, w


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.5, 1.0])
def test_factors_and_exact_invariance(layer, alpha):
  x, w = layer
  act_absmax = np.abs(x).max(0)
  s = smoothquant.smoothing_factors(act_absmax, w, alpha)
  for k in (0, 2, 17, 40):  # Eq. 4 entry by entry
    expected = act_absmax[k] ** alpha / np.abs(w[k]).max() ** (1 - alpha)
    assert s[k] == pytest.approx(expected, rel=1e-12)
  xs, ws = smoothquant.smooth(x, w, s)
  np.testing.assert_allclose(xs @ ws, x @ w, rtol=1e-12, atol=1e-12)
  if alpha == 0.5:  # the outlier channels shrink most
    assert np.abs(xs).max(0)[2] < 0.5 * act_absmax[2]


def test_dead_channels_keep_unit_factor(layer):
  x, w = layer
  x, w = x.copy(), w.copy()
  x[:, 5] = 0.0
  w[9] = 0.0
  s = smoothquant.smoothing_factors(np.abs(x).max(0), w, 0.5)
  assert s[5] == 1.0 and s[9] == 1.0 and np.all(np.isfinite(s))
  with pytest.raises(ValueError, match="alpha"):
    smoothquant.smoothing_factors(np.abs(x).max(0), w, 1.5)
  with pytest.raises(ValueError, match="act_absmax"):
    smoothquant.smoothing_factors(np.ones(3), w, 0.5)


def test_search_picks_smallest_error(layer):
  x, w = layer
  calls = []

  def error(xs, ws):  # any function of the smoothed pair; here: how unbalanced x is
    calls.append(1)
    return float(np.abs(xs).max() / np.abs(ws).max())

  alphas = (0.2, 0.5, 0.8)
  alpha, s, errors = smoothquant.search_alpha(x, w, np.abs(x).max(0), error, alphas)
  assert len(calls) == 3 and alpha == min(errors, key=errors.get)
  np.testing.assert_allclose(s, smoothquant.smoothing_factors(np.abs(x).max(0), w, alpha))


def test_smoothed_layer_matches_reference_and_helps_w8a8(layer):
  """quantize_layer with smoothing: FP4Weight.linear == Q8(x * (1/s)) @ Q8(diag(s) W) (the
  stored kernel), and the output error is below the unsmoothed W8A8 layer's."""
  x, w = layer
  x32, w32 = x.astype(np.float32), w.astype(np.float32)
  stats = LayerStats(np.abs(x32).max(0), np.ones(2, np.float32), np.arange(2), x32, None, len(x))
  config = load_config("sq_w8a8")
  weight, report = hqdit.quantize_layer(w32, config, stats, layer_seed=0)
  assert report["smooth_alpha"] in config.smooth.alphas
  s = smoothquant.smoothing_factors(stats.channel_absmax, w32.astype(np.float64), report["smooth_alpha"])
  np.testing.assert_allclose(np.asarray(weight.input_scale), 1.0 / s, rtol=1e-6)
  stored = np.asarray(weight.dequantize(), np.float64)
  xs = x32 * np.asarray(weight.input_scale)
  a_scale = np.abs(xs).max(-1, keepdims=True) / formats.get_format("int8").max_value
  expected = np.asarray(formats.fake_quantize(xs, "int8", a_scale), np.float64) @ stored
  got = np.asarray(jax.jit(lambda wt, v: wt.linear(v, None))(weight, x32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  config.smooth.enabled = False
  _, plain = hqdit.quantize_layer(w32, config, stats, layer_seed=0)
  assert report["output_rel_error"] < plain["output_rel_error"]
