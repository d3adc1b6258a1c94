"""Randomized orthogonal (Hadamard-based) transform for outlier spreading (HQ-DiT, QuaRot).

``Q = diag(signs) @ kron(A, B)`` with ``signs: (K,)`` random +-1, ``B: (b, b)`` the normalized
Sylvester Walsh-Hadamard matrix (b the largest power of two dividing K) and ``A: (a, a)`` a
small orthogonal matrix for the odd factor ``a = K / b`` (DiT widths: 1152 = 9 * 128,
4608 = 9 * 512, 384 = 3 * 128).  No Hadamard matrix of odd order > 1 exists, so ``A`` is a
Haar-random orthogonal matrix (QR of a Gaussian with the sign fix of Mezzadri 2007), drawn
from the same seed as the signs; ``a = 1`` gives ``A = [[1]]``.

Since Q is orthogonal, ``x @ W = (x @ Q) @ (Q^T @ W)``: the weight is folded offline
(:func:`fold_into_weight`) and activations are transformed online (:func:`apply`) with a fast
Walsh-Hadamard transform, O(K log b + K a) per token, never a dense K x K matmul.  Element
layout (``notes/interfaces.md``):
``xq[m, i*b + j] = sum_{i',j'} x[m, i'*b+j'] * signs[i'*b+j'] * A[i', i] * B[j', j]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class HadamardTransform:
  """Q = diag(signs) @ kron(block, H_b / sqrt(b)).  signs: (K,), block: (a, a), both float32."""

  signs: np.ndarray
  block: np.ndarray
  seed: int

  @property
  def size(self) -> int:
    return int(self.signs.shape[0])

  @property
  def odd_factor(self) -> int:
    return int(self.block.shape[0])

  @property
  def power_of_two_factor(self) -> int:
    return self.size // self.odd_factor


def split_size(size: int) -> tuple[int, int]:
  """size -> (a, b): b the largest power of two dividing size, a = size / b."""
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"transform size must be a positive integer, got {size!r}")
  b = size & (-size)
  return size // b, b


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
  """Haar-distributed (n, n) orthogonal matrix, float64."""
  if n == 1:
    return np.ones((1, 1))
  gaussian = rng.standard_normal((n, n))
  q, r = np.linalg.qr(gaussian)
  return q * np.sign(np.diag(r))[None, :]


def make_transform(size: int, seed: int = 0) -> HadamardTransform:
  """Random signs and odd-factor block for a K = ``size`` transform, reproducible from seed."""
  a, _ = split_size(size)
  rng = np.random.default_rng(seed)
  signs = rng.choice(np.array([-1.0, 1.0]), size=size)
  block = random_orthogonal(a, rng)
  return HadamardTransform(signs.astype(np.float32), block.astype(np.float32), int(seed))


def sylvester_hadamard(b: int) -> np.ndarray:
  """Normalized (b, b) Walsh-Hadamard matrix H_b / sqrt(b) (symmetric, orthogonal), float64."""
  if b < 1 or b & (b - 1):
    raise ValueError(f"Walsh-Hadamard size must be a power of two, got {b}")
  h = np.ones((1, 1))
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(b)


def dense_matrix(transform: HadamardTransform) -> np.ndarray:
  """The dense (K, K) Q in float64 (reference / tests only)."""
  a, b = transform.odd_factor, transform.power_of_two_factor
  q = np.kron(transform.block.astype(np.float64), sylvester_hadamard(b))
  return transform.signs.astype(np.float64)[:, None] * q


def fwht(x, axis: int = -1):
  """Normalized fast Walsh-Hadamard transform along ``axis`` (x @ H_b / sqrt(b)), O(n log n)."""
  x = jnp.moveaxis(jnp.asarray(x), axis, -1)
  b = x.shape[-1]
  if b & (b - 1):
    raise ValueError(f"fwht needs a power-of-two length, got {b}")
  lead = x.shape[:-1]
  h = 1
  while h < b:
    pairs = x.reshape(lead + (b // (2 * h), 2, h))
    first, second = pairs[..., 0, :], pairs[..., 1, :]
    x = jnp.stack([first + second, first - second], axis=-2).reshape(lead + (b,))
    h *= 2
  x = x * jnp.asarray(1.0 / np.sqrt(b), x.dtype)
  return jnp.moveaxis(x, -1, axis)


def apply(x, signs, block):
  """x @ Q for x: (..., K); signs: (K,); block: (a, a) with K = a * b.  Keeps x's dtype."""
  x = jnp.asarray(x)
  k = x.shape[-1]
  a = block.shape[0]
  if signs.shape != (k,) or block.shape != (a, a) or k % a:
    raise ValueError(f"transform (signs {tuple(signs.shape)}, block {tuple(block.shape)}) does "
                     f"not match an input with {k} features")
  return _apply(x, jnp.asarray(signs), jnp.asarray(block))


@jax.jit
def _apply(x, signs, block):
  k = x.shape[-1]
  a = block.shape[0]
  b = k // a
  lead = x.shape[:-1]
  xs = (x * signs.astype(x.dtype)).reshape(lead + (a, b))
  if a > 1:
    xs = jnp.einsum("...ij,ik->...kj", xs, block.astype(x.dtype))
  return fwht(xs, axis=-1).reshape(lead + (k,))


def apply_transform(x, transform: HadamardTransform):
  return apply(x, jnp.asarray(transform.signs), jnp.asarray(transform.block))


def fold_into_weight(kernel, transform: HadamardTransform):
  """Q^T @ kernel for kernel: (K, N), computed as (kernel^T @ Q)^T with the fast transform."""
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2 or kernel.shape[0] != transform.size:
    raise ValueError(f"kernel of shape {tuple(kernel.shape)} does not match a transform of size "
                     f"{transform.size} (expects (K, N) with K = {transform.size})")
  return apply_transform(kernel.T, transform).T
