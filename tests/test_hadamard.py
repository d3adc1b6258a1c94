"""Hadamard transforms: Paley/Sylvester constructions are Hadamard matrices, the transform is
orthogonal and leaves x @ W exactly unchanged in float64 at the DiT widths, the interfaces.md
element layout, the random-block option, determinism, and outlier spreading."""

import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.quant import hadamard, rtn

DIT_WIDTHS = [384, 768, 1152, 4608]
SIZES = [64, 128] + DIT_WIDTHS


def sylvester_reference(b):
  """Unnormalized Walsh-Hadamard by the entry formula H[i, j] = (-1)^popcount(i & j)."""
  i, j = np.meshgrid(np.arange(b), np.arange(b), indexing="ij")
  bits = np.vectorize(lambda v: bin(v).count("1"))(i & j)
  return (-1.0) ** bits


def dense_reference(transform):
  """Q[i'b + j', i b + j] = signs[i'b + j'] * A[i', i] * B[j', j], float64, from interfaces.md."""
  a, b = transform.block_order, transform.power_of_two_factor
  block = transform.block.astype(np.float64)
  walsh = sylvester_reference(b) / np.sqrt(b)
  q = block[:, None, :, None] * walsh[None, :, None, :]  # (i', j', i, j)
  return transform.signs.astype(np.float64)[:, None] * q.reshape(a * b, a * b)


@pytest.fixture(scope="module")
def transforms():
  return {k: hadamard.make_transform(k, seed=k) for k in SIZES}


@pytest.mark.parametrize("order", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 76, 104])
def test_constructions_are_hadamard(order):
  h = hadamard.hadamard_matrix(order)
  assert h.shape == (order, order) and set(np.unique(h)) <= {-1, 1}
  np.testing.assert_array_equal(h @ h.T, order * np.eye(order, dtype=np.int64))


def test_paley_rejects_wrong_q_and_unbuildable_orders():
  with pytest.raises(ValueError, match="Paley I"):
    hadamard.paley_i(13)
  with pytest.raises(ValueError, match="Paley II"):
    hadamard.paley_ii(11)
  assert hadamard.hadamard_matrix(6) is None  # no Hadamard matrix of order 6 exists
  with pytest.raises(ValueError, match="random"):  # 6 = 3 * 2: no order 12 divides it
    hadamard.make_transform(6)


@pytest.mark.parametrize("size,factors", [(64, (1, 64)), (128, (1, 128)), (384, (12, 32)),
                                          (768, (12, 64)), (1152, (36, 32)), (4608, (36, 128)),
                                          (12, (12, 1)), (40, (20, 2))])
def test_block_split_rule(size, factors):
  t = hadamard.make_transform(size, 0)
  assert (t.block_order, t.power_of_two_factor) == factors


@pytest.mark.parametrize("size", SIZES)
def test_orthogonal_and_exactly_invariant_float64(size, transforms):
  transform = transforms[size]
  q = dense_reference(transform)
  assert set(np.unique(transform.signs)) <= {-1.0, 1.0}
  # A real Hadamard: every entry of Q is +-1/sqrt(K) and Q^T Q = I.
  np.testing.assert_allclose(np.abs(q), 1.0 / np.sqrt(size), rtol=1e-6)
  rng = np.random.default_rng(size)
  probe = rng.standard_normal((size, 6))  # Q^T Q = Q Q^T = I, without a K^3 product
  np.testing.assert_allclose(q.T @ (q @ probe), probe, atol=1e-5)
  np.testing.assert_allclose(q @ (q.T @ probe), probe, atol=1e-5)
  x = rng.standard_normal((4, size))
  w = rng.standard_normal((size, 5))
  xq = hadamard.apply_numpy(x, transform)
  folded = hadamard.fold_into_weight_numpy(w, transform)
  np.testing.assert_allclose(xq, x @ q, atol=1e-12)
  np.testing.assert_allclose(folded, q.T @ w, atol=1e-12)
  # (x Q)(Q^T W) == x W to float64 rounding; Q's float32 block limits it to ~1e-7 relative
  # orthogonality, so compare against the dense Q itself.
  np.testing.assert_allclose(xq @ folded, (x @ q) @ (q.T @ w), rtol=1e-11, atol=1e-10)
  np.testing.assert_allclose(xq @ folded, x @ w, rtol=1e-5, atol=1e-4)
  # Online float32 jnp path == x @ Q (the interfaces.md layout).
  x32 = x.astype(np.float32)
  np.testing.assert_allclose(np.asarray(hadamard.apply_transform(x32, transform)), x32 @ q,
                             atol=2e-5 * np.sqrt(size))
  np.testing.assert_allclose(np.asarray(hadamard.fold_into_weight(w, transform)), q.T @ w,
                             atol=1e-5)


@pytest.mark.parametrize("size", [384, 1152])
def test_random_block_option(size):
  transform = hadamard.make_transform(size, 3, kind="random")
  m, b = hadamard.split_size(size)
  assert (transform.block_order, transform.power_of_two_factor) == (m, b)
  q = dense_reference(transform)
  np.testing.assert_allclose(q.T @ q, np.eye(size), atol=1e-5)
  x = np.random.default_rng(1).standard_normal((3, size))
  np.testing.assert_allclose(hadamard.apply_numpy(x, transform), x @ q, atol=1e-12)
  with pytest.raises(ValueError, match="kind"):
    hadamard.make_transform(size, 0, kind="dense")


def test_dense_matrix_matches_reference(transforms):
  np.testing.assert_allclose(hadamard.dense_matrix(transforms[384]), dense_reference(transforms[384]),
                             atol=1e-7)


@pytest.mark.parametrize("b", [1, 2, 8, 64])
def test_fwht_matches_dense(b):
  x = np.random.default_rng(b).standard_normal((3, b)).astype(np.float32)
  expected = x @ (sylvester_reference(b) / np.sqrt(b))
  np.testing.assert_allclose(np.asarray(hadamard.fwht(x)), expected, atol=1e-5)
  np.testing.assert_allclose(hadamard.fwht_numpy(x.astype(np.float64)), expected, atol=1e-5)


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


@pytest.mark.parametrize("kind", hadamard.BLOCK_KINDS)
@pytest.mark.parametrize("fmt", ["int4", "e2m1"])
def test_hadamard_helps_per_token_quantization_of_outliers(fmt, kind):
  """Outlier channels (x40) dominate each token's range; after x @ Q they are spread out,
  so dynamic per-token 4-bit quantization loses much less (error in the original basis)."""
  rng = np.random.default_rng(11)
  size = 384
  x = rng.standard_normal((64, size)).astype(np.float32)
  x[:, rng.choice(size, 4, replace=False)] *= 40.0
  transform = hadamard.make_transform(size, 3, kind=kind)
  q = dense_reference(transform)
  plain = np.asarray(rtn.per_token_fake_quant(x, fmt), np.float64)
  rotated = np.asarray(rtn.per_token_fake_quant(hadamard.apply_transform(x, transform), fmt), np.float64)
  err_plain = np.linalg.norm(plain - x)
  err_rotated = np.linalg.norm(rotated @ q.T - x)
  assert err_rotated < 0.5 * err_plain, (err_rotated, err_plain)
