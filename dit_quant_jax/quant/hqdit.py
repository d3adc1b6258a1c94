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
   ratio (we do not have its full text); the rule below is this project's reading, not a
   formula from the paper.  Our exact rule (``select='ratio'``, :func:`max_min_ratio`):
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

Beyond the paper, switchable in the same config: SmoothQuant (``smooth``,
``quant.smoothquant``) before step 1 and an SVDQuant-style low-rank branch (``lowrank``,
``quant.lowrank``) whose residual goes through steps 1-4.  Calibration
(:func:`quantize_from_config`) is sequential by default: each DiT block's statistics are
collected with every earlier block already quantized (``calib.inputs``).  Every offline
transform of weights and calibration data, and GPTQ, runs in float64 numpy, so the codes do
not depend on the machine's thread count (results/hqdit_determinism.md).

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
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dit_quant_jax.quant import (formats, gptq, hadamard, lowrank, packing, rtn, rules,
                                 smoothquant)
from dit_quant_jax.quant.qtensor import (ActivationQuantizer, QuantizedWeight,
                                         register_quantized_type)

SELECT_METHODS = ("ratio", "mse")
LAYOUTS = ("k_tiles", "pack_bits")  # FP4Weight code storage (class doc)
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

  packed_codes: the codes in the storage ``layout``:
    'k_tiles' (4-bit formats, what ``from_codes`` writes): uint8 (N, K_pad / 2), the tiled
      K-major layout the FP4 kernels read (``kernels.fp4_mma.pack_weight``: K zero-padded to
      a multiple of 128, a 128-code K tile of one output channel in 64 contiguous bytes);
    'pack_bits' (other widths, and 4-bit weights saved before the tiled layout existed):
      uint8 (packing.packed_length(K, bits), N), codes packed along K with
      ``packing.pack_bits(codes, bits, axis=0)``;
  scale: (N,) float32, W[k, n] = lut[code[k, n]] * scale[n];
  hadamard_signs (K,) / hadamard_block (a, a): when set, the stored W is Q^T W_original and
    ``linear`` applies x @ Q online (quant.hadamard); hadamard_seed records their seed and
    hadamard_kind the block's kind ('hadamard': a real Hadamard block, every entry of one
    magnitude, which the act-quant kernel multiplies by its signs; 'random'; None: unknown,
    e.g. a checkpoint written before the field existed);
  act_scale: () float32 static activation scale (act_granularity 'per_tensor');
  act_format / act_granularity / act_clip_ratio: the activation fake quantization applied
    to the (transformed) input: 'per_token' dynamic, 'per_tensor' static, or 'none';
  input_scale: (K,) float32 SmoothQuant factor 1 / s applied first, x * input_scale
    (quant.smoothquant; the stored W then holds diag(s) W);
  lowrank_down (K, r) / lowrank_up (r, N) bfloat16: the SVDQuant-style branch
    (quant.lowrank), y += ((x * input_scale) @ down) @ up on the unquantized input; the
    stored codes then hold the residual W - down @ up.
  Full forward: y = Qa((x * input_scale) @ Q) @ dequantize() + (x * input_scale) @ down @ up + bias.
  The class name is historical; ``format_name`` says the grid.
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
  input_scale: Optional[jax.Array] = None
  lowrank_down: Optional[jax.Array] = None
  lowrank_up: Optional[jax.Array] = None
  layout: str = struct.field(pytree_node=False, default="pack_bits")
  hadamard_kind: Optional[str] = struct.field(pytree_node=False, default=None)

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
    layout = fields.pop("layout", "k_tiles" if fmt.bits == 4 else "pack_bits")
    if layout == "k_tiles":
      if fmt.bits != 4:
        raise ValueError(f"the 'k_tiles' layout is for 4-bit formats, not {fmt.name}")
      from dit_quant_jax.kernels import fp4_mma
      packed = fp4_mma.pack_weight(codes, scale, fmt.name).tiles
    elif layout == "pack_bits":
      packed = _pack_codes(codes.astype(jnp.uint32), fmt.bits)
    else:
      raise ValueError(f"unknown FP4Weight layout {layout!r}; expected one of {LAYOUTS}")
    weight = cls(packed_codes=packed, scale=scale, shape=tuple(int(d) for d in codes.shape),
                 format_name=fmt.name, layout=layout, **fields)
    weight.validate()
    return weight

  def validate(self) -> None:
    if self.layout not in LAYOUTS:
      raise ValueError(f"unknown FP4Weight layout {self.layout!r}; expected one of {LAYOUTS}")
    if self.layout == "k_tiles":
      self.packed_weight().validate()
    if self.act_granularity not in rtn.GRANULARITIES:
      raise ValueError(f"unknown activation granularity {self.act_granularity!r}; known: "
                       f"{rtn.GRANULARITIES}")
    if self.act_granularity != "none":
      formats.get_format(self.act_format)
    if self.act_granularity == "per_tensor" and self.act_scale is None:
      raise ValueError("per_tensor activation quantization needs act_scale")
    if (self.hadamard_signs is None) != (self.hadamard_block is None):
      raise ValueError("hadamard_signs and hadamard_block must be set together")
    if (self.lowrank_down is None) != (self.lowrank_up is None):
      raise ValueError("lowrank_down and lowrank_up must be set together")
    k, n = self.shape
    if self.lowrank_down is not None and (
        self.lowrank_down.ndim != 2 or self.lowrank_down.shape[0] != k
        or self.lowrank_up.shape != (self.lowrank_down.shape[1], n)):
      raise ValueError(f"low-rank factors {tuple(self.lowrank_down.shape)} @ "
                       f"{tuple(self.lowrank_up.shape)} do not make a ({k}, {n}) kernel")
    if self.input_scale is not None and tuple(self.input_scale.shape) != (k,):
      raise ValueError(f"input_scale of shape {tuple(self.input_scale.shape)} does not match "
                       f"{k} input features")

  @property
  def fmt(self) -> formats.Format:
    return formats.get_format(self.format_name)

  @property
  def bits(self) -> int:
    return self.fmt.bits

  def codes(self) -> jax.Array:
    """(K, N) uint8 codes."""
    if self.layout == "k_tiles":
      from dit_quant_jax.kernels import fp4_mma
      return fp4_mma.unpack_weight_codes(self.packed_weight()).astype(jnp.uint8)
    return _unpack_codes(self.packed_codes, self.bits, self.shape[0])

  def in_current_layout(self) -> "FP4Weight":
    """4-bit weights saved in the 'pack_bits' layout -> 'k_tiles' (once, on load), else self."""
    if self.layout == "pack_bits" and self.bits == 4:
      return self.replace(packed_codes=self.packed_weight().tiles, layout="k_tiles")
    return self

  def packed_weight(self):
    """The 4-bit weight as the FP4 kernels take it (``kernels.fp4_mma.PackedFp4Weight``): a
    view of the stored arrays for the 'k_tiles' layout; for 'pack_bits' (4-bit weights saved
    before the tiled layout) a relayout, one pass over the weight per call."""
    from dit_quant_jax.kernels import fp4_mma
    if self.bits != 4:
      raise ValueError(f"{self.format_name} weights have no 4-bit kernel layout")
    if self.layout == "k_tiles":
      return fp4_mma.PackedFp4Weight(self.packed_codes, self.scale, self.format_name,
                                     self.shape[0])
    return fp4_mma.weight_from_pack_bits(self.packed_codes, self.scale, self.format_name,
                                         self.shape[0])

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The stored (K, N) kernel (Q^T W when the Hadamard is folded in)."""
    values = formats.decode(self.codes(), self.fmt)
    return (values * self.scale[None, :]).astype(dtype)

  def smooth_input(self, x):
    """x * input_scale (SmoothQuant), else x."""
    if self.input_scale is None:
      return x
    return x * self.input_scale.astype(x.dtype)

  def rotate_input(self, x):
    """x @ Q when the Hadamard is folded into the weight, else x."""
    if self.hadamard_signs is None:
      return x
    return hadamard.apply(x, self.hadamard_signs, self.hadamard_block)

  def transform_input(self, x):
    """(x * input_scale) @ Q: the input the stored codes multiply (before act quantization)."""
    return self.rotate_input(self.smooth_input(x))

  def _add_branch(self, y, smoothed_x):
    if self.lowrank_down is None:
      return y
    from dit_quant_jax.quant import lowrank
    return y + lowrank.branch_output(smoothed_x, self.lowrank_down, self.lowrank_up).astype(y.dtype)

  def quantize_activation(self, x):
    return rtn.activation_fake_quant(x, self.act_format, self.act_granularity,
                                     self.act_clip_ratio, self.act_scale)

  def linear(self, x: jax.Array, bias: Optional[jax.Array],
             activation: Optional[str] = None) -> jax.Array:
    """x: (..., K) -> (..., N): online transform, activation quantization, matmul.

    On GPU (kernels.common.resolve_impl; forced with ``kernel_impl("pallas")``, interpret
    mode off GPU), 4-bit weights run ``kernels.fp4_matmul.linear``: the path the dispatch
    table (kernels/dispatch.py) picks for (M, K, N, device), on the tiled weight: W4A16 for
    weight-only, W4A4 (act-quant with the Hadamard, the calibrated clip ratio, codes into an
    exact int8 / fp8 image, then an 8-bit dot) for 4-bit per-token activations, W4A8 for FP8
    per-token activations.  Elsewhere (and for other settings) the plain-jnp path:
    dequantized weight, fake-quantized input.  Both compute the same function.

    activation (only where :meth:`fuses_activation`): the output activation, applied in the
    kernel's epilogue.
    """
    self._check_activation(activation)
    smoothed = self.smooth_input(x)
    if self._kernel_path():
      return self._add_branch(self._kernel_linear(smoothed, bias, activation),
                              smoothed).astype(x.dtype)
    dtype = x.dtype
    xq = self.quantize_activation(self.rotate_input(smoothed.astype(jnp.float32)))
    y = jnp.dot(xq.astype(dtype), self.dequantize(dtype))
    if bias is not None:
      y = y + bias.astype(y.dtype)
    return self._add_branch(y, smoothed)

  def _kernel_path(self) -> bool:
    from dit_quant_jax.kernels import common
    return (self.bits == 4 and self.act_granularity in ("none", "per_token")
            and common.resolve_impl("auto")[0])

  def fuses_activation(self, name: Optional[str]) -> bool:
    """Every 4-bit kernel path applies a known output activation in its matmul epilogue
    (kernels.fp4_matmul.linear's activation), unless a low-rank branch is added after it."""
    from dit_quant_jax.numerics import activation as activation_fn
    return (name in activation_fn.ACTIVATIONS and self.lowrank_down is None
            and self._kernel_path())

  def _check_activation(self, activation):
    if activation is not None and not self.fuses_activation(activation):
      raise ValueError(f"this FP4Weight does not fuse the output activation {activation!r} "
                       "here (fuses_activation() is False): apply it to linear()'s output")

  def fuses_row_norm(self) -> bool:
    """The W4A4 / W4A8 kernel path (per-token activations, no low-rank branch) takes the
    adaLN-modulated input deferred: paths whose act-quant is the Triton kernel run the
    LayerNorm and modulation as its prologue, the others materialize it
    (kernels.fp4_matmul.fuses_row_norm, per shape)."""
    from dit_quant_jax.kernels import common
    return (self.bits == 4 and self.act_granularity == "per_token"
            and self.lowrank_down is None and self.kernel_op()[0] != "w4a16"
            and common.resolve_impl("auto")[0])

  def linear_row_norm(self, x, mul, add, eps, bias, activation=None):
    """x: (B, T, K) un-normalized rows; input = LayerNorm(x) * mul + add (the SmoothQuant
    factor folded into mul and add) -> (B, T, N) through ``kernels.fp4_matmul.linear`` with
    the prologue fused into its act-quant step."""
    from dit_quant_jax.kernels import act_quant
    self._check_activation(activation)
    if not self.fuses_row_norm():
      raise ValueError("this FP4Weight does not fuse the row norm here (fuses_row_norm() is "
                       "False): pass the normalized input to linear()")
    if x.ndim != 3 or tuple(mul.shape) != (x.shape[0], x.shape[2]) or mul.shape != add.shape:
      raise ValueError(f"row norm needs x (B, T, K) and mul / add (B, K); got x {x.shape}, "
                       f"mul {tuple(mul.shape)}, add {tuple(add.shape)}")
    mul, add = mul.astype(jnp.float32), add.astype(jnp.float32)
    if self.input_scale is not None:
      mul, add = mul * self.input_scale[None, :], add * self.input_scale[None, :]
    return self._act_quant_linear(x, bias,
                                  act_quant.RowNorm(mul, add, int(x.shape[1]), float(eps)),
                                  activation)

  def kernel_op(self) -> tuple[str, Optional[str]]:
    """(FP4 op, activation format) of the kernel path: ('w4a16', None) weight-only or with
    activations fake-quantized beforehand, ('w4a4', fmt) for 4-bit per-token activations,
    ('w4a8', 'fp8_e4m3') for FP8 per-token activations."""
    from dit_quant_jax.numerics import fp4
    if self.act_granularity == "per_token":
      name = formats.get_format(self.act_format).name  # canonical (aliases such as 'E2M1')
      if name in fp4.FP4_CODE_FORMATS:
        return "w4a4", name
      if name == "fp8_e4m3":
        return "w4a8", name
    return "w4a16", None

  def _kernel_linear(self, x, bias, activation=None):
    """The kernel path on the smoothed input x (the low-rank branch is added by linear())."""
    from dit_quant_jax.kernels import fp4_matmul
    op, _ = self.kernel_op()
    weight = self.packed_weight()
    if op == "w4a16":  # the transform (and any fake quantization) in float32, as linear()'s
      xt = self.rotate_input(x.astype(jnp.float32))
      if self.act_granularity != "none":  # e.g. INT8 per-token
        xt = self.quantize_activation(xt)
      return fp4_matmul.linear("w4a16", xt.astype(x.dtype), weight, bias,
                               activation=activation)
    return self._act_quant_linear(x, bias, activation=activation)

  def _act_quant_linear(self, x, bias, norm=None, activation=None):
    """W4A4 / W4A8 through fp4_matmul.linear: its act-quant applies the Hadamard, the clip
    ratio and (norm, an act_quant.RowNorm) the LayerNorm prologue."""
    from dit_quant_jax.kernels import fp4_matmul
    op, act_format = self.kernel_op()
    transform = None
    if self.hadamard_signs is not None:
      transform = (self.hadamard_signs, self.hadamard_block)
    return fp4_matmul.linear(op, x, self.packed_weight(), bias, act_format=act_format,
                             clip_ratio=self.act_clip_ratio, transform=transform,
                             transform_kind=self.hadamard_kind, out_dtype=x.dtype, norm=norm,
                             activation=activation)

  def effective_kernel(self) -> jax.Array:
    """The (K, N) kernel of the original input x (activation quantization aside):
    diag(input_scale) (Q @ dequantize() + down @ up) (for error reports)."""
    kernel = self._rotated_back()
    if self.lowrank_down is not None:
      kernel = kernel + jnp.dot(self.lowrank_down.astype(jnp.float32),
                                self.lowrank_up.astype(jnp.float32))
    if self.input_scale is not None:
      kernel = kernel * self.input_scale[:, None]
    return kernel

  def _rotated_back(self) -> jax.Array:
    """Q @ dequantize(): the stored kernel in the (smoothed) input basis."""
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
    if self.input_scale is not None:
      out["smooth_scale"] = int(self.input_scale.size) * 4
    if self.lowrank_down is not None:  # bfloat16 factors
      out["lowrank"] = (int(self.lowrank_down.size) + int(self.lowrank_up.size)) * 2
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
  kernel's output channels), any 2D if None (one group: per-tensor scale).

  Input channels that are zero in every group are left out: they encode exactly as 0 on
  every grid, so they need no range (without this, one dead channel made r infinite and
  sent the whole layer to the widest format).  All channels zero: r = 1."""
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
  live = peaks[peaks > 0]
  if live.size == 0:
    return 1.0
  return float(live.max() / live.min())


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
  """Weight format per the weight config: a fixed name, or 'auto' by the ratio or MSE rule.

  With 'auto' the (cheap) ratio rule's pick is always recorded in
  ``report['weight_format_by_rule']``; with select='mse' the MSE rule's pick too (the MSE
  search quantizes with every candidate, so it runs only when it is the configured rule)."""
  name = _get(wcfg, "format", "auto")
  if name != "auto":
    return formats.get_format(name).name
  candidates = _candidates(wcfg)
  method = _check_select(wcfg)
  ratio = max_min_ratio(kernel, group_axis=1)
  report["weight_ratio"] = ratio
  picks = {"ratio": select_by_ratio(ratio, candidates, _get(wcfg, "ratio_thresholds"))}
  report["weight_format_by_rule"] = picks
  if method == "mse":
    ratios = _clip_ratios(wcfg)
    mses = {formats.get_format(c).name: _weight_rtn_mse(kernel, formats.get_format(c).name, ratios)
            for c in candidates}
    report["weight_format_mse"] = mses
    picks["mse"] = min(mses, key=mses.get)
  return picks[method]


def _act_mse(samples, fmt_name, granularity, ratios, absmax):
  best, errs = rtn.search_activation_clip(samples, fmt_name, ratios, granularity, absmax)
  return best, float(np.min(errs))


def choose_act_format(samples, acfg, granularity, report: dict, absmax=None) -> Optional[str]:
  """Activation format per the activation config; samples: (R, K) transformed inputs or None.

  With 'auto' (and calibration rows) the rules' picks go to ``report['act_format_by_rule']``
  (the MSE rule's only with select='mse', as for the weights)."""
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
  picks = {"ratio": select_by_ratio(ratio, candidates, _get(acfg, "ratio_thresholds"))}
  report["act_format_by_rule"] = picks
  if method == "mse":
    ratios = _clip_ratios(acfg)
    mses = {formats.get_format(c).name: _act_mse(samples, formats.get_format(c).name, granularity,
                                                 ratios, absmax)[1]
            for c in candidates}
    report["act_format_mse"] = mses
    picks["mse"] = min(mses, key=mses.get)
  return picks[method]


def _fixed_or_default(cfg, default: str) -> Optional[str]:
  """The config's format name, or ``default`` for 'auto' (None for no quantization)."""
  name = _get(cfg, "format", None)
  if name is None or name == "none":
    return None
  return formats.get_format(default if name == "auto" else name).name


def _smoothing_error_fn(config, transform, rank: int, reference):
  """output_error(xs, ws) for the SmoothQuant alpha search: the layer quantized as configured
  but with max-scaled RTN weights and unclipped activations (fast), against ``reference``
  (the FP outputs of the calibration rows)."""
  w_name = _fixed_or_default(_get(config, "weight"), "e2m1")
  a_name = _fixed_or_default(_get(config, "act"), "e2m1")
  granularity = _get(_get(config, "act"), "granularity", "per_token")

  def output_error(xs, ws):
    branch = 0.0
    if rank > 0:
      down, up, ws = lowrank.split_low_rank(ws, rank)
      branch = xs @ (down.astype(np.float64) @ up.astype(np.float64))
    xt, wt = xs, ws
    if transform is not None:
      xt = hadamard.apply_numpy(xs, transform)
      wt = hadamard.fold_into_weight_numpy(ws, transform)
    w32 = jnp.asarray(wt, jnp.float32)
    wq = np.asarray(formats.fake_quantize(w32, w_name, rtn.channel_scales(w32, w_name)[None, :]),
                    np.float64)
    if a_name is not None:
      x32 = jnp.asarray(xt, jnp.float32)
      absmax = jnp.max(jnp.abs(x32))
      scale = None if granularity == "per_token" else formats.absmax_scale(absmax, a_name, 1.0)
      xt = np.asarray(rtn.activation_fake_quant(x32, a_name, granularity, 1.0, scale), np.float64)
    return float(np.sum(np.square(xt @ wq + branch - reference)))

  return output_error


def quantize_layer(kernel, config, stats=None, *, layer_seed: int = 0):
  """Quantize one (K, N) kernel.  stats: calibrate.act_stats.LayerStats or None.

  Steps (each switchable in the config): SmoothQuant (``smooth``), low-rank branch
  (``lowrank``), Hadamard, format selection, clipping, GPTQ, activation spec.  The
  calibration data are moved into the basis the quantizer sees in float64 numpy.
  Returns (FP4Weight, report dict)."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2:
    raise ValueError(f"expected a (in_features, out_features) kernel, got shape {kernel.shape}")
  k, n = kernel.shape
  wcfg, acfg = _get(config, "weight"), _get(config, "act")
  hcfg, gcfg = _get(config, "hadamard"), _get(config, "gptq")
  scfg, lcfg = _get(config, "smooth"), _get(config, "lowrank")
  report: dict = {}
  if stats is not None and stats.in_features != k:
    raise ValueError(f"calibration stats have {stats.in_features} input features, kernel {k}")
  samples = None if stats is None else np.asarray(stats.samples, np.float64)
  channel_absmax = None if stats is None else np.asarray(stats.channel_absmax, np.float64)
  use_gptq = bool(_get(gcfg, "enabled", False))
  hessian = None
  if use_gptq:
    if stats is None or stats.hessian is None:
      raise ValueError("GPTQ is enabled but no calibration Hessian was collected for this layer "
                       "(pass calibration statistics collected with hessian=True)")
    hessian = np.asarray(stats.hessian, np.float64)
  rank = int(_get(lcfg, "rank", 0) or 0)
  transform = None
  if _get(hcfg, "enabled", False):
    transform = hadamard.make_transform(k, layer_seed, _get(hcfg, "block", "hadamard"))
    report["hadamard_seed"] = layer_seed
    report["hadamard_block"] = f"{transform.kind} {transform.block_order}x{transform.block_order}"

  # 0. SmoothQuant: x @ W = (x / s) @ (diag(s) W)
  work = kernel
  input_scale = None
  if _get(scfg, "enabled", False):
    if stats is None:
      raise ValueError("SmoothQuant (smooth.enabled) needs calibration statistics (activation "
                       "absmax per input channel); pass calibration inputs")
    error_fn = _smoothing_error_fn(config, transform, rank, samples @ kernel)
    alphas = tuple(_get(scfg, "alphas", smoothquant.DEFAULT_ALPHAS))
    alpha, factors, errors = smoothquant.search_alpha(samples, kernel, channel_absmax, error_fn,
                                                      alphas)
    samples, work = smoothquant.smooth(samples, kernel, factors)
    channel_absmax = channel_absmax / factors
    if hessian is not None:  # X' = X diag(1/s): H' = diag(1/s) H diag(1/s)
      hessian = hessian / np.outer(factors, factors)
    input_scale = (1.0 / factors).astype(np.float32)
    report["smooth_alpha"] = alpha
    report["smooth_alpha_errors"] = errors
  smoothed_samples = samples

  # 1. Low-rank branch: W = L1 L2 + R, R goes on through the 4-bit path.
  down = up = None
  if rank > 0:
    down, up, work = lowrank.split_low_rank(work, rank)
    report["lowrank_rank"] = rank

  # 2. Hadamard: store Q^T R, calibrate on x @ Q.
  stored_kernel = work
  if transform is not None:
    stored_kernel = hadamard.fold_into_weight_numpy(work, transform)
    if samples is not None:
      samples = hadamard.apply_numpy(samples, transform)
    if hessian is not None:  # H' = Q^T H Q for inputs x @ Q
      hessian = hadamard.apply_numpy(hadamard.apply_numpy(hessian, transform).T, transform)
  stored32 = jnp.asarray(stored_kernel.astype(np.float32))
  samples32 = None if samples is None else jnp.asarray(samples.astype(np.float32))

  # 3. weight format and scales
  wfmt = choose_weight_format(stored32, wcfg, report)
  scales, chosen = _weight_scales(stored32, wfmt, _clip_ratios(wcfg))
  report["weight_format"] = wfmt
  report["weight_clip_ratio_mean"] = float(jnp.mean(chosen))

  # 4. codes: GPTQ or round-to-nearest
  if use_gptq:
    codes, _ = gptq.gptq_quantize(stored_kernel, hessian, wfmt, scales,
                                  damp=float(_get(gcfg, "damp", gptq.DEFAULT_DAMP)),
                                  block_size=int(_get(gcfg, "block_size", gptq.DEFAULT_BLOCK_SIZE)),
                                  act_order=bool(_get(gcfg, "act_order", False)))
  else:
    codes = rtn.quantize_kernel(stored32, wfmt, scales)
  report["gptq"] = use_gptq

  # 5. activation spec
  granularity = _get(acfg, "granularity", "per_token")
  if granularity not in ("per_token", "per_tensor"):
    raise ValueError(f"unknown activation granularity {granularity!r}; known: per_token, per_tensor")
  absmax = None
  if stats is not None:
    # Range of the quantized input over all timesteps: the channel absmax when there is no
    # transform; with the Hadamard only the kept rows are seen in the rotated basis.
    absmax = float(np.max(np.abs(samples))) if transform is not None else float(np.max(channel_absmax))
    report["act_drift"] = stats.drift
  afmt = choose_act_format(samples32, acfg, granularity, report, absmax)
  fields: dict[str, Any] = {}
  if afmt is None:
    fields["act_granularity"] = "none"
  else:
    fields["act_format"] = afmt
    fields["act_granularity"] = granularity
    clip = 1.0
    ratios = _clip_ratios(acfg)
    if samples32 is not None and len(ratios) > 1:
      clip, _ = rtn.search_activation_clip(samples32, afmt, ratios, granularity, absmax)
    fields["act_clip_ratio"] = float(clip)
    if granularity == "per_tensor":
      if absmax is None:
        raise ValueError("static per-tensor activation scales need calibration data")
      fields["act_scale"] = jnp.asarray(formats.absmax_scale(absmax, afmt, clip), jnp.float32)
  report["act_format"] = afmt
  report["act_clip_ratio"] = fields.get("act_clip_ratio")
  if transform is not None:
    fields.update(hadamard_signs=jnp.asarray(transform.signs),
                  hadamard_block=jnp.asarray(transform.block), hadamard_seed=int(layer_seed),
                  hadamard_kind=transform.kind)
  if input_scale is not None:
    fields["input_scale"] = jnp.asarray(input_scale)
  if down is not None:
    fields.update(lowrank_down=jnp.asarray(down, lowrank.BRANCH_DTYPE),
                  lowrank_up=jnp.asarray(up, lowrank.BRANCH_DTYPE))
  weight = FP4Weight.from_codes(codes, scales, wfmt, **fields)

  # Errors, in float64 numpy (no extra compilation per layer shape).  Q is orthogonal, so
  # the weight error in the original basis equals the error in the stored (folded) basis.
  stored = formats.get_format(wfmt).lut[np.asarray(codes)] * np.asarray(scales, np.float64)[None, :]
  report["weight_rel_error"] = _relative(stored - stored_kernel, stored_kernel)
  if stats is not None:
    x_quantized = np.asarray(weight.quantize_activation(samples32), np.float64)
    output = x_quantized @ stored
    if down is not None:
      output = output + smoothed_samples @ (down.astype(np.float64) @ up.astype(np.float64))
    reference = np.asarray(stats.samples, np.float64) @ kernel
    report["output_rel_error"] = _relative(output - reference, reference)
  return weight, report


def _relative(diff, ref) -> float:
  return float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))


def _attention_modules(paths) -> list[str]:
  """Attention modules owning a selected qkv layer, in the (natural) order of ``paths``."""
  return list(dict.fromkeys(p[: -len("/qkv")] for p in paths if p.endswith("attn/qkv")))


def _layer_seed(config, index: int) -> int:
  return int(_get(_get(config, "hadamard"), "seed", 0)) * 100003 + index


def _selected_paths(params, config) -> list[str]:
  return rules.select_layers(params, list(_get(config, "layer_patterns", rules.DIT_BLOCK_LINEARS)))


def _quantize_paths(qparams, params, paths, all_paths, config, calib, layers) -> dict:
  """Quantize ``paths`` of the FP ``params`` into ``qparams`` (returned); reports into ``layers``.
  The Hadamard seed of a layer is fixed by its index in ``all_paths``."""
  for path in paths:
    kernel = rules.get_path(params, path + "/kernel")
    stats = None if calib is None else calib.get(path)
    if calib is not None and stats is None:
      raise ValueError(f"no calibration statistics for layer {path!r}")
    weight, layer_report = quantize_layer(kernel, config, stats,
                                          layer_seed=_layer_seed(config, all_paths.index(path)))
    qparams = rules.set_path(qparams, path + "/kernel", weight)
    layers[path] = layer_report
  return qparams


def _add_attention_quant(qparams, paths, config):
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
  return qparams, attn_paths


def quantize_params(params, model=None, config=None, calib: Optional[Mapping] = None):
  """Pure transform: params -> (quantized params, report), every layer calibrated on the
  given statistics.

  calib: {layer path: act_stats.LayerStats} (from calibrate.act_stats.collect_layer_stats),
  or None (data-free: no GPTQ, no activation clip search, 'auto' activation formats fall back
  to ``act.default_format``).  ``model`` is accepted for symmetry with the other quantizers
  (unused here: all layer shapes come from the params).  Calibration on the outputs of
  already-quantized layers: :func:`quantize_from_config`."""
  del model
  if config is None:
    raise ValueError("quantize_params needs a config (configs/hqdit.py get_config)")
  paths = _selected_paths(params, config)
  layers: dict = {}
  qparams = _quantize_paths(params, params, paths, paths, config, calib, layers)
  qparams, attn_paths = _add_attention_quant(qparams, paths, config)
  return qparams, summarize(params, qparams, layers, attn_paths, calib)


def quantize_params_rtn(params, weight_format: str, patterns: Sequence[str] = rules.DIT_BLOCK_LINEARS,
                        act_format: Optional[str] = None, act_granularity: str = "per_token",
                        clip_ratios: Optional[Sequence[float]] = None):
  """RTN baseline: per-output-channel weights on ``weight_format`` (e.g. 'int2', 'int3',
  'int4', 'int8', 'e2m1'), optional dynamic per-token activations on ``act_format``.

  clip_ratios: None -> max scaling; else per-channel MSE search over these ratios.
  Returns (qparams, {path: relative weight error})."""
  fmt = formats.get_format(weight_format)
  if act_format is not None:
    formats.get_format(act_format)
  qparams = params
  errors = {}
  for path in rules.select_layers(params, patterns):
    kernel = jnp.asarray(rules.get_path(params, path + "/kernel"), jnp.float32)
    if clip_ratios is None:
      scales = rtn.channel_scales(kernel, fmt)
    else:
      scales, _ = rtn.search_channel_scales(kernel, fmt, clip_ratios)
    codes = rtn.quantize_kernel(kernel, fmt, scales)
    weight = FP4Weight.from_codes(codes, scales, fmt.name,
                                  act_format=act_format,
                                  act_granularity=act_granularity if act_format else "none")
    errors[path] = float(jnp.linalg.norm(weight.dequantize() - kernel) /
                         jnp.maximum(jnp.linalg.norm(kernel), 1e-30))
    qparams = rules.set_path(qparams, path + "/kernel", weight)
  return qparams, errors


def summarize(params, qparams, layers, attn_paths, calib) -> dict:
  """Report: per-layer details, format counts, mean errors, storage bytes, drift."""
  from collections import Counter

  report: dict = dict(layers=layers, attention_quantized=attn_paths)
  report["weight_formats"] = dict(Counter(r["weight_format"] for r in layers.values()))
  report["act_formats"] = dict(Counter(str(r["act_format"]) for r in layers.values()))
  report["format_picks"] = format_picks(layers)
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
    report["act_drift"] = drift_report({p: calib[p] for p in layers if p in calib})
  return report


def format_picks(layers: Mapping[str, dict]) -> dict:
  """{layer: {weight_ratio, weight_mse, act_ratio, act_mse, weight, act}}: the format each
  rule picks per layer (None where the format is fixed or the rule was not run) and the one
  used."""
  picks = {}
  for path, r in layers.items():
    w, a = r.get("weight_format_by_rule", {}), r.get("act_format_by_rule", {})
    picks[path] = dict(weight_ratio=w.get("ratio"), weight_mse=w.get("mse"),
                       act_ratio=a.get("ratio"), act_mse=a.get("mse"),
                       weight=r["weight_format"], act=r["act_format"])
  return picks


def format_picks_markdown(report: Mapping) -> str:
  """The per-layer format picks of a quantization report as a markdown table."""
  lines = ["| layer | W ratio rule | W MSE rule | A ratio rule | A MSE rule | W used | A used |",
           "|---|---|---|---|---|---|---|"]
  for path, p in report["format_picks"].items():
    cells = [path] + [str(p[c]) if p[c] is not None else "—" for c in
                      ("weight_ratio", "weight_mse", "act_ratio", "act_mse")] + [str(p["weight"]),
                                                                                str(p["act"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


CALIB_INPUTS = ("quantized", "fp")
SEQUENTIAL_UNITS = ("block", "layer")


def calibration_groups(order: Sequence[str], paths: Sequence[str], inputs: str, unit: str):
  """Groups of layer paths calibrated together, in execution ``order``.

  inputs 'fp': one group (every layer sees the FP model's inputs).  'quantized': the layers
  of one unit (a DiT block, or one layer) are calibrated on inputs produced with every
  earlier unit already quantized."""
  if inputs not in CALIB_INPUTS:
    raise ValueError(f"unknown calib.inputs {inputs!r}; known: {CALIB_INPUTS}")
  if unit not in SEQUENTIAL_UNITS:
    raise ValueError(f"unknown calib.sequential_unit {unit!r}; known: {SEQUENTIAL_UNITS}")
  ordered = [p for p in order if p in set(paths)]
  missing = sorted(set(paths) - set(ordered))
  if missing:
    raise ValueError(f"layers {missing} were not called by the model's forward pass")
  if inputs == "fp":
    return [ordered]
  if unit == "layer":
    return [[p] for p in ordered]
  groups: list[list[str]] = []
  for path in ordered:
    block = path.split("/")[0]
    if groups and groups[-1][0].split("/")[0] == block:
      groups[-1].append(path)
    else:
      groups.append([path])
  return groups


def quantize_from_config(model, params, config, calib_inputs=None):
  """Entry point for experiments: (qparams, report).

  calib_inputs: the FP trajectory dict(x=(S, B, H, W, C), t=(S, B), y=(S, B)), precomputed
  {path: LayerStats} (every layer calibrated on them), or None.  With a trajectory the
  statistics are collected here with config.calib settings; ``calib.inputs='quantized'``
  (default) collects each unit's statistics (clip search, GPTQ Hessians, activation
  ranges) on the inputs produced by the model with every earlier unit already quantized,
  ``'fp'`` on the FP model's inputs."""
  is_trajectory = (isinstance(calib_inputs, Mapping) and "x" in calib_inputs
                   and "t" in calib_inputs)
  if not is_trajectory:
    return quantize_params(params, model, config, calib_inputs)
  from dit_quant_jax.calibrate import act_stats
  ccfg = _get(config, "calib")
  paths = _selected_paths(params, config)
  order = act_stats.execution_order(model, params, calib_inputs)
  groups = calibration_groups(order, paths, _get(ccfg, "inputs", "quantized"),
                              _get(ccfg, "sequential_unit", "block"))
  qparams, layers, calib = params, {}, {}
  for group in groups:
    stats = act_stats.collect_layer_stats(
        model, qparams, calib_inputs, group,
        hessian=bool(_get(_get(config, "gptq"), "enabled", False)),
        samples_per_step=int(_get(ccfg, "samples_per_step", 64)),
        max_samples=int(_get(ccfg, "max_samples", 1024)),
        batch_size=_get(ccfg, "batch_size"), seed=int(_get(ccfg, "seed", 0)))
    calib.update(stats)
    qparams = _quantize_paths(qparams, params, group, paths, config, calib, layers)
  layers = {p: layers[p] for p in paths}
  qparams, attn_paths = _add_attention_quant(qparams, paths, config)
  report = summarize(params, qparams, layers, attn_paths, calib)
  report["calibration_groups"] = len(groups)
  return qparams, report
