"""SVDQuant-style low-rank branch: L1 L2 + R == W exactly before quantization (float64),
the branch is the best rank-r approximation, FP4Weight.linear adds it, and size accounting
(api.model_size via nbytes_breakdown) counts it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax import api
from dit_quant_jax.calibrate.act_stats import LayerStats
from dit_quant_jax.models.layers import Linear
from dit_quant_jax.quant import hqdit, lowrank
from test_hqdit import load_config


@pytest.mark.parametrize("shape,rank", [((64, 48), 8), ((128, 384), 16), ((40, 40), 40)])
def test_branch_plus_residual_reconstructs_exactly(shape, rank):
  rng = np.random.default_rng(rank)
  w = rng.standard_normal(shape) * 0.1
  down, up, residual = lowrank.split_low_rank(w, rank)
  assert down.shape == (shape[0], rank) and up.shape == (rank, shape[1])
  assert down.dtype == jnp.bfloat16 and up.dtype == jnp.bfloat16
  recon = down.astype(np.float64) @ up.astype(np.float64) + residual
  np.testing.assert_allclose(recon, w, rtol=0, atol=1e-15)
  # The branch is (up to bf16 rounding) the truncated SVD: the residual's norm is the tail
  # of the singular values.
  sv = np.linalg.svd(w, compute_uv=False)
  tail = np.sqrt(np.sum(sv[rank:] ** 2))
  assert np.linalg.norm(residual) <= tail + 0.01 * np.linalg.norm(w)


def test_rank_errors():
  with pytest.raises(ValueError, match="rank"):
    lowrank.split_low_rank(np.ones((8, 4)), 5)
  with pytest.raises(ValueError, match="rank"):
    lowrank.split_low_rank(np.ones((8, 4)), 0)


def test_lowrank_layer_through_linear_module_and_size():
  rng = np.random.default_rng(0)
  k, n, rows, rank = 64, 32, 160, 8
  x = rng.standard_normal((rows, k)).astype(np.float32)
  w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
  w += np.outer(rng.standard_normal(k), rng.standard_normal(n)).astype(np.float32)  # a strong direction
  stats = LayerStats(np.abs(x).max(0), np.ones(2, np.float32), np.arange(2), x,
                     (2 * x.T.astype(np.float64) @ x / rows).astype(np.float32), rows)
  config = load_config("svdq_w4a4")
  config.lowrank.rank = rank
  weight, report = hqdit.quantize_layer(w, config, stats, layer_seed=2)
  assert weight.lowrank_down.shape == (k, rank) and report["lowrank_rank"] == rank
  # linear == Qa((x s) Q) @ stored + bf16 branch, through the model's one Linear module.
  xs = x * np.asarray(weight.input_scale)
  xq = np.asarray(weight.quantize_activation(weight.rotate_input(jnp.asarray(xs))), np.float64)
  branch = np.asarray(lowrank.branch_output(jnp.asarray(xs), weight.lowrank_down, weight.lowrank_up))
  expected = xq @ np.asarray(weight.dequantize(), np.float64) + branch
  module = Linear(n, use_bias=False)
  got = np.asarray(jax.jit(lambda p, v: module.apply({"params": p}, v))({"kernel": weight}, x))
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
  assert np.linalg.norm(got - x @ w) < 0.2 * np.linalg.norm(x @ w)
  # Size: the branch's bf16 bytes are counted by nbytes_breakdown and model_size.
  parts = weight.nbytes_breakdown()
  assert parts["lowrank"] == 2 * rank * (k + n)
  size = api.model_size({"layer": {"kernel": weight}})
  assert size["quantized_components"]["lowrank"] == parts["lowrank"]
  assert size["total_bytes"] == sum(parts.values())
  # The branch lowers the output error of the same W4A4 path.
  config.lowrank.rank = 0
  _, without = hqdit.quantize_layer(w, config, stats, layer_seed=2)
  assert report["output_rel_error"] < without["output_rel_error"]
