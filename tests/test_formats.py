"""Number formats: exact value sets, codes, ties-to-even rounding, FP8 against ml_dtypes,
bit packing of FP4Weight codes, and errors for unknown formats / bit widths."""

import itertools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dit_quant_jax.quant import formats, packing
from dit_quant_jax.quant.hqdit import FP4Weight

# Expected non-negative magnitudes (notes/interfaces.md and the bias choices in formats.py).
EXPECTED_MAGNITUDES = {
    "e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "e1m2": [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75],
    "e3m0": [0, 0.25, 0.5, 1, 2, 4, 8, 16],
    "int4": [0, 1, 2, 3, 4, 5, 6, 7],
    "int2": [0, 1],
    "int3": [0, 1, 2, 3],
    "int8": list(range(128)),
}
EXPECTED_MULTIPLIER = {"e2m1": 2, "e1m2": 4, "e3m0": 4, "int4": 1}
ALL_FORMATS = ["e1m2", "e2m1", "e3m0", "fp8_e4m3", "int2", "int3", "int4", "int8"]


def minifloat_value(sign, exponent, mantissa, e_bits, m_bits, bias):
  """Bit fields -> value, written out independently of formats.py."""
  if exponent == 0:
    value = mantissa / 2**m_bits * 2.0**(1 - bias)
  else:
    value = (1 + mantissa / 2**m_bits) * 2.0**(exponent - bias)
  return -value if sign else value


def nearest_even_reference(values, magnitudes):
  """float64 brute force: nearest magnitude index of |v| (ties to even index, saturating)."""
  mags = np.asarray(magnitudes, np.float64)
  out = []
  for v in np.abs(np.asarray(values, np.float64)).ravel():
    v = min(v, mags[-1])
    dist = np.abs(mags - v)
    best = np.flatnonzero(dist == dist.min())
    even = [i for i in best if i % 2 == 0]
    out.append(even[0] if even else best[0])
  return np.asarray(out).reshape(np.shape(values))


@pytest.mark.parametrize("name", sorted(EXPECTED_MAGNITUDES))
def test_exact_magnitudes(name):
  fmt = formats.get_format(name)
  np.testing.assert_array_equal(np.asarray(fmt.magnitudes), EXPECTED_MAGNITUDES[name])
  assert fmt.bits == (8 if name == "int8" else int(name[-1]) if name.startswith("int") else 4)


@pytest.mark.parametrize("name,layout", [("e1m2", (1, 2, 1)), ("e2m1", (2, 1, 1)), ("e3m0", (3, 0, 3))])
def test_fp4_codes_are_bit_fields(name, layout):
  """Code c = sign | exponent | mantissa decodes to the IEEE-style value of those fields."""
  e_bits, m_bits, bias = layout
  fmt = formats.get_format(name)
  lut = fmt.lut
  for code in range(16):
    sign, rest = code >> 3, code & 7
    expected = minifloat_value(sign, rest >> m_bits, rest & (2**m_bits - 1), e_bits, m_bits, bias)
    assert lut[code] == expected, (name, code)
  decoded = np.asarray(formats.decode(jnp.arange(16, dtype=jnp.uint8), fmt))
  np.testing.assert_array_equal(decoded, lut)


@pytest.mark.parametrize("name", ["e1m2", "e2m1", "e3m0", "int4"])
def test_integer_lut(name):
  fmt = formats.get_format(name)
  assert fmt.multiplier == EXPECTED_MULTIPLIER[name]
  assert fmt.int_lut.dtype == np.int8
  np.testing.assert_array_equal(fmt.int_lut.astype(np.float64), fmt.lut.astype(np.float64) * fmt.multiplier)


@pytest.mark.parametrize("name", ["e1m2", "e2m1", "e3m0", "int4", "int3"])
def test_encode_decode_round_trip(name):
  fmt = formats.get_format(name)
  codes = np.arange(fmt.num_codes)
  values = fmt.lut[codes]
  re_encoded = np.asarray(formats.encode(values, fmt))
  # -0 (code 1 << (bits-1)) canonicalizes to +0 (code 0); every other code is its own.
  negative_zero = 1 << (fmt.bits - 1)
  expected = np.where(codes == negative_zero, 0, codes)
  np.testing.assert_array_equal(re_encoded, expected)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_round_to_nearest_matches_brute_force(name):
  fmt = formats.get_format(name)
  rng = np.random.default_rng(1)
  top = fmt.max_value
  # Dense in the subnormal range, across the grid, and beyond the max (saturation).
  values = np.concatenate([
      rng.uniform(-fmt.min_positive * 2, fmt.min_positive * 2, 300),
      rng.uniform(-top, top, 600),
      rng.uniform(-3 * top, 3 * top, 100),
  ]).astype(np.float32)
  idx = nearest_even_reference(values, fmt.magnitudes)
  expected = np.sign(values) * np.asarray(fmt.magnitudes)[idx]
  got = np.asarray(formats.quantize_to_grid(values, fmt))
  np.testing.assert_array_equal(got, expected.astype(np.float32))
  if fmt.bits <= 8:
    codes = np.asarray(formats.encode(values, fmt))
    np.testing.assert_array_equal(codes & ((1 << (fmt.bits - 1)) - 1), idx)
    np.testing.assert_array_equal(np.asarray(formats.decode(codes, fmt)), got)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_ties_to_even_at_every_midpoint(name):
  fmt = formats.get_format(name)
  mags = np.asarray(fmt.magnitudes, np.float64)
  mids = ((mags[1:] + mags[:-1]) / 2).astype(np.float32)
  assert np.all(mids.astype(np.float64) == (mags[1:] + mags[:-1]) / 2)  # exact ties
  for sign in (1.0, -1.0):
    got = np.asarray(formats.quantize_to_grid(sign * mids, fmt)) * sign
    lower, upper = mags[:-1], mags[1:]
    even_is_upper = (np.arange(1, len(mags)) % 2) == 0
    np.testing.assert_array_equal(got, np.where(even_is_upper, upper, lower))
    # Just off the tie, plain nearest.
    above = np.nextafter(mids, np.float32(np.inf))
    below = np.nextafter(mids, np.float32(-np.inf))
    np.testing.assert_array_equal(np.asarray(formats.quantize_to_grid(sign * above, fmt)) * sign, upper)
    np.testing.assert_array_equal(np.asarray(formats.quantize_to_grid(sign * below, fmt)) * sign, lower)


def test_ties_examples_e2m1():
  """Hand-worked E2M1 ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 3.5 -> 4, 5 -> 4."""
  got = np.asarray(formats.quantize_to_grid(np.array([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 7.0]), "e2m1"))
  np.testing.assert_array_equal(got, [0, 1, 1, 2, 4, 4, 6])


def test_fp8_e4m3_matches_ml_dtypes():
  fmt = formats.get_format("fp8_e4m3")
  finite = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  finite = np.unique(np.abs(finite[np.isfinite(finite)]))
  np.testing.assert_array_equal(np.asarray(fmt.magnitudes), finite)
  assert fmt.max_value == 448.0
  rng = np.random.default_rng(2)
  values = np.concatenate([rng.standard_normal(500) * 10, rng.uniform(-448, 448, 500),
                           rng.uniform(-0.02, 0.02, 200)]).astype(np.float32)
  reference = values.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(formats.quantize_to_grid(values, fmt)), reference)
  # Codes are the float8_e4m3fn bytes.
  codes = np.asarray(formats.encode(values, fmt))
  np.testing.assert_array_equal(codes[reference != 0],
                                values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)[reference != 0])


def test_fake_quantize_scales():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((5, 7)).astype(np.float32)
  scale = rng.uniform(0.1, 1.0, (1, 7)).astype(np.float32)
  got = np.asarray(formats.fake_quantize(x, "e2m1", scale))
  idx = nearest_even_reference(x / scale, formats.get_format("e2m1").magnitudes)
  expected = np.sign(x) * np.asarray(formats.get_format("e2m1").magnitudes)[idx] * scale
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("name,k", [("e2m1", 7), ("e3m0", 10), ("int3", 9), ("fp8_e4m3", 5)])
def test_packing_round_trip(name, k):
  fmt = formats.get_format(name)
  rng = np.random.default_rng(4)
  n = 6
  codes = rng.integers(0, len(fmt.magnitudes), (k, n)) | (rng.integers(0, 2, (k, n)) << (fmt.bits - 1))
  scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
  weight = FP4Weight.from_codes(jnp.asarray(codes, jnp.uint8), scale, name)
  assert weight.packed_codes.dtype == jnp.uint8
  expected = fmt.lut[codes] * scale[None, :]
  if fmt.bits == 4:  # the kernels' tiled layout: K padded to 128, (N, 64) bytes per K tile
    assert weight.layout == "k_tiles"
    assert weight.packed_codes.shape == (n, 64)
    packed = np.asarray(weight.packed_codes)  # byte r of channel n: codes k = r | r + 64
    padded = np.zeros((128, n), np.int64)
    padded[:k] = codes
    np.testing.assert_array_equal(packed, (padded[:64] | (padded[64:] << 4)).T)
    # the older pack_bits layout (4-bit weights saved before) decodes to the same weight
    old = FP4Weight.from_codes(jnp.asarray(codes, jnp.uint8), scale, name, layout="pack_bits")
    assert old.packed_codes.shape == (packing.packed_length(k, 4), n)
    np.testing.assert_array_equal(np.asarray(old.packed_codes)[0], codes[0] | (codes[1] << 4))
    np.testing.assert_array_equal(np.asarray(old.dequantize()), expected.astype(np.float32))
    explicit = FP4Weight.from_codes(jnp.asarray(codes, jnp.uint8), scale, name, layout="k_tiles")
    np.testing.assert_array_equal(np.asarray(explicit.packed_codes), packed)
  else:
    assert weight.layout == "pack_bits"
    assert weight.packed_codes.shape == (packing.packed_length(k, fmt.bits), n)
    with pytest.raises(ValueError, match="4-bit formats"):
      FP4Weight.from_codes(jnp.asarray(codes, jnp.uint8), scale, name, layout="k_tiles")
  np.testing.assert_array_equal(np.asarray(weight.codes()), codes)
  np.testing.assert_array_equal(np.asarray(weight.dequantize()), expected.astype(np.float32))


@pytest.mark.parametrize("bad", ["e5m5", "fp16", "nf4", "int"])
def test_unknown_format_errors(bad):
  with pytest.raises(ValueError, match="unknown number format"):
    formats.get_format(bad)


@pytest.mark.parametrize("bad", ["int1", "int9", "int16"])
def test_unsupported_bit_width_errors(bad):
  with pytest.raises(ValueError, match="unsupported bit width"):
    formats.get_format(bad)
  with pytest.raises(ValueError, match="unsupported bit width"):
    formats.int_format(int(bad[3:]))


def test_aliases_and_dynamic_ranges():
  assert formats.get_format("FP4_E2M1") == formats.get_format("e2m1")
  ranges = {n: formats.get_format(n).dynamic_range for n in formats.FP4_FORMATS}
  assert ranges == {"e1m2": 7.0, "e2m1": 12.0, "e3m0": 64.0}
  # every 4-bit format covers 16 codes and 8 magnitudes
  for name, bits in itertools.product(formats.FP4_FORMATS, [4]):
    assert formats.get_format(name).num_codes == 2**bits
