"""FP4 kernels (kernels/fp4_mma.py, fp4_matmul.PATHS, act_quant.quantize_rows) vs independent
references (float64 numpy, plain jnp), interpret mode on CPU, fresh random inputs."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dit_quant_jax.kernels import act_quant as aq
from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import fp4_matmul as fmm
from dit_quant_jax.kernels import fp4_mma
from dit_quant_jax.numerics import fp4

FORMATS = fp4.FP4_CODE_FORMATS


def _rng(seed):
  return np.random.default_rng(seed)


def _random_orthogonal(rng, n):
  q, r = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.sign(np.diag(r))).astype(np.float32)


def _transform(rng, k_features, a_order):
  signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=k_features)
  return jnp.asarray(signs), jnp.asarray(_random_orthogonal(rng, a_order))


def _dense_q(transform, k_features):
  """float64 (K, K) Q = diag(signs) kron(A, H_b / sqrt(b)) built directly."""
  signs, block = (np.asarray(t, np.float64) for t in transform)
  b = k_features // block.shape[0]
  h = np.ones((1, 1))
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  return signs[:, None] * np.kron(block, h / np.sqrt(b))


@pytest.mark.parametrize("name", FORMATS)
def test_arithmetic_decodes_match_tables(name):
  code = fp4.fp4_code(name)
  codes = jnp.arange(16, dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(fp4.int8_values(codes, code)),
                                code.lut * code.multiplier)
  if code.has_e4m3_image:
    bits = np.asarray(fp4.e4m3_bits(codes, code)).astype(np.uint8)
    values = np.asarray(jnp.asarray(bits).view(jnp.float8_e4m3fn).astype(jnp.float32))
    np.testing.assert_array_equal(values, code.lut * code.e4m3_factor)


def test_encode_nearest_even_matches_search():
  code = fp4.fp4_code("e2m1")
  rng = _rng(0)
  mags = np.asarray(code.magnitudes)
  mids = (mags[1:] + mags[:-1]) / 2
  v = np.concatenate([rng.normal(size=500) * 4, mids, -mids, [0.0, 7.0, -9.0]]).astype(np.float32)
  got = np.asarray(fp4.encode_nearest_even(jnp.asarray(v), code))
  a = np.abs(v)[:, None]
  dist = np.abs(a - mags[None, :])
  best = dist == dist.min(axis=1, keepdims=True)
  even = best & (np.arange(8) % 2 == 0)
  index = np.where(even.any(axis=1), even.argmax(axis=1), best.argmax(axis=1))
  expected = np.where((v < 0) & (index > 0), index + 8, index)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("k_features", [128, 200, 384])
def test_pack_weight_layout_round_trip(k_features):
  rng = _rng(k_features)
  codes = rng.integers(0, 16, size=(k_features, 24))
  weight = fp4_mma.pack_weight(codes, np.ones(24, np.float32), "e2m1")
  assert weight.tiles.shape == (24, fp4_mma.padded_k(k_features) // 2)
  np.testing.assert_array_equal(np.asarray(fp4_mma.unpack_weight_codes(weight)), codes)
  # Layout: byte r of K tile t holds codes 128 t + r (low nibble) and 128 t + 64 + r (high).
  tiles = np.asarray(weight.tiles)
  padded = np.pad(codes, ((0, fp4_mma.padded_k(k_features) - k_features), (0, 0)))
  assert tiles[5, 3] == padded[3, 5] | (padded[64 + 3, 5] << 4)


def _weight(rng, k_features, n_features, name):
  codes = rng.integers(0, 16, size=(k_features, n_features))
  scale = rng.uniform(0.5, 2.0, size=n_features).astype(np.float32)
  weight = fp4_mma.pack_weight(codes, scale, name)
  dense = fp4.fp4_code(name).lut[codes].astype(np.float64) * scale[None, :]
  return weight, dense


def _operand(rng, kind, shape):
  """Random operand of a dot kind and its exact float64 value."""
  if kind == "int8":
    x = rng.integers(-64, 65, size=shape).astype(np.int8)
    return jnp.asarray(x), x.astype(np.float64)
  dtype = jnp.float8_e4m3fn if kind == "fp8" else jnp.bfloat16
  x = jnp.asarray(rng.normal(size=shape) * 3, jnp.float32).astype(dtype)
  return x, np.asarray(x.astype(jnp.float32), np.float64)


MMA_CASES = [
    # (M, K, N, config): block multiples, ragged M / K / N, a K split, the DiT-XL/2 Hopper tile.
    (32, 256, 32, dict(block_m=16, block_n=16, num_warps=4)),
    (20, 200, 40, dict(block_m=16, block_n=32, split_k=2, num_warps=4)),
    # split 3 of 5 K tiles (parts 2, 2, 1) over 3 x 3 ragged tiles: summed in the launch
    (40, 640, 72, dict(block_m=16, block_n=32, split_k=3, num_warps=4)),
    (8, 384, 136, dict(block_m=128, block_n=128, num_warps=8, num_stages=3)),
    # stream-K: 45 iterations (3 x 3 ragged tiles x 5 K tiles) over 7 programs of 7: tiles
    # finished whole, in two pieces and in three, by programs that span two or three tiles
    (40, 640, 72, dict(block_m=16, block_n=32, stream_k=7, num_warps=4)),
    # stream-K with the DiT-XL/2 Hopper tile: 2 x 2 ragged tiles x 3 K tiles over 3 programs
    (130, 384, 136, dict(block_m=128, block_n=128, stream_k=3, num_warps=8, num_stages=2)),
    # W4A16's Hopper launch: stream-K with the staged epilogue (whole tiles through the slots
    # too) after a data-parallel wave: 3 x 3 ragged tiles, 2 programs: 8 tiles whole in 4
    # waves, the 9th tile's 5 K tiles in shares of 3 and 2
    (40, 640, 72, dict(block_m=16, block_n=32, stream_k=2, whole_waves=True,
                       staged_epilogue=True, num_warps=4)),
]


@pytest.mark.parametrize("kind,name", [("int8", "e2m1"), ("int8", "e3m0"), ("int8", "int4"),
                                       ("fp8", "e1m2"), ("fp8", "e3m0"), ("bf16", "e2m1")])
@pytest.mark.parametrize("m_rows,k_features,n_features,config", MMA_CASES)
def test_fp4_mma_matches_float64(kind, name, m_rows, k_features, n_features, config):
  rng = _rng(m_rows * 7 + k_features)
  weight, dense = _weight(rng, k_features, n_features, name)
  x, x64 = _operand(rng, kind, (m_rows, k_features))
  row_scale = rng.uniform(0.5, 2.0, size=m_rows).astype(np.float32)
  bias = rng.normal(size=n_features).astype(np.float32)
  expected = (x64 @ dense) * row_scale[:, None] + bias
  tol = 1e-5 * np.abs(expected).max()
  for predecode in (False, True):
    got = fp4_mma.fp4_mma(x, jnp.asarray(row_scale), weight, jnp.asarray(bias), dot_kind=kind,
                          predecode=predecode, interpret=True, **config)
    np.testing.assert_allclose(np.asarray(got), expected, atol=tol, rtol=0)
  got_xla = fp4_mma.xla_dot(x, jnp.asarray(row_scale), weight, jnp.asarray(bias), dot_kind=kind)
  np.testing.assert_allclose(np.asarray(got_xla), expected, atol=tol, rtol=0)


def test_fp4_mma_rejects_bad_inputs():
  rng = _rng(3)
  weight, _ = _weight(rng, 128, 16, "int4")
  x = jnp.zeros((4, 128), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="no exact E4M3 image"):
    fp4_mma.fp4_mma(x, jnp.ones(4), weight, dot_kind="fp8", interpret=True)
  with pytest.raises(ValueError, match="dtype"):
    fp4_mma.fp4_mma(jnp.zeros((4, 128), jnp.float32), jnp.ones(4), weight, dot_kind="int8",
                    interpret=True)


def _assert_near_ties(values, other, y64, scale, rtol=1e-4, max_fraction=1e-3):
  """Two 8-bit images of the same rows may differ only where the exact value (float64 rows y64
  over the row scale, in image units) sits at a rounding midpoint, to rtol: float32 sums in
  another order round such values either way.  Anything else (a wrong code, a wrong step) is
  far from the midpoint of the two images' values.  A few such near-ties per 10^4 codes."""
  a = np.asarray(values.astype(jnp.float32), np.float64)
  b = np.asarray(other.astype(jnp.float32), np.float64)
  differ = a != b
  assert differ.mean() <= max_fraction, differ.mean()
  exact = (y64 / np.asarray(scale, np.float64)[:, None])[differ]
  midpoint = (a[differ] + b[differ]) / 2
  gap = np.abs(exact - midpoint)
  assert np.all(gap <= rtol * np.maximum(np.abs(exact), 1.0)), (
      exact[gap.argmax()], a[differ][gap.argmax()], b[differ][gap.argmax()])


ROW_CASES = [(5, 384, 12), (3, 1152, 36), (2, 4608, 36), (9, 256, 1), (3, 1152, 9), (4, 200, None),
             (7, 1152, 36)]  # 3-token groups, the last one partial


@pytest.mark.parametrize("m_rows,k_features,a_order", ROW_CASES)
def test_quantize_rows_matches_reference(m_rows, k_features, a_order):
  rng = _rng(k_features + m_rows)
  x = jnp.asarray(rng.normal(size=(m_rows, k_features)) * np.exp(rng.normal(size=k_features)),
                  jnp.float32)
  transform = None if a_order is None else _transform(rng, k_features, a_order)
  y64 = np.asarray(x, np.float64)
  if transform is not None:
    y64 = y64 @ _dense_q(transform, k_features)
    np.testing.assert_allclose(np.asarray(aq.transform_rows_xla(x, transform)), y64,
                               atol=1e-4 * np.abs(y64).max())
  for act_format, image in (("e2m1", "int8"), ("e1m2", "fp8"), ("fp8_e4m3", "fp8")):
    ref_values, ref_scale = aq.quantize_rows_xla(x, transform, act_format=act_format,
                                                 clip_ratio=0.9, image=image)
    values, scale = aq.quantize_rows(x, transform, act_format=act_format, clip_ratio=0.9,
                                     image=image, interpret=True, transform_dtype="float32",
                                     tokens_per_program=2)
    np.testing.assert_allclose(np.asarray(scale), np.asarray(ref_scale), rtol=1e-5)
    # The kernel multiplies by the scale's reciprocal (the reference divides): within an ulp,
    # so a value on a rounding midpoint may round the other way (one grid step).
    _assert_near_ties(values, ref_values, y64, scale)
    # Independent check of the reference: float64 per-token scale with the clip ratio.
    max_value = 448.0 if act_format == "fp8_e4m3" else fp4.fp4_code(act_format).magnitudes[-1]
    factor = 1.0 if act_format == "fp8_e4m3" else fp4.fp4_code(act_format).e4m3_factor
    factor = fp4.fp4_code(act_format).multiplier if image == "int8" else factor
    np.testing.assert_allclose(np.asarray(ref_scale) * factor,
                               np.abs(y64).max(axis=1) * 0.9 / max_value, rtol=1e-4)


@pytest.mark.parametrize("act_format,image", [("e2m1", "int8"), ("e1m2", "fp8"),
                                               ("fp8_e4m3", "fp8")])
def test_row_images_with_a_given_inverse_is_the_reciprocal_path(act_format, image):
  """The kernel's per-token reciprocal (_row_images(inverse=)) computes what dividing by each
  row's scale does: the same images bit for bit (the format's multiplier is a power of two, so
  folding it into 1 / scale rounds the same), and the codes of the midpoint search but for
  near-ties."""
  rng = _rng(29)
  y = jnp.asarray(rng.normal(size=(24, 64)) * np.exp(rng.normal(size=(24, 1))), jnp.float32)
  code = None if act_format == "fp8_e4m3" else fp4.fp4_code(act_format)
  max_value = 448.0 if code is None else code.magnitudes[-1]
  scale = jnp.max(jnp.abs(y), axis=1) * np.float32(0.9) / np.float32(max_value)
  inverse = np.float32(1.0) / scale
  given = aq._row_images(y, None, act_format, code, image, rounding="magic",
                         inverse=inverse[:, None])
  divided = aq._row_images(y, scale[:, None], act_format, code, image, reciprocal=True,
                           rounding="magic")
  np.testing.assert_array_equal(np.asarray(given), np.asarray(divided))
  searched = aq._row_images(y, scale[:, None], act_format, code, image)
  y64 = np.asarray(y, np.float64)
  _assert_near_ties(given, searched, y64, scale)


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_rows_bf16_transforms(x_dtype):
  """'bf16x3' (the default: hi/lo bf16 splits) gives the float32 reference's codes and scales;
  plain 'bfloat16' moves a fraction of the codes by one grid step and the scales by ~0.3%."""
  rng = _rng(11)
  x = jnp.asarray(rng.standard_t(4, size=(8, 1152)), x_dtype)
  transform = _transform(rng, 1152, 36)
  ref, ref_scale = aq.quantize_rows_xla(x, transform, act_format="e2m1", image="int8")
  got, scale = aq.quantize_rows(x, transform, act_format="e2m1", image="int8", interpret=True)
  y64 = np.asarray(x.astype(jnp.float32), np.float64) @ _dense_q(transform, 1152)
  _assert_near_ties(got, ref, y64, scale)  # bf16x3: ~2^-16 relative, near-ties only
  np.testing.assert_allclose(np.asarray(scale), np.asarray(ref_scale), rtol=2e-5)
  got, scale = aq.quantize_rows(x, transform, act_format="e2m1", image="int8", interpret=True,
                                transform_dtype="bfloat16")
  diff = np.asarray(got, np.int32) - np.asarray(ref, np.int32)
  assert 0 < (diff != 0).mean() < 0.05  # near-tie flips only
  assert np.abs(diff).max() <= 4  # one grid step of E2M1 x 2 at most
  assert np.abs(np.asarray(scale) / np.asarray(ref_scale) - 1).max() < 1e-2


def _row_norm_inputs(rng, samples, tokens, k_features, x_dtype=jnp.float32):
  """Un-normalized rows with a large mean and spread (as a DiT residual stream) and a random
  per-sample affine."""
  x = (rng.normal(size=(samples * tokens, k_features)) * np.exp(rng.normal(size=k_features))
       + 3.0 * rng.normal(size=k_features))
  mul = 1.0 + 0.5 * rng.normal(size=(samples, k_features))
  add = 0.3 * rng.normal(size=(samples, k_features))
  return (jnp.asarray(x, x_dtype), jnp.asarray(mul, jnp.float32), jnp.asarray(add, jnp.float32))


def _row_norm_float64(x, mul, add, tokens, eps=1e-6):
  x64 = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, tokens, x.shape[1])
  normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + eps)
  y = normed * np.asarray(mul, np.float64)[:, None] + np.asarray(add, np.float64)[:, None]
  return y.reshape(x.shape)


# (samples, tokens per sample, K, a, tokens per program, x dtype): the affine hoisted per
# program (tokens % tokens_per_program == 0) or loaded per token, a ragged K without transform,
# the DiT-XL/2 width with its order-36 block, bf16 rows.
ROW_NORM_CASES = [(2, 8, 384, 12, 8, jnp.float32), (3, 6, 96, None, 4, jnp.float32),
                  (2, 4, 100, None, 8, jnp.float32), (2, 3, 1152, 36, 2, jnp.bfloat16),
                  (2, 32, 1152, 36, 8, jnp.bfloat16),  # grouped tiles spanning samples
                  # one token per tile (K = 4608): the affine hoisted per program / per token
                  (2, 8, 4608, 36, 8, jnp.bfloat16), (3, 3, 4608, 36, 2, jnp.float32)]


@pytest.mark.parametrize("samples,tokens,k_features,a_order,per_program,x_dtype", ROW_NORM_CASES)
def test_quantize_rows_row_norm_matches_reference(samples, tokens, k_features, a_order,
                                                  per_program, x_dtype):
  rng = _rng(k_features + tokens)
  x, mul, add = _row_norm_inputs(rng, samples, tokens, k_features, x_dtype)
  transform = None if a_order is None else _transform(rng, k_features, a_order)
  norm = aq.RowNorm(mul, add, tokens, 1e-6)
  y64 = _row_norm_float64(x, mul, add, tokens)
  np.testing.assert_allclose(np.asarray(aq.apply_row_norm(x, mul, add, tokens, 1e-6)), y64,
                             atol=2e-5 * np.abs(y64).max())
  if transform is not None:
    y64 = y64 @ _dense_q(transform, k_features)
  for act_format, image in (("e2m1", "int8"), ("fp8_e4m3", "fp8")):
    ref_values, ref_scale = aq.quantize_rows_xla(x, transform, act_format=act_format,
                                                 clip_ratio=0.9, image=image, **norm.kwargs())
    values, scale = aq.quantize_rows(x, transform, act_format=act_format, clip_ratio=0.9,
                                     image=image, interpret=True, transform_dtype="float32",
                                     tokens_per_program=per_program, **norm.kwargs())
    np.testing.assert_allclose(np.asarray(scale), np.asarray(ref_scale), rtol=1e-5)
    # float32 LayerNorm sums in another order: codes may differ at near-ties only
    _assert_near_ties(values, ref_values, y64, scale)
    # Independent of apply_row_norm: quantize the float64-normalized rows (no prologue).
    plain_values, _ = aq.quantize_rows_xla(
        jnp.asarray(_row_norm_float64(x, mul, add, tokens), jnp.float32), transform,
        act_format=act_format, clip_ratio=0.9, image=image)
    _assert_near_ties(values, plain_values, y64, scale)
    max_value = 448.0 if act_format == "fp8_e4m3" else fp4.fp4_code(act_format).magnitudes[-1]
    factor = 1.0 if act_format == "fp8_e4m3" else fp4.fp4_code(act_format).multiplier
    np.testing.assert_allclose(np.asarray(ref_scale) * factor,
                               np.abs(y64).max(axis=1) * 0.9 / max_value, rtol=1e-4)


def test_quantize_rows_row_norm_bf16x3_on_bf16_rows():
  """The default transform on bf16 residual rows: the prologue's float32 output needs the lo
  part of bf16x3's first dot (the bf16-x shortcut would move ~0.5 % of the codes)."""
  rng = _rng(17)
  x, mul, add = _row_norm_inputs(rng, 2, 16, 1152, jnp.bfloat16)
  transform = _transform(rng, 1152, 36)
  kwargs = dict(norm_mul=mul, norm_add=add, tokens_per_sample=16, norm_eps=1e-6)
  ref, ref_scale = aq.quantize_rows_xla(x, transform, act_format="e2m1", image="int8", **kwargs)
  got, scale = aq.quantize_rows(x, transform, act_format="e2m1", image="int8", interpret=True,
                                **kwargs)
  assert (np.asarray(got) != np.asarray(ref)).mean() < 2e-4
  np.testing.assert_allclose(np.asarray(scale), np.asarray(ref_scale), rtol=2e-5)


def test_token_groups_cut_the_padding():
  # K = 1152 with the order-36 block: a' = 36 rows of c = 32; three tokens fill 108 of 128 rows
  assert aq.token_group(36, 32) == 3
  assert aq.token_group(36, 128) == 1  # K = 4608: one 64 x 128 tile already fills registers
  assert aq.main_loop_trips(1152, 36, 8) == 3  # 8 tokens per program -> 9 -> 3 groups
  for rows, c_size in ((36, 32), (12, 32), (9, 128), (1, 64)):
    group = aq.token_group(rows, c_size)
    padded = max(16, 1 << (rows * group - 1).bit_length())
    assert padded <= 128 and padded * c_size <= max(4096, max(16, 1 << (rows - 1).bit_length())
                                                    * c_size)


def test_fp8_dot_gets_its_hopper_tiles_at_run_time():
  """The path passes its dot kind to the launch options (the fp8 dot lowers to mma.sync f16
  on Hopper, where 128 x 128 tiles spilled): 64 x 128 there, 128 x 128 for int8."""
  rng = _rng(4)
  weight, _ = _weight(rng, 256, 128, "e2m1")
  x = jnp.zeros((256, 256), jnp.float32)
  assert fmm._mma_options(x, weight, None, "fp8")["block_m"] == 64
  assert fmm._mma_options(x, weight, None, "int8")["block_m"] == 128


def test_a_split_asked_for_replaces_the_stream_k_launch():
  """W4A16 fc2 at M = 1024 dispatches stream-K with the staged epilogue (Hopper table; CPU
  counts as Hopper); a config that asks for a K split gets a plain split launch, one that
  names stream_k keeps it."""
  rng = _rng(6)
  weight, _ = _weight(rng, 4608, 1152, "e2m1")
  x = jax.ShapeDtypeStruct((1024, 4608), jnp.bfloat16)
  dispatched = fmm._mma_options(x, weight, None, "bf16", predecode=False)
  assert (dispatched["stream_k"], dispatched["staged_epilogue"]) == (264, True)
  split = fmm._mma_options(x, weight, {"split_k": 2}, "bf16", predecode=False)
  assert (split["split_k"], split["stream_k"], split["whole_waves"],
          split["staged_epilogue"]) == (2, 0, False, False)
  common.check_stream_k(split["stream_k"], split["split_k"], split["staged_epilogue"])
  kept = fmm._mma_options(x, weight, {"stream_k": 8}, "bf16", predecode=False)
  assert (kept["stream_k"], kept["split_k"]) == (8, 1)


def test_fuses_row_norm_names_real_paths():
  for op in ("w4a4", "w4a8"):
    assert set(fmm._TRITON_ACT_QUANT[op]) <= set(fmm.PATHS[op])  # no misspelt path
    assert all(fmm.fuses_row_norm(op, p) for p in fmm._TRITON_ACT_QUANT[op])
    assert not fmm.fuses_row_norm(op, "xla_fp8") and not fmm.fuses_row_norm(op, "reference")
  assert not any(fmm.fuses_row_norm("w4a16", p) for p in fmm.PATHS["w4a16"])


def test_quantize_rows_row_norm_bad_input():
  rng = _rng(3)
  x, mul, add = _row_norm_inputs(rng, 2, 4, 64)
  with pytest.raises(ValueError, match="whole samples"):
    aq.quantize_rows(x, act_format="e2m1", interpret=True, norm_mul=mul, norm_add=add,
                     tokens_per_sample=3)
  with pytest.raises(ValueError, match=r"norm_mul must have shape \(2, 64\)"):
    aq.quantize_rows_xla(x, act_format="e2m1", norm_mul=mul[:1], norm_add=add,
                         tokens_per_sample=4)
  with pytest.raises(ValueError, match="both norm_mul and norm_add"):
    aq.quantize_rows(x, act_format="e2m1", interpret=True, norm_mul=mul, tokens_per_sample=4)


@pytest.mark.parametrize("op,path", [("w4a4", "unpacked_triton_int8"), ("w4a4", "xla_int8"),
                                     ("w4a8", "triton_bf16"), ("w4a8", "xla_fp8"),
                                     ("w4a16", "triton_bf16")])
def test_linear_row_norm_matches_materialized_input(op, path):
  """fp4_matmul.linear with the fused prologue == linear on the normalized rows."""
  rng = _rng(21)
  x, mul, add = _row_norm_inputs(rng, 2, 8, 384)
  weight, _ = _weight(rng, 384, 48, "e2m1")
  bias = jnp.asarray(rng.normal(size=48), jnp.float32)
  transform = _transform(rng, 384, 12) if op != "w4a16" else None
  kwargs = dict(act_format="e2m1" if op == "w4a4" else None, clip_ratio=0.9,
                transform=transform, path=path, out_dtype=jnp.float32)
  if op == "w4a8":
    kwargs["act_format"] = "fp8_e4m3"
  fused = fmm.linear(op, x.reshape(2, 8, 384), weight, bias,
                     norm=aq.RowNorm(mul, add, 8, 1e-6), **kwargs)
  plain = fmm.linear(op, aq.apply_row_norm(x, mul, add, 8, 1e-6), weight, bias, **kwargs)
  assert fused.shape == (2, 8, 48)
  reference = fmm.linear(op, x.reshape(2, 8, 384), weight, bias,
                         norm=aq.RowNorm(mul, add, 8, 1e-6), **dict(kwargs, path="reference"))
  np.testing.assert_allclose(np.asarray(reference), np.asarray(plain).reshape(2, 8, 48),
                             atol=1e-2 * np.abs(np.asarray(plain)).max())
  np.testing.assert_allclose(np.asarray(fused).reshape(16, 48), np.asarray(plain),
                             atol=1e-2 * np.abs(np.asarray(plain)).max())


def _path_inputs(seed, m_rows, k_features, n_features, name, a_order):
  rng = _rng(seed)
  weight, _ = _weight(rng, k_features, n_features, name)
  x = jnp.asarray(rng.normal(size=(m_rows, k_features)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=n_features).astype(np.float32))
  transform = None if a_order is None else _transform(rng, k_features, a_order)
  return x, weight, bias, transform


def _path_tolerance(path):
  """Relative (to the largest output) tolerance of a path against the reference: float32
  accumulation order off a GPU; compiled fp8 dots on a GPU sum each K tile in the tensor core's
  reduced-precision accumulator (kernels/fp8_dot.py), so they get 2e-3."""
  from dit_quant_jax.kernels import common
  return 2e-3 if common.on_gpu() and path.endswith("fp8") else 1e-5


def _runnable(op):
  return sorted(name for name in fmm.PATHS[op]
                if name != "reference" and (op, name) not in fmm.UNVERIFIED)


@pytest.mark.parametrize("path", _runnable("w4a4"))
@pytest.mark.parametrize("a_order", [None, 12])
def test_w4a4_paths_match_reference(path, a_order):
  x, weight, bias, transform = _path_inputs(5, 24, 384, 48, "e2m1", a_order)
  kwargs = dict(act_format="e2m1", clip_ratio=0.8, transform=transform,
                config=dict(quant_transform_dtype="float32"))
  expected = fmm.PATHS["w4a4"]["reference"](x, weight, bias, **kwargs)
  got = fmm.PATHS["w4a4"][path](x, weight, bias, **kwargs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected),
                             atol=_path_tolerance(path) * np.abs(np.asarray(expected)).max())


@pytest.mark.parametrize("path", _runnable("w4a8"))
def test_w4a8_paths_match_reference_with_clip(path):
  x, weight, bias, transform = _path_inputs(6, 20, 256, 40, "e1m2", 1)
  kwargs = dict(clip_ratio=0.7, transform=transform, config=dict(quant_transform_dtype="float32"))
  expected = fmm.PATHS["w4a8"]["reference"](x, weight, bias, **kwargs)
  got = fmm.PATHS["w4a8"][path](x, weight, bias, **kwargs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected),
                             atol=_path_tolerance(path) * np.abs(np.asarray(expected)).max())
  # The clip ratio matters: without it the result differs.
  unclipped = fmm.PATHS["w4a8"][path](x, weight, bias, clip_ratio=1.0, transform=transform,
                                      config=dict(quant_transform_dtype="float32"))
  assert np.abs(np.asarray(unclipped) - np.asarray(got)).max() > 1e-3


def test_w4a8_reference_is_fp8_fake_quant_in_float64():
  x, weight, bias, _ = _path_inputs(8, 6, 128, 16, "e2m1", None)
  got = fmm.PATHS["w4a8"]["reference"](x, weight, bias, clip_ratio=0.5)
  x64 = np.asarray(x, np.float64)
  scale = np.abs(x64).max(axis=1, keepdims=True) * 0.5 / 448.0
  xq = np.asarray(jnp.asarray(np.clip(x64 / scale, -448, 448), jnp.float32)
                  .astype(jnp.float8_e4m3fn).astype(jnp.float32), np.float64) * scale
  dense = np.asarray(fp4_mma.dequantize_reference(weight), np.float64)
  np.testing.assert_allclose(np.asarray(got), xq @ dense + np.asarray(bias), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("path", sorted(fmm.PATHS["w4a16"]))
def test_w4a16_paths_match_float64(path):
  x, weight, bias, _ = _path_inputs(9, 33, 200, 24, "e3m0", None)
  x = x.astype(jnp.bfloat16)
  dense = np.asarray(fp4_mma.dequantize_reference(weight), np.float64)
  expected = np.asarray(x.astype(jnp.float32), np.float64) @ dense + np.asarray(bias)
  got = fmm.PATHS["w4a16"][path](x, weight, bias)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), expected,
                             atol=1e-2 * np.abs(expected).max())


def test_weight_from_pack_bits_matches_codes():
  from dit_quant_jax.numerics import packing
  rng = _rng(12)
  codes = rng.integers(0, 16, size=(130, 8))
  weight = fp4_mma.weight_from_pack_bits(packing.pack_bits(codes, 4, axis=0),
                                         np.ones(8, np.float32), "e1m2", 130)
  np.testing.assert_array_equal(np.asarray(fp4_mma.unpack_weight_codes(weight)), codes)


def test_lowering_cases_are_well_formed():
  cases = fmm.lowering_cases(shapes=[(4096, 1152, 4608), (16, 4608, 1152)])
  names = [c[0] for c in cases]
  assert any("fp4_mma_int8 M=4096" in n for n in names)
  assert any("quantize_rows_int8 M=4096 K=1152 a=36" in n for n in names)
  assert any("quantize_rows_norm_int8 M=4096 K=1152 a=36" in n for n in names)
  assert any("quantize_rows_norm_fp8 M=4096 K=1152 a=36" in n for n in names)  # W4A8, Hopper
  assert not any("_fp8 " in n for n in (c[0] for c in fmm.lowering_cases(
      shapes=[(4096, 1152, 4608)], device="ampere")))
  for _, fn, args, config in cases:
    assert callable(fn) and "num_warps" in config
    assert all(isinstance(a, (jax.ShapeDtypeStruct, fp4_mma.PackedFp4Weight, tuple)) for a in args)


def test_hqdit_w4a8_kernel_path_honours_clip_ratio():
  """quant/hqdit.FP4Weight: the GPU (Pallas, interpret here) and CPU (reference) W4A8 paths
  compute the same function with a calibrated activation clip ratio < 1."""
  from dit_quant_jax.kernels import common
  from dit_quant_jax.quant import hqdit
  rng = _rng(13)
  codes = rng.integers(0, 16, size=(64, 32))
  weight = hqdit.FP4Weight.from_codes(codes, rng.uniform(0.5, 2.0, 32), "e2m1",
                                      act_format="fp8_e4m3", act_granularity="per_token",
                                      act_clip_ratio=0.6)
  x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=32), jnp.float32)
  with common.kernel_impl("reference"):
    expected = weight.linear(x, bias)
  with common.kernel_impl("pallas"):
    got = weight.linear(x, bias)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dot_kind,instruction", [("int8", "m64n128k32.s32.s8.s8"),
                                                  ("fp8", "m64n128k32.f32.e4m3.e4m3")])
def test_mosaic_kernel_lowers_to_wgmma(dot_kind, instruction):
  """Mosaic GPU (jax >= 0.11): lowers for an abstract H100; its MLIR issues the 8-bit wgmma."""
  from dit_quant_jax.kernels import fp4_mosaic
  if not fp4_mosaic.available() or not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip(f"Pallas Mosaic GPU API not in jax {jax.__version__}")
  text = fp4_mosaic.lower_for_abstract_h100(256, 384, 256, dot_kind=dot_kind)
  assert "mosaic_gpu" in text
  assert f"wgmma.mma_async.sync.aligned.{instruction}" in text


@pytest.mark.parametrize("seed,dot_kind,name,out_dtype", [(1, "int8", "e2m1", jnp.float32),
                                                          (2, "int8", "e3m0", jnp.bfloat16),
                                                          (3, "fp8", "e1m2", jnp.float32)])
def test_mosaic_kernel_matches_reference_in_the_gpu_interpreter(seed, dot_kind, name, out_dtype):
  """Mosaic GPU (jax >= 0.11) run in Pallas's GPU interpreter on CPU at the DiT tile (128 x
  128): 2 x 2 output tiles walked by one program, 3 K steps through the TMA pipeline."""
  from dit_quant_jax.kernels import fp4_mosaic
  if not fp4_mosaic.interpreter_available():
    pytest.skip(f"no Pallas Mosaic GPU interpreter in jax {jax.__version__}")
  rng = _rng(seed)
  m_rows, k_features, n_features = 256, 384, 256
  weight, dense = _weight(rng, k_features, n_features, name)
  x, x64 = _operand(rng, dot_kind, (m_rows, k_features))
  row_scale = rng.uniform(0.5, 2.0, m_rows).astype(np.float32)
  bias = rng.normal(size=n_features).astype(np.float32)
  got = fp4_mosaic.fp4_mosaic_matmul(x, jnp.asarray(row_scale), weight, jnp.asarray(bias),
                                     dot_kind=dot_kind, num_programs=1, interpret=True,
                                     out_dtype=out_dtype)
  expected = (x64 * row_scale[:, None]) @ dense + bias
  with pytest.raises(ValueError, match="num_programs=1"):
    fp4_mosaic.fp4_mosaic_matmul(x, jnp.asarray(row_scale), weight, dot_kind=dot_kind,
                                 interpret=True)
  rtol = 2e-6 if out_dtype == jnp.float32 else 2 ** -8
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), expected,
                             rtol=rtol, atol=rtol * np.abs(expected).max())


def _hqdit_weight(rng, k_features, n_features, act_format, granularity, a_order=None,
                  weight_format="e2m1", **fields):
  from dit_quant_jax.quant import hqdit
  if a_order is not None:
    signs, block = _transform(rng, k_features, a_order)
    fields.update(hadamard_signs=signs, hadamard_block=block)
  codes = rng.integers(0, 16, size=(k_features, n_features))
  return hqdit.FP4Weight.from_codes(codes, rng.uniform(0.5, 2.0, n_features), weight_format,
                                    act_format=act_format, act_granularity=granularity, **fields)


@pytest.mark.parametrize("act_format,a_order,op,weight_format,x_dtype", [
    (None, None, "w4a16", "e2m1", jnp.float32),
    (None, 12, "w4a16", "e3m0", jnp.bfloat16),  # weight-only with the Hadamard, bf16 x
    ("e2m1", 12, "w4a4", "e2m1", jnp.float32),
    ("E1M2", None, "w4a4", "int4", jnp.bfloat16),  # an alias; INT4 weights: int8 image only
    ("fp8_e4m3", 3, "w4a8", "e2m1", jnp.float32),
    ("fp8_e4m3", None, "w4a8", "int4", jnp.float32),  # INT4 weights: no E4M3 image
    ("int8", 12, "w4a16", "e2m1", jnp.bfloat16),  # fake-quantized INT8 acts, W4A16 kernel
])
@pytest.mark.parametrize("m_rows", [6, 80])  # the dispatcher's small-M and large-M paths
def test_fp4_weight_linear_kernel_paths_match_reference(act_format, a_order, op, weight_format,
                                                        x_dtype, m_rows):
  """quant/hqdit.FP4Weight.linear through fp4_matmul.linear (the dispatched path on the tiled
  weight, interpret mode) computes the reference path's function; the old pack_bits layout
  gives the same result."""
  from dit_quant_jax.kernels import common
  rng = _rng(20 + m_rows)
  granularity = "none" if act_format is None else "per_token"
  weight = _hqdit_weight(rng, 384, 48, act_format, granularity, a_order, weight_format,
                         act_clip_ratio=0.8)
  assert weight.kernel_op()[0] == op
  transform = None if a_order is None else (weight.hadamard_signs, weight.hadamard_block)
  choice = fmm.choose_path(op, m_rows, 384, 48, act_format=weight.kernel_op()[1],
                           weight_format=weight_format, transform=transform)
  assert choice.path in fmm.PATHS[op]
  if op == "w4a4":  # the in-loop kernel at every M (dispatch.py)
    assert choice.path == "triton_int8"
  else:
    assert (m_rows <= 64) == (not choice.path.startswith(("xla", "unpacked")))
  if weight_format == "int4":
    assert not choice.path.endswith("fp8")
  x = jnp.asarray(rng.normal(size=(2, m_rows // 2, 384)), x_dtype)
  bias = jnp.asarray(5 * rng.normal(size=48), jnp.float32)
  with common.kernel_impl("reference"):
    expected = np.asarray(weight.linear(x, bias).astype(jnp.float32), np.float64)
  with common.kernel_impl("pallas"):
    got = np.asarray(weight.linear(x, bias).astype(jnp.float32), np.float64)
    old = weight.replace(packed_codes=jnp.asarray(
        fmm.packing.pack_bits(weight.codes(), 4, axis=0)), layout="pack_bits")
    got_old = np.asarray(old.linear(x, bias).astype(jnp.float32), np.float64)
  assert got.shape == expected.shape == (2, m_rows // 2, 48)
  # bf16 x: the reference rounds its dequantized weight and its output to bf16 (~2^-9 each);
  # W4A16 float32 x: the kernels' bf16 operands; 8-bit operands with float32 accumulation:
  # near-tie code flips only.  (Dropping the bias alone would be a ~5 % error.)
  bound = 1e-2 if x_dtype == jnp.bfloat16 else (5e-3 if op == "w4a16" else 1e-3)
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < bound
  np.testing.assert_allclose(got_old, got, atol=1e-6 * np.abs(expected).max())


def test_choose_path_falls_back_where_kernels_do_not_apply():
  # No transform: ragged K is zero-padded to the kernel's row, so it applies
  assert fmm.choose_path("w4a4", 8, 40, 64, act_format="e2m1").path == "triton_int8"
  block = jnp.eye(3)  # K = 48 = 3 x 16: the kernel takes it; K = 24 = 3 x 8: it does not
  assert fmm.choose_path("w4a4", 8, 48, 64, act_format="e2m1",
                         transform=(jnp.ones(48), block)).path == "triton_int8"
  assert fmm.choose_path("w4a4", 8, 24, 64, act_format="e2m1",
                         transform=(jnp.ones(24), block)).path == "xla_int8"
  assert fmm.choose_path("w4a4", 8, 384, 64, act_format="e2m1").path == "triton_int8"
  # fp8 images only for formats with an exact E4M3 image (INT4 has none)
  path = fmm.choose_path("w4a4", 8, 384, 64, act_format="int4", device_kind="H100").path
  assert not path.endswith("fp8")
  assert fmm.choose_path("w4a8", 4096, 1152, 1152, device_kind="H100").path == "unpacked_triton_fp8"
  # an INT4 weight has no E4M3 image: the bf16 image on Hopper too
  assert fmm.choose_path("w4a8", 4096, 1152, 1152, device_kind="H100",
                         weight_format="int4").path == "unpacked_triton_bf16"
  assert fmm.choose_path("w4a8", 4096, 1152, 1152, device_kind="A100").path == "unpacked_triton_bf16"
  with pytest.raises(ValueError, match="act_format"):
    fmm.linear("w4a4", jnp.ones((2, 128)), fp4_mma.pack_weight(np.zeros((128, 16), np.int32),
                                                               np.ones(16), "e2m1"))


@pytest.mark.parametrize("name", FORMATS)
def test_binary_search_encode_matches_the_midpoint_scan(name):
  """fp4.encode_magnitudes (3 comparisons per element) == the 7-midpoint scan, ties and their
  float32 neighbours included, on both signs, past saturation and at zero."""
  mags = fp4.fp4_code(name).magnitudes
  mids = [np.float32((mags[t] + mags[t + 1]) / 2) for t in range(7)]
  up = [np.nextafter(m, np.float32(np.inf)) for m in mids]
  down = [np.nextafter(m, np.float32(-np.inf)) for m in mids]
  points = np.array(list(mags) + mids + up + down + [mags[-1] * 1.5, 1e30, 0.0], np.float32)
  rng = _rng(5)
  v = np.concatenate([points, -points, rng.normal(size=20000).astype(np.float32) * mags[-1]])
  codes = fp4.encode_magnitudes_linear_scan(jnp.asarray(v), mags)
  np.testing.assert_array_equal(np.asarray(fp4.encode_magnitudes(jnp.asarray(v), mags)),
                                np.asarray(codes))
  # the int8 image straight from the search == the codes through the int8 table
  code = fp4.fp4_code(name)
  np.testing.assert_array_equal(np.asarray(fp4.encode_int8_image(jnp.asarray(v), code)),
                                np.asarray(fp4.int8_values(codes, code)))


def _tie_points(code):
  """Every grid value, midpoint and the midpoints' float32 neighbours, both signs, in int8-image
  units, plus past-saturation values and zeros."""
  ints = np.asarray(code.int_magnitudes, np.float32)
  mids = (ints[1:] + ints[:-1]) / np.float32(2)
  points = np.concatenate([ints, mids, np.nextafter(mids, np.float32(np.inf)),
                           np.nextafter(mids, np.float32(-np.inf)),
                           [ints[-1] * 1.5, ints[-1] * (1 + 2**-22), 1e30, 0.0, -0.0]])
  return points.astype(np.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_magic_rounding_matches_the_search(name):
  """fp4.round_int_units / int8_image_bits / encode_e4m3_image (the kernel's magic-number add)
  == the midpoint search's codes through the tables, eagerly and under jit (XLA must not fold
  the add and the subtraction away), on every tie and its float32 neighbours."""
  code = fp4.fp4_code(name)
  if not fp4.rounds_by_magic(code):  # E3M0: ties alternate between indices
    assert name == "e3m0"
    with pytest.raises(ValueError, match="alternate"):
      fp4.round_int_units(jnp.ones(3), code)
    return
  rng = _rng(31)
  points = _tie_points(code)
  t = np.concatenate([points, -points, rng.normal(size=20000).astype(np.float32)
                      * np.float32(code.int_magnitudes[-1])])
  v = t / np.float32(code.multiplier)  # exact: the multiplier is a power of two
  want = np.asarray(fp4.int8_values(fp4.encode_magnitudes_linear_scan(jnp.asarray(v),
                                                                      code.magnitudes), code))
  for fn in (lambda f: f, jax.jit):
    rounded = fn(lambda t: fp4.round_int_units(t, code))(jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(rounded), want.astype(np.float32))
    assert not np.signbit(np.asarray(rounded)[want == 0]).any()  # -0 comes out as +0
    bits = fn(lambda t: fp4.int8_image_bits(t, code))(jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(bits.astype(jnp.int8)), want.astype(np.int8))
    image = fn(lambda v: fp4.encode_int8_image(v, code))(jnp.asarray(v))
    np.testing.assert_array_equal(np.asarray(image), want)
    if code.has_e4m3_image:
      e4m3 = fn(lambda v: fp4.encode_e4m3_image(v, code))(jnp.asarray(v))
      np.testing.assert_array_equal(np.asarray(e4m3), want / code.multiplier * code.e4m3_factor)
  # saturate=False: exact for rows scaled by their own absmax (|t| <= top to a few ulps)
  inside = np.abs(t) <= code.int_magnitudes[-1] * (1 + 2**-22)
  unclamped = jax.jit(lambda t: fp4.round_int_units(t, code, saturate=False))(jnp.asarray(t))
  np.testing.assert_array_equal(np.asarray(unclamped)[inside], want[inside].astype(np.float32))
  with pytest.raises(ValueError, match="rounding"):
    fp4.encode_int8_image(jnp.ones(2), code, rounding="nearest")


def test_split_bf16_is_exact_to_2_pow_16():
  """act_quant._split_bf16 (bit rounding, no conversion): hi is exactly bf16, and hi + lo equals
  v to 2^-16 relative, on random magnitudes over many binades, ties of the bit rounding, both
  signs and zero."""
  rng = _rng(41)
  v = (rng.normal(size=50000) * np.exp(rng.uniform(-30, 30, size=50000))).astype(np.float32)
  ties = (np.arange(1, 200, dtype=np.uint32) << 16 | np.uint32(0x8000)) + np.uint32(0x3F800000)
  v = np.concatenate([v, ties.view(np.float32), -ties.view(np.float32), [0.0, -0.0, 1.0]])
  hi, lo = aq._split_bf16(jnp.asarray(v))
  hi32 = np.asarray(hi.astype(jnp.float32), np.float64)
  total = hi32 + np.asarray(lo.astype(jnp.float32), np.float64)
  np.testing.assert_array_less(np.abs(total - v), 2.0**-16 * np.abs(v) + 1e-45)
  assert np.all(np.abs(v - hi32) <= 2.0**-8 * np.abs(v))  # hi is v rounded to bf16


@pytest.mark.parametrize("k_features,a_order,samples,tokens", [(1152, 36, 2, 5), (4608, 36, 1, 3)])
def test_quantize_rows_dense_signs_matches_reference(k_features, a_order, samples, tokens):
  """dense_signs (a Hadamard block: the kernel multiplies by its signs and puts the magnitude
  into the row scale) computes the general path's function, with and without the LayerNorm
  prologue, on the model's own transform (quant.hadamard kind 'hadamard')."""
  from dit_quant_jax.quant import hadamard
  rng = _rng(k_features + 3)
  model = hadamard.make_transform(k_features, seed=5)
  assert model.kind == "hadamard" and model.block_order == a_order
  block = np.abs(model.block)
  assert np.all(block == block[0, 0])  # what dense_signs asserts
  transform = (jnp.asarray(model.signs), jnp.asarray(model.block))
  x, mul, add = _row_norm_inputs(rng, samples, tokens, k_features, jnp.bfloat16)
  # clip 0.85: the magic rounding saturates; 1.0: it leaves the clamp out (the rows' own absmax)
  for norm, clip in ((None, 0.85), (aq.RowNorm(mul, add, tokens, 1e-6), 1.0)):
    kwargs = {} if norm is None else norm.kwargs()
    for act_format, image in (("e2m1", "int8"), ("e1m2", "fp8"), ("fp8_e4m3", "fp8")):
      ref, ref_scale = aq.quantize_rows_xla(x, transform, act_format=act_format, image=image,
                                            clip_ratio=clip, **kwargs)
      got, scale = aq.quantize_rows(x, transform, act_format=act_format, image=image,
                                    clip_ratio=clip, interpret=True, dense_signs=True,
                                    tokens_per_program=2, **kwargs)
      np.testing.assert_allclose(np.asarray(scale), np.asarray(ref_scale), rtol=2e-5)
      flips = (np.asarray(got.astype(jnp.float32)) != np.asarray(ref.astype(jnp.float32)))
      # near-ties of bf16x3 only (a wrong sign or magnitude would move most codes); E4M3's
      # grid has 16x the rounding boundaries of a 4-bit one, so more of them
      limit = 1e-3 if act_format == "fp8_e4m3" else 3e-4
      assert flips.sum() <= max(4, limit * flips.size), flips.sum()
      g, r = (np.asarray(v.astype(jnp.float32))[flips] for v in (got, ref))
      step_at_zero = 1.0 if image == "int8" else 2.0**-6  # the images' smallest grid steps
      assert np.all(np.abs(g - r) <= 0.5 * np.abs(r) + step_at_zero)  # one grid step at most


@pytest.mark.parametrize("k_features,tokens", [(4608, 5), (1152, 7)])
def test_quantize_rows_signs_per_token_is_the_same_function(k_features, tokens):
  """signs_per_token (sm_80's K = 4608 kernel reloads a bf16 copy of the signs per token
  instead of holding them) gives the held kernel's codes and scales exactly, on bf16 rows of a
  ragged token count (the last program part empty), one and several tokens per tile, and
  matches the XLA reference up to bf16x3's near-ties."""
  from dit_quant_jax.quant import hadamard
  rng = _rng(k_features + 11)
  model = hadamard.make_transform(k_features, seed=7)
  transform = (jnp.asarray(model.signs), jnp.asarray(model.block))
  x = jnp.asarray(rng.normal(size=(tokens, k_features)) * rng.uniform(0.1, 4.0, (tokens, 1)),
                  jnp.bfloat16)
  outputs = {}
  for reload in (False, True):
    outputs[reload] = aq.quantize_rows(x, transform, act_format="e2m1", image="int8",
                                       clip_ratio=0.9, interpret=True, dense_signs=True,
                                       tokens_per_program=4, signs_per_token=reload)
  for held, reloaded in zip(outputs[False], outputs[True]):
    np.testing.assert_array_equal(np.asarray(held), np.asarray(reloaded))
  ref, ref_scale = aq.quantize_rows_xla(x, transform, act_format="e2m1", image="int8",
                                        clip_ratio=0.9)
  np.testing.assert_allclose(np.asarray(outputs[True][1]), np.asarray(ref_scale), rtol=2e-5)
  flips = np.asarray(outputs[True][0]) != np.asarray(ref)
  assert flips.sum() <= max(4, 3e-4 * flips.size), flips.sum()


def test_default_signs_per_token_only_where_the_held_tile_spilled():
  """Reloaded on sm_80 (and other non-Hopper GPUs) where one token's tile exceeds the register
  budget (K = 4608: 64 x 128 at 4 warps); held on Hopper, on the CPU and at K = 1152."""
  wide, narrow = aq.row_shape(4608, 36), aq.row_shape(1152, 36)
  assert wide == (36, 128) and narrow == (36, 32)
  assert aq.default_signs_per_token(*wide, 4, "ampere")
  assert aq.default_signs_per_token(*wide, 4, "gpu")
  assert not aq.default_signs_per_token(*wide, 4, "hopper")
  assert not aq.default_signs_per_token(*wide, 4, "cpu")
  assert not aq.default_signs_per_token(*narrow, 4, "ampere")
  assert not aq.default_signs_per_token(*wide, 8, "ampere")  # 32 elements per thread: fits


def test_split_bf16_f16_is_exact_to_2_pow_18():
  """act_quant._split_bf16_f16: hi is v's bf16 truncation (exact), lo its float16 residual, and
  hi + lo equals v to 2^-18 relative wherever lo is a float16 normal (|v| >= 2^-7), to 2^-25
  absolute below; float16's range holds every lo of |v| < 2^22 (the kernel's prescaled rows)."""
  rng = _rng(44)
  v = (rng.normal(size=50000) * np.exp(rng.uniform(-12, 14.5, size=50000))).astype(np.float32)
  v = np.concatenate([v, [0.0, -0.0, 1.0, -(2.0**22) * 0.999]]).astype(np.float32)
  hi, lo = aq._split_bf16_f16(jnp.asarray(v))
  assert hi.dtype == jnp.bfloat16 and lo.dtype == jnp.float16
  hi64 = np.asarray(hi.astype(jnp.float32), np.float64)
  lo64 = np.asarray(lo.astype(jnp.float32), np.float64)
  assert np.all(np.isfinite(lo64))
  truncated = (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
  np.testing.assert_array_equal(hi64, truncated.astype(np.float64))
  error = np.abs(hi64 + lo64 - v)
  normal = np.abs(v) >= 2.0**-7
  np.testing.assert_array_less(error[normal], 2.0**-18 * np.abs(v[normal]) + 1e-45)
  assert np.all(error[~normal] <= 2.0**-25)


@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 3e4])
def test_quantize_rows_norm_prescale_keeps_codes_at_any_modulation_scale(magnitude):
  """The LayerNorm-fused kernel's float16 lo parts (f16_lo): scaled by a power of two chosen
  from mul / add, its rows neither overflow float16 (mul ~ 3e4: unscaled, the lo parts of the
  transformed rows would pass 65504 and give inf) nor lose precision in its subnormals
  (mul ~ 1e-4); the codes stay the float64 reference's but for near-ties, the scales within
  float32 rounding."""
  from dit_quant_jax.quant import hadamard
  rng = _rng(45)
  k_features, tokens = 1152, 4
  model = hadamard.make_transform(k_features, seed=5)
  transform = (jnp.asarray(model.signs), jnp.asarray(model.block))
  x, mul, add = _row_norm_inputs(rng, 2, tokens, k_features, jnp.bfloat16)
  mul, add = mul * magnitude, add * magnitude
  y64 = _row_norm_float64(x, mul, add, tokens) @ _dense_q(transform, k_features)
  norm = aq.RowNorm(mul, add, tokens, 1e-6)
  got, scale = aq.quantize_rows(x, transform, act_format="e2m1", image="int8", interpret=True,
                                dense_signs=True, tokens_per_program=3, **norm.kwargs())
  scale64 = np.abs(y64).max(axis=1) / 6.0 / 2.0  # absmax -> E2M1's 6, int8 image units x2
  np.testing.assert_allclose(np.asarray(scale), scale64, rtol=2e-5)
  ref = np.asarray(aq.quantize_rows_xla(x, transform, act_format="e2m1", image="int8",
                                        **norm.kwargs())[0])
  _assert_near_ties(got, jnp.asarray(ref), y64, scale64 * 2.0)
  assert float(aq.rows_prescale(mul, add, k_features, 32)) == 2.0 ** (
      aq.F16_LO_TOP - np.frexp(np.float32(32 * (np.sqrt(k_features) * np.abs(mul).max()
                                                 + np.abs(add).max())))[1])


def test_bf16_signs_fit_the_registers():
  # K = 1152 (3 tokens in a 128 x 32 tile: 32 elements per thread at 4 warps): bf16 signs
  assert aq.bf16_signs_fit(128, 32, 4, dense_signs=False)
  # K = 4608 (64 x 128: 64 per thread): only with the two-dot stage of dense_signs
  assert not aq.bf16_signs_fit(64, 128, 4, dense_signs=False)
  assert aq.bf16_signs_fit(64, 128, 4, dense_signs=True)


def test_fp4_weight_hadamard_kind_reaches_the_kernel(monkeypatch):
  """HQ-DiT's FP4Weight records its block kind, and its kernel path asks quantize_rows for the
  sign-form dense factor only for a real Hadamard block."""
  from dit_quant_jax.kernels import common
  from dit_quant_jax.quant import hadamard
  rng = _rng(43)
  model = hadamard.make_transform(384, seed=2)
  weight = _hqdit_weight(rng, 384, 48, "e2m1", "per_token", None, "e2m1",
                         hadamard_signs=jnp.asarray(model.signs),
                         hadamard_block=jnp.asarray(model.block))
  seen = []
  original = aq.quantize_rows

  def spy(*args, **kwargs):
    seen.append(kwargs.get("dense_signs", False))
    return original(*args, **kwargs)

  monkeypatch.setattr(aq, "quantize_rows", spy)
  x = jnp.asarray(rng.normal(size=(80, 384)), jnp.float32)
  outputs = []
  for kind, expected in (("hadamard", True), ("random", False), (None, False)):
    seen.clear()
    with common.kernel_impl("pallas"):
      outputs.append(np.asarray(weight.replace(hadamard_kind=kind).linear(x, None)))
    assert seen == [expected], (kind, seen)
  # the sign form computes the general dense factor's function (near-tie flips aside)
  np.testing.assert_allclose(outputs[0], outputs[2], atol=1e-2 * np.abs(outputs[2]).max())


def test_fused_gelu_matches_the_closed_form():
  """numerics/activation: the epilogue's exp2 / division form of GELU (tanh) == the float64
  closed form and jax.nn.gelu(approximate=True), over the range and past where exp2 overflows."""
  from dit_quant_jax.numerics import activation
  y = np.concatenate([np.linspace(-12, 12, 20001), [-200.0, -60.0, 60.0, 200.0, 0.0]])
  y = y.astype(np.float32)
  want = activation.reference_float64("gelu_tanh", y)
  for fn in (lambda f: f, jax.jit):
    got = np.asarray(fn(lambda v: activation.fused("gelu_tanh", v))(jnp.asarray(y)), np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  unfused = np.asarray(activation.unfused("gelu_tanh", jnp.asarray(y)), np.float64)
  # jax.nn.gelu's 1 + tanh(u) cancels for x < -4 (-0.0 where the value is ~ -1e-7)
  np.testing.assert_allclose(unfused, want, rtol=2e-6, atol=1e-6)
  # the tanh form the compiled kernels use (with the hardware's tanh.approx there)
  tanh_form = np.asarray(activation.fused("gelu_tanh", jnp.asarray(y), tanh=jnp.tanh), np.float64)
  np.testing.assert_allclose(tanh_form, want, rtol=2e-6, atol=1e-6)
  assert activation.fused(None, jnp.asarray(y)) is not None
  with pytest.raises(ValueError, match="unknown output activation"):
    activation.check("relu6")


def common_on_gpu():
  from dit_quant_jax.kernels import common
  return common.on_gpu()


# One path per implementation of the epilogue: the references, XLA's folded bf16 dot, its
# 8-bit dot with the scale epilogue, fp4_mma with in-loop decode and on the decoded image.
ACTIVATION_PATHS = [("w4a16", "reference"), ("w4a16", "xla_bf16"), ("w4a16", "triton_bf16"),
                    ("w4a8", "reference"), ("w4a8", "unpacked_triton_bf16"),
                    ("w4a4", "reference"), ("w4a4", "xla_int8"), ("w4a4", "triton_int8"),
                    ("w4a4", "unpacked_triton_int8")]


@pytest.mark.parametrize("op,path", ACTIVATION_PATHS)
def test_paths_fuse_the_output_activation(op, path):
  """fp4_matmul.linear(activation='gelu_tanh') on every path == the path's output with GELU
  applied afterwards in float32 (the epilogue applies it before the output cast)."""
  from dit_quant_jax.numerics import activation
  x, weight, bias, transform = _path_inputs(13, 20, 256, 40, "e2m1", 8 if op != "w4a16" else None)
  kwargs = dict(path=path, out_dtype=jnp.float32)
  if op != "w4a16":
    kwargs.update(transform=transform, clip_ratio=0.9)
  if op == "w4a4":
    kwargs["act_format"] = "e2m1"
  plain = fmm.linear(op, x, weight, bias, **kwargs)
  fused = fmm.linear(op, x, weight, bias, activation="gelu_tanh", **kwargs)
  want = activation.reference_float64("gelu_tanh", np.asarray(plain, np.float64))
  # compiled on a GPU the Triton epilogues use tanh.approx.f32 (~2^-12 |y| absolute)
  tol = 1e-3 if common_on_gpu() and path.startswith(("triton", "unpacked")) else 1e-5
  np.testing.assert_allclose(np.asarray(fused), want, rtol=tol, atol=tol * np.abs(want).max())
  with pytest.raises(ValueError, match="unknown output activation"):
    fmm.linear(op, x, weight, bias, activation="swish", **kwargs)


def test_fp4_mma_split_k_epilogue_applies_the_activation():
  from dit_quant_jax.numerics import activation
  x, weight, bias, _ = _path_inputs(14, 16, 512, 32, "e2m1", None)
  xb = x.astype(jnp.bfloat16)
  ones = jnp.ones((16,), jnp.float32)
  # the plain tile, a K split and stream-K (its fix-up runs the epilogue 32 columns at a time)
  for launch in (dict(split_k=1), dict(split_k=2), dict(stream_k=3)):
    plain = fp4_mma.fp4_mma(xb, ones, weight, bias, dot_kind="bf16", block_m=16, block_n=64,
                            interpret=True, **launch)
    fused = fp4_mma.fp4_mma(xb, ones, weight, bias, dot_kind="bf16", block_m=16, block_n=64,
                            interpret=True, activation="gelu_tanh", **launch)
    want = activation.reference_float64("gelu_tanh", np.asarray(plain, np.float64))
    np.testing.assert_allclose(np.asarray(fused), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["e1m2", "e2m1", "e3m0"])
def test_packed_bf16_decode_bit_model_gives_the_values(name):
  """The compiled kernels' packed bf16 decode (fp4_mma.packed_bf16_decode_asm: sign to bit 15,
  magnitude bits to [7 - M, 10 - M), then an FMA by 2^(127 - bias)): its bit model, on every
  byte and both nibble planes, is the code's value times 2^(bias - 127) exactly (subnormal codes
  as bf16 subnormals), and the asm text carries the model's constants."""
  import ml_dtypes
  code = fp4.fp4_code(name)
  assert fp4_mma.packed_bf16_decode_applies(code, "bf16")
  assert not fp4_mma.packed_bf16_decode_applies(code, "int8")
  assert not fp4_mma.packed_bf16_decode_applies(fp4.fp4_code("int4"), "bf16")
  byte_tile = np.arange(256, dtype=np.uint8).reshape(16, 16)
  for plane in (0, 1):
    bits = fp4_mma.packed_bf16_decode_model(byte_tile, code, plane)
    values = bits.view(ml_dtypes.bfloat16).astype(np.float64) * 2.0 ** (127 - code.bias)
    codes = (byte_tile >> 4) if plane else (byte_tile & 15)
    np.testing.assert_array_equal(values, code.lut[codes].astype(np.float64))
    params = fp4_mma.packed_bf16_decode_params(code, plane)
    asm = fp4_mma.packed_bf16_decode_asm(code, plane)
    assert f"shl.b32 a, t, {params['mag_shift']};" in asm
    assert f"{params['mag_mask']:#010x}" in asm and f"{params['factor']:#010x}" in asm
    assert asm.count("fma.rn.bf16x2") == 2 and "$2" in asm  # 4 bytes in, 2 bf16 pairs out
  # the factor is exact in bf16 and the column scale takes the int image's multiplier back
  assert fp4_mma._bf16_bits(2.0 ** (127 - code.bias)) << 16 == \
      int(np.array(2.0 ** (127 - code.bias), np.float32).view(np.uint32))


def test_prmt_model_follows_the_ptx_definition():
  """fp4_mma._prmt (the numpy PRMT of the packed decodes' models) on hand cases of the PTX
  ISA's default mode: selector nibble i picks byte (nibble & 7) of {b, a} for byte i of the
  result, and with its bit 3 set replicates that byte's sign bit."""
  a, b = np.array([0x44332211], np.uint32), np.array([0x88776655], np.uint32)
  assert fp4_mma._prmt(a, b, np.array([0x3210], np.uint32))[0] == 0x44332211
  assert fp4_mma._prmt(a, b, np.array([0x7654], np.uint32))[0] == 0x88776655
  assert fp4_mma._prmt(a, b, np.array([0x0167], np.uint32))[0] == 0x11227788
  # bit 3: byte 7 (0x88, sign set) -> 0xFF, byte 0 (0x11) -> 0x00; bits above 15 are ignored
  assert fp4_mma._prmt(a, b, np.array([0xABCD0F08], np.uint32))[0] == 0x11FF1100
  assert fp4_mma._prmt(a, np.zeros(1, np.uint32), np.array([0x4140], np.uint32))[0] == 0x00220011
  assert fp4_mma._lop3(np.array([0xF0], np.uint32), np.array([0xCC], np.uint32),
                       np.array([0xAA], np.uint32), 0xBE)[0] == 0xBE


@pytest.mark.parametrize("name", ["e1m2", "e2m1", "e3m0", "int4"])
def test_packed_8bit_decode_model_gives_the_images(name):
  """The compiled kernels' packed int8 / E4M3 decode (fp4_mma.packed_8bit_decode_asm: byte
  permutes through the magnitude table, the sign by the permute's sign-replicate mode): its
  model, instruction by instruction, gives decode_image's bytes for both nibble planes of every
  byte value at every position of the word (E4M3: -0 as +0), and the asm is that program."""
  code = fp4.fp4_code(name)
  rng = _rng(46)
  words = [rng.integers(0, 2**32, size=2048, dtype=np.uint64).astype(np.uint32)]
  for position in range(4):  # each byte position takes all 256 values
    base = rng.integers(0, 2**32, size=256, dtype=np.uint64).astype(np.uint32)
    base &= ~np.uint32(0xFF << (8 * position))
    words.append(base | (np.arange(256, dtype=np.uint32) << np.uint32(8 * position)))
  words = np.concatenate(words)
  tile_bytes = words.view(np.uint8).reshape(-1, 4)
  kinds = [k for k in ("int8", "fp8") if fp4_mma.packed_8bit_decode_applies(code, k)]
  assert kinds == (["int8", "fp8"] if code.has_e4m3_image else ["int8"])
  assert not fp4_mma.packed_8bit_decode_applies(code, "bf16")
  for kind in kinds:
    for plane in (0, 1):
      got = fp4_mma.packed_8bit_decode_model(words, code, kind, plane).view(np.uint8)
      codes = (tile_bytes >> 4) if plane else (tile_bytes & 15)
      want = np.asarray(fp4_mma.decode_image(jnp.asarray(codes.astype(np.int32)), code, kind))
      want = want.view(np.uint8).reshape(-1)
      if kind == "fp8":
        want = np.where(want == 0x80, 0, want)  # -0 (code 8)
      np.testing.assert_array_equal(got, want)
      asm = fp4_mma.packed_8bit_decode_asm(code, kind, plane)
      program = fp4_mma.packed_8bit_decode_program(code, kind, plane)
      assert asm.count("prmt.b32") == sum(op[0] == "prmt" for op in program) == 5
      assert "$1" in asm and "$2" not in asm  # one input, one result register
      assert f"{program[0][2]:#010x}" in asm and f"{program[1][2]:#010x}" in asm  # the table
  # the two planes' programs differ in their last (unmixing) permute only
  first, second = (fp4_mma.packed_8bit_decode_program(code, "int8", p) for p in (0, 1))
  assert first[:-1] == second[:-1] and first[-1] != second[-1]


def test_quantize_rows_zero_and_subnormal_rows_get_scale_one():
  """A row of zeros or of float32 subnormals (absmax ~1e-39): scale 1, every code 0, no NaN /
  inf from the reciprocal of a subnormal scale, in the kernel and the reference alike."""
  rng = _rng(51)
  x = rng.normal(size=(4, 384)).astype(np.float32)
  x[1] = 0.0
  x[2] = rng.normal(size=384).astype(np.float32) * np.float32(1e-39)
  transform = _transform(rng, 384, 12)
  for act_format, image, clip in (("e2m1", "int8", 0.9), ("e2m1", "fp8", 1.0),
                                  ("fp8_e4m3", "fp8", 1.0)):
    ref, ref_scale = aq.quantize_rows_xla(jnp.asarray(x), transform, act_format=act_format,
                                          image=image, clip_ratio=clip)
    got, scale = aq.quantize_rows(jnp.asarray(x), transform, act_format=act_format,
                                  image=image, clip_ratio=clip, interpret=True)
    for values, scales in ((got, scale), (ref, ref_scale)):
      values = np.asarray(values.astype(jnp.float32))
      assert np.all(np.isfinite(values)) and np.all(np.isfinite(np.asarray(scales)))
      assert not values[1:3].any()
      factor = fp4.fp4_code(act_format).multiplier if image == "int8" else (
          1.0 if act_format == "fp8_e4m3" else fp4.fp4_code(act_format).e4m3_factor)
      np.testing.assert_allclose(np.asarray(scales)[1:3] * factor, 1.0)
