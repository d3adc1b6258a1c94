"""k-means (quant/kmeans.py) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.quant import kmeans as km


def _nearest_f64(points, centroids):
  """(squared distances (n, k), argsort (n, k)) in float64."""
  diff = np.asarray(points, np.float64)[:, None, :] - np.asarray(centroids, np.float64)[None]
  sq = np.sum(diff * diff, axis=-1)
  return sq, np.argsort(sq, axis=1, kind="stable")


@pytest.fixture(scope="module")
def gaussian_points():
  return np.random.default_rng(11).normal(size=(3000, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def gaussian_run(gaussian_points):
  # chunk_elements 32 * 128 -> 128-row chunks, 3000 = 23 * 128 + 56: exercises padding.
  return km.kmeans(gaussian_points, 32, num_iters=25, seed=3, chunk_elements=32 * 128)


def test_objective_never_increases(gaussian_points, gaussian_run):
  num_run = int(gaussian_run.num_iters_run)
  history = np.asarray(gaussian_run.objective_history)
  assert num_run >= 5
  assert np.all(np.isfinite(history[: num_run + 1])) and np.all(np.isnan(history[num_run + 1:]))
  steps = np.diff(history[: num_run + 1].astype(np.float64))
  assert np.all(steps <= 1e-6 * history[0]), steps
  assert history[num_run] < 0.8 * history[0]  # Lloyd actually improved on the seeding
  # The recorded final objective is that of the returned centroids and assignments.
  reference = km.objective(gaussian_points, gaussian_run.centroids, gaussian_run.assignments)
  np.testing.assert_allclose(history[num_run], reference, rtol=1e-5)


def test_assignments_are_nearest(gaussian_points, gaussian_run):
  sq, order = _nearest_f64(gaussian_points, gaussian_run.centroids)
  assigned = np.asarray(gaussian_run.assignments)
  picked = sq[np.arange(len(assigned)), assigned]
  best = sq[np.arange(len(assigned)), order[:, 0]]
  np.testing.assert_allclose(picked, best, rtol=1e-5, atol=1e-9)
  assert np.mean(assigned == order[:, 0]) > 0.999


def test_deterministic_for_a_seed(gaussian_points, gaussian_run):
  again = km.kmeans(gaussian_points, 32, num_iters=25, seed=3, chunk_elements=32 * 128)
  np.testing.assert_array_equal(np.asarray(again.centroids), np.asarray(gaussian_run.centroids))
  np.testing.assert_array_equal(np.asarray(again.assignments), np.asarray(gaussian_run.assignments))


def test_finds_planted_clusters():
  rng = np.random.default_rng(5)
  centers = rng.normal(size=(6, 3)) * 10.0
  labels = rng.permutation(np.repeat(np.arange(6), 80))
  points = (centers[labels] + 0.05 * rng.normal(size=(480, 3))).astype(np.float32)
  result = km.kmeans(points, 6, num_iters=50, seed=1)
  found = np.asarray(result.centroids, np.float64)
  # Every true centre is matched by exactly one centroid, within the noise level.
  distance = np.linalg.norm(found[:, None] - centers[None], axis=-1)
  match = np.argmin(distance, axis=0)
  assert sorted(match.tolist()) == list(range(6))
  assert np.max(np.min(distance, axis=0)) < 0.05
  assigned = np.asarray(result.assignments)
  np.testing.assert_array_equal(assigned, match[labels])


def test_seeding_picks_distinct_data_points():
  points = np.random.default_rng(2).normal(size=(500, 2)).astype(np.float32)
  seeds = np.asarray(jax.jit(km.kmeans_plus_plus, static_argnums=1)(jnp.asarray(points), 20,
                                                                     jax.random.PRNGKey(0)))
  rows = {tuple(p) for p in points.tolist()}
  assert all(tuple(s) in rows for s in seeds.tolist())
  assert len({tuple(s) for s in seeds.tolist()}) == 20


def test_lloyd_update_and_empty_cluster_relocation():
  rng = np.random.default_rng(8)
  points = rng.normal(size=(200, 3)).astype(np.float32)
  centroids = rng.normal(size=(5, 3)).astype(np.float32)
  centroids[4] = 1e3  # no point is nearest to this one: an empty cluster
  idx, sq = jax.jit(km.assign_to_nearest)(points, centroids)
  sq64, order = _nearest_f64(points, centroids)
  np.testing.assert_array_equal(np.asarray(idx), order[:, 0])
  np.testing.assert_allclose(np.asarray(sq), sq64[np.arange(200), order[:, 0]], rtol=1e-5)
  updated = np.asarray(jax.jit(km.lloyd_update)(points, idx, sq, centroids))
  for j in range(4):
    np.testing.assert_allclose(updated[j], points[order[:, 0] == j].mean(0), rtol=1e-5, atol=1e-6)
  farthest = np.argmax(sq64[np.arange(200), order[:, 0]])
  np.testing.assert_array_equal(updated[4], points[farthest])
  # The move does not raise the objective.
  before = km.objective(points, centroids, order[:, 0])
  after = np.min(_nearest_f64(points, updated)[0], axis=1).sum()
  assert after <= before


def test_errors():
  points = np.zeros((10, 2), np.float32)
  with pytest.raises(ValueError, match="cannot form k=11"):
    km.kmeans(points, 11)
  with pytest.raises(ValueError, match=r"shape \(n, d\)"):
    km.kmeans(np.zeros((10,), np.float32), 2)
  with pytest.raises(ValueError, match="positive integer"):
    km.kmeans(points, 0)
