"""The one linear module of the project.

Every linear layer of the DiT goes through :class:`Linear`.  Its ``kernel`` parameter is
either a dense ``(in_features, out_features)`` array or any
:class:`dit_quant_jax.quant.qtensor.QuantizedWeight` placed in the params pytree by a
quantizer; the module dispatches on that type and knows nothing else about quantization.

When the ``linear_inputs`` collection is mutable, the module sows its input, which is how
calibration (activation ranges, GPTQ Hessians) observes layer inputs without model edits.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax import struct

from dit_quant_jax.numerics import activation as activation_fn
from dit_quant_jax.quant.qtensor import QuantizedWeight

LINEAR_INPUTS = "linear_inputs"
LAYER_NORM_EPS = 1e-6  # official DiT: nn.LayerNorm(..., elementwise_affine=False, eps=1e-6)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: x: (N, T, D); shift, scale: (N, D)."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(x: jax.Array, eps: float = LAYER_NORM_EPS) -> jax.Array:
  """LayerNorm without affine parameters (biased variance, as torch), computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


@struct.dataclass
class NormModulated:
  """A linear layer's input ``modulate(layer_norm(x), shift, scale)``, not yet computed.

  DiT blocks hand this to :class:`Linear` so that a quantized kernel whose act-quant step can
  fuse the LayerNorm and the modulation (``QuantizedWeight.fuses_row_norm``: HQ-DiT W4A4 /
  W4A8 on GPU) reads x once; every other kernel gets :meth:`materialize`, the same arrays
  as before.  x: (N, T, D); shift, scale: (N, D).

  When the ``linear_inputs`` collection is mutable (calibration), Linear materializes the
  input and runs unfused, so the calibration forward computes the LayerNorm in the model's
  dtype where the fused GPU kernel keeps it in float32 (identical for float32 models).  The
  fused kernel reads the per-sample affine from L2: once per program for one-token tiles in a
  single sample, else per row of each grouped tile (K = 1152: 3 tokens per tile)."""
  x: jax.Array
  shift: jax.Array
  scale: jax.Array
  eps: float = struct.field(pytree_node=False, default=LAYER_NORM_EPS)

  @property
  def shape(self):
    return self.x.shape

  @property
  def dtype(self):
    """The dtype of the materialized input (x, shift and scale promoted)."""
    return jnp.result_type(self.x, self.shift, self.scale)

  def materialize(self) -> jax.Array:
    return modulate(layer_norm(self.x, self.eps), self.shift, self.scale)

Initializer = Callable[..., jax.Array]


class Linear(nn.Module):
  """y = x @ kernel + bias, with kernel: (in_features, out_features) or quantized."""

  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None  # computation dtype; None keeps the input's dtype
  precision: Any = None
  # Output activation (numerics/activation.py, e.g. 'gelu_tanh' for DiT's fc1): fused into a
  # quantized kernel's epilogue where it can (QuantizedWeight.fuses_activation), else applied
  # to the output as the unfused model does (jax.nn.gelu).
  activation: Optional[str] = None

  @nn.compact
  def __call__(self, x) -> jax.Array:
    """x: (..., in_features) array, or a :class:`NormModulated` input -> (..., features)."""
    in_features = x.shape[-1]
    deferred = x if isinstance(x, NormModulated) else None
    if deferred is not None and self.is_mutable_collection(LINEAR_INPUTS):
      x = deferred.materialize()  # calibration observes the layer's real input
    if not isinstance(x, NormModulated):
      self.sow(LINEAR_INPUTS, "x", x)
    if self.has_variable("params", "kernel"):
      # Read directly: nn.Module.param would compare the (possibly quantized) leaves'
      # shapes with a dense initializer's.
      kernel = self.get_variable("params", "kernel")
    else:
      kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
    bias = None
    if self.use_bias:
      if self.has_variable("params", "bias"):
        bias = self.get_variable("params", "bias")
      else:
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    if isinstance(kernel, QuantizedWeight):
      if tuple(kernel.shape) != (in_features, self.features):
        raise ValueError(
            f"{self.path_text()}: quantized kernel has shape {tuple(kernel.shape)}, "
            f"layer expects {(in_features, self.features)}")
      fused = {}
      if self.activation is not None and kernel.fuses_activation(self.activation):
        fused = dict(activation=self.activation)
      if isinstance(x, NormModulated) and kernel.fuses_row_norm():
        y = kernel.linear_row_norm(x.x.astype(dtype), 1 + x.scale, x.shift, x.eps, bias,
                                   **fused)
        return y if fused else activation_fn.unfused(self.activation, y)
    if isinstance(x, NormModulated):
      x = x.materialize()
    x = x.astype(dtype)

    if isinstance(kernel, QuantizedWeight):
      y = kernel.linear(x, bias, **fused)
      return y if fused else activation_fn.unfused(self.activation, y)

    if kernel.shape != (in_features, self.features):
      raise ValueError(
          f"{self.path_text()}: kernel has shape {tuple(kernel.shape)}, "
          f"layer expects {(in_features, self.features)}")
    y = jnp.dot(x, kernel.astype(dtype), precision=self.precision)
    if bias is not None:
      y = y + bias.astype(dtype)
    return activation_fn.unfused(self.activation, y)

  def path_text(self) -> str:
    return "/".join(str(p) for p in self.scope.path) if self.scope is not None else "Linear"
