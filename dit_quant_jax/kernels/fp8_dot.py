"""FP8 tensor-core dots in Pallas-Triton kernels on Hopper: the fast-accumulation algorithm.

Triton uses Hopper's fp8 wgmma for an E4M3 x E4M3 -> float32 ``tt.dot`` only when the op's
``maxNumImpreciseAcc`` is at least 32: the hardware accumulates fp8 products in a reduced-
precision float32 accumulator, and with the default 0 Triton refuses that and upcasts both
operands to f16 for ``mma.sync`` (half the fp8 rate, and the decoded-image kernel spills at
128 x 128 tiles).  Pallas-Triton always emits 0 and rejects
``lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM``, the algorithm that names this choice.

:func:`install` extends Pallas-Triton's ``dot_general`` lowering rule for that one algorithm: the
dot is lowered as the stock rule lowers a default-precision dot, then its ``tt.dot`` gets
``maxNumImpreciseAcc = FAST_ACCUM_INTERVAL``.  Dots with any other precision are untouched (the
stock rule raises NotImplementedError for this preset, so nothing that worked before changes).
A kernel asks for it with ``precision=FAST_ACCUM`` when compiled for a GPU; in interpret mode it
passes no preset (CPU dots accumulate exactly; the fp8 products of 4-bit codes are exact, so
the two differ only in accumulation rounding).

``FAST_ACCUM_INTERVAL``: Triton adds the wgmma accumulator into a float32 register accumulator
every this many K elements (its ``maxNumImpreciseAcc`` semantics); 128, one K tile of
:mod:`fp4_mma`, is the promotion interval DeepSeek-V3 reports for Hopper fp8 GEMMs (the
accumulator keeps about 14 mantissa bits).  In fp4_mma the K loop's ``acc + dot`` also stays a
float32 add per K tile (Triton's combine pass does not fold an add into a dot whose
maxNumImpreciseAcc is not 0), so each 128-wide tile is summed in the tensor core and promoted
(static report: 32-64 FADD per warp per step, and the loop waits for its wgmma every step).
"""

from __future__ import annotations

import functools

from jax import lax

FAST_ACCUM = lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM
FAST_ACCUM_INTERVAL = 128
_DOT_OP_NAME = "tt.dot"


def _rules():
  """Pallas-Triton's lowering rule table (jax 0.10 ... 0.12: ``triton_lowering_rules``)."""
  from jax._src.pallas.triton import lowering
  return lowering.triton_lowering_rules


def _set_imprecise_acc(value, interval: int) -> bool:
  """Set ``maxNumImpreciseAcc`` on the ``tt.dot`` that produced ``value``; False if it was not
  one (a cast after the dot: the caller's dtypes were not fp8 x fp8 -> float32)."""
  from jax._src.lib.mlir import ir
  owner = getattr(value, "owner", None)
  operation = getattr(owner, "operation", owner)
  if operation is None or getattr(operation, "name", None) != _DOT_OP_NAME:
    return False
  operation.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(
      ir.IntegerType.get_signless(32), int(interval))
  return True


def install() -> bool:
  """Register the FAST_ACCUM extension of the dot_general rule (idempotent).  False where this
  jax has no Pallas-Triton lowering table (then kernels must not pass FAST_ACCUM)."""
  try:
    rules = _rules()
  except ImportError:
    return False
  original = rules.get(lax.dot_general_p)
  if original is None:
    return False
  if getattr(original, "_fast_accum_extension", False):
    return True

  @functools.wraps(original)
  def rule(ctx, a, b, *, precision=None, **params):
    if precision != FAST_ACCUM:
      return original(ctx, a, b, precision=precision, **params)
    in_dtypes = {str(aval.dtype) for aval in ctx.avals_in}
    if in_dtypes != {"float8_e4m3fn"} or str(ctx.avals_out[0].dtype) != "float32":
      raise ValueError(f"{FAST_ACCUM} needs float8_e4m3fn operands and a float32 result, got "
                       f"{sorted(in_dtypes)} -> {ctx.avals_out[0].dtype}")
    out = original(ctx, a, b, precision=None, **params)
    if not _set_imprecise_acc(out, FAST_ACCUM_INTERVAL):
      raise AssertionError("the dot_general lowering no longer ends in tt.dot; update "
                           "kernels/fp8_dot.py for this jax version")
    return out

  rule._fast_accum_extension = True
  rules[lax.dot_general_p] = rule
  return True


INSTALLED = install()
