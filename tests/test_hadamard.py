"""Randomized Hadamard transform: orthogonality, the interfaces.md element layout, X W
invariance at the DiT widths (float64 numpy references), and outlier spreading."""

import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.quant import hadamard, rtn

SIZES = [64, 128, 384, 1152, 4608]


def sylvester_reference(b):
  """Unnormalized Walsh-Hadamard by the entry formula H[i, j] = (-1)^popcount(i & j)."""
  i, j = np.meshgrid(np.arange(b), np.arange(b), indexing="ij")
  bits = np.vectorize(lambda v: bin(v).count("1"))(i & j)
  return (-1.0) ** bits


def dense_reference(transform):
  """Q[i'b + j', i b + j] = signs[i'b + j'] * A[i', i] * B[j', j], float64, from interfaces.md."""
  a, b = transform.odd_factor, transform.power_of_two_factor
  block = transform.block.astype(np.float64)
  walsh = sylvester_reference(b) / np.sqrt(b)
  q = block[:, None, :, None] * walsh[None, :, None, :]  # (i', j', i, j)
  return transform.signs.astype(np.float64)[:, None] * q.reshape(a * b, a * b)


@pytest.fixture(scope="module")
def transforms():
  return {k: hadamard.make_transform(k, seed=k) for k in SIZES}


@pytest.mark.parametrize("size,factors", [(64, (1, 64)), (128, (1, 128)), (384, (3, 128)),
                                          (1152, (9, 128)), (4608, (9, 512)), (12, (3, 4))])
def test_split_size(size, factors):
  assert hadamard.split_size(size) == factors


@pytest.mark.parametrize("size", SIZES)
def test_orthogonal_and_invariant(size, transforms):
  transform = transforms[size]
  q = dense_reference(transform)
  rng = np.random.default_rng(size)
  assert set(np.unique(transform.signs)) <= {-1.0, 1.0}
  a = transform.odd_factor
  np.testing.assert_allclose(transform.block.astype(np.float64) @ transform.block.T.astype(np.float64),
                             np.eye(a), atol=1e-6)
  probe = rng.standard_normal((size, 3))
  np.testing.assert_allclose(q @ (q.T @ probe), probe, atol=1e-5)  # Q Q^T = I
  np.testing.assert_allclose(q.T @ (q @ probe), probe, atol=1e-5)  # Q^T Q = I
  # Online transform == x @ Q (the interfaces.md layout).
  x = rng.standard_normal((4, size)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(hadamard.apply_transform(x, transform)), x @ q,
                             atol=2e-5 * np.sqrt(size))
  # Folded weight == Q^T W and (x Q)(Q^T W) == x W.
  w = rng.standard_normal((size, 5)).astype(np.float32)
  folded = np.asarray(hadamard.fold_into_weight(w, transform))
  np.testing.assert_allclose(folded, q.T @ w, atol=2e-5 * np.sqrt(size))
  xq = np.asarray(hadamard.apply_transform(x, transform), np.float64)
  np.testing.assert_allclose(xq @ folded, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-3)


def test_dense_matrix_matches_reference(transforms):
  np.testing.assert_allclose(hadamard.dense_matrix(transforms[384]), dense_reference(transforms[384]),
                             atol=1e-7)


@pytest.mark.parametrize("b", [1, 2, 8, 64])
def test_fwht_matches_dense(b):
  x = np.random.default_rng(b).standard_normal((3, b)).astype(np.float32)
  expected = x @ (sylvester_reference(b) / np.sqrt(b))
  np.testing.assert_allclose(np.asarray(hadamard.fwht(x)), expected, atol=1e-5)


def test_seed_reproducible_and_distinct():
  one, again, other = (hadamard.make_transform(1152, s) for s in (7, 7, 8))
  np.testing.assert_array_equal(one.signs, again.signs)
  np.testing.assert_array_equal(one.block, again.block)
  assert not np.array_equal(one.signs, other.signs)


def test_shape_errors():
  transform = hadamard.make_transform(384, 0)
  with pytest.raises(ValueError, match="does not match"):
    hadamard.apply_transform(jnp.ones((2, 256)), transform)
  with pytest.raises(ValueError, match="does not match"):
    hadamard.fold_into_weight(jnp.ones((256, 4)), transform)
  with pytest.raises(ValueError, match="power-of-two"):
    hadamard.fwht(jnp.ones((2, 12)))


@pytest.mark.parametrize("fmt", ["int4", "e2m1"])
def test_hadamard_helps_per_token_quantization_of_outliers(fmt):
  """Outlier channels (x40) dominate each token's range; after x @ Q they are spread out,
  so dynamic per-token 4-bit quantization loses much less (error in the original basis)."""
  rng = np.random.default_rng(11)
  size = 384
  x = rng.standard_normal((64, size)).astype(np.float32)
  x[:, rng.choice(size, 4, replace=False)] *= 40.0
  transform = hadamard.make_transform(size, 3)
  q = dense_reference(transform)
  plain = np.asarray(rtn.per_token_fake_quant(x, fmt), np.float64)
  rotated = np.asarray(rtn.per_token_fake_quant(hadamard.apply_transform(x, transform), fmt), np.float64)
  err_plain = np.linalg.norm(plain - x)
  err_rotated = np.linalg.norm(rotated @ q.T - x)
  assert err_rotated < 0.5 * err_plain, (err_rotated, err_plain)
