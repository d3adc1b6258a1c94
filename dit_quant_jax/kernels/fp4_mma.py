"""4-bit weights on exact 8-bit tensor cores: the tiled weight layout, the arithmetic decodes,
the Pallas-Triton matmul and the XLA unpack-then-dot alternative.

Weight layout (``pack_weight``, done once offline): codes ``(K, N)`` (sign-magnitude 4-bit,
:mod:`dit_quant_jax.numerics.fp4`) are zero-padded along K to ``K_pad``, a multiple of
``TILE_K`` = 128, and stored K-major as uint8 ``tiles: (N, K_pad / 2)``.  Byte ``t * 64 + r``
of output channel n holds code ``k = 128 t + r`` in its low nibble and ``k = 128 t + 64 + r``
in its high nibble (Marlin-style: a K tile of one channel is 64 contiguous bytes, so a program
loads its ``(block_n, 64)`` byte tile with wide, coalesced loads and no gathers, and the two
nibble planes feed two dots over the tile's two contiguous K halves, so nothing is
interleaved).  K-major because 8-bit ``wgmma`` takes only K-major operands (the transpose
option exists for 16-bit types only): with an N-major tile Triton fell back to ``mma.sync`` on
f16 for FP8 (seen in the PTX).

Decode (per element, shifts / masks / selects only, no table loads):

* to FP8 E4M3 (``fp4.e4m3_bits``): ``(c & 8) << 4 | (c & 7) << (3 - M)``, the format value
  times ``2**(bias - 7)``;  exact for E1M2 / E2M1 / E3M0;
* to int8 (``fp4.int8_values``): ``multiplier * value`` from a 32-bit register table;  exact for
  every 4-bit format (E2M1 x2, E1M2 x4, E3M0 x4, INT4 x1);
* to bf16 (W4A16): the int8 image converted to bf16 (exact).

The weight image's factor (``2**(bias-7)`` or ``multiplier``) is divided out of the per-channel
scale once (``PackedFp4Weight.column_scale``), so ``y = (x8 @ w8) * row_scale * column_scale + b``.

Kernel ``fp4_mma_kernel``: one program per ``(block_m, block_n)`` output tile (and K split);
per K tile it loads x's two ``(block_m, 64)`` halves, the ``(64, block_n)`` byte tile, decodes
the two nibble planes and issues two dots (``int8 x int8 -> int32``, ``e4m3 x e4m3 -> f32`` or
``bf16 x bf16 -> f32``), then applies the scales and bias in the epilogue.

XLA paths (``xla_dot``): unpack the whole layer to an int8 / E4M3 / bf16 ``(K, N)`` buffer
(one memory-bound pass), then ``lax.dot_general`` with ``preferred_element_type`` int32 /
float32: the decode is paid once per call, not once per M tile (the better choice at large M).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import fp8_dot
from dit_quant_jax.numerics import activation as activation_fn
from dit_quant_jax.numerics import fp4
from dit_quant_jax.numerics import packing

TILE_K = 128  # K codes per layout tile (two nibble planes of 64 rows)
HALF_TILE_K = TILE_K // 2
NIBBLE_MASK = 15
# Dot operand kinds: the 8-bit (or bf16) images both sides are decoded to.
DOT_KINDS = ("int8", "fp8", "bf16")
STATIC_ARGS = ["dot_kind", "predecode", "block_m", "block_n", "split_k", "num_warps", "num_stages",
               "interpret", "out_dtype", "activation", "stream_k", "whole_waves",
               "staged_epilogue"]


# ----------------------------------------------------------------------------------------
# The packed weight (a pytree: arrays are leaves, format and K are static).
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class PackedFp4Weight:
  """tiles: (N, K_pad / 2) uint8 (module doc layout);  scale: (N,) float32 per-channel scale
  (W[k, n] = value(code[k, n]) * scale[n]);  format_name: 'e1m2' | 'e2m1' | 'e3m0' | 'int4';
  k_features: K (static)."""

  def __init__(self, tiles, scale, format_name: str, k_features: int):
    self.tiles = tiles
    self.scale = scale
    self.format_name = format_name
    self.k_features = int(k_features)

  def tree_flatten(self):
    return (self.tiles, self.scale), (self.format_name, self.k_features)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def code(self) -> fp4.Fp4Code:
    return fp4.fp4_code(self.format_name)

  @property
  def n_features(self) -> int:
    return int(self.tiles.shape[0])

  @property
  def k_padded(self) -> int:
    return 2 * int(self.tiles.shape[1])

  def column_scale(self, dot_kind: str):
    """(N,) float32 scale for the decoded image of kind dot_kind (module doc)."""
    factor = self.code.e4m3_factor if dot_kind == "fp8" else float(self.code.multiplier)
    return self.scale.astype(jnp.float32) / np.float32(factor)

  def validate(self) -> None:
    fp4.fp4_code(self.format_name)
    if self.tiles.ndim != 2 or self.tiles.dtype != jnp.uint8:
      raise ValueError(f"weight tiles must be 2-D uint8, got {self.tiles.shape} {self.tiles.dtype}")
    if self.k_padded != padded_k(self.k_features):
      raise ValueError(f"weight tiles have {self.tiles.shape[1]} columns; K = {self.k_features} "
                       f"needs {padded_k(self.k_features) // 2} (pack_weight)")
    if self.scale.shape != (self.n_features,):
      raise ValueError(f"weight scale must be ({self.n_features},), got {self.scale.shape}")


def padded_k(k_features: int) -> int:
  return -(-int(k_features) // TILE_K) * TILE_K


def pack_weight(codes, scale, format_name: str) -> PackedFp4Weight:
  """codes: (K, N) 4-bit codes (ints < 16); scale: (N,) -> PackedFp4Weight (module doc)."""
  codes = jnp.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"codes must be (K, N), got shape {codes.shape}")
  k_features, n_features = codes.shape
  k_pad = padded_k(k_features)
  codes = jnp.pad(codes.astype(jnp.uint8), ((0, k_pad - k_features), (0, 0)))
  tiles = codes.T.reshape(n_features, k_pad // TILE_K, 2, HALF_TILE_K)
  packed = lax.bitwise_or(tiles[:, :, 0], lax.shift_left(tiles[:, :, 1], np.uint8(4)))
  weight = PackedFp4Weight(packed.reshape(n_features, k_pad // 2),
                           jnp.asarray(scale, jnp.float32), fp4.fp4_code(format_name).name,
                           k_features)
  weight.validate()
  return weight


def weight_from_pack_bits(packed_codes, scale, format_name: str, k_features: int):
  """The project's ``pack_bits(codes, 4, axis=0)`` (ceil(K/2), N) layout -> PackedFp4Weight
  (a relayout: run once offline, or it costs one weight pass per call)."""
  codes = packing.unpack_bits(packed_codes, 4, k_features, axis=0, dtype=jnp.uint8)
  return pack_weight(codes, scale, format_name)


def unpack_weight_codes_nk(weight: PackedFp4Weight):
  """(N, K) int32 codes from the tiled layout (plain jnp)."""
  tiles = weight.tiles.astype(jnp.int32).reshape(weight.n_features, -1, HALF_TILE_K)
  low = lax.bitwise_and(tiles, np.int32(NIBBLE_MASK))
  high = lax.shift_right_logical(tiles, np.int32(4))
  codes = jnp.stack([low, high], axis=2).reshape(weight.n_features, weight.k_padded)
  return codes[:, :weight.k_features]


def unpack_weight_codes(weight: PackedFp4Weight):
  """(K, N) int32 codes (plain jnp)."""
  return unpack_weight_codes_nk(weight).T


def decode_image(codes_i32, code: fp4.Fp4Code, dot_kind: str):
  """int32 codes -> the dot operand image of kind dot_kind (int8 / float8_e4m3fn / bf16)."""
  if dot_kind == "fp8":
    bits = fp4.e4m3_bits(codes_i32, code).astype(jnp.uint8)
    return lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)
  values = fp4.int8_values(codes_i32, code)
  return values.astype(jnp.int8) if dot_kind == "int8" else values.astype(jnp.bfloat16)


# ----------------------------------------------------------------------------------------
# Packed bf16 decode (compiled kernels): 4 bytes -> 4 bf16 of one nibble plane per asm block.
# ----------------------------------------------------------------------------------------
#
# A minifloat code's sign and 3 magnitude bits, placed in a bf16 at bit 15 and at bits
# [7 - M, 10 - M) (the exponent field's low bits and the top mantissa bits), are the bf16 of
# value * 2**(bias - 127) exactly, subnormal codes (e = 0) as bf16 subnormals; one bf16 FMA by
# 2**(127 - bias) (PTX bf16 arithmetic keeps subnormals) gives the value.  Two bytes per 32-bit
# register (PRMT spreads bytes 0, 1 into the two 16-bit lanes), then shift / mask / LOP3 / FMA:
# 5 instructions per 2 weights, against ~10 per weight for the jnp decode in Triton (SASS
# count; the decode bounds the small-M W4A16 / W4A8 kernels).  The int8 / fp8 images and INT4
# keep the jnp decode; so does interpret mode, which cannot run inline PTX.


def packed_bf16_decode_applies(code: fp4.Fp4Code, dot_kind: str) -> bool:
  return dot_kind == "bf16" and code.mantissa_bits is not None


def _bf16_bits(value: float) -> int:
  return int(np.array(value, np.float32).view(np.uint32)) >> 16


def packed_bf16_decode_params(code: fp4.Fp4Code, plane: int) -> dict:
  """The bit operations of :func:`packed_bf16_decode_asm` for nibble plane 0 (low) / 1 (high):
  magnitude shift and mask, sign shift, the FMA factor (bf16 bits, both lanes)."""
  m_bits = code.mantissa_bits
  factor = _bf16_bits(2.0 ** (127 - code.bias))
  return dict(mag_shift=(7 - m_bits) - 4 * plane, sign_shift=12 - 4 * plane,
              mag_mask=(7 << (7 - m_bits)) * 0x00010001, factor=factor * 0x00010001)


def packed_bf16_decode_asm(code: fp4.Fp4Code, plane: int) -> str:
  """PTX for elementwise_inline_asm (pack 4 uint8 -> 4 bf16 of one plane, '=r,=r,r')."""
  p = packed_bf16_decode_params(code, plane)
  lines = ["{", ".reg .b32 t, a, b, f, z;", f"mov.b32 f, {p['factor']:#010x};",
           "mov.b32 z, 0x80008000;"]
  for out, selector in (("$0", "0x4140"), ("$1", "0x4342")):
    lines += [f"prmt.b32 t, $2, 0, {selector};",
              f"shl.b32 a, t, {p['mag_shift']};",
              f"shl.b32 b, t, {p['sign_shift']};",
              "and.b32 b, b, 0x80008000;",
              f"lop3.b32 a, a, {p['mag_mask']:#010x}, b, 0xEA;",
              f"fma.rn.bf16x2 {out}, a, f, z;"]
  return "\n".join(lines + ["}"])


def packed_bf16_decode_model(byte_tile: np.ndarray, code: fp4.Fp4Code, plane: int) -> np.ndarray:
  """numpy model of the asm's bit operations, lane by lane (tests): uint8 bytes -> the bf16 bit
  patterns of its first 5 instructions (before the FMA) as uint16."""
  p = packed_bf16_decode_params(code, plane)
  t = byte_tile.astype(np.uint32)  # one byte in the low bits of a 16-bit lane
  mag = ((t << np.uint32(p["mag_shift"])) & np.uint32(p["mag_mask"] & 0xFFFF))
  sign = (t << np.uint32(p["sign_shift"])) & np.uint32(0x8000)
  return (mag | sign).astype(np.uint16)


def decode_bf16_packed(byte_tile, code: fp4.Fp4Code, plane: int):
  """(rows, 64) uint8 tile -> (rows, 64) bf16 values of one nibble plane (compiled kernels)."""
  return plgpu.elementwise_inline_asm(
      packed_bf16_decode_asm(code, plane), args=[byte_tile], constraints="=r,=r,r", pack=4,
      result_shape_dtypes=[jax.ShapeDtypeStruct(byte_tile.shape, jnp.bfloat16)])[0]


# ----------------------------------------------------------------------------------------
# Packed 8-bit decode (compiled kernels): 4 bytes -> the int8 / E4M3 images of both nibble
# planes, by byte permutes (PRMT) through an 8-entry magnitude table, ~1.6 instructions per
# weight against ~10 for the jnp decode in Triton (SASS).
# ----------------------------------------------------------------------------------------
#
# prmt.b32 d, a, b, c picks each byte of d from the 8 bytes {b, a} by a selector nibble of
# c's low 16 bits: its low 3 bits index the byte; with its bit 3 set, d's byte is instead that
# byte's sign bit replicated (0x00 or 0xFF).  A sign-magnitude code used as the selector over
# a table of the 8 non-negative images (sign bits clear) therefore yields the magnitude image
# for positive codes and 0x00 for negative ones; the same code with bit 3 flipped yields the
# magnitude for negative codes and 0x00 for positive ones.  The two have disjoint non-zero
# bytes, so each byte is formed without carries: int8 -m is (0x80 - m) ^ 0x80 for m <= 0x80
# (one subtract on the word, as an integer multiply-add: no byte borrows), E4M3's sign bit is set where the negative
# magnitude byte is non-zero ((m + 0x7F) & 0x80: no carries for m < 0x80); -0 decodes to +0.
# The tile byte i holds (plane 0, plane 1) codes i in its (low, high) nibble, so the word's
# low half is itself a selector for codes (0: plane 0, 0: plane 1, 1: p0, 1: p1) and its high
# half for codes 2 and 3; two final byte permutes separate the planes.  The program below is
# both the PTX (packed_8bit_decode_asm) and, instruction by instruction, its numpy model
# (packed_8bit_decode_model, the tests' reference): interpret mode cannot run inline PTX and
# keeps the jnp decode.

PACKED_8BIT_KINDS = ("int8", "fp8")


def packed_8bit_decode_applies(code: fp4.Fp4Code, dot_kind: str) -> bool:
  return dot_kind in PACKED_8BIT_KINDS and (dot_kind != "fp8" or code.has_e4m3_image)


def _magnitude_images(code: fp4.Fp4Code, dot_kind: str) -> list:
  """The 8 non-negative images (codes 0..7) as bytes: int8 multiplier * value, or E4M3 bits."""
  if dot_kind == "int8":  # fp4.int8_values of codes 0..7
    images = [int(v) for v in code.int_magnitudes]
  else:  # fp4.e4m3_bits of codes 0..7
    images = [m << (code.e4m3_shift or 0) for m in range(8)]
  assert all(0 <= v < 0x80 for v in images), images
  return images


def packed_8bit_decode_program(code: fp4.Fp4Code, dot_kind: str, plane: int) -> list:
  """(op, dst, *operands) of the decode of one plane; '$1' is the input word (4 tile bytes),
  '$0' the plane's output word; integer operands are immediates.  The two planes' programs
  differ in their last instruction only: in one kernel, ptxas computes the rest once."""
  images = _magnitude_images(code, dot_kind)
  program = [("mov", "tl", sum(v << (8 * i) for i, v in enumerate(images[:4]))),
             ("mov", "th", sum(v << (8 * i) for i, v in enumerate(images[4:]))),
             ("mulhi", "wh", "$1", 0x10000),  # >> 16 (mul.hi: an IMAD, off the ALU)
             ("xor", "x", "$1", 0x88888888),
             ("mulhi", "xh", "x", 0x10000)]
  for half, (word, flipped) in enumerate((("$1", "x"), ("wh", "xh"))):
    a, b, v = f"a{half}", f"b{half}", f"v{half}"
    program += [("prmt", a, "tl", "th", word),  # positive codes' images, 0 elsewhere
                ("prmt", b, "tl", "th", flipped)]  # negative codes' magnitudes, 0 elsewhere
    if dot_kind == "int8":
      # 0x80808080 - b, written b * -1 + 0x80808080 (ptxas emits one IADD3 either way; the
      # shifts above are what mul.hi moves off the ALU)
      program += [("mad", f"t{half}", b, 0xFFFFFFFF, 0x80808080),
                  ("lop3", v, f"t{half}", 0x80808080, a, 0xBE)]  # (t ^ 0x80808080) | a
    else:
      program += [("add", f"t{half}", b, 0x7F7F7F7F),
                  ("or", f"u{half}", a, b),
                  ("lop3", v, f"t{half}", 0x80808080, f"u{half}", 0xEA)]  # (t & 0x80808080) | u
  # v0 bytes: codes (0, 0, 1, 1) of planes (0, 1, 0, 1); v1: codes 2, 3 likewise
  program.append(("prmt", "$0", "v0", "v1", 0x7531 if plane else 0x6420))
  return program


def _ptx_operand(value) -> str:
  return f"{value:#010x}" if isinstance(value, int) else value


def packed_8bit_decode_asm(code: fp4.Fp4Code, dot_kind: str, plane: int) -> str:
  """PTX for elementwise_inline_asm (pack 4 uint8 -> 4 bytes of one plane, '=r,r'; Pallas
  lowers one result per asm block)."""
  program = packed_8bit_decode_program(code, dot_kind, plane)
  registers = sorted({op[1] for op in program if not op[1].startswith("$")})
  lines = ["{", f".reg .b32 {', '.join(registers)};"]
  for op, dst, *args in program:
    name = {"mulhi": "mul.hi.u32", "add": "add.u32", "mad": "mad.lo.u32"}.get(op, f"{op}.b32")
    lines.append(f"{name} {dst}, {', '.join(_ptx_operand(a) for a in args)};")
  return "\n".join(lines + ["}"])


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  source = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
  out = np.zeros(a.shape, np.uint32)
  for byte in range(4):
    nibble = (c >> np.uint32(4 * byte)) & np.uint32(15)
    picked = ((source >> (np.uint64(8) * (nibble & np.uint32(7)).astype(np.uint64)))
              & np.uint64(255)).astype(np.uint32)
    replicated = np.where(picked & np.uint32(0x80), np.uint32(255), np.uint32(0))
    chosen = np.where(nibble & np.uint32(8), replicated, picked)
    out |= chosen << np.uint32(8 * byte)
  return out


def _lop3(a, b, c, lut: int) -> np.ndarray:
  out = np.zeros(a.shape, np.uint32)
  for index in range(8):  # LUT bit (a << 2 | b << 1 | c): PTX's immLut = F(0xF0, 0xCC, 0xAA)
    if lut >> index & 1:
      out |= ((a if index & 4 else ~a) & (b if index & 2 else ~b) & (c if index & 1 else ~c))
  return out


def packed_8bit_decode_model(words: np.ndarray, code: fp4.Fp4Code, dot_kind: str,
                             plane: int) -> np.ndarray:
  """numpy model of the asm: uint32 words (4 tile bytes, little-endian) -> the plane's output
  words."""
  env = {"$1": words.astype(np.uint32)}

  def value(operand):
    return np.full(words.shape, operand, np.uint32) if isinstance(operand, int) else env[operand]

  for op, dst, *args in packed_8bit_decode_program(code, dot_kind, plane):
    v = [value(a) for a in args]
    if op == "mov":
      env[dst] = v[0]
    elif op == "prmt":
      env[dst] = _prmt(*v)
    elif op == "lop3":
      env[dst] = _lop3(v[0], v[1], v[2], args[3])
    elif op == "mad":  # low 32 bits of a * b + c
      env[dst] = (v[0].astype(np.uint64) * v[1] + v[2]).astype(np.uint32)
    elif op == "mulhi":  # high 32 bits of a * b
      env[dst] = ((v[0].astype(np.uint64) * v[1]) >> np.uint64(32)).astype(np.uint32)
    else:
      env[dst] = {"or": np.bitwise_or, "xor": np.bitwise_xor, "add": np.add}[op](v[0], v[1])
  return env["$0"]


def decode_8bit_packed(byte_tile, code: fp4.Fp4Code, dot_kind: str):
  """(rows, 64) uint8 tile -> both planes' (rows, 64) int8 images / E4M3 bits as int8 (the
  asm's results are signless integers; compiled kernels only)."""
  shape = jax.ShapeDtypeStruct(byte_tile.shape, jnp.int8)
  return tuple(plgpu.elementwise_inline_asm(
      packed_8bit_decode_asm(code, dot_kind, plane), args=[byte_tile], constraints="=r,r",
      pack=4, result_shape_dtypes=[shape])[0] for plane in (0, 1))


def check_dot_kind(dot_kind: str, code: fp4.Fp4Code) -> None:
  if dot_kind not in DOT_KINDS:
    raise ValueError(f"unknown dot kind {dot_kind!r}; expected one of {DOT_KINDS}")
  if dot_kind == "fp8" and not code.has_e4m3_image:
    raise ValueError(f"{code.name} weights have no exact E4M3 image; use dot_kind='int8'")


def x_dtype_for(dot_kind: str):
  return {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "bf16": jnp.bfloat16}[dot_kind]


def acc_dtype_for(dot_kind: str):
  return jnp.int32 if dot_kind == "int8" else jnp.float32


# ----------------------------------------------------------------------------------------
# Pallas-Triton kernel
# ----------------------------------------------------------------------------------------


def fp4_mma_kernel(x_ref, row_scale_ref, tiles_ref, col_scale_ref, bias_ref, *refs,
                   code: fp4.Fp4Code, dot_kind: str, predecode: bool, block_m: int,
                   block_n: int, split_k: int, activation=None, approx_tanh: bool = False,
                   packed_decode: bool = False, fast_accum: bool = False,
                   interpret: bool = False, stream_k: common.StreamKSchedule | None = None,
                   staged_epilogue: bool = False):
  """x_ref: (M, K) in the dot kind's dtype (int8 / bf16; fp8: uint8 E4M3 bits); row_scale_ref: (M,)
  float32; tiles_ref: (N, K_pad/2) uint8; col_scale_ref, bias_ref: (N,) float32.  predecode:
  tiles_ref is instead the (N, K_pad) image (int8 / uint8 E4M3 bits / bf16) from
  :func:`decode_weight_image`.  refs: split_k == 1: (out_ref (M, N),); split_k > 1: (counter
  (M tiles * N tiles,) int32 zeros, out_ref, partials_ref (split_k * M, N) in the accumulator's
  dtype, counter_out_ref): the split is summed in the launch (common.finish_tile_reduced_in_kernel:
  the last program of a tile adds the raw partials, int32 exactly, and applies the epilogue).
  stream_k: one stream-K program's share (common.run_stream_k; refs of
  common.launch_matmul_stream_k)."""
  m_rows, k_features = x_ref.shape
  n_features = col_scale_ref.shape[0]
  all_half = jnp.ones((HALF_TILE_K,), jnp.bool_)
  acc_dtype = acc_dtype_for(dot_kind)
  # fp8 on a GPU: Hopper's fp8 wgmma (fp8_dot.FAST_ACCUM; Triton's f16 mma.sync otherwise).
  dot_precision = fp8_dot.FAST_ACCUM if fast_accum and dot_kind == "fp8" else None

  def compute(tile, first, end):
    row_start, col_start, row_mask, col_mask = tile

    def whole_tile_step(k_tile, acc):
      # The decoded image: one dot over the whole K tile.  One dot per loop iteration is what
      # lets Triton keep the wgmma of a float32-accumulator dot in flight across iterations
      # (two chained dots make it wait for the first before the second: wgmma.wait_group 0).
      k_start = k_tile * TILE_K
      k_mask = k_start + jnp.arange(TILE_K, dtype=jnp.int32) < k_features
      x_tile = common.load_tile(x_ref, row_start, block_m, k_start, TILE_K, row_mask, k_mask)
      w_tile = common.load_tile(tiles_ref, col_start, block_n, k_start, TILE_K, col_mask,
                                jnp.ones((TILE_K,), jnp.bool_))
      if dot_kind == "fp8":  # E4M3 bit patterns (a masked fp8 load cannot lower)
        x_tile = lax.bitcast_convert_type(x_tile, jnp.float8_e4m3fn)
        w_tile = lax.bitcast_convert_type(w_tile, jnp.float8_e4m3fn)
      return acc + jnp.dot(x_tile, w_tile.T, preferred_element_type=acc_dtype,
                           precision=dot_precision)

    def k_step(k_tile, acc):
      k_start = k_tile * TILE_K
      byte_tile = common.load_tile(tiles_ref, col_start, block_n, k_tile * HALF_TILE_K,
                                   HALF_TILE_K, col_mask, all_half)
      if packed_decode and dot_kind == "bf16":  # values, not the int8 image (column scale)
        planes = tuple(decode_bf16_packed(byte_tile, code, plane) for plane in (0, 1))
      elif packed_decode:  # the int8 image / E4M3 bits, as decode_image
        planes = decode_8bit_packed(byte_tile, code, dot_kind)
        if dot_kind == "fp8":
          planes = tuple(lax.bitcast_convert_type(p, jnp.float8_e4m3fn) for p in planes)
      else:
        byte_tile = byte_tile.astype(jnp.int32)
        planes = (lax.bitwise_and(byte_tile, np.int32(NIBBLE_MASK)),
                  lax.shift_right_logical(byte_tile, np.int32(4)))
      for half, codes in enumerate(planes):
        half_start = k_start + half * HALF_TILE_K
        k_mask = half_start + jnp.arange(HALF_TILE_K, dtype=jnp.int32) < k_features
        x_half = common.load_tile(x_ref, row_start, block_m, half_start, HALF_TILE_K, row_mask,
                                  k_mask)
        if dot_kind == "fp8":  # x arrives as E4M3 bit patterns (a masked fp8 load cannot lower)
          x_half = lax.bitcast_convert_type(x_half, jnp.float8_e4m3fn)
        if packed_decode:
          w_half = codes  # already the bf16 values
        else:
          w_half = decode_image(codes, code, dot_kind)  # (block_n, 64), K-major
        acc = acc + jnp.dot(x_half, w_half.T, preferred_element_type=acc_dtype,
                            precision=dot_precision)
      return acc

    return lax.fori_loop(first, end, whole_tile_step if predecode else k_step,
                         jnp.zeros((block_m, block_n), acc_dtype))

  def epilogue(acc, tile):
    width = acc.shape[1]
    row_scale = common.load_vector(row_scale_ref, tile.row_start, block_m, tile.row_mask)
    col_scale = common.load_vector(col_scale_ref, tile.col_start, width, tile.col_mask)
    bias = common.load_vector(bias_ref, tile.col_start, width, tile.col_mask)
    return _scale_and_bias(acc, row_scale, col_scale, bias, activation,
                           common.tanh_approx if approx_tanh else None)

  common.run_matmul_program(compute, epilogue, refs, block_m=block_m, block_n=block_n,
                            block_k=TILE_K, m_rows=m_rows, k_features=k_features,
                            n_features=n_features, split_k=split_k, stream_k=stream_k,
                            staged=staged_epilogue, interpret=interpret)


def _scale_and_bias(acc, row_scale, col_scale, bias, activation=None, tanh=None):
  """activation(acc * row_scale[:, None] * col_scale[None, :] + bias) (numerics/activation.fused,
  on the float32 tile before the output cast; tanh: the compiled kernel's hardware tanh, else
  the float32-accurate form)."""
  y = acc.astype(jnp.float32) * row_scale[:, None] * col_scale[None, :] + bias[None, :]
  return activation_fn.fused(activation, y, tanh)


def _check_operands(x, row_scale, weight: PackedFp4Weight, bias, dot_kind):
  weight.validate()
  check_dot_kind(dot_kind, weight.code)
  if x.ndim != 2 or x.shape[1] != weight.k_features:
    raise ValueError(f"x must be (M, {weight.k_features}), got shape {x.shape}")
  if x.dtype != x_dtype_for(dot_kind):
    raise ValueError(f"dot kind {dot_kind} needs x of dtype {jnp.dtype(x_dtype_for(dot_kind))}, "
                     f"got {x.dtype}")
  if row_scale.shape != (x.shape[0],):
    raise ValueError(f"row_scale must be ({x.shape[0]},), got {row_scale.shape}")
  if bias is not None and bias.shape != (weight.n_features,):
    raise ValueError(f"bias must be ({weight.n_features},), got {bias.shape}")


def _bias_or_zeros(bias, n_features):
  return jnp.zeros((n_features,), jnp.float32) if bias is None else bias.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=STATIC_ARGS)
def fp4_mma(x, row_scale, weight: PackedFp4Weight, bias=None, *, dot_kind: str,
            predecode: bool = False, block_m: int = 128, block_n: int = 128, split_k: int = 1,
            num_warps: int = 8, num_stages: int = 3, interpret: bool = False,
            out_dtype=jnp.float32, activation=None, stream_k: int = 0,
            whole_waves: bool = False, staged_epilogue: bool = False):
  """y = (x @ decode(weight)) * row_scale[:, None] * weight.column_scale(dot_kind) + bias,
  then the output activation (None or 'gelu_tanh', numerics/activation.py) in the epilogue
  (compiled: with the GPU's tanh.approx, ~2^-11 relative; interpret mode: the float32-accurate
  form).  split_k > 1: the K loop is split over grid axis 2 and summed in the same launch (the
  last program of each output tile adds the partials, int32 exactly for the int8 dot, and
  applies the epilogue).  stream_k > 0 (split_k 1): a stream-K launch of at most that many
  programs sharing the (tiles x K tiles) iterations evenly (common.run_stream_k); whole_waves:
  whole waves of tiles data-parallel first, stream-K for the rest (common.stream_k_schedule);
  staged_epilogue: whole tiles too are finished from a scratch slot in column chunks
  (common.run_stream_k: fewer registers for this kernel's bf16 tile).

  x: (M, K) of the dot kind's dtype (int8 / float8_e4m3fn / bfloat16); row_scale: (M,) float32
  (ones for W4A16); weight: PackedFp4Weight -> (M, N) out_dtype.

  predecode=False: each program decodes its weight tiles in the K loop (the weight is read as
  4 bits: the small-M choice; the decode repeats once per M tile).  predecode=True: the layer is
  first decoded once with XLA into a transient (N, K_pad) 8-bit / bf16 image and the K loop only
  loads it (the large-M choice: decode paid once per call, the fused epilogue kept).
  """
  _check_operands(x, row_scale, weight, bias, dot_kind)
  common.check_block("block_m", block_m)
  common.check_block("block_n", block_n)
  common.check_split_k(split_k)
  common.check_stream_k(stream_k, split_k, staged_epilogue)
  col_scale = weight.column_scale(dot_kind)
  bias = _bias_or_zeros(bias, weight.n_features)
  row_scale = row_scale.astype(jnp.float32)
  activation_fn.check(activation)
  # compiled: the packed bf16 decode yields values, not the multiplier's integer image
  packed_decode = not interpret and not predecode and (
      packed_bf16_decode_applies(weight.code, dot_kind)
      or packed_8bit_decode_applies(weight.code, dot_kind))
  if packed_decode and dot_kind == "bf16":
    col_scale = col_scale * np.float32(weight.code.multiplier)
  kernel = functools.partial(fp4_mma_kernel, code=weight.code, dot_kind=dot_kind,
                             predecode=predecode, block_m=block_m, block_n=block_n, split_k=split_k,
                             activation=activation, approx_tanh=not interpret,
                             packed_decode=packed_decode,
                             fast_accum=not interpret and fp8_dot.INSTALLED, interpret=interpret)
  w_operand = decode_weight_image(weight, dot_kind) if predecode else weight.tiles
  if dot_kind == "fp8":
    x = lax.bitcast_convert_type(x, jnp.uint8)
  operands = (x, row_scale, w_operand, col_scale, bias)
  if stream_k:
    schedule = common.stream_k_schedule(x.shape[0], weight.n_features,
                                        weight.k_padded // TILE_K, block_m=block_m,
                                        block_n=block_n, programs=stream_k,
                                        data_parallel=whole_waves)
    return common.launch_matmul_stream_k(
        functools.partial(kernel, stream_k=schedule, staged_epilogue=staged_epilogue), operands,
        schedule=schedule, m_rows=x.shape[0], n_features=weight.n_features,
        out_dtype=out_dtype, block_m=block_m, block_n=block_n, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret, name=f"fp4_mma_{dot_kind}_stream_k",
        partial_dtype=acc_dtype_for(dot_kind))
  return common.launch_matmul_reduced_in_kernel(
      kernel, operands, m_rows=x.shape[0],
      n_features=weight.n_features, out_dtype=out_dtype, block_m=block_m, block_n=block_n,
      split_k=split_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      name=f"fp4_mma_{dot_kind}", partial_dtype=acc_dtype_for(dot_kind))


# ----------------------------------------------------------------------------------------
# XLA: unpack the layer once, then one dot_general.
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=["dot_kind", "out_dtype", "activation"])
def xla_dot(x, row_scale, weight: PackedFp4Weight, bias=None, *, dot_kind: str,
            out_dtype=jnp.float32, activation=None):
  """Same function as :func:`fp4_mma`: decode the (K, N) image with XLA (transient buffer of
  K * N bytes, 2 K * N for bf16), then ``lax.dot_general`` with an int32 / float32 accumulator."""
  _check_operands(x, row_scale, weight, bias, dot_kind)
  w_image = decode_image(unpack_weight_codes_nk(weight), weight.code, dot_kind)  # (N, K)
  acc = lax.dot_general(x, w_image, (((1,), (1,)), ((), ())),
                        preferred_element_type=acc_dtype_for(dot_kind))
  y = _scale_and_bias(acc, row_scale.astype(jnp.float32), weight.column_scale(dot_kind),
                      _bias_or_zeros(bias, weight.n_features), activation_fn.check(activation))
  return y.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=["out_dtype", "activation"])
def xla_dot_folded(x, weight: PackedFp4Weight, bias=None, *, out_dtype=jnp.bfloat16,
                   activation=None):
  """W4A16 with XLA: the layer decoded once into a transient bf16 (N, K) weight with the
  column scale folded in (value * scale rounded to bf16: the dequantized weight of the plain
  path), then the bf16 dot + bias, the same pattern as the bf16 baseline (no scale epilogue)."""
  if x.ndim != 2 or x.shape[1] != weight.k_features:
    raise ValueError(f"x must be (M, {weight.k_features}), got {x.shape}")
  values = fp4.decode_values(unpack_weight_codes_nk(weight), weight.code)
  w_bf16 = (values * weight.scale.astype(jnp.float32)[:, None]).astype(jnp.bfloat16)
  y = lax.dot_general(x.astype(jnp.bfloat16), w_bf16, (((1,), (1,)), ((), ())),
                      preferred_element_type=jnp.float32)
  y = y + _bias_or_zeros(bias, weight.n_features)
  return activation_fn.fused(activation, y.astype(jnp.float32)).astype(out_dtype)


def decode_weight_image(weight: PackedFp4Weight, dot_kind: str):
  """(N, K_pad) image of the whole layer (XLA, one memory-bound pass; padding codes are 0):
  int8, uint8 E4M3 bit patterns (fp8) or bf16."""
  tiles = weight.tiles.astype(jnp.int32).reshape(weight.n_features, -1, HALF_TILE_K)
  planes = (lax.bitwise_and(tiles, np.int32(NIBBLE_MASK)),
            lax.shift_right_logical(tiles, np.int32(4)))
  codes = jnp.stack(planes, axis=2).reshape(weight.n_features, weight.k_padded)
  image = decode_image(codes, weight.code, dot_kind)
  return lax.bitcast_convert_type(image, jnp.uint8) if dot_kind == "fp8" else image


def dequantize_reference(weight: PackedFp4Weight):
  """(K, N) float32 W[k, n] = value(code[k, n]) * scale[n] (table lookup, plain jnp)."""
  values = fp4.decode_values(unpack_weight_codes(weight), weight.code)
  return values * weight.scale.astype(jnp.float32)[None, :]
