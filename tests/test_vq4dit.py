"""VQ4DiT weights (quant/vq4dit.py): layout, packing, candidates, ratios, freezing, sizes."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.models import dit
from dit_quant_jax.quant import packing, rules, vq4dit
from dit_quant_jax.quant.qtensor import QUANTIZED_TYPES

CONFIG_PATH = os.path.join(os.path.dirname(__file__), "..", "configs", "vq4dit.py")


def load_config(arg):
  spec = importlib.util.spec_from_file_location("vq4dit_config", CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def dense_from_indices_f64(codebook, indices, d):
  """W[s*d + j, n] = codebook[index[s, n], j], by loops (interfaces.md)."""
  s_count, n_out = indices.shape
  out = np.zeros((s_count * d, n_out))
  for s in range(s_count):
    for n in range(n_out):
      out[s * d:(s + 1) * d, n] = codebook[indices[s, n]]
  return out


def test_subvector_layout_round_trip():
  kernel = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
  sub = np.asarray(vq4dit.kernel_to_subvectors(jnp.asarray(kernel), 3))
  assert sub.shape == (4, 5, 3)
  for s in range(4):
    for n in range(5):
      np.testing.assert_array_equal(sub[s, n], kernel[3 * s:3 * s + 3, n])
  np.testing.assert_array_equal(np.asarray(vq4dit.subvectors_to_kernel(jnp.asarray(sub))), kernel)


@pytest.mark.parametrize("k,d", [(2, 4), (16, 2), (64, 2), (256, 4), (4096, 1)])
def test_vqweight_packing_round_trip(k, d):
  rng = np.random.default_rng(k)
  shape = (8 * d, 7)  # 8 sub-vectors per column: an odd tail for 6- and 12-bit groups too
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  indices = rng.integers(0, k, size=(8, 7))
  indices[0, 0] = k - 1  # the largest index must survive packing
  weight = vq4dit.VQWeight.from_indices(codebook, jnp.asarray(indices), shape)
  bits = math.ceil(math.log2(k))
  assert weight.assignments.dtype == jnp.uint8
  assert weight.assignments.shape == (packing.packed_length(8, bits), 7)
  np.testing.assert_array_equal(np.asarray(weight.indices()), indices)
  np.testing.assert_allclose(np.asarray(weight.dequantize()), dense_from_indices_f64(codebook, indices, d),
                             rtol=0, atol=0)
  assert weight.nbytes_breakdown() == {"codebook": k * d * 4,
                                       "assignments": packing.packed_length(8, bits) * 7}
  # Packed exactly as the shared routine does it (what the kernels decode).
  np.testing.assert_array_equal(np.asarray(weight.assignments), packing.pack_bits(indices, bits, axis=0))


def test_vqweight_is_a_registered_pytree():
  assert QUANTIZED_TYPES["VQWeight"] is vq4dit.VQWeight
  weight = vq4dit.VQWeight.from_indices(np.ones((4, 2), np.float32), jnp.zeros((3, 5), jnp.int32), (6, 5))
  leaves, treedef = jax.tree_util.tree_flatten(weight)
  assert len(leaves) == 2
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (rebuilt.shape, rebuilt.k, rebuilt.d) == ((6, 5), 4, 2)
  doubled = jax.jit(lambda w: w.dequantize() * 2)(weight)
  np.testing.assert_array_equal(np.asarray(doubled), 2 * np.ones((6, 5)))


def test_errors():
  with pytest.raises(ValueError, match="does not divide the input dimension 10"):
    vq4dit.VQWeight.from_indices(np.zeros((4, 4), np.float32), jnp.zeros((2, 3), jnp.int32), (10, 3))
  with pytest.raises(ValueError, match="exceeds what the 16-bit"):
    vq4dit.VQWeight.from_indices(np.zeros((2**16 + 1, 1), np.float32), jnp.zeros((4, 3), jnp.int32), (4, 3))
  with pytest.raises(ValueError, match="k must be an integer >= 2"):
    vq4dit.VQWeight.from_indices(np.zeros((1, 2), np.float32), jnp.zeros((2, 3), jnp.int32), (4, 3))
  with pytest.raises(ValueError, match="do not fit"):
    vq4dit.VQWeight.from_indices(np.zeros((4, 2), np.float32), jnp.zeros((3, 3), jnp.int32), (4, 3))
  with pytest.raises(ValueError, match="does not divide"):
    vq4dit.kmeans_codebook(np.zeros((6, 4), np.float32), 4, 4)
  with pytest.raises(ValueError, match="num_candidates"):
    vq4dit.init_soft(np.zeros((8, 4), np.float32), np.zeros((4, 4), np.float32), num_candidates=5)
  with pytest.raises(ValueError, match="too small"):
    vq4dit.effective_codebook_size(7, 256)
  with pytest.raises(ValueError, match="unknown VQ4DiT setting"):
    load_config("w5")


def test_effective_codebook_size():
  # Power of two at most a quarter of the sub-vector count (public code's get_num_centroids).
  assert vq4dit.effective_codebook_size(1000, 256) == 128
  assert vq4dit.effective_codebook_size(1024, 256) == 256
  assert vq4dit.effective_codebook_size(288 * 4608, 256) == 256
  assert vq4dit.effective_codebook_size(64, 64) == 16


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(4)
  return rng.normal(size=(24, 40)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)


@pytest.mark.parametrize("num_candidates", [1, 2, 4])
def test_candidates_are_the_true_nearest(layer, num_candidates):
  kernel, codebook = layer
  soft = vq4dit.init_soft(kernel, codebook, num_candidates)
  sub = np.asarray(vq4dit.kernel_to_subvectors(jnp.asarray(kernel), 4), np.float64)  # (6, 40, 4)
  sq = np.sum((sub[:, :, None, :] - codebook.astype(np.float64)[None, None]) ** 2, axis=-1)
  order = np.argsort(sq, axis=-1, kind="stable")[..., :num_candidates]
  np.testing.assert_array_equal(np.asarray(soft.candidates), order)
  # Public-code logit initialisation with Euclidean distances.
  dist = np.sqrt(np.take_along_axis(sq, order, axis=-1))
  expected = np.log(dist[..., -1:] / (dist + vq4dit.LOGIT_INIT_EPS))
  expected[..., -1] = 0.0
  np.testing.assert_allclose(np.asarray(soft.ratio_logits), expected, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(soft.frozen))
  if num_candidates == 2:  # the nearest gets ratio d2 / (d1 + d2)
    ratios = np.asarray(soft.ratios())
    np.testing.assert_allclose(ratios[..., 0], dist[..., 1] / (dist[..., 0] + dist[..., 1] + 1e-5),
                               rtol=1e-4)


def test_soft_reconstruction_and_one_hot(layer):
  kernel, codebook = layer
  soft = vq4dit.init_soft(kernel, codebook, 4)
  rng = np.random.default_rng(1)
  logits = rng.normal(size=soft.ratio_logits.shape).astype(np.float32)
  soft = soft.replace(ratio_logits=jnp.asarray(logits))
  # Soft: ratio-weighted sum of candidate codewords (float64 reference).
  ratios = np.exp(logits - logits.max(-1, keepdims=True))
  ratios /= ratios.sum(-1, keepdims=True)
  cands = np.asarray(soft.candidates)
  mixed = np.einsum("snc,sncd->snd", ratios, codebook.astype(np.float64)[cands])
  expected = np.transpose(mixed, (0, 2, 1)).reshape(24, 40)
  np.testing.assert_allclose(np.asarray(soft.dequantize()), expected, rtol=1e-5, atol=1e-6)
  # One-hot ratios reproduce a plain codebook lookup of the chosen candidate.
  choice = rng.integers(0, 4, size=cands.shape[:2])
  one_hot = np.where(np.arange(4) == choice[..., None], 50.0, -50.0).astype(np.float32)
  hard = soft.replace(ratio_logits=jnp.asarray(one_hot))
  chosen = np.take_along_axis(cands, choice[..., None], -1)[..., 0]
  lookup = dense_from_indices_f64(codebook, chosen, 4)
  np.testing.assert_allclose(np.asarray(hard.dequantize()), lookup, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(hard.hard_indices()), chosen)
  np.testing.assert_allclose(np.asarray(hard.to_vqweight().dequantize()), lookup, rtol=0, atol=0)
  # Frozen sub-vectors use frozen_index whatever their logits.
  frozen_index = rng.integers(0, 16, size=cands.shape[:2])
  frozen = soft.replace(frozen=jnp.ones(cands.shape[:2], bool), frozen_index=jnp.asarray(frozen_index))
  np.testing.assert_allclose(np.asarray(frozen.dequantize()), dense_from_indices_f64(codebook, frozen_index, 4),
                             rtol=0, atol=0)
  np.testing.assert_array_equal(np.asarray(frozen.hard_indices()), frozen_index)


def _two_candidate_soft(top_ratios, frozen=None, frozen_index=None):
  """A SoftVQWeight (S=1, N=len(top_ratios)) whose candidate-1 ratios are top_ratios."""
  r = np.asarray(top_ratios, np.float64)
  logits = np.stack([np.zeros_like(r), np.log(r / (1 - r))], -1)[None].astype(np.float32)
  n = len(r)
  candidates = np.stack([np.arange(n) % 8, (np.arange(n) + 3) % 8], -1)[None].astype(np.int32)
  return vq4dit.SoftVQWeight(
      codebook=jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.float32),
      ratio_logits=jnp.asarray(logits), candidates=jnp.asarray(candidates),
      frozen=jnp.asarray(np.zeros((1, n), bool) if frozen is None else frozen[None]),
      frozen_index=jnp.asarray(candidates[..., 0] if frozen_index is None else frozen_index[None]),
      shape=(2, n))


def test_freezing_thresholds():
  # Candidate 1's ratio; below 0.5 the largest ratio is candidate 0's (1 - r).
  r = np.array([0.995, 0.985, 0.5, 0.004, 0.3, 0.9999])
  soft = _two_candidate_soft(r)
  out = vq4dit.update_freezing(soft, subvector_threshold=0.99, layer_threshold=0.99)
  np.testing.assert_array_equal(np.asarray(out.frozen)[0], [True, False, False, True, False, True])
  cands = np.asarray(soft.candidates)[0]
  frozen_index = np.asarray(out.frozen_index)[0]
  assert frozen_index[0] == cands[0, 1] and frozen_index[3] == cands[3, 0] and frozen_index[5] == cands[5, 1]
  # Frozen stays frozen, with its index, even if the logits move afterwards.
  moved = out.replace(ratio_logits=-out.ratio_logits)
  again = vq4dit.update_freezing(moved, 0.99, 0.99)
  np.testing.assert_array_equal(np.asarray(again.frozen), np.asarray(out.frozen))
  np.testing.assert_array_equal(np.asarray(again.frozen_index)[0, [0, 3, 5]], frozen_index[[0, 3, 5]])
  # Layer-level switch: > layer_threshold frozen -> every sub-vector hard at its argmax.
  hard = vq4dit.update_freezing(soft, subvector_threshold=0.99, layer_threshold=0.4)
  assert np.all(np.asarray(hard.frozen))
  argmax = np.where(r > 0.5, cands[:, 1], cands[:, 0])
  np.testing.assert_array_equal(np.asarray(hard.frozen_index)[0], argmax)
  # Exactly at the layer threshold (3/6 = 0.5) does not switch.
  assert not np.all(np.asarray(vq4dit.update_freezing(soft, 0.99, 0.5).frozen))


def test_ratio_regularizers():
  r = np.array([0.9, 0.6, 0.2, 0.999])
  frozen = np.array([False, True, False, False])
  soft = _two_candidate_soft(r, frozen=frozen)
  ratios = np.stack([1 - r, r], -1)
  live = ~frozen
  paper = np.sum((1 - np.abs(2 * ratios - 1))[live]) / len(r)
  public = 2 * np.mean((ratios * (1 - ratios))[live])
  np.testing.assert_allclose(float(vq4dit.ratio_regularizer(soft, "paper")), paper, rtol=1e-5)
  np.testing.assert_allclose(float(vq4dit.ratio_regularizer(soft, "public")), public, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown ratio regulariser"):
    vq4dit.ratio_regularizer(soft, "entropy")


def tiny_model_and_params():
  """DiT-S/4 at 16x16x1, 10 classes, depth 2, hidden 64; random weights everywhere
  (adaLN-Zero init would make every block the identity)."""
  model = dit.create_model("DiT-S/4", input_size=16, in_channels=1, num_classes=10, depth=2,
                           hidden_size=64, num_heads=4)
  params = jax.jit(lambda key: dit.init_params(model, key))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda leaf: jnp.asarray(np.asarray(leaf) + 0.05 * rng.normal(size=leaf.shape), jnp.float32), params)
  return model, params


@pytest.fixture(scope="module")
def tiny():
  model, params = tiny_model_and_params()
  rng = np.random.default_rng(0)
  inputs = (jnp.asarray(rng.normal(size=(2, 16, 16, 1)), jnp.float32), jnp.array([3, 900]), jnp.array([1, 10]))
  apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  return apply, params, inputs


def test_model_apply_with_vq_params(tiny):
  apply, params, (x, t, y) = tiny
  rng = np.random.default_rng(3)
  weights = {}
  for path in rules.select_layers(params, rules.DIT_BLOCK_LINEARS):
    k_in, n_out = rules.get_path(params, path + "/kernel").shape
    codebook = rng.normal(scale=0.05, size=(16, 4)).astype(np.float32)
    weights[path] = vq4dit.VQWeight.from_indices(codebook, rng.integers(0, 16, (k_in // 4, n_out)),
                                                 (k_in, n_out))
  assert len(weights) == 10
  quantized = vq4dit.replace_kernels(params, weights)
  dense = vq4dit.replace_kernels(params, jax.jit(lambda ws: {p: w.dequantize() for p, w in ws.items()})(weights))
  out_q = apply(quantized, x, t, y)
  out_d = apply(dense, x, t, y)
  assert out_q.shape == (2, 16, 16, 2)
  np.testing.assert_allclose(np.asarray(out_q), np.asarray(out_d), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(out_q), np.asarray(apply(params, x, t, y)), atol=1e-3)


def test_kmeans_only_on_tiny_model(tiny):
  apply, params, (x, t, y) = tiny
  config = load_config("kmeans_w2")
  # One layer shape (the one test_vq_calibrate also uses): one k-means compilation.
  config.layer_patterns = [r"blocks_\d+/mlp/fc1"]
  config.codebook_size = 16
  config.kmeans.num_iters = 15
  qparams, report = vq4dit.kmeans_only(params, config)
  assert set(report["layers"]) == {"blocks_0/mlp/fc1", "blocks_1/mlp/fc1"}
  for path, layer_report in report["layers"].items():
    weight = rules.get_path(qparams, path + "/kernel")
    assert isinstance(weight, vq4dit.VQWeight) and weight.k == 16 and weight.d == 4
    kernel = np.asarray(rules.get_path(params, path + "/kernel"), np.float64)
    mse = np.mean((np.asarray(weight.dequantize(), np.float64) - kernel) ** 2)
    np.testing.assert_allclose(layer_report["final_mse"], mse, rtol=1e-4)
    assert mse < 0.5 * np.mean(kernel**2)  # 16 codewords of 4 weights do capture the layer
    # Each sub-vector sits at its nearest codeword (the k-means assignment).
    sub = np.asarray(vq4dit.kernel_to_subvectors(jnp.asarray(kernel, jnp.float32), 4), np.float64)
    sq = np.sum((sub[:, :, None] - np.asarray(weight.codebook, np.float64)[None, None]) ** 2, -1)
    picked = np.take_along_axis(sq, np.asarray(weight.indices())[..., None], -1)[..., 0]
    np.testing.assert_allclose(picked, sq.min(-1), rtol=1e-5, atol=1e-9)
  assert report["sizes"]["codebook_bytes"] == 2 * 16 * 4 * 4
  # 2 layers x (64/4 = 16 sub-vectors of 4-bit indices = 8 bytes) x 256 columns.
  assert report["sizes"]["assignments_bytes"] == 2 * 8 * 256
  out = apply(qparams, x, t, y)
  assert np.all(np.isfinite(np.asarray(out)))


def test_size_report_dit_xl2_w2():
  sizes = vq4dit.size_report(dit.create_model("DiT-XL/2"), load_config("w2"))
  d = 1152
  per_block = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d), (d, 6 * d)]  # qkv, proj, fc1, fc2, adaLN
  weights = 28 * sum(k * n for k, n in per_block)
  assert sizes["num_layers"] == 140 and sizes["num_weights"] == weights
  assert sizes["fp32_bytes"] == 4 * weights
  assert sizes["codebook_bytes"] == 140 * 256 * 4 * 4
  assert sizes["assignments_bytes"] == weights // 4  # one 8-bit index per 4 weights
  # Paper (VQ4DiT Table): 159.5 MB of assignments, 2553 MB in float32.
  assert sizes["quantized_mib"] <= 162
  np.testing.assert_allclose(sizes["assignments_mib"], 159.5, atol=0.1)
  np.testing.assert_allclose(sizes["bits_per_weight"], 2.0, atol=0.01)
