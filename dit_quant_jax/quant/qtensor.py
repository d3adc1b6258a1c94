"""The contract between quantized weights and the model.

A quantized kernel is a pytree (a ``flax.struct.dataclass``) that stands in the params
pytree exactly where the dense ``kernel`` of a linear layer stood.  The model's single
linear module (``dit_quant_jax.models.layers.Linear``) checks ``isinstance(kernel,
QuantizedWeight)`` and calls ``kernel.linear(x, bias)``; nothing else in the model knows
about quantization.

Every concrete type (``quant.vq4dit.VQWeight``, ``quant.hqdit.FP4Weight``, ...) subclasses
``QuantizedWeight`` and provides:

* ``shape``: the dense kernel's shape ``(in_features, out_features)`` (static metadata);
* ``dequantize(dtype)``: the dense ``(in_features, out_features)`` kernel;
* ``linear(x, bias)``: ``y = x @ W + bias`` for ``x: (..., in_features)``.  The default
  dequantizes and runs a dense dot; types override it to dispatch to Pallas kernels on GPU
  or to quantize activations (HQ-DiT carries its activation spec with the weight).
* ``nbytes_breakdown()``: storage bytes by component, for model-size reports.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp


class QuantizedWeight:
  """Mixin base class of every quantized kernel type (see module docstring)."""

  shape: tuple  # (in_features, out_features), static

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} must implement dequantize()")

  def linear(self, x: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """x: (..., in_features) -> (..., out_features)."""
    kernel = self.dequantize(x.dtype)
    y = jnp.dot(x, kernel)
    if bias is not None:
      y = y + bias.astype(y.dtype)
    return y

  def nbytes_breakdown(self) -> Mapping[str, int]:
    """Bytes of each stored component, e.g. {'codebook': .., 'assignments': ..}."""
    raise NotImplementedError(f"{type(self).__name__} must implement nbytes_breakdown()")

  def fuses_row_norm(self) -> bool:
    """Whether :meth:`linear_row_norm` runs fused (one kernel reads the un-normalized rows)
    on this device; default no: the caller materializes the normalized input."""
    return False

  def linear_row_norm(self, x: jax.Array, mul: jax.Array, add: jax.Array, eps: float,
                      bias: Optional[jax.Array], activation: Optional[str] = None) -> jax.Array:
    """y for the input ``LayerNorm(x) * mul[:, None] + add[:, None]`` (x: (B, T, K), mul /
    add: (B, K); LayerNorm without affine parameters, float32, biased variance), for types
    whose kernel fuses that prologue (:meth:`fuses_row_norm`); activation as in
    :meth:`fuses_activation`."""
    raise NotImplementedError(f"{type(self).__name__} does not fuse the row norm")

  def fuses_activation(self, name: Optional[str]) -> bool:
    """Whether ``linear(x, bias, activation=name)`` (and linear_row_norm's) applies the output
    activation (numerics/activation.py) inside its matmul's epilogue on this device; default
    no: the caller applies it to the output (models.layers.Linear)."""
    del name
    return False

  def in_current_layout(self) -> "QuantizedWeight":
    """The same weight in the storage layout the kernels read now (a weight saved in an older
    layout is converted once, on load); default: unchanged."""
    return self


class ActivationQuantizer:
  """Mixin base class of activation fake-quantizers stored in the params pytree.

  Used for the optional quantization of attention-matmul operands (see
  ``models.dit.Attention``).  ``__call__(x)`` returns x quantized and dequantized.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} must implement __call__()")


def is_quantized(x) -> bool:
  return isinstance(x, (QuantizedWeight, ActivationQuantizer))


# Registry of quantized pytree types by class name, so that checkpoints can record a node's
# type and static metadata and rebuild it on restore (see dit_quant_jax/utils/checkpoint.py).
# Convention for registered types: they are flax.struct.dataclass-es whose array fields are
# pytree nodes and whose static fields (struct.field(pytree_node=False)) are JSON-friendly
# (ints, floats, strings, bools, None, tuples/lists of those).
QUANTIZED_TYPES: dict = {}


def register_quantized_type(cls):
  """Class decorator: make a quantized type restorable from checkpoints."""
  QUANTIZED_TYPES[cls.__name__] = cls
  return cls
