"""HQ-DiT (Liu & Zhang, 2024, "HQ-DiT: Efficient Diffusion Transformer with FP4 Hybrid
Quantization"): 4-bit floating point for the weights and activations of a DiT, and the
integer baselines, as one pure transform ``params -> quantized params``.

Per selected linear layer (``rules.select_layers``), each component switchable in the config
(``configs/hqdit.py``):

1. Hadamard transform (the paper's "universal identity transform" against outliers):
   ``x @ W = (x @ Q) @ (Q^T W)`` with a randomized Hadamard ``Q`` (``quant.hadamard``); Q^T
   is folded into the weight offline, ``x @ Q`` runs online in ``FP4Weight.linear``.  A
   per-layer online transform is used (not QuaRot's residual-stream rotation) because adaLN
   modulation scales channels per sample, which no fixed rotation commutes with.
2. Format selection, separately for weights and activations, among E1M2 / E2M1 / E3M0 (the
   paper's "hybrid" FP4).  The paper only says the choice follows the data's max/min
   ratio; our exact rule (``select='ratio'``, :func:`max_min_ratio`):
   the data are viewed as the quantizer sees them, in scaling groups along the reduction
   axis K (weights: one output column, activations: one token, or the whole tensor for
   static per-tensor scales).  Each entry is divided by its group's absmax, and for every
   input channel k the channel's peak ``c_k = max over groups of |x| / group absmax`` is
   taken.  The statistic is ``r = max_k c_k / min_k c_k``: how far below the group maximum
   the weakest channel peaks.  The format picked is the one with the *smallest* dynamic
   range (largest / smallest non-zero magnitude: E1M2 7, E2M1 12, E3M0 64) that still
   covers r, i.e. the most mantissa resolution that keeps every channel's peak above the
   grid's underflow; beyond every range the widest format is taken.  Thresholds are config
   options.  ``select='mse'`` instead quantizes with every candidate (with its own clip
   search) and keeps the smallest squared error on the weight / calibration rows.
3. Clipping-range search (the paper's "clipping range selection"): weight scales per output
   channel and the activation clip ratio per layer, each chosen among ``clip_count`` ratios
   of the max in [clip_min, 1] by smallest quantization MSE (``quant.rtn``).
4. GPTQ (``quant.gptq``) on the chosen grid with the chosen per-channel scales, using the
   layer's input Hessian from calibration (transformed by Q when the Hadamard is on).

Activation quantization travels with the weight (``FP4Weight`` static fields):

* ``per_token`` (default): dynamic scale ``clip_ratio * max_k |x[m, k]| / format.max`` per
  token, computed at run time; the calibrated ``clip_ratio`` is one scalar per layer.
* ``per_tensor``: a static scale per layer.  A static range per *timestep* would need the
  current timestep inside every linear layer, which the model does not pass; we calibrate
  one static scale per layer on rows pooled over all timesteps (MSE clip search against
  the all-timestep absmax) and report how far the per-timestep ranges drift
  (``calibrate.act_stats``: max_t absmax_t / min_t absmax_t per layer).

Optional attention-matmul quantization (Q, K, V and the softmax probabilities; params
``q_quant``/``k_quant``/``v_quant``/``probs_quant`` of ``models.dit.Attention``) uses
:class:`AttnActQuantizer`, per-row dynamic over the last axis (head_dim for Q/K/V, keys for
the probabilities).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dit_quant_jax.quant import formats, gptq, hadamard, packing, rtn, rules
from dit_quant_jax.quant.qtensor import (ActivationQuantizer, QuantizedWeight,
                                         register_quantized_type)

SELECT_METHODS = ("ratio", "mse")
ATTN_QUANT_NAMES = ("q_quant", "k_quant", "v_quant", "probs_quant")


@functools.partial(jax.jit, static_argnums=1)
def _pack_codes(codes, bits):
  return packing.pack_bits(codes, bits, axis=0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpack_codes(packed, bits, rows):
  return packing.unpack_bits(packed, bits, rows, axis=0)


# ------------------------------------------------------------------------------ pytree types
@register_quantized_type
@struct.dataclass
class FP4Weight(QuantizedWeight):
  """A (K, N) kernel on a sign-magnitude grid (FP4 E1M2/E2M1/E3M0, FP8 E4M3 or INT-b).

  packed_codes: uint8 (packing.packed_length(K, bits), N), codes packed along K with
    ``packing.pack_bits(codes, bits, axis=0)`` (4 bits: two per byte, notes/interfaces.md);
  scale: (N,) float32, W[k, n] = lut[code[k, n]] * scale[n];
  hadamard_signs (K,) / hadamard_block (a, a): when set, the stored W is Q^T W_original and
    ``linear`` applies x @ Q online (quant.hadamard); hadamard_seed records their seed;
  act_scale: () float32 static activation scale (act_granularity 'per_tensor');
  act_format / act_granularity / act_clip_ratio: the activation fake quantization applied
    to the (transformed) input: 'per_token' dynamic, 'per_tensor' static, or 'none'.
  The class name is historical (notes/interfaces.md); ``format_name`` says the grid.
  """

  packed_codes: jax.Array
  scale: jax.Array
  shape: tuple = struct.field(pytree_node=False)
  format_name: str = struct.field(pytree_node=False)
  hadamard_signs: Optional[jax.Array] = None
  hadamard_block: Optional[jax.Array] = None
  act_scale: Optional[jax.Array] = None
  hadamard_seed: Optional[int] = struct.field(pytree_node=False, default=None)
  act_format: Optional[str] = struct.field(pytree_node=False, default=None)
  act_granularity: str = struct.field(pytree_node=False, default="none")
  act_clip_ratio: float = struct.field(pytree_node=False, default=1.0)

  @classmethod
  def from_codes(cls, codes, scale, format_name: str, **fields) -> "FP4Weight":
    """codes: (K, N) unsigned sign-magnitude codes; scale: (N,)."""
    fmt = formats.get_format(format_name)
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
      raise ValueError(f"codes must be (in_features, out_features), got shape {codes.shape}")
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape != (codes.shape[1],):
      raise ValueError(f"scale of shape {scale.shape} does not match {codes.shape[1]} outputs")
    packed = _pack_codes(codes.astype(jnp.uint32), fmt.bits)
    weight = cls(packed_codes=packed, scale=scale, shape=tuple(int(d) for d in codes.shape),
                 format_name=fmt.name, **fields)
    weight.validate()
    return weight

  def validate(self) -> None:
    if self.act_granularity not in rtn.GRANULARITIES:
      raise ValueError(f"unknown activation granularity {self.act_granularity!r}; known: "
                       f"{rtn.GRANULARITIES}")
    if self.act_granularity != "none":
      formats.get_format(self.act_format)
    if self.act_granularity == "per_tensor" and self.act_scale is None:
      raise ValueError("per_tensor activation quantization needs act_scale")
    if (self.hadamard_signs is None) != (self.hadamard_block is None):
      raise ValueError("hadamard_signs and hadamard_block must be set together")

  @property
  def fmt(self) -> formats.Format:
    return formats.get_format(self.format_name)

  @property
  def bits(self) -> int:
    return self.fmt.bits

  def codes(self) -> jax.Array:
    """(K, N) uint8 codes."""
    return _unpack_codes(self.packed_codes, self.bits, self.shape[0])

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The stored (K, N) kernel (Q^T W when the Hadamard is folded in)."""
    values = formats.decode(self.codes(), self.fmt)
    return (values * self.scale[None, :]).astype(dtype)

  def transform_input(self, x):
    """x @ Q when the Hadamard is folded into the weight, else x."""
    if self.hadamard_signs is None:
      return x
    return hadamard.apply(x, self.hadamard_signs, self.hadamard_block)

  def quantize_activation(self, x):
    return rtn.activation_fake_quant(x, self.act_format, self.act_granularity,
                                     self.act_clip_ratio, self.act_scale)

  def linear(self, x: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """x: (..., K) -> (..., N): online transform, activation quantization, matmul.

    On GPU (kernels.common.resolve_impl), 4-bit weights run the Pallas kernels from their
    packed form: W4A16 for weight-only, the fused act-quant kernel + exact INT8-tensor-core
    W4A4 for 4-bit per-token activations, W4A8 for FP8 per-token activations.  Elsewhere
    (and for other settings) the plain-jnp path: dequantized weight, fake-quantized input.
    """
    from dit_quant_jax.kernels import common
    if (self.bits == 4 and self.act_granularity in ("none", "per_token")
        and common.resolve_impl("auto")[0]):
      return self._kernel_linear(x, bias).astype(x.dtype)
    dtype = x.dtype
    xq = self.quantize_activation(self.transform_input(x.astype(jnp.float32)))
    y = jnp.dot(xq.astype(dtype), self.dequantize(dtype))
    if bias is not None:
      y = y + bias.astype(y.dtype)
    return y

  def _kernel_linear(self, x, bias):
    """The Pallas path (kernels/fp4_matmul.py, kernels/act_quant.py); see linear()."""
    from dit_quant_jax.kernels import act_quant, fp4_matmul
    w_fmt = self.fmt
    if self.act_granularity == "none":
      return fp4_matmul.w4a16_linear(self.transform_input(x), self.packed_codes, w_fmt.lut,
                                     self.scale, bias)
    a_fmt = formats.get_format(self.act_format)
    if a_fmt.bits == 4:
      transform = None
      if self.hadamard_signs is not None:
        b = self.shape[0] // self.hadamard_block.shape[0]
        walsh = hadamard.fwht(jnp.eye(b, dtype=jnp.float32), axis=-1)  # H_b / sqrt(b)
        transform = (self.hadamard_signs, self.hadamard_block, walsh)
      packed_x, x_scale = act_quant.quantize_activations(
          x, a_fmt.magnitudes, transform, clip_ratio=self.act_clip_ratio)
      return fp4_matmul.w4a4_linear(
          packed_x, x_scale / a_fmt.multiplier, jnp.asarray(a_fmt.int_lut, jnp.int8),
          self.packed_codes, jnp.asarray(w_fmt.int_lut, jnp.int8), self.scale / w_fmt.multiplier,
          bias, k_features=self.shape[0])
    if a_fmt.name == "fp8_e4m3":
      xt = self.transform_input(x.astype(jnp.float32))
      x2d = xt.reshape(-1, xt.shape[-1])
      x_fp8, x_scale = fp4_matmul.quantize_fp8_per_token_reference(x2d)
      y = fp4_matmul.w4a8_linear(x_fp8, x_scale, self.packed_codes, w_fmt.lut, self.scale, bias)
      return y.reshape(x.shape[:-1] + (self.shape[1],))
    xq = self.quantize_activation(self.transform_input(x.astype(jnp.float32)))
    return fp4_matmul.w4a16_linear(xq.astype(x.dtype), self.packed_codes, w_fmt.lut, self.scale, bias)

  def effective_kernel(self) -> jax.Array:
    """The (K, N) kernel in the original basis, Q @ dequantize() (for error reports)."""
    stored = self.dequantize(jnp.float32)
    if self.hadamard_signs is None:
      return stored
    # Q @ S = (S^T Q^T)^T; Q^T = kron(A^T, B) diag(signs) is applied via the transposed ops.
    k = self.shape[0]
    a = self.hadamard_block.shape[0]
    rows = hadamard.fwht(stored.T.reshape(-1, a, k // a), axis=-1)  # (N, a, b) @ B
    rows = jnp.einsum("nij,ki->nkj", rows, self.hadamard_block)  # A applied on the left
    return (rows.reshape(-1, k) * self.hadamard_signs[None, :]).T

  def nbytes_breakdown(self) -> Mapping[str, int]:
    out = {"codes": int(self.packed_codes.size), "scale": int(self.scale.size) * 4}
    if self.hadamard_signs is not None:
      # Storable as one bit per sign and a float32 block; the seed alone would also do.
      out["hadamard"] = int(math.ceil(self.hadamard_signs.size / 8)) + int(self.hadamard_block.size) * 4
    if self.act_scale is not None:
      out["act_scale"] = 4
    return out


@register_quantized_type
@struct.dataclass
class AttnActQuantizer(ActivationQuantizer):
  """Fake quantizer of an attention-matmul operand: per row over the last axis (dynamic),
  or per tensor with a static scale.  q/k/v: (N, T, heads, head_dim); probs: (N, heads, T, T).
  """

  static_scale: Optional[jax.Array] = None
  format_name: str = struct.field(pytree_node=False, default="e2m1")
  granularity: str = struct.field(pytree_node=False, default="per_token")
  clip_ratio: float = struct.field(pytree_node=False, default=1.0)

  def __call__(self, x):
    out = rtn.activation_fake_quant(x.astype(jnp.float32), self.format_name, self.granularity,
                                    self.clip_ratio, self.static_scale)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------ format selection
def max_min_ratio(x, group_axis: Optional[int]) -> float:
  """The max/min-ratio statistic of the module doc.  x: (groups, K) if group_axis == 0 (rows are
  scaling groups, e.g. tokens), (K, groups) if group_axis == 1 (columns are groups, e.g. a
  kernel's output channels), any 2D if None (one group: per-tensor scale)."""
  a = np.abs(np.asarray(x, np.float64))
  if a.ndim != 2:
    raise ValueError(f"max_min_ratio expects a 2D array, got shape {a.shape}")
  if group_axis is None:
    normalized, channel_axis = a / max(a.max(), 1e-30), 0
  elif group_axis in (0, 1):
    group_max = a.max(axis=1 - group_axis, keepdims=True)
    normalized = a / np.where(group_max > 0, group_max, 1.0)
    channel_axis = group_axis  # reduce over the groups, keep one peak per input channel
  else:
    raise ValueError(f"group_axis must be 0, 1 or None, got {group_axis}")
  peaks = normalized.max(axis=channel_axis)
  return float(peaks.max() / max(peaks.min(), 1e-12))


def select_by_ratio(ratio: float, candidates, thresholds=None) -> str:
  """The candidate with the smallest dynamic range covering ``ratio`` (see module doc).

  thresholds: one per candidate but the last, ascending; default the candidates' dynamic
  ranges (E1M2 7, E2M1 12).  Candidates are ordered by dynamic range first."""
  fmts = sorted((formats.get_format(c) for c in candidates), key=lambda f: f.dynamic_range)
  if thresholds is None:
    thresholds = [f.dynamic_range for f in fmts[:-1]]
  thresholds = list(thresholds)
  if len(thresholds) != len(fmts) - 1 or sorted(thresholds) != thresholds:
    raise ValueError(f"need {len(fmts) - 1} ascending ratio thresholds for candidates "
                     f"{[f.name for f in fmts]}, got {thresholds}")
  for fmt, limit in zip(fmts, thresholds):
    if ratio <= limit:
      return fmt.name
  return fmts[-1].name


# ---------------------------------------------------------------------- config helpers
def _get(cfg, name, default=None):
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default) if hasattr(cfg, name) else default


def _clip_ratios(cfg) -> np.ndarray:
  if not _get(cfg, "clip_search", False):
    return np.ones((1,), np.float32)
  return rtn.clip_ratio_candidates(float(_get(cfg, "clip_min", 0.5)), int(_get(cfg, "clip_count", 11)))


def _check_select(cfg) -> str:
  method = _get(cfg, "select", "ratio")
  if method not in SELECT_METHODS:
    raise ValueError(f"unknown format selection method {method!r}; known: {SELECT_METHODS}")
  return method


def _candidates(cfg):
  cands = tuple(_get(cfg, "candidates", formats.FP4_FORMATS))
  for c in cands:
    formats.get_format(c)
  return cands


# -------------------------------------------------------------------------- per layer
def _weight_scales(kernel, fmt_name, ratios):
  if len(ratios) == 1 and ratios[0] == 1.0:
    return rtn.channel_scales(kernel, fmt_name), jnp.ones((kernel.shape[1],), jnp.float32)
  return rtn.search_channel_scales(kernel, fmt_name, ratios)


def _weight_rtn_mse(kernel, fmt_name, ratios) -> float:
  scales, _ = _weight_scales(kernel, fmt_name, ratios)
  deq = formats.fake_quantize(kernel, fmt_name, scales[None, :])
  return float(jnp.mean(jnp.square(kernel - deq)))


def choose_weight_format(kernel, wcfg, report: dict) -> str:
  """Weight format per the weight config: a fixed name, or 'auto' by ratio or MSE."""
  name = _get(wcfg, "format", "auto")
  if name != "auto":
    return formats.get_format(name).name
  candidates = _candidates(wcfg)
  method = _check_select(wcfg)
  ratio = max_min_ratio(kernel, group_axis=1)
  report["weight_ratio"] = ratio
  if method == "ratio":
    return select_by_ratio(ratio, candidates, _get(wcfg, "ratio_thresholds"))
  ratios = _clip_ratios(wcfg)
  mses = {c: _weight_rtn_mse(kernel, formats.get_format(c).name, ratios) for c in candidates}
  report["weight_format_mse"] = mses
  return formats.get_format(min(mses, key=mses.get)).name


def _act_mse(samples, fmt_name, granularity, ratios, absmax):
  best, errs = rtn.search_activation_clip(samples, fmt_name, ratios, granularity, absmax)
  return best, float(np.min(errs))


def choose_act_format(samples, acfg, granularity, report: dict, absmax=None) -> Optional[str]:
  """Activation format per the activation config; samples: (R, K) transformed inputs or None."""
  name = _get(acfg, "format", None)
  if name is None or name == "none":
    return None
  if name != "auto":
    return formats.get_format(name).name
  candidates = _candidates(acfg)
  if samples is None:
    fallback = formats.get_format(_get(acfg, "default_format", "e2m1")).name
    report["act_format_note"] = f"no calibration data: fallback {fallback}"
    return fallback
  method = _check_select(acfg)
  ratio = max_min_ratio(samples, group_axis=0 if granularity == "per_token" else None)
  report["act_ratio"] = ratio
  if method == "ratio":
    return select_by_ratio(ratio, candidates, _get(acfg, "ratio_thresholds"))
  ratios = _clip_ratios(acfg)
  mses = {c: _act_mse(samples, formats.get_format(c).name, granularity, ratios, absmax)[1]
          for c in candidates}
  report["act_format_mse"] = mses
  return formats.get_format(min(mses, key=mses.get)).name


def quantize_layer(kernel, config, stats=None, *, layer_seed: int = 0):
  """Quantize one (K, N) kernel.  stats: calibrate.act_stats.LayerStats or None.

  Returns (FP4Weight, report dict)."""
  kernel = jnp.asarray(kernel, jnp.float32)
  if kernel.ndim != 2:
    raise ValueError(f"expected a (in_features, out_features) kernel, got shape {kernel.shape}")
  k, n = kernel.shape
  wcfg, acfg = _get(config, "weight"), _get(config, "act")
  hcfg, gcfg = _get(config, "hadamard"), _get(config, "gptq")
  report: dict = {}
  if stats is not None and stats.in_features != k:
    raise ValueError(f"calibration stats have {stats.in_features} input features, kernel {k}")
  samples = None if stats is None else jnp.asarray(stats.samples, jnp.float32)
  use_gptq = bool(_get(gcfg, "enabled", False))
  hessian = None
  if use_gptq:
    if stats is None or stats.hessian is None:
      raise ValueError("GPTQ is enabled but no calibration Hessian was collected for this layer "
                       "(pass calibration statistics collected with hessian=True)")
    hessian = jnp.asarray(stats.hessian, jnp.float32)

  # 1. Hadamard
  transform = None
  stored_kernel = kernel
  if _get(hcfg, "enabled", False):
    transform = hadamard.make_transform(k, layer_seed)
    stored_kernel = hadamard.fold_into_weight(kernel, transform)
    if samples is not None:
      samples = hadamard.apply_transform(samples, transform)
    if hessian is not None:  # H' = Q^T H Q for inputs x @ Q
      hessian = hadamard.apply_transform(hadamard.apply_transform(hessian, transform).T, transform)
    report["hadamard_seed"] = layer_seed
    report["hadamard_odd_factor"] = transform.odd_factor

  # 2-3. weight format and scales
  wfmt = choose_weight_format(stored_kernel, wcfg, report)
  scales, chosen = _weight_scales(stored_kernel, wfmt, _clip_ratios(wcfg))
  report["weight_format"] = wfmt
  report["weight_clip_ratio_mean"] = float(jnp.mean(chosen))

  # 4. codes: GPTQ or round-to-nearest
  if use_gptq:
    codes, _ = gptq.gptq_quantize(stored_kernel, hessian, wfmt, scales,
                                  damp=float(_get(gcfg, "damp", gptq.DEFAULT_DAMP)),
                                  block_size=int(_get(gcfg, "block_size", gptq.DEFAULT_BLOCK_SIZE)),
                                  act_order=bool(_get(gcfg, "act_order", False)))
  else:
    codes = rtn.quantize_kernel(stored_kernel, wfmt, scales)
  report["gptq"] = use_gptq

  # 5. activation spec
  granularity = _get(acfg, "granularity", "per_token")
  if granularity not in ("per_token", "per_tensor"):
    raise ValueError(f"unknown activation granularity {granularity!r}; known: per_token, per_tensor")
  absmax = None
  if stats is not None:
    # Range of the quantized input over all timesteps: the channel absmax when there is no
    # transform; with the Hadamard only the kept rows are seen in the rotated basis.
    absmax = float(np.max(np.abs(np.asarray(samples)))) if transform is not None else \
        float(np.max(stats.channel_absmax))
    report["act_drift"] = stats.drift
  afmt = choose_act_format(samples, acfg, granularity, report, absmax)
  fields: dict[str, Any] = {}
  if afmt is None:
    fields["act_granularity"] = "none"
  else:
    fields["act_format"] = afmt
    fields["act_granularity"] = granularity
    clip = 1.0
    ratios = _clip_ratios(acfg)
    if samples is not None and len(ratios) > 1:
      clip, _ = rtn.search_activation_clip(samples, afmt, ratios, granularity, absmax)
    fields["act_clip_ratio"] = float(clip)
    if granularity == "per_tensor":
      if absmax is None:
        raise ValueError("static per-tensor activation scales need calibration data")
      fields["act_scale"] = jnp.asarray(formats.absmax_scale(absmax, afmt, clip), jnp.float32)
  report["act_format"] = afmt
  report["act_clip_ratio"] = fields.get("act_clip_ratio")
  if transform is not None:
    fields.update(hadamard_signs=jnp.asarray(transform.signs),
                  hadamard_block=jnp.asarray(transform.block), hadamard_seed=int(layer_seed))
  weight = FP4Weight.from_codes(codes, scales, wfmt, **fields)

  # Errors, in float64 numpy (no extra compilation per layer shape).  Q is orthogonal, so
  # the weight error in the original basis equals the error in the stored (folded) basis.
  stored = formats.get_format(wfmt).lut[np.asarray(codes)] * np.asarray(scales, np.float64)[None, :]
  folded = np.asarray(stored_kernel, np.float64)
  report["weight_rel_error"] = _relative(stored - folded, folded)
  if stats is not None:
    x_quantized = np.asarray(weight.quantize_activation(samples), np.float64)
    reference = np.asarray(stats.samples, np.float64) @ np.asarray(kernel, np.float64)
    report["output_rel_error"] = _relative(x_quantized @ stored - reference, reference)
  return weight, report


def _relative(diff, ref) -> float:
  return float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))


def _attention_modules(paths) -> list[str]:
  """Attention modules owning a selected qkv layer, in the (natural) order of ``paths``."""
  return list(dict.fromkeys(p[: -len("/qkv")] for p in paths if p.endswith("attn/qkv")))


def quantize_params(params, model=None, config=None, calib: Optional[Mapping] = None):
  """Pure transform: params -> (quantized params, report).

  calib: {layer path: act_stats.LayerStats} (from calibrate.act_stats.collect_layer_stats),
  or None (data-free: no GPTQ, no activation clip search, 'auto' activation formats fall back
  to ``act.default_format``).  ``model`` is accepted for symmetry with the other quantizers
  (unused here: all layer shapes come from the params)."""
  del model
  if config is None:
    raise ValueError("quantize_params needs a config (configs/hqdit.py get_config)")
  patterns = _get(config, "layer_patterns", rules.DIT_BLOCK_LINEARS)
  paths = rules.select_layers(params, list(patterns))
  base_seed = int(_get(_get(config, "hadamard"), "seed", 0))
  qparams = params
  layers = {}
  for index, path in enumerate(paths):
    kernel = rules.get_path(params, path + "/kernel")
    stats = None if calib is None else calib.get(path)
    if calib is not None and stats is None:
      raise ValueError(f"no calibration statistics for layer {path!r}")
    weight, layer_report = quantize_layer(kernel, config, stats,
                                          layer_seed=base_seed * 100003 + index)
    qparams = rules.set_path(qparams, path + "/kernel", weight)
    layers[path] = layer_report

  acfg = _get(config, "attn_quant")
  attn_paths = []
  if _get(acfg, "enabled", False):
    fmt_name = formats.get_format(_get(acfg, "format", "e2m1")).name
    quantizer = AttnActQuantizer(format_name=fmt_name, granularity="per_token",
                                 clip_ratio=float(_get(acfg, "clip_ratio", 1.0)))
    for module in _attention_modules(paths):
      for name in ATTN_QUANT_NAMES:
        qparams = rules.set_path(qparams, f"{module}/{name}", quantizer)
      attn_paths.append(module)
  return qparams, summarize(params, qparams, layers, attn_paths, calib)


def summarize(params, qparams, layers, attn_paths, calib) -> dict:
  """Report: per-layer details, format counts, mean errors, storage bytes, drift."""
  from collections import Counter

  report: dict = dict(layers=layers, attention_quantized=attn_paths)
  report["weight_formats"] = dict(Counter(r["weight_format"] for r in layers.values()))
  report["act_formats"] = dict(Counter(str(r["act_format"]) for r in layers.values()))
  report["mean_weight_rel_error"] = float(np.mean([r["weight_rel_error"] for r in layers.values()]))
  outs = [r["output_rel_error"] for r in layers.values() if "output_rel_error" in r]
  if outs:
    report["mean_output_rel_error"] = float(np.mean(outs))
  fp_bytes = 0
  q_bytes = 0
  for path in layers:
    kernel = rules.get_path(params, path + "/kernel")
    fp_bytes += int(np.prod(kernel.shape)) * 4
    q_bytes += sum(rules.get_path(qparams, path + "/kernel").nbytes_breakdown().values())
  report["quantized_layers_fp32_bytes"] = fp_bytes
  report["quantized_layers_bytes"] = q_bytes
  if calib:
    from dit_quant_jax.calibrate.act_stats import drift_report
    report["act_drift"] = drift_report({p: calib[p] for p in layers})
  return report


def quantize_from_config(model, params, config, calib_inputs=None):
  """Entry point for experiments: (qparams, report).

  calib_inputs: the FP trajectory dict(x=(S, B, H, W, C), t=(S, B), y=(S, B)) (statistics are
  collected here with config.calib settings), precomputed {path: LayerStats}, or None."""
  calib = None
  if calib_inputs is not None:
    if isinstance(calib_inputs, Mapping) and "x" in calib_inputs and "t" in calib_inputs:
      from dit_quant_jax.calibrate import act_stats
      ccfg = _get(config, "calib")
      paths = rules.select_layers(params, list(_get(config, "layer_patterns",
                                                    rules.DIT_BLOCK_LINEARS)))
      calib = act_stats.collect_layer_stats(
          model, params, calib_inputs, paths,
          hessian=bool(_get(_get(config, "gptq"), "enabled", False)),
          samples_per_step=int(_get(ccfg, "samples_per_step", 64)),
          max_samples=int(_get(ccfg, "max_samples", 1024)),
          batch_size=_get(ccfg, "batch_size"), seed=int(_get(ccfg, "seed", 0)))
    else:
      calib = calib_inputs
  return quantize_params(params, model, config, calib)
