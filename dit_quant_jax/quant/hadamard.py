"""Randomized Hadamard transform for outlier spreading (HQ-DiT, QuaRot), at any DiT width.

``Q = diag(signs) @ kron(block, H_b / sqrt(b))`` with ``signs: (K,)`` random +-1, ``H_b`` the
Sylvester Walsh-Hadamard matrix of the power of two ``b`` and ``block: (a, a)`` an orthogonal
matrix, ``K = a * b``.  Two choices of ``block`` (``make_transform(kind=...)``):

* ``'hadamard'`` (default): a real normalized Hadamard matrix ``H_a / sqrt(a)``, so Q is a
  (randomly signed) Hadamard matrix of order K and spreads every input channel evenly over
  all K outputs (every entry of Q has magnitude 1 / sqrt(K)).  Rule for ``a``: write
  ``K = m * 2^j`` with m odd.  m = 1: ``a = 1`` (pure Walsh-Hadamard).  Otherwise ``a`` is the
  smallest order ``m * 2^i`` (i >= 2; Hadamard orders above 2 are multiples of 4) that
  :func:`hadamard_matrix` can build and that divides K.  DiT widths:

  ======  ============  ==========================================
  K       a * b         block
  ======  ============  ==========================================
  384     12 * 32       Paley I, q = 11
  768     12 * 64       Paley I, q = 11
  1152    36 * 32       Paley II, q = 17
  4608    36 * 128      Paley II, q = 17
  ======  ============  ==========================================

  (QuaRot uses Hadamard matrices of these orders at LLM widths.)  Orders are built in code
  (:func:`hadamard_matrix`): Paley I for a prime q = 3 mod 4 (order q + 1), Paley II for a
  prime q = 1 mod 4 (order 2 (q + 1)), Sylvester doubling on either.  Prime powers (GF(p^k)
  arithmetic) are not implemented; a width whose odd part needs one raises an error that
  names ``kind='random'``.
* ``'random'``: a Haar-random orthogonal ``(m, m)`` block for the odd part m (QR of a
  Gaussian, with the sign fix of Mezzadri 2007), b the largest power of two dividing K.  It
  is orthogonal, but it does not guarantee an even spread (kept for the ablation).

Since Q is orthogonal, ``x @ W = (x @ Q) @ (Q^T @ W)``: the weight is folded offline
(:func:`fold_into_weight`, float64 numpy) and activations are transformed online
(:func:`apply`) with a fast Walsh-Hadamard transform on the power-of-two factor and one small
dense matmul with ``block``: O(K (log b + a)) per token, never a dense K x K matmul.
Element layout (``notes/interfaces.md``):
``xq[m, i*b + j] = sum_{i',j'} x[m, i'*b+j'] * signs[i'*b+j'] * block[i', i] * H_b[j', j] / sqrt(b)``.

Determinism: the ``'hadamard'`` construction is integer arithmetic (entries +-1, scaled by
1/sqrt(a) once); the signs come from numpy's seeded Generator.  Neither depends on LAPACK,
BLAS or the thread count, so the transform is bit-identical on every machine.  The
``'random'`` block goes through LAPACK QR (float64, cast to float32), whose last bits may
differ between LAPACK builds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_KINDS = ("hadamard", "random")


@dataclasses.dataclass(frozen=True)
class HadamardTransform:
  """Q = diag(signs) @ kron(block, H_b / sqrt(b)).  signs: (K,), block: (a, a), both float32."""

  signs: np.ndarray
  block: np.ndarray
  seed: int
  kind: str = "hadamard"

  @property
  def size(self) -> int:
    return int(self.signs.shape[0])

  @property
  def block_order(self) -> int:
    """a: the order of the dense block."""
    return int(self.block.shape[0])

  @property
  def power_of_two_factor(self) -> int:
    """b = K / a: the Walsh-Hadamard (FWHT) factor."""
    return self.size // self.block_order


# ------------------------------------------------------------------ Hadamard constructions
def _check_size(size) -> int:
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"transform size must be a positive integer, got {size!r}")
  return int(size)


def split_size(size: int) -> tuple[int, int]:
  """size -> (m, b): b the largest power of two dividing size, m = size / b odd."""
  size = _check_size(size)
  b = size & (-size)
  return size // b, b


def _is_prime(n: int) -> bool:
  if n < 2:
    return False
  f = 2
  while f * f <= n:
    if n % f == 0:
      return False
    f += 1
  return True


def _jacobsthal(q: int) -> np.ndarray:
  """(q, q) Jacobsthal matrix of the prime q: Q[i, j] = chi(j - i), chi the quadratic
  character mod q (0 at 0, +1 on non-zero squares, -1 otherwise).  Integer entries."""
  chi = -np.ones(q, np.int64)
  chi[0] = 0
  chi[np.unique((np.arange(1, q) ** 2) % q)] = 1
  i, j = np.meshgrid(np.arange(q), np.arange(q), indexing="ij")
  return chi[(j - i) % q]


def paley_i(q: int) -> np.ndarray:
  """Paley construction I: Hadamard matrix of order q + 1 for a prime q = 3 (mod 4).

  With the (skew-symmetric) Jacobsthal matrix J: S = [[0, 1^T], [-1, J]], H = I + S."""
  if not (_is_prime(q) and q % 4 == 3):
    raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
  n = q + 1
  s = np.zeros((n, n), np.int64)
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = _jacobsthal(q)
  return np.eye(n, dtype=np.int64) + s


def paley_ii(q: int) -> np.ndarray:
  """Paley construction II: Hadamard matrix of order 2 (q + 1) for a prime q = 1 (mod 4).

  With the (symmetric) Jacobsthal matrix J: C = [[0, 1^T], [1, J]] and
  H = kron(C, [[1, -1], [-1, -1]]) + kron(I, [[1, 1], [1, -1]])."""
  if not (_is_prime(q) and q % 4 == 1):
    raise ValueError(f"Paley II needs a prime q = 1 mod 4, got {q}")
  n = q + 1
  c = np.zeros((n, n), np.int64)
  c[0, 1:] = 1
  c[1:, 0] = 1
  c[1:, 1:] = _jacobsthal(q)
  return (np.kron(c, np.array([[1, -1], [-1, -1]])) +
          np.kron(np.eye(n, dtype=np.int64), np.array([[1, 1], [1, -1]])))


def sylvester(b: int) -> np.ndarray:
  """Unnormalized (b, b) Sylvester Walsh-Hadamard matrix, b a power of two.  Integer entries."""
  if b < 1 or b & (b - 1):
    raise ValueError(f"Walsh-Hadamard size must be a power of two, got {b}")
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  return h


def _paley_base(n: int):
  """A Paley matrix of order exactly n, or None."""
  if n >= 4 and _is_prime(n - 1) and (n - 1) % 4 == 3:
    return paley_i(n - 1)
  if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
    return paley_ii(n // 2 - 1)
  return None


def hadamard_matrix(n: int):
  """Unnormalized (n, n) +-1 Hadamard matrix (H H^T = n I) from Paley I/II and Sylvester
  doubling, or None when none of these constructions gives order n.  Integer entries."""
  n = _check_size(n)
  doublings = 0
  while True:
    if n & (n - 1) == 0:  # a power of two: Sylvester
      base = sylvester(n)
    else:
      base = _paley_base(n)
    if base is not None:
      return np.kron(sylvester(2 ** doublings), base)
    if n % 2:
      return None
    n //= 2
    doublings += 1


def hadamard_block_order(size: int) -> int:
  """The order a of the Hadamard block for width K = ``size`` (rule of the module doc)."""
  m, _ = split_size(size)
  if m == 1:
    return 1
  a = 4 * m
  while size % a == 0:
    if hadamard_matrix(a) is not None:
      return a
    a *= 2
  raise ValueError(
      f"no Hadamard matrix of order m * 2^i (m = {m}, the odd part of {size}) dividing {size} "
      f"can be built here (Paley I/II for primes and Sylvester products only); use the random "
      f"orthogonal block (hadamard.block = 'random' / make_transform(kind='random'))")


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
  """Haar-distributed (n, n) orthogonal matrix, float64 (LAPACK QR)."""
  if n == 1:
    return np.ones((1, 1))
  gaussian = rng.standard_normal((n, n))
  q, r = np.linalg.qr(gaussian)
  return q * np.sign(np.diag(r))[None, :]


def make_transform(size: int, seed: int = 0, kind: str = "hadamard") -> HadamardTransform:
  """Random signs and the block for a K = ``size`` transform, reproducible from seed.

  kind: 'hadamard' (a real Hadamard block, default) or 'random' (Haar orthogonal block for
  the odd part of K); see the module doc."""
  size = _check_size(size)
  if kind not in BLOCK_KINDS:
    raise ValueError(f"unknown Hadamard block kind {kind!r}; known: {BLOCK_KINDS}")
  rng = np.random.default_rng(seed)
  signs = rng.choice(np.array([-1.0, 1.0]), size=size)
  if kind == "hadamard":
    a = hadamard_block_order(size)
    block = hadamard_matrix(a).astype(np.float64) / np.sqrt(a)
  else:
    block = random_orthogonal(split_size(size)[0], rng)
  return HadamardTransform(signs.astype(np.float32), block.astype(np.float32), int(seed), kind)


def sylvester_hadamard(b: int) -> np.ndarray:
  """Normalized (b, b) Walsh-Hadamard matrix H_b / sqrt(b) (symmetric, orthogonal), float64."""
  return sylvester(b).astype(np.float64) / np.sqrt(b)


def dense_matrix(transform: HadamardTransform) -> np.ndarray:
  """The dense (K, K) Q in float64 (reference / tests only)."""
  q = np.kron(transform.block.astype(np.float64), sylvester_hadamard(transform.power_of_two_factor))
  return transform.signs.astype(np.float64)[:, None] * q


# -------------------------------------------------------------------------- applying Q
def _fwht_last_axis(x, xp):
  """Normalized FWHT of the last axis with array module xp (jax.numpy or numpy)."""
  b = x.shape[-1]
  if b & (b - 1):
    raise ValueError(f"fwht needs a power-of-two length, got {b}")
  lead = x.shape[:-1]
  h = 1
  while h < b:
    pairs = x.reshape(lead + (b // (2 * h), 2, h))
    first, second = pairs[..., 0, :], pairs[..., 1, :]
    x = xp.stack([first + second, first - second], axis=-2).reshape(lead + (b,))
    h *= 2
  return x * xp.asarray(1.0 / np.sqrt(b), x.dtype)


def fwht(x, axis: int = -1):
  """Normalized fast Walsh-Hadamard transform along ``axis`` (x @ H_b / sqrt(b)), O(n log n)."""
  x = jnp.moveaxis(jnp.asarray(x), axis, -1)
  return jnp.moveaxis(_fwht_last_axis(x, jnp), -1, axis)


def _check_match(k: int, signs_shape, block_shape) -> None:
  a = block_shape[0]
  if tuple(signs_shape) != (k,) or tuple(block_shape) != (a, a) or k % a:
    raise ValueError(f"transform (signs {tuple(signs_shape)}, block {tuple(block_shape)}) does "
                     f"not match an input with {k} features")


def apply(x, signs, block):
  """x @ Q for x: (..., K); signs: (K,); block: (a, a) with K = a * b.  Keeps x's dtype."""
  x = jnp.asarray(x)
  _check_match(x.shape[-1], signs.shape, block.shape)
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


def fwht_numpy(x: np.ndarray) -> np.ndarray:
  """Normalized FWHT of the last axis in numpy (same butterfly order as :func:`fwht`)."""
  return _fwht_last_axis(np.asarray(x), np)


def apply_numpy(x, transform: HadamardTransform) -> np.ndarray:
  """x @ Q in float64 numpy for x: (..., K), the offline path (weights, calibration data).

  The block product is an explicit sum over the block's rows in a fixed order (no BLAS), so
  the result does not depend on the BLAS build or thread count."""
  x = np.asarray(x, np.float64)
  k = x.shape[-1]
  _check_match(k, transform.signs.shape, transform.block.shape)
  a, b = transform.block_order, transform.power_of_two_factor
  lead = x.shape[:-1]
  xs = (x * transform.signs.astype(np.float64)).reshape(lead + (a, b))
  if a > 1:
    block = transform.block.astype(np.float64)
    mixed = np.zeros_like(xs)
    for row in range(a):  # mixed[..., i, :] = sum_row xs[..., row, :] * block[row, i]
      mixed += xs[..., row, None, :] * block[row][:, None]
    xs = mixed
  return fwht_numpy(xs).reshape(lead + (k,))


def fold_into_weight_numpy(kernel, transform: HadamardTransform) -> np.ndarray:
  """Q^T @ kernel in float64 for kernel: (K, N), as (kernel^T @ Q)^T."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2 or kernel.shape[0] != transform.size:
    raise ValueError(f"kernel of shape {tuple(kernel.shape)} does not match a transform of size "
                     f"{transform.size} (expects (K, N) with K = {transform.size})")
  return apply_numpy(kernel.T, transform).T


def fold_into_weight(kernel, transform: HadamardTransform):
  """Q^T @ kernel (K, N) as a float32 jax array (computed in float64, :func:`fold_into_weight_numpy`)."""
  return jnp.asarray(fold_into_weight_numpy(kernel, transform).astype(np.float32))
