"""Number formats of the quantizers: 4-bit floating point (E1M2, E2M1, E3M0), FP8 E4M3 and
symmetric signed INT-b, each described as a sorted grid of non-negative magnitudes.

Every format here is sign-magnitude: a code is ``sign << (bits - 1) | m`` where ``m`` indexes
the format's magnitudes sorted ascending (``m = 0`` is zero).  For IEEE-style minifloats this
index *is* the exponent-mantissa bit pattern (magnitudes grow monotonically with the bit
pattern), so E2M1 codes are the OCP MX FP4 codes and E4M3 codes are ``float8_e4m3fn`` bytes.
Any such format is therefore a lookup table ``lut: (2**bits,)`` (``lut[c] = (-1)**sign *
magnitudes[m]``); that is the layout the kernels decode (``notes/interfaces.md``).

Minifloat value of exponent field ``e`` and mantissa field ``f`` (``E`` and ``M`` bits):
``e = 0``: subnormal ``f / 2**M * 2**(1 - bias)``; ``e > 0``: ``(1 + f / 2**M) * 2**(e - bias)``.
No infinities or NaNs in the 4-bit formats (every code is a finite number).

Exponent biases (the bias scales the whole grid by a power of two, which a per-channel scale
absorbs, so it changes no quantization result; it fixes the integer multiplier):

* E2M1: bias 1 (= 2**(E-1) - 1, the OCP MX choice) -> {0, .5, 1, 1.5, 2, 3, 4, 6}; x2 -> ints.
* E1M2: bias 1 (the IEEE rule 2**(E-1) - 1 would give 0).  Chosen so that 4 * magnitudes =
  {0, 1, ..., 7}: E1M2 *is* the symmetric INT4 grid divided by 4, and the integer multiplier
  4 of ``notes/interfaces.md`` is the smallest one.  With bias 0 the grid would be twice as
  large ({0, .5, ..., 3.5}), identical after scaling.
* E3M0: bias 3 (= 2**(E-1) - 1) -> {0, .25, .5, 1, 2, 4, 8, 16}; x4 -> ints.  With no mantissa
  bits the only subnormal is zero.
* FP8 E4M3 (``float8_e4m3fn``): bias 7, max 448, the all-ones pattern is NaN (never produced:
  values saturate at 448); x512 -> ints (int32, not int8).
* INT-b: magnitudes {0, 1, ..., 2**(b-1) - 1} (symmetric, -0 unused), multiplier 1.

Rounding: to the nearest grid magnitude, ties to the even code (the even magnitude index,
i.e. mantissa LSB 0 for minifloats, an even integer for INT), the same rule in the subnormal
range.  Values beyond the largest magnitude saturate to it.  Zero always encodes as code 0.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from dit_quant_jax.numerics import fp4 as fp4_tables

FP4_FORMATS = ("e1m2", "e2m1", "e3m0")
FP8_FORMATS = ("fp8_e4m3",)
INT_BITS = tuple(range(2, 9))  # supported INT-b widths (sign-magnitude codes of b bits)

# The code tables live in numerics/ (below quant/ and kernels/, which both use them).
_MINIFLOAT_LAYOUT = fp4_tables.MINIFLOAT_LAYOUT  # (exponent bits, mantissa bits, bias)
_INT_MULTIPLIER = fp4_tables.INT_MULTIPLIER  # smallest k with k * magnitudes all integers
FP8_E4M3_MAX = fp4_tables.FP8_E4M3_MAX

_ALIASES = {"fp4_e1m2": "e1m2", "fp4_e2m1": "e2m1", "fp4_e3m0": "e3m0", "e4m3": "fp8_e4m3",
            "fp8": "fp8_e4m3"}


@dataclasses.dataclass(frozen=True)
class Format:
  """A sign-magnitude number format.

  name: canonical name ('e2m1', 'int4', ...);  bits: code width;  kind: 'float' or 'int';
  magnitudes: sorted non-negative grid values, magnitudes[0] = 0, 2**(bits-1) entries
  (127 for fp8_e4m3, whose code 0x7f is NaN);  multiplier: integer k with k * magnitudes
  integral;  exponent_bits / mantissa_bits / bias: minifloat layout (None for INT).
  """

  name: str
  bits: int
  kind: str
  magnitudes: tuple
  multiplier: int
  exponent_bits: int | None = None
  mantissa_bits: int | None = None
  bias: int | None = None

  @property
  def max_value(self) -> float:
    return float(self.magnitudes[-1])

  @property
  def min_positive(self) -> float:
    return float(self.magnitudes[1])

  @property
  def dynamic_range(self) -> float:
    """Largest / smallest non-zero magnitude (E1M2: 7, E2M1: 12, E3M0: 64, INT4: 7)."""
    return self.max_value / self.min_positive

  @property
  def num_codes(self) -> int:
    return 2**self.bits

  @property
  def magnitudes_array(self) -> np.ndarray:
    return np.asarray(self.magnitudes, np.float32)

  @property
  def lut(self) -> np.ndarray:
    """(2**bits,) float32 code -> value; codes with no magnitude (fp8 0x7f, 0xff) are NaN."""
    half = self.num_codes // 2
    mags = np.full((half,), np.nan, np.float32)
    mags[: len(self.magnitudes)] = self.magnitudes
    return np.concatenate([mags, -mags]).astype(np.float32)

  @property
  def int_lut(self) -> np.ndarray:
    """lut * multiplier as integers (int8 when they fit, else int32); NaN codes map to 0."""
    values = np.nan_to_num(self.lut.astype(np.float64) * self.multiplier)
    dtype = np.int8 if np.abs(values).max() <= 127 else np.int32
    return np.rint(values).astype(dtype)

  @property
  def midpoints(self) -> np.ndarray:
    """(n - 1,) decision thresholds between consecutive magnitudes, float32.

    Midpoints of float32 grid values are exact in float32 (one more bit than the grid)."""
    mags = np.asarray(self.magnitudes, np.float64)
    return ((mags[1:] + mags[:-1]) / 2).astype(np.float32)


_minifloat_magnitudes = fp4_tables.minifloat_magnitudes


@functools.lru_cache(maxsize=None)
def get_format(name: str) -> Format:
  """The format called ``name``: 'e1m2', 'e2m1', 'e3m0', 'fp8_e4m3' or 'int<b>', b in 2..8."""
  if isinstance(name, Format):
    return name
  if not isinstance(name, str):
    raise TypeError(f"format name must be a string, got {type(name).__name__}")
  key = _ALIASES.get(name.lower(), name.lower())
  if key in _MINIFLOAT_LAYOUT:
    e_bits, m_bits, bias = _MINIFLOAT_LAYOUT[key]
    mags = _minifloat_magnitudes(e_bits, m_bits, bias)
    if key == "fp8_e4m3":
      mags = mags[:-1]  # all-ones exponent and mantissa is NaN in float8_e4m3fn
      assert mags[-1] == FP8_E4M3_MAX
    return Format(key, 1 + e_bits + m_bits, "float", tuple(mags), _INT_MULTIPLIER[key],
                  e_bits, m_bits, bias)
  match = re.fullmatch(r"int(\d+)", key)
  if match:
    bits = int(match.group(1))
    if bits not in INT_BITS:
      raise ValueError(f"unsupported bit width {bits} for format {name!r}: signed INT formats "
                       f"support {INT_BITS[0]}..{INT_BITS[-1]} bits")
    return Format(key, bits, "int", tuple(float(v) for v in range(2**(bits - 1))), 1)
  raise ValueError(f"unknown number format {name!r}; known: {list(FP4_FORMATS + FP8_FORMATS)} "
                   f"and int2..int8")


def int_format(bits: int) -> Format:
  if not isinstance(bits, (int, np.integer)) or bits not in INT_BITS:
    raise ValueError(f"unsupported bit width {bits!r}: signed INT formats support "
                     f"{INT_BITS[0]}..{INT_BITS[-1]} bits")
  return get_format(f"int{bits}")


# ----------------------------------------------------------------------------- rounding
def magnitude_index(x, fmt: Format | str):
  """Index (int32) of the grid magnitude nearest to |x| (ties to even, saturating)."""
  return _magnitude_index(jnp.asarray(x, jnp.float32), get_format(fmt).name)


def quantize_to_grid(x, fmt: Format | str):
  """x (any shape, in grid units) -> nearest representable value (float32), ties to even.

  NaN inputs are not supported (they saturate to the max magnitude)."""
  return _quantize_to_grid(jnp.asarray(x, jnp.float32), get_format(fmt).name)


def encode(x, fmt: Format | str):
  """x (in grid units, any shape) -> uint8 sign-magnitude codes of the rounded values."""
  fmt = get_format(fmt)
  if fmt.bits > 8:
    raise ValueError(f"encode supports codes of at most 8 bits, {fmt.name} has {fmt.bits}")
  return _encode(jnp.asarray(x, jnp.float32), fmt.name)


def decode(codes, fmt: Format | str, dtype=jnp.float32):
  """uint codes (any shape) -> values in grid units."""
  fmt = get_format(fmt)
  return jnp.asarray(fmt.lut)[jnp.asarray(codes).astype(jnp.int32)].astype(dtype)


def fake_quantize(x, fmt: Format | str, scale):
  """x -> scale * round_to_grid(x / scale); ``scale`` broadcasts against x (zeros -> 1)."""
  x = jnp.asarray(x)
  return _fake_quantize(x, jnp.asarray(scale, jnp.float32), get_format(fmt).name)


def absmax_scale(absmax, fmt: Format | str, clip_ratio=1.0):
  """Scale mapping clip_ratio * absmax onto the format's largest magnitude (0 -> 1)."""
  fmt = get_format(fmt)
  scale = jnp.asarray(absmax, jnp.float32) * clip_ratio / fmt.max_value
  return jnp.where(scale > 0, scale, 1.0)


_COMPARE_ALL_MAX = 16

# One compiled function per (format, shape) rather than one per primitive in eager mode.
@functools.partial(jax.jit, static_argnums=1)
def _magnitude_index(x, name):
  fmt = get_format(name)
  a = jnp.abs(x)
  mids = jnp.asarray(fmt.midpoints)
  # Few thresholds (4-bit: 7): compare against all, cheap to compile and run; long grids
  # (FP8: 126) use the logarithmic scan to avoid a 126x broadcast.
  method = "compare_all" if len(fmt.midpoints) <= _COMPARE_ALL_MAX else "scan"
  below = jnp.searchsorted(mids, a, side="left", method=method)  # midpoints strictly below |x|
  at_or_below = jnp.searchsorted(mids, a, side="right", method=method)
  tie = at_or_below > below  # |x| is exactly a midpoint between index `below` and `below + 1`
  idx = jnp.where(tie & (below % 2 == 1), below + 1, below)
  return idx.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_to_grid(x, name):
  fmt = get_format(name)
  if fmt.kind == "int":
    # round() is round-half-to-even, identical to the grid rule on the integer grid.
    return jnp.clip(jnp.round(x), -fmt.max_value, fmt.max_value)
  if fmt.name == "fp8_e4m3":
    # The hardware cast rounds to nearest-even; clip first since it does not saturate.
    clipped = jnp.clip(x, -fmt.max_value, fmt.max_value)
    return clipped.astype(jnp.float8_e4m3fn).astype(jnp.float32)
  mags = jnp.asarray(fmt.magnitudes_array)
  return jnp.sign(x) * mags[_magnitude_index(x, name)]


@functools.partial(jax.jit, static_argnums=1)
def _encode(x, name):
  fmt = get_format(name)
  idx = _magnitude_index(x, name)
  sign = ((x < 0) & (idx > 0)).astype(jnp.int32)
  return ((sign << (fmt.bits - 1)) | idx).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=2)
def _fake_quantize(x, scale, name):
  safe = jnp.where(scale > 0, scale, 1.0)
  return (_quantize_to_grid(x.astype(jnp.float32) / safe, name) * safe).astype(x.dtype)
