"""VQ4DiT: post-training vector quantization of DiT weights (Deng et al. 2024, arXiv:2408.17131).

A pure transform ``params -> quantized params``.  Per selected linear layer (kernel (K, N) =
(in, out)):

1. Sub-vectors: the d consecutive input-channel weights of one output column,
   ``W[s*d:(s+1)*d, n]`` (interfaces.md), S = K/d of them per column.
2. Codebook: k-means (k-means++ seeding, Lloyd) over the layer's S*N sub-vectors, k codewords
   of dimension d; bits per weight = log2(k) / d.  k is clamped to a power of two at most a
   quarter of the sub-vector count (public code's ``get_num_centroids``, from "And the bit
   goes down", Stock et al. 2020).
3. Candidates (public code, CompressedLinear.py ``prepare_sim``): each sub-vector keeps its ``n`` nearest codewords and
   learnable ratio logits; the soft weight is the softmax-ratio-weighted sum of the candidate
   codewords.  Logit initialisation (public code ``prepare_sim``), with Euclidean (not squared)
   distances dist_1 <= ... <= dist_n to the candidates: candidate i < n gets
   ``log(dist_n / (dist_i + 1e-5))``, the last gets 0 (n = 2: the nearest gets log(d2/d1),
   its ratio d2 / (d1 + d2)).
4. Calibration (``calibrate/vq_calibrate.py``, which imports this module, never the other
   way) trains logits, codebooks and biases; sub-vectors whose largest ratio passes a
   threshold are frozen; finally every sub-vector takes its argmax candidate
   (:func:`harden`) and the layer becomes a hard :class:`VQWeight`.

Two pytree types: :class:`SoftVQWeight` (codebook + candidates + ratio logits + frozen mask,
the trainable form; its ``dequantize`` is the soft reconstruction) and :class:`VQWeight` (the
final codebook + packed assignments).  Both stand in the params pytree where the dense kernel
was, so ``model.apply`` runs with either.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from dit_quant_jax.quant import kmeans as kmeans_lib
from dit_quant_jax.quant import packing, rules
from dit_quant_jax.quant.qtensor import QuantizedWeight, register_quantized_type

# Largest codebook whose indices the packed assignment format holds (packing.MAX_BITS bits).
MAX_CODEBOOK_SIZE = 2**packing.MAX_BITS
# "And the bit goes down" clamp used by the public VQ4DiT code: k <= (#sub-vectors) / 4.
SUBVECTORS_PER_CODEWORD_MIN = 4
# Public code prepare_sim: log(dist_last / (dist_i + 1e-5)).
LOGIT_INIT_EPS = 1e-5
# Number of candidate codewords per sub-vector (public code: top_indices_num = 2); 1..4 allowed.
MAX_CANDIDATES = 4
REGULARIZERS = ("public", "paper")


# ------------------------------------------------------------------------------ shapes
def effective_codebook_size(num_subvectors: int, k: int) -> int:
  """k clamped to the largest power of two <= num_subvectors / 4 (public code's rule)."""
  _check_k(k)
  cap = num_subvectors / SUBVECTORS_PER_CODEWORD_MIN
  if cap < 2:
    raise ValueError(f"a layer with {num_subvectors} sub-vectors is too small for vector quantization "
                     f"(needs at least {2 * SUBVECTORS_PER_CODEWORD_MIN})")
  return int(min(k, 2 ** int(math.floor(math.log2(cap)))))


def _check_k(k) -> None:
  if not isinstance(k, (int, np.integer)) or k < 2:
    raise ValueError(f"codebook size k must be an integer >= 2, got {k!r}")
  if k > MAX_CODEBOOK_SIZE:
    raise ValueError(f"codebook size k={k} exceeds what the {packing.MAX_BITS}-bit assignment indices "
                     f"hold (at most {MAX_CODEBOOK_SIZE})")


def check_layer_shape(shape: Sequence[int], d: int) -> None:
  if len(shape) != 2:
    raise ValueError(f"VQ expects a 2-D (in_features, out_features) kernel, got shape {tuple(shape)}")
  if not isinstance(d, (int, np.integer)) or d < 1:
    raise ValueError(f"sub-vector dimension d must be a positive integer, got {d!r}")
  if shape[0] % d:
    raise ValueError(f"sub-vector dimension d={d} does not divide the input dimension {shape[0]} "
                     f"of a kernel of shape {tuple(shape)}")


def kernel_to_subvectors(kernel: jax.Array, d: int) -> jax.Array:
  """kernel (K, N) -> sub-vectors (K/d, N, d): out[s, n] = kernel[s*d:(s+1)*d, n]."""
  check_layer_shape(kernel.shape, d)
  k_in, n_out = kernel.shape
  return jnp.transpose(kernel.reshape(k_in // d, d, n_out), (0, 2, 1))


def subvectors_to_kernel(subvectors: jax.Array) -> jax.Array:
  """Inverse of :func:`kernel_to_subvectors`: (S, N, d) -> (S*d, N)."""
  s, n_out, d = subvectors.shape
  return jnp.transpose(subvectors, (0, 2, 1)).reshape(s * d, n_out)


# ------------------------------------------------------------------------- hard weight
@register_quantized_type
@struct.dataclass
class VQWeight(QuantizedWeight):
  """Codebook + packed assignments of one linear layer (interfaces.md "VQ weights").

  codebook: (k, d) float32.  assignments: uint8 (packed_length(K/d, ceil(log2 k)), N), the
  indices (K/d, N) packed along axis 0.  W[s*d + j, n] = codebook[index[s, n], j].
  """

  codebook: jax.Array
  assignments: jax.Array
  shape: tuple = struct.field(pytree_node=False)  # (in_features, out_features)
  k: int = struct.field(pytree_node=False)
  d: int = struct.field(pytree_node=False)
  # Optional dynamic per-token activation quantization of the layer input (the W2A4
  # combination: VQ weights with 4-bit FP activations); None keeps activations in FP.
  act_format: Optional[str] = struct.field(pytree_node=False, default=None)
  act_clip_ratio: float = struct.field(pytree_node=False, default=1.0)

  @classmethod
  def from_indices(cls, codebook, indices, shape) -> "VQWeight":
    """codebook (k, d), indices (K/d, N) ints < k, shape (K, N)."""
    shape = tuple(int(s) for s in shape)
    k, d = codebook.shape
    _check_k(k)
    check_layer_shape(shape, d)
    expected = (shape[0] // d, shape[1])
    if tuple(indices.shape) != expected:
      raise ValueError(f"indices of shape {tuple(indices.shape)} do not fit a {shape} kernel with d={d} "
                       f"(expected {expected})")
    # numpy indices pack on the host (no per-shape compilation); jax indices pack traceably.
    packed = packing.pack_bits(indices, packing.index_bits(k), axis=0)
    return cls(codebook=jnp.asarray(codebook, jnp.float32), assignments=jnp.asarray(packed), shape=shape,
               k=int(k), d=int(d))

  @property
  def index_bits(self) -> int:
    return packing.index_bits(self.k)

  def indices(self) -> jax.Array:
    """(K/d, N) codeword indices."""
    return packing.unpack_bits(self.assignments, self.index_bits, self.shape[0] // self.d, axis=0,
                               dtype=jnp.int32)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    subvectors = jnp.take(self.codebook, self.indices(), axis=0)  # (S, N, d)
    return subvectors_to_kernel(subvectors).astype(dtype)

  def linear(self, x: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """x: (..., K) -> (..., N): the Pallas VQ kernel on GPU (the dense weight is never
    materialised), the plain-jnp reference elsewhere (kernels/vq_matmul.py)."""
    from dit_quant_jax.kernels import vq_matmul  # kernels know nothing of quant; no cycle
    if self.act_format is not None:
      from dit_quant_jax.quant import rtn
      x = rtn.per_token_fake_quant(x, self.act_format, self.act_clip_ratio).astype(x.dtype)
    return vq_matmul.vq_linear(x, self.codebook.astype(x.dtype), self.assignments, bias)

  def with_activation_quant(self, act_format: Optional[str], clip_ratio: float = 1.0) -> "VQWeight":
    if act_format is not None:
      from dit_quant_jax.quant import formats
      formats.get_format(act_format)  # clear error for unknown formats
    return self.replace(act_format=act_format, act_clip_ratio=float(clip_ratio))

  def nbytes_breakdown(self) -> Mapping[str, int]:
    return {"codebook": _nbytes(self.codebook), "assignments": _nbytes(self.assignments)}


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


# ------------------------------------------------------------------------- soft weight
@struct.dataclass
class SoftVQWeight(QuantizedWeight):
  """The trainable form of a VQ layer (public code: CompressedLinear ``use_sim``).

  codebook: (k, d) float32                trainable
  ratio_logits: (S, N, n) float32          trainable; ratios = softmax over the last axis
  candidates: (S, N, n) int32              the n nearest codewords at initialisation
  frozen: (S, N) bool                      frozen sub-vectors use frozen_index, not the ratios
  frozen_index: (S, N) int32               codeword of a frozen sub-vector
  """

  codebook: jax.Array
  ratio_logits: jax.Array
  candidates: jax.Array
  frozen: jax.Array
  frozen_index: jax.Array
  shape: tuple = struct.field(pytree_node=False)

  @property
  def k(self) -> int:
    return self.codebook.shape[0]

  @property
  def d(self) -> int:
    return self.codebook.shape[1]

  @property
  def num_candidates(self) -> int:
    return self.candidates.shape[-1]

  def ratios(self) -> jax.Array:
    return jax.nn.softmax(self.ratio_logits, axis=-1)

  def soft_subvectors(self) -> jax.Array:
    """(S, N, d): frozen -> codebook[frozen_index]; else sum_i ratio_i * codebook[candidate_i]."""
    candidate_codewords = jnp.take(self.codebook, self.candidates, axis=0)  # (S, N, n, d)
    mixed = jnp.einsum("snc,sncd->snd", self.ratios(), candidate_codewords)
    hard = jnp.take(self.codebook, self.frozen_index, axis=0)
    return jnp.where(self.frozen[..., None], hard, mixed)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return subvectors_to_kernel(self.soft_subvectors()).astype(dtype)

  def hard_indices(self) -> jax.Array:
    """(S, N): frozen_index where frozen, else the candidate with the largest ratio."""
    best = jnp.argmax(self.ratio_logits, axis=-1)
    chosen = jnp.take_along_axis(self.candidates, best[..., None], axis=-1)[..., 0]
    return jnp.where(self.frozen, self.frozen_index, chosen)

  def to_vqweight(self) -> VQWeight:
    return VQWeight.from_indices(self.codebook, self.hard_indices(), self.shape)

  def nbytes_breakdown(self) -> Mapping[str, int]:
    """Bytes of the hard weight this layer becomes."""
    s, n_out = self.frozen.shape
    return {"codebook": _nbytes(self.codebook),
            "assignments": packing.packed_length(s, packing.index_bits(self.k)) * n_out}

  def frozen_fraction(self) -> jax.Array:
    return jnp.mean(self.frozen.astype(jnp.float32))


def init_ratio_logits(candidate_sq_dist: jax.Array) -> jax.Array:
  """Public-code initialisation from squared distances (S, N, n) sorted ascending -> (S, N, n).

  logit_i = log(dist_n / (dist_i + LOGIT_INIT_EPS)) for i < n, logit_n = 0, dist Euclidean.
  """
  dist = jnp.sqrt(jnp.maximum(candidate_sq_dist, 0.0))
  logits = jnp.log(dist[..., -1:] / (dist + LOGIT_INIT_EPS))
  return logits.at[..., -1].set(0.0).astype(jnp.float32)


def init_soft(kernel: jax.Array, codebook: jax.Array, num_candidates: int = 2,
              chunk_elements: int = kmeans_lib.DEFAULT_CHUNK_ELEMENTS) -> SoftVQWeight:
  """Candidates (the num_candidates nearest codewords) and initial logits of a layer.

  kernel (K, N), codebook (k, d).
  """
  k, d = codebook.shape
  if not 1 <= num_candidates <= min(MAX_CANDIDATES, k):
    raise ValueError(f"num_candidates must be in [1, {min(MAX_CANDIDATES, k)}], got {num_candidates}")
  subvectors = kernel_to_subvectors(jnp.asarray(kernel, jnp.float32), d)
  s, n_out, _ = subvectors.shape
  sq, idx = kmeans_lib.nearest_centroids(subvectors.reshape(-1, d), codebook, num_candidates,
                                         chunk_elements)
  sq = sq.reshape(s, n_out, num_candidates)
  candidates = idx.reshape(s, n_out, num_candidates)
  return SoftVQWeight(codebook=jnp.asarray(codebook, jnp.float32), ratio_logits=init_ratio_logits(sq),
                      candidates=candidates, frozen=jnp.zeros((s, n_out), bool),
                      frozen_index=candidates[..., 0], shape=tuple(kernel.shape))


def update_freezing(soft: SoftVQWeight, subvector_threshold, layer_threshold) -> SoftVQWeight:
  """Progressive freezing (public code, CompressedLinear.py ``progressive_freeze`` and the
  ``true_ratio > 0.99`` -> ``freeze_sim`` switch in gaussian_diffusion.py).

  A sub-vector whose largest ratio exceeds ``subvector_threshold`` is frozen to that candidate
  for good.  When more than ``layer_threshold`` of the layer's sub-vectors are frozen, the
  whole layer switches to hard assignments (every remaining sub-vector takes its argmax).
  """
  ratios = soft.ratios()
  best = jnp.argmax(ratios, axis=-1)
  best_ratio = jnp.max(ratios, axis=-1)
  chosen = jnp.take_along_axis(soft.candidates, best[..., None], axis=-1)[..., 0]
  newly = ~soft.frozen & (best_ratio > subvector_threshold)
  frozen = soft.frozen | newly
  frozen_index = jnp.where(newly, chosen, soft.frozen_index)
  go_hard = jnp.mean(frozen.astype(jnp.float32)) > layer_threshold
  frozen_index = jnp.where(go_hard & ~frozen, chosen, frozen_index)
  frozen = frozen | go_hard
  return soft.replace(frozen=frozen, frozen_index=frozen_index)


def ratio_regularizer(soft: SoftVQWeight, kind: str = "public") -> jax.Array:
  """Pushes ratios of unfrozen sub-vectors towards one-hot; frozen ones contribute 0.

  "paper":  sum over unfrozen sub-vectors and candidates of (1 - |2 r - 1|), divided by the
            layer's sub-vector count S*N (an alternative form, not the public code's).
  "public": n * mean over unfrozen (sub-vector, candidate) entries of r (1 - r) (public code,
            CompressedLinear.py: ``custom_loss_function`` scaled by top_indices_num).
  How the per-layer values are combined, and when the term enters the loss, is the
  calibration's business (calibrate/vq_calibrate.py ``regularizer``).
  """
  ratios = soft.ratios()
  live = (~soft.frozen)[..., None].astype(jnp.float32)
  n = soft.num_candidates
  if kind == "paper":
    per_entry = 1.0 - jnp.abs(2.0 * ratios - 1.0)
    return jnp.sum(per_entry * live) / soft.frozen.size
  if kind == "public":
    per_entry = ratios * (1.0 - ratios)
    count = jnp.sum(live) * n
    return n * jnp.sum(per_entry * live) / jnp.maximum(count, 1.0)
  raise ValueError(f"unknown ratio regulariser {kind!r}; known: {REGULARIZERS}")


# ------------------------------------------------------------------- layer quantization
def kmeans_codebook(kernel, k: int, d: int, *, num_iters: int = kmeans_lib.DEFAULT_NUM_ITERS,
                    seed: int = 0, tol: float = 0.0,
                    chunk_elements: int = kmeans_lib.DEFAULT_CHUNK_ELEMENTS):
  """k-means codebook of one kernel (K, N): -> (codebook (k_eff, d), indices (K/d, N), KMeansResult)."""
  kernel = jnp.asarray(kernel, jnp.float32)
  subvectors = kernel_to_subvectors(kernel, d)
  s, n_out, _ = subvectors.shape
  k_eff = effective_codebook_size(s * n_out, k)
  result = kmeans_lib.kmeans(subvectors.reshape(-1, d), k_eff, num_iters=num_iters, seed=seed, tol=tol,
                             chunk_elements=chunk_elements)
  return result.centroids, result.assignments.reshape(s, n_out), result


def _kmeans_kwargs(config) -> dict:
  return dict(num_iters=int(config.kmeans.num_iters), tol=float(config.kmeans.tol),
              chunk_elements=int(config.kmeans.chunk_elements))


def _layer_seed(config, index: int) -> int:
  return int(config.kmeans.seed) + index  # a distinct, reproducible seed per layer


def kmeans_layers(params, config) -> tuple[dict, dict]:
  """k-means for every selected layer: -> ({path: (codebook, indices)}, {path: report})."""
  paths = rules.select_layers(params, list(config.layer_patterns))
  k, d = int(config.codebook_size), int(config.subvector_dim)
  codebooks, reports = {}, {}
  for i, path in enumerate(paths):
    kernel = rules.get_path(params, path + "/kernel")
    if isinstance(kernel, QuantizedWeight):
      raise TypeError(f"{path}: kernel is already quantized ({type(kernel).__name__})")
    start = time.perf_counter()
    codebook, indices, result = kmeans_codebook(kernel, k, d, seed=_layer_seed(config, i),
                                                **_kmeans_kwargs(config))
    codebook.block_until_ready()
    seconds = time.perf_counter() - start
    recon = subvectors_to_kernel(jnp.take(codebook, indices, axis=0))
    mse = float(jnp.mean(jnp.square(recon - kernel)))
    codebooks[path] = (codebook, indices)
    reports[path] = dict(shape=tuple(kernel.shape), k=int(codebook.shape[0]), d=d,
                         kmeans_seconds=seconds, kmeans_iters=int(result.num_iters_run),
                         kmeans_mse=mse, weight_mean_square=float(jnp.mean(jnp.square(kernel))))
    logging.info("k-means %s %s k=%d d=%d: %d iters, %.2fs, weight MSE %.3e", path, tuple(kernel.shape),
                 codebook.shape[0], d, int(result.num_iters_run), seconds, mse)
  return codebooks, reports


def replace_kernels(params, weights: Mapping[str, Any]):
  """params with ``<path>/kernel`` replaced by weights[path] for every path."""
  for path, weight in weights.items():
    params = rules.set_path(params, path + "/kernel", weight)
  return params


def _layer_size_report(weights: Mapping[str, Any]) -> dict:
  fp = sum(int(np.prod(w.shape)) * 4 for w in weights.values())
  codebook = sum(w.nbytes_breakdown()["codebook"] for w in weights.values())
  assignments = sum(w.nbytes_breakdown()["assignments"] for w in weights.values())
  return dict(fp32_bytes=fp, codebook_bytes=codebook, assignments_bytes=assignments,
              quantized_bytes=codebook + assignments)


def _final_errors(params, weights, reports) -> None:
  for path, weight in weights.items():
    kernel = rules.get_path(params, path + "/kernel")
    err = jnp.mean(jnp.square(weight.dequantize() - kernel))
    reports[path]["final_mse"] = float(err)
    reports[path].update({f"{k}_bytes": v for k, v in weight.nbytes_breakdown().items()})


def kmeans_only(params, config) -> tuple[dict, dict]:
  """The "k-means only, no calibration" row: nearest-codeword assignments.  -> (qparams, report)."""
  start = time.perf_counter()
  codebooks, reports = kmeans_layers(params, config)
  weights = {p: VQWeight.from_indices(cb, idx, rules.get_path(params, p + "/kernel").shape)
             for p, (cb, idx) in codebooks.items()}
  _final_errors(params, weights, reports)
  report = dict(layers=reports, sizes=_layer_size_report(weights), calibration=None,
                seconds=time.perf_counter() - start)
  return replace_kernels(params, weights), report


def harden(params, softs: Mapping[str, SoftVQWeight], reports: dict,
           biases: Optional[Mapping[str, jax.Array]] = None) -> tuple[dict, dict]:
  """Calibrated soft layers -> (qparams with hard VQWeight kernels, report without 'calibration').

  Every sub-vector takes its frozen index or argmax candidate (:meth:`SoftVQWeight.hard_indices`);
  biases: {path: (N,)} replaces ``<path>/bias`` (calibrated biases), None keeps the FP ones.
  """
  weights = {p: s.to_vqweight() for p, s in softs.items()}
  for p, s in softs.items():
    reports[p]["frozen_fraction_before_argmax"] = float(s.frozen_fraction())
  _final_errors(params, weights, reports)
  qparams = replace_kernels(params, weights)
  for path, bias in (biases or {}).items():
    qparams = rules.set_path(qparams, path + "/bias", jnp.asarray(bias))
  return qparams, dict(layers=reports, sizes=_layer_size_report(weights))


def init_soft_layers(params, config, skip_kmeans: bool = False) -> tuple[dict, dict]:
  """k-means + candidates for every selected layer -> ({path: SoftVQWeight}, {path: report}).

  skip_kmeans: only shapes are needed (a checkpoint will overwrite every value), so build
  placeholders with the right shapes without running k-means.
  """
  n = int(config.num_candidates)
  if skip_kmeans:
    paths = rules.select_layers(params, list(config.layer_patterns))
    soft = {}
    for i, path in enumerate(paths):
      kernel = rules.get_path(params, path + "/kernel")
      abstract = jax.eval_shape(
          lambda w: init_soft(w, jnp.zeros((_k_eff(w.shape, config), int(config.subvector_dim))), n),
          jax.ShapeDtypeStruct(kernel.shape, jnp.float32))
      soft[path] = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    return soft, {p: dict(shape=tuple(s.shape), k=s.k, d=s.d, resumed=True) for p, s in soft.items()}
  codebooks, reports = kmeans_layers(params, config)
  soft = {p: init_soft(rules.get_path(params, p + "/kernel"), cb, n,
                       chunk_elements=int(config.kmeans.chunk_elements))
          for p, (cb, _) in codebooks.items()}
  return soft, reports


def _k_eff(shape, config) -> int:
  check_layer_shape(shape, int(config.subvector_dim))
  return effective_codebook_size(shape[0] // int(config.subvector_dim) * shape[1],
                                 int(config.codebook_size))


# ---------------------------------------------------------------------------- size report
def size_report(model, config) -> dict:
  """FP vs VQ bytes of the selected layers, from shapes only (jax.eval_shape, no weights).

  Returns fp32_bytes, codebook_bytes, assignments_bytes, quantized_bytes (= codebooks +
  assignments), their MiB, the compression ratio, bits per weight and the layer count.  Only
  the selected kernels are counted (biases and unquantized layers stay as they are).
  """
  from dit_quant_jax.models import dit  # lazy: quant does not otherwise depend on models

  abstract_params = jax.eval_shape(lambda: dit.init_params(model, jax.random.PRNGKey(0)))
  paths = rules.select_layers(abstract_params, list(config.layer_patterns))
  k, d = int(config.codebook_size), int(config.subvector_dim)
  per_shape: dict = {}
  weights = {}
  for path in paths:
    shape = tuple(rules.get_path(abstract_params, path + "/kernel").shape)
    if shape not in per_shape:
      k_eff = _k_eff(shape, config)
      per_shape[shape] = jax.eval_shape(
          lambda w: VQWeight.from_indices(jnp.zeros((k_eff, d), jnp.float32),
                                          jnp.zeros((shape[0] // d, shape[1]), jnp.int32), w.shape),
          jax.ShapeDtypeStruct(shape, jnp.float32))
    weights[path] = per_shape[shape]
  sizes = _layer_size_report(weights)
  mib = 1024.0**2
  num_weights = sum(int(np.prod(w.shape)) for w in weights.values())
  sizes.update(
      num_layers=len(paths), num_weights=num_weights,
      fp32_mib=sizes["fp32_bytes"] / mib, codebook_mib=sizes["codebook_bytes"] / mib,
      assignments_mib=sizes["assignments_bytes"] / mib, quantized_mib=sizes["quantized_bytes"] / mib,
      compression_ratio=sizes["fp32_bytes"] / sizes["quantized_bytes"],
      bits_per_weight=8.0 * sizes["quantized_bytes"] / num_weights)
  return sizes
