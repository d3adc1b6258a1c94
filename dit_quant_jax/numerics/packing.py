"""Dense bit packing of small unsigned codes into uint8, the one packing routine of the project.

Layout (shared by the VQ assignments, the 4-bit FP/INT weight codes and the Pallas kernels):
along ``axis`` (the reduction / input-feature axis), codes are taken in groups of
``g = 8 / gcd(bits, 8)`` consecutive entries; a group's ``g * bits`` bits are stored as a
little-endian bit string in ``bits / gcd(bits, 8)`` consecutive bytes.  Entry ``j`` of a
group occupies bits ``[j * bits, (j + 1) * bits)`` of that string.  Examples:

  bits=8  : one code per byte (identity);
  bits=4  : two codes per byte, entry 2i in the low nibble, entry 2i+1 in the high nibble;
  bits=6  : four codes in three bytes;
  bits=12 : two codes in three bytes.

The axis length is padded with zero codes to a multiple of ``g``; ``unpack_bits`` takes the
original length back.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

MAX_BITS = 16


def group_shape(bits: int) -> tuple[int, int]:
  """(codes per group, bytes per group) for a code width."""
  _check_bits(bits)
  gcd = math.gcd(bits, 8)
  return 8 // gcd, bits // gcd


def packed_length(n: int, bits: int) -> int:
  """Bytes along the packed axis for n codes."""
  codes_per_group, bytes_per_group = group_shape(bits)
  return -(-n // codes_per_group) * bytes_per_group


def _check_bits(bits: int) -> None:
  if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
    raise ValueError(f"bit width must be an integer in [1, {MAX_BITS}], got {bits!r}")


def pack_bits(codes, bits: int, axis: int = 0):
  """codes: unsigned ints < 2**bits, any shape -> uint8 with ``axis`` packed (see module doc).

  Works on numpy arrays (returns numpy) and jax arrays (returns jax, traceable).
  """
  _check_bits(bits)
  xp = np if isinstance(codes, np.ndarray) else jnp
  codes = xp.moveaxis(codes, axis, 0)
  n = codes.shape[0]
  codes_per_group, bytes_per_group = group_shape(bits)
  pad = (-n) % codes_per_group
  codes = codes.astype(xp.uint32)
  if pad:
    codes = xp.concatenate([codes, xp.zeros((pad,) + codes.shape[1:], xp.uint32)], axis=0)
  rest = codes.shape[1:]
  groups = codes.reshape((-1, codes_per_group) + rest)
  shifts = xp.arange(bits, dtype=xp.uint32).reshape((1, 1, bits) + (1,) * len(rest))
  bit_planes = (groups[:, :, None] >> shifts) & 1  # (G, codes_per_group, bits, ...)
  bit_planes = bit_planes.reshape((-1, bytes_per_group, 8) + rest)
  weights = (xp.uint32(1) << xp.arange(8, dtype=xp.uint32)).reshape((1, 1, 8) + (1,) * len(rest))
  packed = (bit_planes * weights).sum(axis=2).astype(xp.uint8)
  packed = packed.reshape((-1,) + rest)
  return xp.moveaxis(packed, 0, axis)


def unpack_bits(packed, bits: int, n: int, axis: int = 0, dtype=None):
  """Inverse of :func:`pack_bits`: uint8 with ``axis`` packed -> codes (length n on ``axis``)."""
  _check_bits(bits)
  xp = np if isinstance(packed, np.ndarray) else jnp
  packed = xp.moveaxis(packed, axis, 0)
  codes_per_group, bytes_per_group = group_shape(bits)
  expected = packed_length(n, bits)
  if packed.shape[0] != expected:
    raise ValueError(f"packed axis has {packed.shape[0]} bytes; {n} codes of {bits} bits need {expected}")
  rest = packed.shape[1:]
  bytes_ = packed.astype(xp.uint32).reshape((-1, bytes_per_group) + rest)
  shifts8 = xp.arange(8, dtype=xp.uint32).reshape((1, 1, 8) + (1,) * len(rest))
  bit_planes = (bytes_[:, :, None] >> shifts8) & 1  # (G, bytes_per_group, 8, ...)
  bit_planes = bit_planes.reshape((-1, codes_per_group, bits) + rest)
  weights = (xp.uint32(1) << xp.arange(bits, dtype=xp.uint32)).reshape((1, 1, bits) + (1,) * len(rest))
  codes = (bit_planes * weights).sum(axis=2)
  codes = codes.reshape((-1,) + rest)[:n]
  out_dtype = dtype or (xp.uint8 if bits <= 8 else xp.uint16)
  return xp.moveaxis(codes.astype(out_dtype), 0, axis)


def index_bits(k: int) -> int:
  """Bits needed for an index into k entries (k >= 2)."""
  if k < 2:
    raise ValueError(f"need at least 2 entries to index, got k={k}")
  return int(math.ceil(math.log2(k)))
