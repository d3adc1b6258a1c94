"""GPTQ on arbitrary grids: lower output error than RTN on a synthetic layer with correlated
inputs; reduces exactly to RTN for a diagonal Hessian; block size does not change the math."""

import numpy as np
import pytest

from dit_quant_jax.quant import formats, gptq, rtn


@pytest.fixture(scope="module")
def layer():
  """Correlated inputs X (n, K) = Z @ M (channel mixing) plus a few strong channels."""
  rng = np.random.default_rng(0)
  n, k, out = 512, 48, 24
  mixing = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
  x = rng.standard_normal((n, k)) @ mixing
  x[:, :3] *= 4.0
  w = rng.standard_normal((k, out)) * 0.1
  hessian = 2.0 * x.T @ x / n
  return x.astype(np.float32), w.astype(np.float32), hessian.astype(np.float32)


def output_error(x, w, deq):
  x64 = np.asarray(x, np.float64)
  return np.linalg.norm(x64 @ (np.asarray(w, np.float64) - np.asarray(deq, np.float64)))


@pytest.mark.parametrize("fmt_name,act_order", [("e2m1", False), ("e2m1", True), ("e3m0", False),
                                                ("int4", False), ("int3", False)])
def test_gptq_beats_rtn(layer, fmt_name, act_order):
  x, w, hessian = layer
  scales = rtn.channel_scales(w, fmt_name)
  rtn_deq = formats.fake_quantize(w, fmt_name, scales[None, :])
  codes, deq = gptq.gptq_quantize(w, hessian, fmt_name, scales, block_size=16, act_order=act_order)
  err_gptq, err_rtn = output_error(x, w, deq), output_error(x, w, rtn_deq)
  assert err_gptq < 0.85 * err_rtn, (err_gptq, err_rtn)
  # codes and dequantized kernel agree, and every value is on the scaled grid
  lut = formats.get_format(fmt_name).lut
  np.testing.assert_allclose(lut[np.asarray(codes)] * np.asarray(scales)[None, :], np.asarray(deq),
                             rtol=1e-6, atol=1e-8)
  assert gptq.layer_output_error(w, deq, x) == pytest.approx(
      err_gptq / np.linalg.norm(x.astype(np.float64) @ w.astype(np.float64)), rel=1e-6)


def test_diagonal_hessian_reduces_to_rtn(layer):
  """With H = c I and no damping, H^-1 is diagonal: no error is propagated, GPTQ == RTN."""
  _, w, _ = layer
  scales = rtn.channel_scales(w, "e2m1")
  _, deq = gptq.gptq_quantize(w, 3.0 * np.eye(48, dtype=np.float32), "e2m1", scales, damp=0.0,
                              block_size=16)
  np.testing.assert_allclose(np.asarray(deq), np.asarray(formats.fake_quantize(w, "e2m1", scales[None, :])),
                             rtol=1e-6)


def test_block_size_and_padding_do_not_change_result(layer):
  x, w, hessian = layer  # K = 48: block 10 pads to 50, block 48 is one block
  scales = rtn.channel_scales(w, "int4")
  _, small = gptq.gptq_quantize(w, hessian, "int4", scales, block_size=10)
  _, whole = gptq.gptq_quantize(w, hessian, "int4", scales, block_size=48)
  # float64 decisions: the blocking changes only the summation order (~1e-16), no code.
  np.testing.assert_array_equal(np.asarray(small), np.asarray(whole))


def reference_gptq(w, hessian, fmt_name, scales, damp):
  """Unblocked GPTQ straight from Algorithm 1 (float64; inverse by np.linalg.inv)."""
  k = w.shape[0]
  h = np.asarray(hessian, np.float64) + damp * np.mean(np.diag(hessian)) * np.eye(k)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  work = np.asarray(w, np.float64).copy()
  s = np.asarray(scales, np.float64)
  mags = np.asarray(formats.get_format(fmt_name).magnitudes, np.float64)
  q = np.zeros_like(work)
  for i in range(k):
    v = work[i] / s
    idx = np.argmin(np.abs(np.minimum(np.abs(v), mags[-1])[:, None] - mags[None, :]), axis=1)
    q[i] = np.sign(v) * mags[idx] * s
    err = (work[i] - q[i]) / u[i, i]
    work[i + 1:] -= u[i, i + 1:, None] * err[None, :]
  return q


@pytest.mark.parametrize("fmt_name", ["e2m1", "int4"])
def test_matches_unblocked_reference(layer, fmt_name):
  _, w, hessian = layer
  scales = rtn.channel_scales(w, fmt_name)
  _, deq = gptq.gptq_quantize(w, hessian, fmt_name, scales, block_size=16)
  ref = reference_gptq(w, hessian, fmt_name, np.asarray(scales), gptq.DEFAULT_DAMP)
  np.testing.assert_allclose(np.asarray(deq), ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("fmt_name", ["e1m2", "e2m1", "e3m0", "int4", "fp8_e4m3"])
def test_numpy_rounding_matches_formats(fmt_name):
  fmt = formats.get_format(fmt_name)
  mags = np.asarray(fmt.magnitudes, np.float64)
  rng = np.random.default_rng(1)
  ties = (mags[1:] + mags[:-1]) / 2
  x = np.concatenate([rng.uniform(-1.2, 1.2, 500) * mags[-1], ties, -ties, [0.0, 2 * mags[-1]]])
  expected = np.asarray(formats.quantize_to_grid(x.astype(np.float32), fmt_name), np.float64)
  np.testing.assert_array_equal(gptq.round_to_grid_numpy(x.astype(np.float32).astype(np.float64), fmt),
                                expected)


def test_dead_inputs_are_zeroed(layer):
  x, w, hessian = layer
  hessian = hessian.copy()
  hessian[5, :] = 0
  hessian[:, 5] = 0
  scales = rtn.channel_scales(w, "e2m1")
  _, deq = gptq.gptq_quantize(w, hessian, "e2m1", scales, block_size=16)
  np.testing.assert_array_equal(np.asarray(deq)[5], 0.0)
  assert np.all(np.isfinite(np.asarray(deq)))


def test_errors(layer):
  _, w, hessian = layer
  scales = rtn.channel_scales(w, "e2m1")
  with pytest.raises(ValueError, match="Hessian"):
    gptq.gptq_quantize(w, hessian[:10, :10], "e2m1", scales)
  with pytest.raises(ValueError, match="scales"):
    gptq.gptq_quantize(w, hessian, "e2m1", scales[:3])
  with pytest.raises(ValueError, match="unknown number format"):
    gptq.gptq_quantize(w, hessian, "e9m9", scales)
