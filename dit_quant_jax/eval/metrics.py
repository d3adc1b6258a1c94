"""Sample-quality and fidelity metrics, in numpy float64.

Distribution metrics work on classifier outputs (dit_quant_jax/eval/classifier.py), the
Fashion-MNIST stand-ins for Inception-v3's:
  * Fréchet distance between Gaussian fits of two feature sets (FID's formula; Heusel et al.
    2017, eq. 6 of "GANs Trained by a Two Time-Scale Update Rule ...");
  * Inception-Score analogue exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, sec. 4);
  * class accuracy of class-conditional samples;
  * k-NN-manifold precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and
    Recall Metric for Assessing Generative Models", sec. 2, k = 3).
Paired metrics compare a quantized model with its full-precision original on the same noise:
  * per-image MSE and PSNR of final images in the model range [-1, 1] (peak-to-peak 2);
  * per-step MSE of model outputs along two sampling trajectories.

No scipy: the matrix square root in the Fréchet distance comes from symmetric eigensolvers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# Peak-to-peak range of images in model space [-1, 1]; PSNR = 10 log10(range^2 / MSE).  With
# uint8 images (range 255) the PSNR is identical up to the quantization of the pixel values.
MODEL_DATA_RANGE = 2.0
# Neighbourhood size of the k-NN manifolds; Kynkäänniemi et al. 2019 recommend k = 3.
PRECISION_RECALL_K = 3


def _as_feature_matrix(features, what: str) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"{what}: expected features of shape (N, D), got {features.shape}")
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{what}: features contain NaN or Inf")
  return features


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """features: (N, D), N >= 2 -> (mean (D,), unbiased covariance (D, D)), float64."""
  features = _as_feature_matrix(features, "gaussian_statistics")
  if features.shape[0] < 2:
    raise ValueError(f"gaussian_statistics needs at least 2 feature vectors, got {features.shape[0]}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Principal square root of a symmetric positive semi-definite matrix (eigenvalues < 0 -> 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(covariance_a: np.ndarray, covariance_b: np.ndarray) -> float:
  """tr sqrt(A B) for symmetric PSD A, B.

  A B is similar to the symmetric PSD matrix sqrt(A) B sqrt(A) (conjugate by sqrt(A)), so both
  have the same non-negative eigenvalues; their square roots summed give the trace.
  """
  sqrt_a = _psd_sqrt(np.asarray(covariance_a, np.float64))
  product = sqrt_a @ np.asarray(covariance_b, np.float64) @ sqrt_a
  eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))


def frechet_distance_from_statistics(mean_a, covariance_a, mean_b, covariance_b) -> float:
  """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b): the Fréchet (2-Wasserstein^2)
  distance between N(mu_a, S_a) and N(mu_b, S_b).  mean: (D,), covariance: (D, D)."""
  mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
  covariance_a = np.asarray(covariance_a, np.float64)
  covariance_b = np.asarray(covariance_b, np.float64)
  dim = mean_a.shape[0]
  for name, array, shape in (("mean_a", mean_a, (dim,)), ("mean_b", mean_b, (dim,)),
                             ("covariance_a", covariance_a, (dim, dim)),
                             ("covariance_b", covariance_b, (dim, dim))):
    if array.shape != shape:
      raise ValueError(f"frechet_distance: {name} has shape {array.shape}, expected {shape}")
  mean_term = float(np.sum((mean_a - mean_b) ** 2))
  return (mean_term + float(np.trace(covariance_a)) + float(np.trace(covariance_b))
          - 2.0 * trace_sqrt_product(covariance_a, covariance_b))


def frechet_distance(features_a, features_b) -> float:
  """Fréchet distance between Gaussian fits of features_a (N, D) and features_b (M, D)."""
  mean_a, covariance_a = gaussian_statistics(features_a)
  mean_b, covariance_b = gaussian_statistics(features_b)
  return frechet_distance_from_statistics(mean_a, covariance_a, mean_b, covariance_b)


def softmax(logits) -> np.ndarray:
  """logits: (N, C) -> probabilities (N, C), float64, numerically stable."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


def inception_score(probabilities) -> float:
  """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean of p(y|x) over the samples.

  probabilities: (N, C), rows on the simplex.  1 when every row is the same distribution,
  C when each row is one-hot and the classes are used equally often.  One split over all
  samples (Salimans et al. average 10 splits of 5000; with 10 classes one split is stable).
  """
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.ndim != 2 or probabilities.shape[0] == 0:
    raise ValueError(f"inception_score: expected probabilities of shape (N, C), N > 0, "
                     f"got {probabilities.shape}")
  if np.any(probabilities < 0) or not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4):
    raise ValueError("inception_score: rows must be probability vectors (non-negative, summing "
                     "to 1); pass softmax(logits)")
  marginal = probabilities.mean(axis=0, keepdims=True)
  positive = probabilities > 0
  ratio = np.where(positive, probabilities, 1.0) / np.where(positive, marginal, 1.0)
  kl = np.sum(np.where(positive, probabilities * np.log(ratio), 0.0), axis=1)  # 0 log 0 = 0
  return float(np.exp(kl.mean()))


def class_accuracy(logits, labels) -> float:
  """Fraction of samples whose argmax class equals the label.  logits: (N, C), labels: (N,)."""
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != (logits.shape[0],):
    raise ValueError(f"class_accuracy: logits (N, C) and labels (N,) expected, got "
                     f"{logits.shape} and {labels.shape}")
  if labels.size == 0:
    raise ValueError("class_accuracy: no samples")
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N, D), (M, D) -> (N, M) squared Euclidean distances, float64, clipped at 0."""
  squared = (np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T))
  return np.clip(squared, 0.0, None)


def knn_radii(features, k: int = PRECISION_RECALL_K, batch_size: int = 1000) -> np.ndarray:
  """Distance from each vector to its k-th nearest neighbour in the same set (itself excluded).

  features: (N, D) with N > k -> radii (N,) float64: the hyperspheres whose union is the
  k-NN estimate of the set's manifold.
  """
  features = _as_feature_matrix(features, "knn_radii")
  if not 1 <= k < features.shape[0]:
    raise ValueError(f"knn_radii: k must be in [1, N-1] for N = {features.shape[0]} vectors, got {k}")
  radii = np.empty(features.shape[0])
  for start in range(0, features.shape[0], batch_size):
    squared = _squared_distances(features[start:start + batch_size], features)
    # Sorted row: index 0 is the vector itself (distance 0), index k its k-th neighbour.
    radii[start:start + batch_size] = np.sqrt(np.partition(squared, k, axis=1)[:, k])
  return radii


def manifold_coverage(queries, reference, reference_radii, batch_size: int = 1000) -> float:
  """Fraction of queries (N, D) inside at least one ball (reference (M, D), reference_radii (M,))."""
  queries = _as_feature_matrix(queries, "manifold_coverage queries")
  reference = _as_feature_matrix(reference, "manifold_coverage reference")
  reference_radii = np.asarray(reference_radii, np.float64)
  if reference_radii.shape != (reference.shape[0],) or queries.shape[1] != reference.shape[1]:
    raise ValueError(f"manifold_coverage: queries {queries.shape}, reference {reference.shape} and "
                     f"radii {reference_radii.shape} do not match")
  inside = 0
  squared_radii = reference_radii ** 2
  for start in range(0, queries.shape[0], batch_size):
    squared = _squared_distances(queries[start:start + batch_size], reference)
    inside += int(np.sum(np.any(squared <= squared_radii[None, :], axis=1)))
  return inside / queries.shape[0]


def precision_recall(real_features, fake_features, k: int = PRECISION_RECALL_K,
                     real_radii: Optional[np.ndarray] = None) -> dict:
  """Kynkäänniemi et al. 2019: precision = share of fake samples on the real manifold, recall =
  share of real samples on the fake manifold (manifolds: unions of k-NN balls).

  real_features: (N, D), fake_features: (M, D); real_radii: (N,) precomputed knn_radii of the
  real set with the same k (optional, saves the N x N pass).  Returns dict(precision, recall).
  """
  real_features = _as_feature_matrix(real_features, "precision_recall real")
  fake_features = _as_feature_matrix(fake_features, "precision_recall fake")
  if real_radii is None:
    real_radii = knn_radii(real_features, k)
  fake_radii = knn_radii(fake_features, k)
  return {"precision": manifold_coverage(fake_features, real_features, real_radii),
          "recall": manifold_coverage(real_features, fake_features, fake_radii)}


def _check_pair(images_a, images_b, what: str) -> tuple[np.ndarray, np.ndarray]:
  images_a = np.asarray(images_a, np.float64)
  images_b = np.asarray(images_b, np.float64)
  if images_a.shape != images_b.shape or images_a.ndim < 2:
    raise ValueError(f"{what}: paired arrays must have the same shape (N, ...), got "
                     f"{images_a.shape} and {images_b.shape}")
  return images_a, images_b


def per_image_mse(images_a, images_b) -> np.ndarray:
  """Mean squared error of each pair: (N, ...) x (N, ...) -> (N,) float64."""
  images_a, images_b = _check_pair(images_a, images_b, "per_image_mse")
  return np.mean((images_a - images_b).reshape(images_a.shape[0], -1) ** 2, axis=1)


def psnr(images_a, images_b, data_range: float = MODEL_DATA_RANGE) -> np.ndarray:
  """Per-image PSNR in dB: 10 log10(data_range^2 / MSE); (N, ...) x (N, ...) -> (N,).

  data_range is the peak-to-peak range of the pixel values: 2 for model space [-1, 1], 255 for
  uint8.  Identical images give +inf.
  """
  mse = per_image_mse(images_a, images_b)
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range ** 2 / mse)


def per_step_mse(outputs_a, outputs_b) -> np.ndarray:
  """MSE at each sampling step between two trajectories of model outputs.

  outputs_a, outputs_b: (S, B, ...) (e.g. (S, B, H, W, 2C) raw DiT outputs) or sequences of
  S arrays (B, ...) -> (S,) float64, the mean over everything but the step axis.
  """
  outputs_a = np.stack([np.asarray(o) for o in outputs_a]) if isinstance(outputs_a, (list, tuple)) else outputs_a
  outputs_b = np.stack([np.asarray(o) for o in outputs_b]) if isinstance(outputs_b, (list, tuple)) else outputs_b
  return per_image_mse(outputs_a, outputs_b)


# ------------------------------------------------------------------ bootstrap intervals
BOOTSTRAP_CONFIDENCE = 0.95


def bootstrap_indices(num_samples: int, num_resamples: int, seed: int = 0) -> np.ndarray:
  """(num_resamples, num_samples) indices drawn with replacement (numpy PCG64, ``seed``)."""
  if num_samples < 1 or num_resamples < 1:
    raise ValueError(f"bootstrap needs num_samples >= 1 and num_resamples >= 1, got "
                     f"{num_samples}, {num_resamples}")
  return np.random.default_rng(seed).integers(0, num_samples, (num_resamples, num_samples))


def percentile_interval(values, confidence: float = BOOTSTRAP_CONFIDENCE) -> tuple[float, float]:
  """The central ``confidence`` interval of bootstrap ``values`` (percentile method)."""
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
  tail = 100.0 * (1.0 - confidence) / 2.0
  low, high = np.percentile(np.asarray(values, np.float64), [tail, 100.0 - tail])
  return float(low), float(high)


def bootstrap_interval(statistic, num_samples: int, num_resamples: int = 200,
                       confidence: float = BOOTSTRAP_CONFIDENCE, seed: int = 0,
                       estimate: Optional[float] = None) -> tuple[float, float]:
  """Bootstrap interval of ``statistic(indices) -> float`` over resamples (with replacement)
  of ``num_samples`` items.

  Without ``estimate``: the percentile interval.  With ``estimate`` (the statistic on all
  items): the percentile interval shifted by the bootstrap estimate of the bias,
  ``estimate - mean(resampled values)`` (Efron & Tibshirani 1993, ch. 10), for statistics
  such as the FD whose resamples (which repeat items) are biased: the interval then spans the
  sampling spread of the statistic around ``estimate``.
  """
  indices = bootstrap_indices(num_samples, num_resamples, seed)
  values = np.array([statistic(row) for row in indices], np.float64)
  if estimate is None:
    return percentile_interval(values, confidence)
  return shifted_percentile_interval(values, estimate, confidence)


def shifted_percentile_interval(values, estimate: float,
                                confidence: float = BOOTSTRAP_CONFIDENCE) -> tuple[float, float]:
  """The percentile interval of bootstrap ``values`` shifted by ``estimate - mean(values)``."""
  low, high = percentile_interval(values, confidence)
  shift = float(estimate) - float(np.mean(values))
  return low + shift, high + shift


def class_accuracy_interval(logits, labels, num_resamples: int = 200,
                            confidence: float = BOOTSTRAP_CONFIDENCE, seed: int = 0):
  """Bootstrap interval of :func:`class_accuracy` over the samples."""
  correct = (np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)).astype(np.float64)
  return bootstrap_interval(lambda idx: float(correct[idx].mean()), correct.shape[0],
                            num_resamples, confidence, seed)


def frechet_distance_interval(fake_features, real_mean, real_covariance, num_resamples: int = 200,
                              confidence: float = BOOTSTRAP_CONFIDENCE, seed: int = 0):
  """Bootstrap interval of the FD of ``fake_features`` (N, D) against fixed real statistics.

  Only the generated samples are resampled (the real statistics, from 10k images, are held
  fixed), so the interval is the spread due to the finite generated set.  sqrt(S_real) is
  computed once: tr sqrt(S_fake S_real) = sum sqrt(eig(sqrt(S_real) S_fake sqrt(S_real))),
  and the resamples are evaluated in stacked batches (a few large BLAS calls, not hundreds).
  A resample repeats samples, which biases its FD upward (by several points at 250 samples of
  128 features), so the percentile interval is shifted by the bootstrap bias estimate
  (:func:`bootstrap_interval` with ``estimate``): it spans the spread of the FD of N samples
  around the FD of these N samples.
  """
  features = _as_feature_matrix(fake_features, "frechet_distance_interval")
  real_mean = np.asarray(real_mean, np.float64)
  real_covariance = np.asarray(real_covariance, np.float64)
  sqrt_real = _psd_sqrt(real_covariance)
  trace_real = float(np.trace(real_covariance))

  def fds(index_rows: np.ndarray) -> np.ndarray:
    """(R, N) resample indices -> (R,) FDs."""
    x = features[index_rows]  # (R, N, D)
    mean = x.mean(axis=1)
    centred = x - mean[:, None, :]
    covariance = np.swapaxes(centred, 1, 2) @ centred / (x.shape[1] - 1)
    product = sqrt_real @ covariance @ sqrt_real
    eigenvalues = np.linalg.eigvalsh((product + np.swapaxes(product, 1, 2)) / 2)
    return (np.sum((mean - real_mean) ** 2, axis=1) + np.trace(covariance, axis1=1, axis2=2)
            + trace_real - 2.0 * np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)), axis=1))

  n = features.shape[0]
  estimate = float(fds(np.arange(n)[None])[0])
  indices = bootstrap_indices(n, num_resamples, seed)
  values = np.concatenate([fds(indices[i:i + _BOOTSTRAP_CHUNK])
                           for i in range(0, num_resamples, _BOOTSTRAP_CHUNK)])
  return shifted_percentile_interval(values, estimate, confidence)


_BOOTSTRAP_CHUNK = 25  # resamples per stacked batch: (25, N, D) float64 at a time
