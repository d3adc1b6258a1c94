"""Code tables of the 4-bit formats (E1M2, E2M1, E3M0, INT4) and FP8 E4M3, and the arithmetic
decodes the kernels use (no table lookups).

A 4-bit code is sign-magnitude: bit 3 is the sign, bits 2..0 the index ``i`` of the magnitude in
the format's sorted grid (for the minifloats ``i`` is the exponent-mantissa bit pattern
``(e << M) | f``).  ``quant/formats.py`` builds its ``Format`` objects from the tables here; the
rounding rule (nearest magnitude, ties to the even index, saturating) is documented there.

Minifloat value of exponent field ``e`` and mantissa field ``f`` (``E`` and ``M`` bits, bias):
``e = 0``: ``f / 2**M * 2**(1 - bias)``; ``e > 0``: ``(1 + f / 2**M) * 2**(e - bias)``.

Exact 8-bit images of the 4-bit codes (what the tensor-core paths multiply):

* FP8 E4M3 (bias 7): a 4-bit minifloat code ``c`` *is* an E4M3 byte after moving the sign to
  bit 7 and the 3 magnitude bits up by ``3 - M``:
  ``e4m3_bits = (c & 8) << 4 | (c & 7) << (3 - M)``.  The exponent field keeps ``e`` and the
  mantissa keeps ``f`` in its top bits, so subnormals map to subnormals and every value is
  ``fp4_value * 2**(bias - 7)`` exactly (E2M1, E1M2: 2**-6; E3M0: 2**-4).  The power of two goes
  into the per-channel / per-token scale.  INT4 has no such image (its grid is linear, 0..7, and
  E4M3 holds it exactly only through a conversion; use the int8 image).
* INT8: ``int8_value = multiplier * fp4_value`` (E2M1: x2 -> {0, 1, 2, 3, 4, 6, 8, 12};
  E1M2: x4 -> {0..7}; E3M0: x4 -> {0, 1, 2, 4, .., 64}; INT4: x1).  Decoded arithmetically from a
  packed 32-bit "register table": ``magnitude = (word >> (width * i)) & mask`` (width 4 when every
  integer magnitude is < 16, else two 8-bit-wide words selected by ``i >= 4``), then the sign.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

# (exponent bits, mantissa bits, bias) of the minifloats (biases justified in quant/formats.py).
MINIFLOAT_LAYOUT = {
    "e1m2": (1, 2, 1),
    "e2m1": (2, 1, 1),
    "e3m0": (3, 0, 3),
    "fp8_e4m3": (4, 3, 7),
}
# Smallest integer k with k * magnitudes all integers.
INT_MULTIPLIER = {"e1m2": 4, "e2m1": 2, "e3m0": 4, "fp8_e4m3": 2**9, "int4": 1}
FP8_E4M3_MAX = 448.0  # OCP FP8 spec, float8_e4m3fn largest finite value
FP8_E4M3_BIAS = 7
FP4_CODE_FORMATS = ("e1m2", "e2m1", "e3m0", "int4")
SIGN_BIT = 8  # bit 3 of a 4-bit code
MAGNITUDE_MASK = 7


def minifloat_magnitudes(exponent_bits: int, mantissa_bits: int, bias: int) -> list[float]:
  """All non-negative values of a minifloat, ascending (index = exponent-mantissa pattern)."""
  values = []
  for e in range(2**exponent_bits):
    for f in range(2**mantissa_bits):
      frac = f / 2**mantissa_bits
      values.append(frac * 2.0**(1 - bias) if e == 0 else (1 + frac) * 2.0**(e - bias))
  return values


@dataclasses.dataclass(frozen=True)
class Fp4Code:
  """What a kernel needs to know about a 4-bit code format (hashable: a static argument).

  name: 'e1m2' | 'e2m1' | 'e3m0' | 'int4';  magnitudes: the 8 grid values;  multiplier: int8
  image factor;  mantissa_bits / bias: minifloat layout (None for INT4).
  """

  name: str
  magnitudes: tuple
  multiplier: int
  mantissa_bits: int | None
  bias: int | None

  @property
  def has_e4m3_image(self) -> bool:
    return self.mantissa_bits is not None

  @property
  def e4m3_shift(self) -> int:
    """Left shift of the magnitude bits into an E4M3 byte (module doc)."""
    if not self.has_e4m3_image:
      raise ValueError(f"format {self.name} has no exact E4M3 bit image; use the int8 path")
    return 3 - self.mantissa_bits

  @property
  def e4m3_factor(self) -> float:
    """E4M3 image value / format value (a power of two)."""
    if not self.has_e4m3_image:
      raise ValueError(f"format {self.name} has no exact E4M3 bit image; use the int8 path")
    return 2.0**(self.bias - FP8_E4M3_BIAS)

  @property
  def int_magnitudes(self) -> tuple:
    return tuple(int(round(m * self.multiplier)) for m in self.magnitudes)

  @property
  def int_table_words(self) -> tuple:
    """(width, words): the int8 magnitudes packed into 32-bit words, entry i at bits
    [width*i, width*(i+1)) of word 0 (width 4) or of word i // 4 (width 8)."""
    mags = self.int_magnitudes
    width = 4 if max(mags) < 16 else 8
    per_word = 32 // width
    words = []
    for start in range(0, len(mags), per_word):
      word = 0
      for j, m in enumerate(mags[start:start + per_word]):
        word |= m << (width * j)
      words.append(word)
    return width, tuple(words)

  @property
  def lut(self) -> np.ndarray:
    """(16,) float32 code -> value."""
    mags = np.asarray(self.magnitudes, np.float32)
    return np.concatenate([mags, -mags])


@functools.lru_cache(maxsize=None)
def fp4_code(name: str) -> Fp4Code:
  """The 4-bit code format ``name`` ('e1m2', 'e2m1', 'e3m0', 'int4')."""
  if isinstance(name, Fp4Code):
    return name
  key = str(name).lower()
  if key in ("e1m2", "e2m1", "e3m0"):
    e_bits, m_bits, bias = MINIFLOAT_LAYOUT[key]
    mags = tuple(minifloat_magnitudes(e_bits, m_bits, bias))
    return Fp4Code(key, mags, INT_MULTIPLIER[key], m_bits, bias)
  if key == "int4":
    return Fp4Code(key, tuple(float(v) for v in range(8)), 1, None, None)
  raise ValueError(f"unknown 4-bit code format {name!r}; known: {FP4_CODE_FORMATS}")


def code_from_magnitudes(magnitudes) -> Fp4Code:
  """The Fp4Code whose grid is ``magnitudes`` (8 values; any positive scaling of a known grid
  is not accepted: the grid must match exactly)."""
  magnitudes = tuple(float(v) for v in magnitudes)
  for name in FP4_CODE_FORMATS:
    if fp4_code(name).magnitudes == magnitudes:
      return fp4_code(name)
  raise ValueError(f"magnitudes {magnitudes} are not the grid of any of {FP4_CODE_FORMATS}")


# ----------------------------------------------------------------------------------------
# Elementwise decodes (jnp ops on int32 codes; used in kernels and in XLA alike).
# ----------------------------------------------------------------------------------------


def e4m3_bits(codes_i32, code: Fp4Code):
  """4-bit codes (int32, values 0..15) -> E4M3 bit patterns (int32 0..255), value x e4m3_factor."""
  sign = lax.shift_left(lax.bitwise_and(codes_i32, np.int32(SIGN_BIT)), np.int32(4))
  magnitude = lax.bitwise_and(codes_i32, np.int32(MAGNITUDE_MASK))
  if code.e4m3_shift:
    magnitude = lax.shift_left(magnitude, np.int32(code.e4m3_shift))
  return lax.bitwise_or(sign, magnitude)


def int8_values(codes_i32, code: Fp4Code):
  """4-bit codes (int32, values 0..15) -> multiplier * value as int32 (fits int8)."""
  index = lax.bitwise_and(codes_i32, np.int32(MAGNITUDE_MASK))
  width, words = code.int_table_words
  # The words as int32 bit patterns (a logical shift reads them as unsigned).
  words = tuple(np.array(w, np.uint32).view(np.int32) for w in words)
  if code.int_magnitudes == tuple(range(8)):
    magnitude = index  # linear grid (E1M2 x4, INT4): the index is the integer
  elif len(words) == 1:
    shift = lax.shift_left(index, np.int32(2)) if width == 4 else index * np.int32(width)
    magnitude = lax.bitwise_and(lax.shift_right_logical(words[0], shift),
                                np.int32((1 << width) - 1))
  else:
    low = lax.bitwise_and(index, np.int32(3))
    shift = lax.shift_left(low, np.int32(3))
    word = jnp.where(index >= 4, words[1], words[0])
    magnitude = lax.bitwise_and(lax.shift_right_logical(word, shift), np.int32(255))
  negative = lax.bitwise_and(codes_i32, np.int32(SIGN_BIT)) != 0
  return jnp.where(negative, -magnitude, magnitude)


def decode_values(codes, code: Fp4Code, dtype=jnp.float32):
  """4-bit codes -> format values (reference; plain table lookup)."""
  return jnp.asarray(code.lut)[jnp.asarray(codes).astype(jnp.int32)].astype(dtype)


def encode_nearest_even(v, code: Fp4Code):
  """v (any shape, float32, in grid units) -> int32 sign-magnitude codes of ``code``'s grid."""
  return encode_magnitudes(v, code.magnitudes)


def encode_magnitudes(v, magnitudes):
  """v (any shape, float32, grid units), magnitudes: 8 ascending grid values from 0 -> int32
  sign-magnitude codes: nearest magnitude, ties to the even index, saturating; zero magnitude
  never gets the sign bit.  A binary search over the 7 midpoints (exact: midpoints of float32
  grid values are exact in float32): 3 comparisons and 4 threshold selects per element instead
  of 7 comparisons and 7 adds (the act-quant kernel is instruction-bound).  Index bit b splits
  at an odd midpoint (b = 2, 1: a tie goes up, to the even index) or an even one (b = 0: a tie
  stays, at the even index)."""
  if len(magnitudes) != 8:
    raise ValueError(f"expected 8 magnitudes, got {len(magnitudes)}")
  high, upper, low = _midpoint_search(jnp.abs(v), magnitudes)
  index = (high.astype(jnp.int32) * np.int32(4) + upper.astype(jnp.int32) * np.int32(2)
           + low.astype(jnp.int32))
  negative = (v < 0) & (index > 0)
  return jnp.where(negative, index + np.int32(SIGN_BIT), index)


def _midpoint_search(a, magnitudes):
  """(high, upper, low) index bits of the nearest magnitude to a >= 0 (encode_magnitudes)."""
  mid = [np.float32((magnitudes[t] + magnitudes[t + 1]) / 2) for t in range(7)]
  high = a >= mid[3]
  upper = a >= jnp.where(high, mid[5], mid[1])
  last = jnp.where(high, jnp.where(upper, mid[6], mid[4]), jnp.where(upper, mid[2], mid[0]))
  return high, upper, a > last


# Rounding by a magic-number add: for |t| < 2**22, ``(t + C) - C`` with C = 1.5 * 2**23 * q (q a
# power of two) rounds t to the nearest multiple of q, ties to the even multiple (IEEE
# round-to-nearest-even of the add; 1.5 keeps t + C inside one binade for either sign).  In
# int8-image units (format value x multiplier) a minifloat's grid spacing is
# q = max(2**(e - M), 1) for |t| in [2**e, 2**(e + 1)) (M mantissa bits; 1 = the subnormal
# spacing), and the even multiple of q is the grid point with the even mantissa, i.e. the even
# index: the same codes as the midpoint search.  C's bits are t's exponent field plus a
# constant, clamped below at q = 1.  E1M2 (x4) and INT4 are the integers 0..7: q = 1, C constant.
# E3M0 (no mantissa bit: ties alternate between the two neighbours' indices) keeps the search.
# The int8 image needs no subtraction: bits(rounded + MAGIC_ROUND) holds the integer in its low
# byte (for the uniform grids t + MAGIC_ROUND is already that sum).
MAGIC_ROUND = np.float32(1.5 * 2**23)
MAGIC_ROUND_BITS = 0x4B400000  # bits of MAGIC_ROUND; bits(n + MAGIC_ROUND) = this + n, |n| < 2**22
_EXPONENT_MASK = 0x7F800000


def _saturate_int_units(t, code: "Fp4Code"):
  top = np.float32(code.int_magnitudes[-1])
  return jnp.minimum(jnp.maximum(t, -top), top)


def rounds_by_magic(code: "Fp4Code") -> bool:
  """Whether :func:`round_int_units` applies to ``code`` (every format but E3M0)."""
  return code.int_magnitudes == tuple(range(8)) or (code.mantissa_bits or 0) >= 1


def round_int_units(t, code: "Fp4Code", saturate: bool = True):
  """t (float32, int8-image units: format value x multiplier) -> the nearest image integer
  (float32), ties to the even index, as ``int8_values(encode_nearest_even(t / multiplier))``.
  saturate=False: the caller guarantees |t| <= max image integer * (1 + 2**-20) (a row scaled by
  its own absmax without clipping), and the two clamps are left out.  +-0 rounds to +0.
  About 6 instructions per element (clamp 2, exponent 3, two adds) against the search's ~13."""
  if not rounds_by_magic(code):
    raise ValueError(f"{code.name} ties alternate between indices; use encode_int8_image")
  if saturate:
    t = _saturate_int_units(t, code)
  # INT4's integers 0..7 space like a 2-mantissa-bit minifloat's image (E1M2 x4): q = 1.  The
  # magic constant is always computed from t's exponent, never a literal: XLA's algebraic
  # simplifier rewrites (t + literal) - literal to t.
  mantissa_bits = 2 if code.mantissa_bits is None else code.mantissa_bits
  shift = (23 - mantissa_bits) << 23
  exponent = lax.bitwise_and(lax.bitcast_convert_type(t, jnp.int32), np.int32(_EXPONENT_MASK))
  magic_bits = jnp.maximum(exponent + np.int32(shift + (MAGIC_ROUND_BITS & 0x7FFFFF)),
                           np.int32(MAGIC_ROUND_BITS))
  magic = lax.bitcast_convert_type(magic_bits, jnp.float32)
  return (t + magic) - magic


def int8_image_bits(t, code: "Fp4Code", saturate: bool = True):
  """t as :func:`round_int_units` -> int32 whose low byte is the int8 image (two's complement):
  ``bits(rounded + MAGIC_ROUND)``; the kernel's narrowing cast to int8 keeps that byte, so the
  integer costs one add (uniform grids: none, the rounding add already is it)."""
  if saturate:
    t = _saturate_int_units(t, code)
  if code.int_magnitudes == tuple(range(8)):
    shifted = t + MAGIC_ROUND
  else:
    shifted = round_int_units(t, code, saturate=False) + MAGIC_ROUND
  return lax.bitcast_convert_type(shifted, jnp.int32)


def encode_int8_image(v, code: "Fp4Code", saturate: bool = True, rounding: str = "magic"):
  """v (float32, grid units) -> the signed int8 image multiplier * value (int32), the same as
  ``int8_values(encode_nearest_even(v, code), code)``: rounding 'magic' (where the format
  allows; saturate as :func:`round_int_units`) or 'search' (the midpoint search's bits select
  the integer directly, a tree of constant selects, skipping the code and its table lookup)."""
  if rounding not in ("magic", "search"):
    raise ValueError(f"rounding must be 'magic' or 'search', got {rounding!r}")
  if rounding == "magic" and rounds_by_magic(code):
    t = v * np.float32(code.multiplier)
    return int8_image_bits(t, code, saturate) - np.int32(MAGIC_ROUND_BITS)
  return _encode_int8_by_search(v, code)


def _encode_int8_by_search(v, code: "Fp4Code"):
  a = jnp.abs(v)
  high, upper, low = _midpoint_search(a, code.magnitudes)
  ints = [np.int32(m) for m in code.int_magnitudes]

  def pick(bit, when_set, when_clear):
    return jnp.where(bit, when_set, when_clear)

  even = pick(high, pick(upper, ints[6], ints[4]), pick(upper, ints[2], ints[0]))
  odd = pick(high, pick(upper, ints[7], ints[5]), pick(upper, ints[3], ints[1]))
  magnitude = pick(low, odd, even)
  return jnp.where(v < 0, -magnitude, magnitude)


def encode_e4m3_image(v, code: "Fp4Code", saturate: bool = True):
  """v (float32, grid units) -> float32 E4M3-image values (value x e4m3_factor, exact in
  float8_e4m3fn) of the nearest grid point, ties to the even index, saturating."""
  if rounds_by_magic(code):
    rounded = round_int_units(v * np.float32(code.multiplier), code, saturate)
    return rounded * np.float32(code.e4m3_factor / code.multiplier)
  bits = e4m3_bits(encode_nearest_even(v, code), code).astype(jnp.uint8)
  return lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).astype(jnp.float32)


def encode_magnitudes_linear_scan(v, magnitudes):
  """The same codes by 7 midpoint comparisons summed (the earlier form; test reference)."""
  a = jnp.abs(v)
  index = jnp.zeros(v.shape, jnp.int32)
  for t in range(len(magnitudes) - 1):
    mid = np.float32((magnitudes[t] + magnitudes[t + 1]) / 2)
    above = (a > mid) if t % 2 == 0 else (a >= mid)  # a tie goes to the even index
    index = index + above.astype(jnp.int32)
  negative = (v < 0) & (index > 0)
  return jnp.where(negative, index + np.int32(SIGN_BIT), index)
