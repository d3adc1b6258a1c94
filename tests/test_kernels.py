"""Pallas kernels vs their plain-jnp references (interpret mode on CPU, compiled on GPU).

Shapes are tiny and blocks small (16/16/32) so that ragged cases cover several programs per
grid axis and several K steps.  Every kernel is also lowered to Triton IR for the "cuda"
platform (jax.export, no GPU needed), which checks Triton constraints (power-of-two tensors,
supported ops and dtypes) on CPU; PTX compilation and timing still need a GPU.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu

from dit_quant_jax.kernels import act_quant as aq
from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import fp4_matmul as fm
from dit_quant_jax.bench import triton_ptx
from dit_quant_jax.kernels import vq_matmul as vq
from dit_quant_jax.quant import packing

INTERPRET = jax.default_backend() != "gpu"
SMALL_BLOCKS = dict(block_m=16, block_n=16, block_k=32)
BF16_REL_TOL = 1e-2  # bf16 operands (8-bit mantissa), float32 accumulation, K <= 96

# 4-bit formats' magnitudes (sign-magnitude codes, notes/interfaces.md).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E1M2 = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
INT4 = tuple(float(v) for v in range(8))
E3M0_BIAS3 = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def lut_of(magnitudes):
  magnitudes = np.asarray(magnitudes, np.float32)
  return np.concatenate([magnitudes, -magnitudes]).astype(np.float32)


def rel_max_error(y, reference):
  y, reference = np.asarray(y, np.float64), np.asarray(reference, np.float64)
  return np.max(np.abs(y - reference)) / np.max(np.abs(reference))


def rng_for(*key):
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def random_fp4_weight(rng, k_features, n_features):
  codes = rng.integers(0, 16, (k_features, n_features))
  packed = jnp.asarray(packing.pack_bits(codes, 4, axis=0))
  scale = jnp.asarray(rng.uniform(0.5, 2.0, n_features), jnp.float32)
  return codes, packed, scale


# VQ kernels: tests/test_vq_kernels.py; dispatch table: tests/test_dispatch.py.


# ------------------------------------------------------------------------------- FP4


@pytest.fixture(scope="module")
def fp4_problem():
  """Ragged shapes: M=37, K=96 (3 K steps of 32), N=48, with a bias."""
  rng = rng_for("fp4")
  m_rows, k_features, n_features = 37, 96, 48
  w_codes, packed_weight, w_scale = random_fp4_weight(rng, k_features, n_features)
  return dict(
      rng=rng, x=jnp.asarray(rng.standard_normal((m_rows, k_features)), jnp.float32),
      w_codes=w_codes, packed_weight=packed_weight, w_scale=w_scale,
      bias=jnp.asarray(rng.standard_normal(n_features), jnp.float32))


def test_w4a16_matches_reference(fp4_problem):
  p = fp4_problem
  lut = jnp.asarray(lut_of(E2M1))
  y = fm.w4a16_matmul(p["x"], p["packed_weight"], lut, p["w_scale"], p["bias"],
                      interpret=INTERPRET, **SMALL_BLOCKS)
  reference = fm.w4a16_matmul_reference(p["x"], p["packed_weight"], lut, p["w_scale"], p["bias"])
  assert y.shape == reference.shape == (37, 48)
  assert rel_max_error(y, reference) < BF16_REL_TOL
  dense = lut_of(E2M1)[p["w_codes"]].astype(np.float64) * np.asarray(p["w_scale"])[None, :]
  expected = np.asarray(p["x"], np.float64) @ dense + np.asarray(p["bias"])
  np.testing.assert_allclose(reference, expected, rtol=1e-4, atol=1e-4)


def test_w4a8_matches_reference(fp4_problem):
  p = fp4_problem
  lut = jnp.asarray(lut_of(E1M2))
  x_fp8, x_scale = fm.quantize_fp8_per_token_reference(p["x"])
  y = fm.w4a8_matmul(x_fp8, x_scale, p["packed_weight"], lut, p["w_scale"], p["bias"],
                     split_k=2, interpret=INTERPRET, **SMALL_BLOCKS)
  reference = fm.w4a8_matmul_reference(x_fp8, x_scale, p["packed_weight"], lut, p["w_scale"],
                                       p["bias"])
  # FP8 values and lut entries are exact in bf16: only the float32 summation order differs.
  np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-4)


def test_w4a4_integer_accumulator_is_exact(fp4_problem):
  """Unit scales and a zero bias expose the int32 accumulator (here summed over a K split of
  2 + 1 tiles): it must equal an int64 sum."""
  p, rng = fp4_problem, fp4_problem["rng"]
  m_rows, k_features = p["x"].shape
  x_codes = rng.integers(0, 16, (m_rows, k_features))
  packed_x = jnp.asarray(packing.pack_bits(x_codes, 4, axis=1))
  x_int_lut, _ = common.int_lut_from_lut(lut_of(E3M0_BIAS3))
  w_int_lut, _ = common.int_lut_from_lut(lut_of(E2M1))
  n_features = p["packed_weight"].shape[1]
  ones_m, ones_n = jnp.ones((m_rows,), jnp.float32), jnp.ones((n_features,), jnp.float32)
  args = (packed_x, ones_m, jnp.asarray(x_int_lut), p["packed_weight"], jnp.asarray(w_int_lut),
          ones_n, jnp.zeros((n_features,), jnp.float32))
  y = fm.w4a4_matmul(*args, k_features=k_features, split_k=2, interpret=INTERPRET,
                     **SMALL_BLOCKS)
  expected = x_int_lut.astype(np.int64)[x_codes] @ w_int_lut.astype(np.int64)[p["w_codes"]]
  np.testing.assert_array_equal(np.asarray(y), expected.astype(np.float32))
  # Same compiled kernel with real scales and bias vs the reference's float epilogue.
  x_scale = jnp.asarray(rng.uniform(0.1, 1.0, m_rows), jnp.float32)
  args = args[:1] + (x_scale,) + args[2:5] + (p["w_scale"], p["bias"])
  y = fm.w4a4_matmul(*args, k_features=k_features, split_k=2, interpret=INTERPRET,
                     **SMALL_BLOCKS)
  reference = fm.w4a4_matmul_reference(*args, k_features=k_features)
  np.testing.assert_allclose(y, reference, rtol=1e-6, atol=1e-5)


def test_w4a4_block_multiple_shapes():
  rng = rng_for("w4a4_aligned")
  m_rows, k_features, n_features = 32, 64, 32
  w_codes, packed_weight, w_scale = random_fp4_weight(rng, k_features, n_features)
  x_codes = rng.integers(0, 16, (m_rows, k_features))
  int_lut, multiplier = common.int_lut_from_lut(lut_of(INT4))
  assert multiplier == 1
  args = (jnp.asarray(packing.pack_bits(x_codes, 4, axis=1)),
          jnp.asarray(rng.uniform(0.1, 1.0, m_rows), jnp.float32), jnp.asarray(int_lut),
          packed_weight, jnp.asarray(int_lut), w_scale, None)
  y = fm.w4a4_matmul(*args, k_features=k_features, interpret=INTERPRET, **SMALL_BLOCKS)
  reference = fm.w4a4_matmul_reference(*args, k_features=k_features)
  np.testing.assert_allclose(y, reference, rtol=1e-6, atol=1e-5)


def test_e4m3_decode_all_bit_patterns():
  bit_patterns = np.arange(256, dtype=np.uint8)
  expected = np.asarray(jnp.asarray(bit_patterns).view(jnp.float8_e4m3fn).astype(jnp.float32))
  decoded = np.asarray(common.decode_e4m3_bits(jnp.asarray(bit_patterns, jnp.int32)))
  np.testing.assert_array_equal(decoded, expected)  # NaN positions compare equal too


def test_int_lut_multipliers():
  for magnitudes, multiplier in ((E2M1, 2), (INT4, 1), (E3M0_BIAS3, 4)):
    int_lut, found = common.int_lut_from_lut(lut_of(magnitudes))
    assert found == multiplier and int_lut.dtype == np.int8
    np.testing.assert_array_equal(int_lut, lut_of(magnitudes) * multiplier)
  with pytest.raises(ValueError, match="integer multiple"):
    common.int_lut_from_lut(lut_of((0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)))


# ------------------------------------------------------------------------------- act quant


def nearest_even_numpy(v, magnitudes):
  """float64 brute force: index of the nearest magnitude, ties to the even index."""
  grid = np.asarray(magnitudes, np.float64)
  distance = np.abs(v[..., None] - grid)
  best = distance.min(axis=-1, keepdims=True)
  candidates = np.isclose(distance, best, rtol=0, atol=1e-12)
  even_pick = np.where(candidates & (np.arange(8) % 2 == 0), 1, 0)
  return np.where(even_pick.any(-1), even_pick.argmax(-1), candidates.argmax(-1))


def test_nearest_even_reference_on_ties():
  midpoints = [(a + b) / 2 for a, b in zip(E2M1, E2M1[1:])]
  v = np.array(midpoints + [0.1, 1.3, 6.0, 7.5], np.float64)
  y = jnp.asarray(np.concatenate([v, -v])[None, :], jnp.float32)
  codes = np.asarray(aq.nearest_even_codes_reference(y, jnp.ones((1,)), E2M1))[0]
  index = nearest_even_numpy(v, E2M1)
  np.testing.assert_array_equal(codes[: len(v)], index)
  np.testing.assert_array_equal(codes[len(v):], np.where(index > 0, index + 8, 0))
  # E2M1 ties: 0.25->0, 0.75->1.0 (index 2), 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0
  np.testing.assert_array_equal(index[:7], [0, 2, 2, 4, 4, 6, 6])


def allowed_code_mismatch(y64, scale64, magnitudes, tolerance=1e-4):
  """Entries whose |y| / scale lies within tolerance of a rounding midpoint."""
  v = np.abs(y64) / np.where(scale64 > 0, scale64, 1)[:, None]
  midpoints = np.array([(a + b) / 2 for a, b in zip(magnitudes, magnitudes[1:])])
  return np.min(np.abs(v[..., None] - midpoints), axis=-1) < tolerance * magnitudes[-1]


def test_act_quant_without_transform_ragged_and_ties():
  """Odd K (padded nibble), M not a block multiple, exact rounding ties, a zero row."""
  rng = rng_for("act_quant_plain")
  m_rows, k_features = 37, 95
  x = rng.standard_normal((m_rows, k_features)).astype(np.float32)
  x[3, :8] = [6.0, 0.25, -0.75, 1.25, -1.75, 2.5, 3.5, -5.0]  # absmax 6 -> scale 1: ties
  x[3, 8:] = np.clip(x[3, 8:], -5.9, 5.9)
  x[5] = 0.0
  x = jnp.asarray(x)
  packed, scale = aq.act_quant(x, magnitudes=E2M1, block_m=16, block_k=32, interpret=INTERPRET)
  packed_ref, scale_ref = aq.act_quant_reference(x, magnitudes=E2M1)
  assert packed.shape == (m_rows, 48) and packed.dtype == jnp.uint8
  codes = packing.unpack_bits(np.asarray(packed), 4, k_features, axis=1)
  if INTERPRET:  # same float ops as the reference: bit-identical
    np.testing.assert_array_equal(scale, scale_ref)
    np.testing.assert_array_equal(packed, packed_ref)
  else:  # Triton's float32 division may differ by an ulp: codes may flip only at near-ties
    np.testing.assert_allclose(scale, scale_ref, rtol=1e-6)
    codes_ref = packing.unpack_bits(np.asarray(packed_ref), 4, k_features, axis=1)
    x64 = np.asarray(x, np.float64)
    near_tie = allowed_code_mismatch(x64, np.abs(x64).max(axis=1) / E2M1[-1], E2M1)
    assert np.all((codes == codes_ref) | near_tie)
  np.testing.assert_array_equal(codes[3, :8], [7, 0, 8 + 2, 2, 8 + 4, 4, 6, 8 + 6])
  assert scale[5] == 1 and not np.any(codes[5])  # all-zero row: scale 1, codes 0
  # Dequantized activations are within half a grid step (at most 1.0 * scale for E2M1).
  dequantized = aq.dequantize_activations_reference(packed, scale, lut_of(E2M1), k_features)
  assert np.all(np.abs(dequantized - x) <= 1.0 * np.asarray(scale)[:, None] + 1e-6)


def random_orthogonal(rng, n):
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


def test_act_quant_with_transform():
  """bf16 input, random orthogonal A and B, clip ratio 0.8 (the largest values saturate)."""
  rng = rng_for("act_quant_transform")
  clip_ratio = 0.8
  m_rows, a_size, b_size = 20, 3, 32
  k_features = a_size * b_size
  signs = rng.choice([-1.0, 1.0], k_features)
  a_matrix, b_matrix = random_orthogonal(rng, a_size), random_orthogonal(rng, b_size)
  x = rng.standard_normal((m_rows, k_features))
  transform = tuple(jnp.asarray(t, jnp.float32) for t in (signs, a_matrix, b_matrix))
  packed, scale = aq.act_quant(jnp.asarray(x, jnp.bfloat16), transform, magnitudes=INT4,
                               clip_ratio=clip_ratio, block_m=16, interpret=INTERPRET)
  packed_ref, scale_ref = aq.act_quant_reference(jnp.asarray(x, jnp.bfloat16), transform,
                                                 magnitudes=INT4, clip_ratio=clip_ratio)
  # Transform in float64: x diag(signs) kron(A, B).
  x_bf16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  y64 = (x_bf16 * signs) @ np.kron(a_matrix, b_matrix)
  scale64 = clip_ratio * np.abs(y64).max(axis=1) / INT4[-1]
  np.testing.assert_allclose(scale, scale64, rtol=1e-5)
  np.testing.assert_allclose(scale_ref, scale64, rtol=1e-5)
  codes = packing.unpack_bits(np.asarray(packed), 4, k_features, axis=1)
  codes_ref = packing.unpack_bits(np.asarray(packed_ref), 4, k_features, axis=1)
  near_tie = allowed_code_mismatch(y64, scale64, INT4)
  assert np.all((codes == codes_ref) | near_tie)
  v64 = np.abs(y64) / scale64[:, None]
  assert np.any(v64 > INT4[-1] + 0.5)  # clipped values exist, and saturate to magnitude 7
  index64 = nearest_even_numpy(v64, INT4)
  expected = np.where((y64 < 0) & (index64 > 0), index64 + 8, index64)
  assert np.all((codes == expected) | near_tie)


def test_act_quant_rejects_bad_input():
  x = jnp.ones((4, 96))
  with pytest.raises(ValueError, match="8 magnitudes"):
    aq.act_quant(x, magnitudes=(0.0, 1.0), interpret=True)
  with pytest.raises(ValueError, match="increase strictly"):
    aq.act_quant(x, magnitudes=(0, 2, 1, 3, 4, 5, 6, 7), interpret=True)
  bad = (jnp.ones(96), jnp.eye(4), jnp.eye(32))
  with pytest.raises(ValueError, match="128 wide but in_features is 96"):
    aq.act_quant(x, bad, magnitudes=E2M1, interpret=True)
  small_b = (jnp.ones(96), jnp.eye(6), jnp.eye(16))
  with pytest.raises(ValueError, match="transform block b"):
    aq.act_quant(x, small_b, magnitudes=E2M1, interpret=True)


# ------------------------------------------------------------------------------- dispatch


def test_dispatch_routes_and_flattens_leading_dims():
  rng = rng_for("dispatch")
  x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
  codes, packed_weight, w_scale = random_fp4_weight(rng, 64, 32)
  lut = jnp.asarray(lut_of(E2M1))
  assert common.resolve_impl("auto")[0] == (jax.default_backend() == "gpu")
  with common.kernel_impl("reference"):
    assert common.resolve_impl("auto") == (False, INTERPRET)
  assert common.resolve_impl("pallas") == (True, INTERPRET)
  with pytest.raises(ValueError, match="unknown kernel impl"):
    common.resolve_impl("triton")
  y = fm.w4a16_linear(x, packed_weight, lut, w_scale, impl="reference")
  flat = fm.w4a16_matmul_reference(x.reshape(6, 64), packed_weight, lut, w_scale)
  assert y.shape == (2, 3, 32)
  np.testing.assert_array_equal(y.reshape(6, 32), flat)
  packed, scale = aq.quantize_activations(x, E2M1, impl="reference")
  assert packed.shape == (2, 3, 32) and scale.shape == (2, 3)


def test_default_blocks_split_k_for_few_programs():
  few = common.default_matmul_blocks(16, 1152, 1152)  # adaLN-like: 18 column tiles only
  assert few["split_k"] > 1 and few["block_m"] == 16
  many = common.default_matmul_blocks(16384, 4608, 1152)
  assert many["split_k"] == 1 and many["block_m"] == many["block_n"] == 128
  for options in (few, many):
    for name in ("block_m", "block_n", "block_k"):
      common.check_block(name, options[name])


# ------------------------------------------------------------------------------- Triton IR

TRITON_CUSTOM_CALL = getattr(plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")


def _triton_cases():
  rng = np.random.default_rng(0)
  k_features, n_features, m_rows = 128, 64, 16
  x = jnp.asarray(rng.standard_normal((m_rows, k_features)), jnp.bfloat16)
  _, packed_weight, w_scale = random_fp4_weight(rng, k_features, n_features)
  lut = jnp.asarray(lut_of(E2M1))
  int_lut = jnp.asarray(common.int_lut_from_lut(lut_of(E2M1))[0])
  packed_x = jnp.zeros((m_rows, k_features // 2), jnp.uint8)
  x_scale = jnp.ones((m_rows,), jnp.float32)
  bias = jnp.zeros((n_features,), jnp.float32)
  transform = (jnp.ones(k_features), jnp.eye(2), jnp.eye(64))
  x_fp8 = x.astype(jnp.float8_e4m3fn)
  blocks = dict(block_m=16, block_n=32, block_k=64)
  return {
      "vq6": (lambda *a: vq.vq_matmul(*a, **blocks),
              (x, jnp.ones((64, 4)), jnp.zeros((24, n_features), jnp.uint8), bias)),
      "vq8": (lambda *a: vq.vq_matmul(*a, **blocks),
              (x, jnp.ones((256, 2)), jnp.zeros((64, n_features), jnp.uint8), bias)),
      "w4a16": (lambda *a: fm.w4a16_matmul(*a, **blocks), (x, packed_weight, lut, w_scale, bias)),
      "w4a16_split_k": (lambda *a: fm.w4a16_matmul(*a, split_k=2, **blocks),
                        (x, packed_weight, lut, w_scale, bias)),
      "w4a8": (lambda *a: fm.w4a8_matmul(*a, **blocks),
               (x_fp8, x_scale, packed_weight, lut, w_scale, bias)),
      "w4a4": (lambda *a: fm.w4a4_matmul(*a, k_features=k_features, **blocks),
               (packed_x, x_scale, int_lut, packed_weight, int_lut, w_scale, bias)),
      "act_quant": (lambda x: aq.act_quant(x, magnitudes=E2M1, block_k=64), (x,)),
      "act_quant_transform": (lambda x, t: aq.act_quant(x, t, magnitudes=E2M1), (x, transform)),
  }


@pytest.mark.parametrize("name", ["vq6", "vq8", "w4a16", "w4a16_split_k", "w4a8", "w4a4",
                                  "act_quant", "act_quant_transform"])
def test_kernel_lowers_to_triton(name):
  fn, args = _triton_cases()[name]
  # An abstract GPU: jax >= 0.11 needs one to lower Pallas-Triton calls without a GPU.
  exported = triton_ptx.export_for_gpu(jax.jit(fn), *args)
  assert TRITON_CUSTOM_CALL in exported.mlir_module()
