"""K-means for weight sub-vectors: k-means++ seeding and Lloyd iterations, vectorised in JAX.

Built for VQ4DiT codebook initialisation (Deng et al. 2024, Sec. 3.2): the points are the
d-dimensional sub-vectors of one layer's weight, up to 1.3M of them for DiT-XL/2's largest
layer (4608 x 1152 at d = 4).  Distances are computed in row chunks so that memory stays
bounded by ``chunk_elements`` floats per step, independent of the number of points.

Nearest-centroid search uses the matmul form |c|^2 - 2 x.c (fast on every backend); where the
exact order matters (candidate codewords) a short list from it is re-ranked with exact
differences, and objectives are always computed from exact differences.  k-means++ seeding
runs on a random subset of at most ``seeding_sample`` points; Lloyd iterations use all points.

Deterministic for a seed: seeding draws from ``jax.random``; the Lloyd loop has no randomness.

Measured on the shared 2-core CPU of the project (jax 0.10.2): DiT-XL/2 fc1 (1152 x 4608,
1.33M sub-vectors, d = 4, k = 256): seeding + final assignment ~3 s CPU, ~1.3 s CPU per Lloyd
iteration, so ~140 s CPU for the public code's 100 iterations.

Empty clusters: after an update step, every cluster that received no point is moved onto one
of the points farthest from their current centroid (the i-th empty cluster gets the i-th
farthest point).  An empty cluster's centroid does not enter the objective, so the move never
raises it and the next assignment step can only lower it: the objective is non-increasing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Upper bound on the (chunk_rows, k) distance block of one step, in elements (16M float32 =
# 64 MiB), whatever the number of points.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# Extra centroids shortlisted by the fast matmul distances before exact re-ranking; covers
# float32 cancellation in |c|^2 - 2 x.c (near-ties further down the list do not matter).
SHORTLIST_MARGIN = 4
# k-means++ seeding runs on a uniform random subset of at most this many points (k sequential
# passes over all 1.3M sub-vectors of DiT-XL/2's fc1 would dominate the run time); Lloyd
# iterations then use every point.  256 codewords still see ~1000 points each.
DEFAULT_SEEDING_SAMPLE = 1 << 18
# Lloyd iterations of the public VQ4DiT code (kmeans(..., n_iters=100)).
DEFAULT_NUM_ITERS = 100


class KMeansResult(NamedTuple):
  centroids: jax.Array  # (k, d) float32
  assignments: jax.Array  # (n,) int32, nearest centroid of each point
  objective_history: jax.Array  # (num_iters + 1,) sum of squared distances after each
  #   assignment step; entries past `num_iters_run` are NaN (converged early)
  num_iters_run: jax.Array  # () int32, Lloyd updates performed


def _chunk_rows(k: int, chunk_elements: int) -> int:
  return max(1, chunk_elements // max(1, k))


def squared_distances(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """Exact squared Euclidean distances by differences.  points (m, d), centroids (k, d) -> (m, k)."""
  diff = points[:, None, :] - centroids[None, :, :]
  return jnp.sum(diff * diff, axis=-1)


def _ranking_scores(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """|c|^2 - 2 x.c: squared distance minus |x|^2, same ordering per row; (m, d), (k, d) -> (m, k).

  A matmul, several times faster than differences on CPU, but subject to cancellation, so
  results that must be exact are re-ranked with :func:`squared_distances`.
  """
  norms = jnp.sum(centroids * centroids, axis=-1)
  return norms[None, :] - 2.0 * jnp.dot(points, centroids.T, precision=jax.lax.Precision.HIGHEST)


def _map_chunks(fn, points: jax.Array, chunk_rows: int):
  """Apply fn to row chunks of points (n, d); pads with copies of row 0 and cuts back."""
  n = points.shape[0]
  chunk_rows = min(chunk_rows, n)
  num_chunks = -(-n // chunk_rows)
  pad = num_chunks * chunk_rows - n
  if pad:
    points = jnp.concatenate([points, jnp.broadcast_to(points[:1], (pad,) + points.shape[1:])], 0)
  chunks = points.reshape((num_chunks, chunk_rows) + points.shape[1:])
  out = jax.lax.map(fn, chunks)
  return jax.tree_util.tree_map(lambda a: a.reshape((num_chunks * chunk_rows,) + a.shape[2:])[:n], out)


def assign_to_nearest(points: jax.Array, centroids: jax.Array,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
  """Lloyd assignment step.  points (n, d), centroids (k, d) -> (indices (n,) int32,
  exact squared distance to that centroid (n,)).  Ties (and near-ties within float32
  rounding of the matmul form) go to the lowest index."""
  k = centroids.shape[0]
  centroids = centroids.astype(jnp.float32)
  positions = jnp.arange(k, dtype=jnp.int32)

  def one_chunk(chunk):
    scores = _ranking_scores(chunk, centroids)
    best = jnp.min(scores, axis=1, keepdims=True)
    # min-then-first-match is faster than argmin's variadic reduction on XLA:CPU.
    idx = jnp.min(jnp.where(scores == best, positions[None, :], k), axis=1)
    sq = jnp.sum(jnp.square(chunk - centroids[idx]), axis=-1)
    return idx, sq

  return _map_chunks(one_chunk, points.astype(jnp.float32), _chunk_rows(k, chunk_elements))


@functools.partial(jax.jit, static_argnames=("num_nearest", "chunk_elements"))
def nearest_centroids(points: jax.Array, centroids: jax.Array, num_nearest: int = 1,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
  """The num_nearest closest centroids of every point, closest first.

  points (n, d), centroids (k, d) -> (squared distances (n, num_nearest) float32,
  indices (n, num_nearest) int32).  A shortlist of num_nearest + SHORTLIST_MARGIN centroids
  by the matmul form is re-ranked by exact differences.
  """
  k, d = centroids.shape
  if not 1 <= num_nearest <= k:
    raise ValueError(f"num_nearest must be in [1, k={k}], got {num_nearest}")
  centroids = centroids.astype(jnp.float32)
  shortlist = min(k, num_nearest + SHORTLIST_MARGIN)

  def one_chunk(chunk):
    _, idx = jax.lax.top_k(-_ranking_scores(chunk, centroids), shortlist)  # (m, shortlist)
    exact = jnp.sum(jnp.square(chunk[:, None, :] - centroids[idx]), axis=-1)
    # Stable sort by exact distance; ties keep the shortlist order (lower index first).
    order = jnp.argsort(exact, axis=1, stable=True)[:, :num_nearest]
    return (jnp.take_along_axis(exact, order, axis=1),
            jnp.take_along_axis(idx, order, axis=1).astype(jnp.int32))

  return _map_chunks(one_chunk, points.astype(jnp.float32), _chunk_rows(k, chunk_elements))


def kmeans_plus_plus(points: jax.Array, k: int, rng: jax.Array) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007).  points (n, d) -> centroids (k, d).

  First centroid uniform; each next one drawn with probability proportional to the squared
  distance to the nearest centroid chosen so far (inverse-CDF sampling on a cumulative sum).
  """
  n = points.shape[0]
  points = points.astype(jnp.float32)
  first_key, loop_key = jax.random.split(rng)
  first = jax.random.randint(first_key, (), 0, n)
  centroids = jnp.zeros((k, points.shape[1]), jnp.float32).at[0].set(points[first])
  min_sq = jnp.sum(jnp.square(points - points[first]), axis=1)

  def body(j, carry):
    centroids, min_sq = carry
    cdf = jnp.cumsum(min_sq)
    total = cdf[-1]
    u = jax.random.uniform(jax.random.fold_in(loop_key, j), (), jnp.float32) * total
    pick = jnp.searchsorted(cdf, u, side="right")
    # All points already coincide with a centroid (total == 0): any point will do.
    pick = jnp.where(total > 0, jnp.minimum(pick, n - 1), j % n)
    new = points[pick]
    centroids = centroids.at[j].set(new)
    min_sq = jnp.minimum(min_sq, jnp.sum(jnp.square(points - new), axis=1))
    return centroids, min_sq

  centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, min_sq))
  return centroids


def lloyd_update(points: jax.Array, assignments: jax.Array, min_sq: jax.Array,
                 centroids: jax.Array) -> jax.Array:
  """Centroids <- mean of their points; empty clusters moved to the farthest points.

  points (n, d), assignments (n,), min_sq (n,) squared distance to the assigned centroid,
  centroids (k, d) -> (k, d).
  """
  k = centroids.shape[0]
  n = points.shape[0]
  sums = jax.ops.segment_sum(points, assignments, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), assignments, num_segments=k)
  empty = counts == 0
  means = sums / jnp.maximum(counts, 1.0)[:, None]

  def relocate(means):
    num_far = min(k, n)
    _, far = jax.lax.top_k(min_sq, num_far)  # farthest points first
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, num_far - 1)
    return jnp.where(empty[:, None], points[far[rank]], means)

  return jax.lax.cond(jnp.any(empty), relocate, lambda m: m, means)


@functools.partial(jax.jit, static_argnames=("k", "num_iters", "chunk_elements", "seeding_sample"))
def _kmeans(points, rng, tol, *, k, num_iters, chunk_elements, seeding_sample):
  points = points.astype(jnp.float32)
  n = points.shape[0]
  sample_key, seed_key = jax.random.split(rng)
  if n > seeding_sample:
    seeding_points = points[jax.random.choice(sample_key, n, (seeding_sample,), replace=False)]
  else:
    seeding_points = points
  centroids = kmeans_plus_plus(seeding_points, k, seed_key)
  history = jnp.full((num_iters + 1,), jnp.nan, jnp.float32)

  def assign(centroids):
    return assign_to_nearest(points, centroids, chunk_elements)

  def cond(carry):
    i, _, _, _, converged = carry
    return (i < num_iters) & ~converged

  def body(carry):
    i, centroids, history, prev_objective, _ = carry
    idx, sq = assign(centroids)
    objective = jnp.sum(sq)
    history = history.at[i].set(objective)
    converged = (prev_objective - objective) <= tol * prev_objective
    centroids = lloyd_update(points, idx, sq, centroids)
    return i + 1, centroids, history, objective, converged

  init = (jnp.int32(0), centroids, history, jnp.float32(jnp.inf), jnp.bool_(False))
  num_run, centroids, history, _, _ = jax.lax.while_loop(cond, body, init)
  idx, sq = assign(centroids)
  history = history.at[num_run].set(jnp.sum(sq))
  return KMeansResult(centroids, idx, history, num_run)


def kmeans(points, k: int, *, num_iters: int = DEFAULT_NUM_ITERS, seed: int = 0, tol: float = 0.0,
           chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
           seeding_sample: int = DEFAULT_SEEDING_SAMPLE) -> KMeansResult:
  """Cluster points (n, d) into k centroids: k-means++ seeding, then up to num_iters Lloyd steps.

  Stops early when an assignment step lowers the objective by no more than ``tol`` times its
  previous value (tol = 0: only at an exact fixed point).
  """
  points = jnp.asarray(points)
  if points.ndim != 2:
    raise ValueError(f"k-means expects points of shape (n, d), got {points.shape}")
  n = points.shape[0]
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  if k > n:
    raise ValueError(f"cannot form k={k} clusters from {n} points")
  if num_iters < 0:
    raise ValueError(f"num_iters must be >= 0, got {num_iters}")
  return _kmeans(points, jax.random.PRNGKey(seed), jnp.float32(tol), k=int(k), num_iters=int(num_iters),
                 chunk_elements=int(chunk_elements), seeding_sample=max(int(seeding_sample), int(k)))


def objective(points, centroids, assignments) -> float:
  """Sum of squared distances of points to their assigned centroids (float64, numpy)."""
  points = np.asarray(points, np.float64)
  diff = points - np.asarray(centroids, np.float64)[np.asarray(assignments)]
  return float(np.sum(diff * diff))
