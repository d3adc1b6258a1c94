"""The one linear module of the project.

Every linear layer of the DiT goes through :class:`Linear`.  Its ``kernel`` parameter is
either a dense ``(in_features, out_features)`` array or any
:class:`dit_quant_jax.quant.qtensor.QuantizedWeight` placed in the params pytree by a
quantizer; the module dispatches on that type and knows nothing else about quantization.

When the ``linear_inputs`` collection is mutable, the module sows its input, which is how
calibration (activation ranges, GPTQ Hessians) observes layer inputs without model edits.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_quant_jax.quant.qtensor import QuantizedWeight

LINEAR_INPUTS = "linear_inputs"

Initializer = Callable[..., jax.Array]


class Linear(nn.Module):
  """y = x @ kernel + bias, with kernel: (in_features, out_features) or quantized."""

  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = None  # computation dtype; None keeps the input's dtype
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in_features) -> (..., features)."""
    in_features = x.shape[-1]
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
    x = x.astype(dtype)

    if isinstance(kernel, QuantizedWeight):
      if tuple(kernel.shape) != (in_features, self.features):
        raise ValueError(
            f"{self.path_text()}: quantized kernel has shape {tuple(kernel.shape)}, "
            f"layer expects {(in_features, self.features)}")
      return kernel.linear(x, bias)

    if kernel.shape != (in_features, self.features):
      raise ValueError(
          f"{self.path_text()}: kernel has shape {tuple(kernel.shape)}, "
          f"layer expects {(in_features, self.features)}")
    y = jnp.dot(x, kernel.astype(dtype), precision=self.precision)
    if bias is not None:
      y = y + bias.astype(dtype)
    return y

  def path_text(self) -> str:
    return "/".join(str(p) for p in self.scope.path) if self.scope is not None else "Linear"
