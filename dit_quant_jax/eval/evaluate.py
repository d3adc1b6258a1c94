"""Score generated Fashion-MNIST samples: the glue between the classifier, the real test set and
the metrics.

  classifier = load_classifier()                        # the shipped checkpoint
  scores = evaluate_samples(images, labels, classifier) # fd, is, class_acc, precision, recall
  fidelity = paired_metrics(images_quantized, images_full_precision)   # psnr, mse

The real test set's classifier features are computed once per classifier and kept in a
:class:`RealFeatureCache` (in memory; also on disk when it has a ``cache_dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import numpy as np

from dit_quant_jax.data import fashion_mnist
from dit_quant_jax.eval import metrics
from dit_quant_jax.eval.classifier import Classifier, check_images, load_classifier
from dit_quant_jax.utils import atomic


@dataclasses.dataclass
class RealStatistics:
  """Classifier outputs on the real images: features (N, D), logits (N, C), and derived values."""

  features: np.ndarray
  logits: np.ndarray
  radii: dict = dataclasses.field(default_factory=dict)  # k -> knn_radii(features, k): (N,)

  def __post_init__(self):
    self.mean, self.covariance = metrics.gaussian_statistics(self.features)

  def knn_radii(self, k: int) -> np.ndarray:
    if k not in self.radii:
      self.radii[k] = metrics.knn_radii(self.features, k)
    return self.radii[k]


class RealFeatureCache:
  """Real-image classifier outputs, computed once per (classifier, split, limit).

  cache_dir: optional folder for ``real_<split>_<count>_<classifier digest>.npz`` files, so
  that later processes skip the pass over the real images.  data_dir: Fashion-MNIST folder
  (default as in dit_quant_jax.data.fashion_mnist).  limit: first ``limit`` images only.
  """

  def __init__(self, cache_dir: Optional[str] = None, split: str = "test",
               data_dir: Optional[str] = None, limit: Optional[int] = None, batch_size: int = 500):
    self.cache_dir = cache_dir
    self.split = split
    self.data_dir = data_dir
    self.limit = limit
    self.batch_size = batch_size
    self._entries: dict[str, RealStatistics] = {}

  def _disk_path(self, digest: str) -> Optional[str]:
    if not self.cache_dir:
      return None
    count = "all" if self.limit is None else str(self.limit)
    return os.path.join(self.cache_dir, f"real_{self.split}_{count}_{digest[:16]}.npz")

  def get(self, classifier: Classifier) -> RealStatistics:
    """The real split's statistics under ``classifier`` (memory, else disk, else computed)."""
    digest = classifier.fingerprint()
    if digest in self._entries:
      return self._entries[digest]
    path = self._disk_path(digest)
    if path and os.path.isfile(path):
      with np.load(path) as stored:
        radii = {int(name[len("radii_k"):]): stored[name] for name in stored.files
                 if name.startswith("radii_k")}
        statistics = RealStatistics(stored["features"], stored["logits"], radii)
    else:
      images, _ = fashion_mnist.load_split(self.split, self.data_dir, self.limit)
      features, logits = classifier.features_and_logits(images, self.batch_size)
      statistics = RealStatistics(features, logits)
    self._entries[digest] = statistics
    return statistics

  def save(self, classifier: Classifier) -> Optional[str]:
    """Write the entry of ``classifier`` (with any radii computed so far) to cache_dir."""
    path = self._disk_path(classifier.fingerprint())
    if path is None:
      return None
    statistics = self.get(classifier)
    os.makedirs(self.cache_dir, exist_ok=True)
    radii = {f"radii_k{k}": r for k, r in statistics.radii.items()}
    atomic.savez(path, features=statistics.features, logits=statistics.logits, **radii)
    return path


# The cache used when none is passed: the full test split, in memory only.
DEFAULT_REAL_FEATURE_CACHE = RealFeatureCache()


@functools.lru_cache(maxsize=1)
def default_classifier() -> Classifier:
  """The shipped classifier (checkpoints/fmnist_classifier), loaded once per process."""
  return load_classifier()


def evaluate_samples(images, labels, classifier: Optional[Classifier] = None,
                     real_features_cache: Optional[RealFeatureCache] = None,
                     k: int = metrics.PRECISION_RECALL_K, batch_size: int = 500,
                     bootstrap_resamples: int = 0,
                     confidence: float = metrics.BOOTSTRAP_CONFIDENCE) -> dict:
  """Distribution metrics of class-conditional samples against the real test set.

  images: (N, 32, 32, 1) in [-1, 1], N > k; labels: (N,) the classes they were sampled for.
  classifier: default the shipped one; real_features_cache: default DEFAULT_REAL_FEATURE_CACHE.
  Returns dict(fd, is, class_acc, precision, recall, num_samples):
    fd: Fréchet distance of classifier features (FID analogue; lower is better);
    is: exp(E KL(p(y|x) || p(y))) of the classifier posterior (IS analogue, in [1, 10]);
    class_acc: share of samples classified as their label;
    precision, recall: k-NN manifold precision/recall of features (Kynkäänniemi et al. 2019).
  With ``bootstrap_resamples`` > 0 also fd_ci and class_acc_ci: [low, high] percentile
  bootstrap intervals (``confidence``) over resamples of the generated samples.
  """
  images = check_images(images, "evaluate_samples images")
  labels = np.asarray(labels)
  if labels.shape != (images.shape[0],):
    raise ValueError(f"evaluate_samples: {images.shape[0]} images but labels of shape {labels.shape}")
  if images.shape[0] <= k:
    raise ValueError(f"evaluate_samples: need more than k = {k} samples for precision/recall, "
                     f"got {images.shape[0]}")
  classifier = classifier or default_classifier()
  real_features_cache = real_features_cache or DEFAULT_REAL_FEATURE_CACHE
  real = real_features_cache.get(classifier)
  features, logits = classifier.features_and_logits(images, batch_size)
  fake_mean, fake_covariance = metrics.gaussian_statistics(features)
  scores = {
      "fd": metrics.frechet_distance_from_statistics(fake_mean, fake_covariance,
                                                     real.mean, real.covariance),
      "is": metrics.inception_score(metrics.softmax(logits)),
      "class_acc": metrics.class_accuracy(logits, labels),
      "num_samples": int(images.shape[0]),
  }
  scores.update(metrics.precision_recall(real.features, features, k, real_radii=real.knn_radii(k)))
  if bootstrap_resamples:
    scores["fd_ci"] = list(metrics.frechet_distance_interval(
        features, real.mean, real.covariance, bootstrap_resamples, confidence))
    scores["class_acc_ci"] = list(metrics.class_accuracy_interval(
        logits, labels, bootstrap_resamples, confidence))
    scores["ci_confidence"] = confidence
  return scores


def paired_metrics(images_q, images_fp, data_range: float = metrics.MODEL_DATA_RANGE) -> dict:
  """Fidelity of quantized-model samples to full-precision ones from the same noise and labels.

  images_q, images_fp: (N, H, W, C) in [-1, 1].  Returns dict(psnr, mse): the mean over images
  of the per-image PSNR (dB, peak-to-peak ``data_range`` = 2) and of the per-image MSE.
  PSNR is +inf when the two sets are identical.
  """
  return {"psnr": float(np.mean(metrics.psnr(images_q, images_fp, data_range))),
          "mse": float(np.mean(metrics.per_image_mse(images_q, images_fp)))}
