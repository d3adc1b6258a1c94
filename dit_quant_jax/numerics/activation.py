"""Output activations a matmul epilogue can apply (shared by the kernels and XLA paths).

DiT's MLP is fc1 -> GELU (tanh approximation, as the official model's
``nn.GELU(approximate="tanh")``) -> fc2.  Unfused, the GELU is its own pass over the fc1 output
(M x 4608 bf16 read and written again: ~22 us per block at M = 4096 on an H100, as much as the
fc1 GEMM itself); a quantized matmul kernel applies it to its float32 output tile before the
store instead.

``fused(name, y)`` is the epilogue's form, ``unfused(name, y)`` exactly what the model computes
without fusion (``jax.nn.gelu(y, approximate=True)``).  They are the same function:
``0.5 x (1 + tanh(u)) = x * sigmoid(2 u)`` with ``u = sqrt(2 / pi) (x + 0.044715 x^3)``; the
fused form takes one exp2 and one division per element (no tanh: libdevice's tanhf is ~20
instructions).  In float32 the two agree to a few ulps (tests/test_kernels_fp4.py).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ("gelu_tanh",)
_GELU_CUBIC = 0.044715
# sigmoid(2u) = 1 / (1 + 2 ** (-2 u log2(e))): the exponent is x * (A + B x^2)
_GELU_U = math.sqrt(2.0 / math.pi)  # u = _GELU_U * (x + 0.044715 x^3)
_GELU_A = -2.0 * _GELU_U * math.log2(math.e)
_GELU_B = _GELU_A * _GELU_CUBIC


def check(name: Optional[str]) -> Optional[str]:
  """None or a known activation name -> itself; else a ValueError naming the known ones."""
  if name is not None and name not in ACTIVATIONS:
    raise ValueError(f"unknown output activation {name!r}; known: {ACTIVATIONS} or None")
  return name


def fused(name: Optional[str], y, tanh=None):
  """The epilogue's activation on float32 y (jnp ops that lower in Pallas-Triton and XLA).

  tanh: None (the exp2 / division form: float32-accurate, 2 special-function ops per element)
  or a tanh implementation for ``0.5 y (1 + tanh(u))`` (a compiled GPU kernel passes the
  hardware's tanh.approx.f32, kernels.common.tanh_approx: 1 special-function op and 6
  instructions per element; its ~2^-11 relative error gives an absolute error of about
  2^-12 |y|: below the bf16 output's rounding for y > 0, above it where GELU is near 0,
  y < -2, at a level no 4-bit activation grid resolves)."""
  if check(name) is None:
    return y
  if tanh is not None:
    u = y * (np.float32(_GELU_U) + np.float32(_GELU_U * _GELU_CUBIC) * (y * y))
    half = np.float32(0.5) * y
    return half + half * tanh(u)
  exponent = y * (np.float32(_GELU_A) + np.float32(_GELU_B) * (y * y))
  return y / (np.float32(1.0) + jnp.exp2(exponent))


def unfused(name: Optional[str], y):
  """What the model computes after an unfused linear (its dtype, jax.nn.gelu)."""
  if check(name) is None:
    return y
  return jax.nn.gelu(y, approximate=True)


def reference_float64(name: Optional[str], y: np.ndarray) -> np.ndarray:
  """float64 numpy closed form (tests)."""
  if check(name) is None:
    return y
  y = np.asarray(y, np.float64)
  return 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + _GELU_CUBIC * y**3)))
