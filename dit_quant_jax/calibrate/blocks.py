"""Block-wise views of a DiT for calibration: embed, run blocks one by one, compare outputs.

Block-wise calibration (VQ4DiT Sec. 3.3) compares the FP and the quantized model block by
block.  Here every block's *FP input* feeds both the FP and the quantized block, so block i's
error measures block i's weights alone and errors of earlier blocks do not propagate (the
conditioning c comes from the unquantized embedders and is shared).  Blocks run as
standalone modules (:func:`block_module`) on the ``blocks_i`` sub-tree of the params.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dit_quant_jax.models.dit import DiTBlock


def block_name(index: int) -> str:
  return f"blocks_{index}"


def embed(model, params, x: jax.Array, t: jax.Array, y: jax.Array):
  """x (N, H, W, C), t (N,), y (N,) -> (tokens (N, T, D), c (N, D)), as DiT.__call__ computes them."""
  return model.apply({"params": params}, x, t, y, method=type(model).embed)


def block_module(model) -> DiTBlock:
  """A standalone DiTBlock with the model's hyperparameters.

  Built here with ``parent=None``: ``DiT.block_module()`` is a method of an (unbound) Flax
  module, so a module it creates is auto-parented to the DiT and fails outside ``apply``.
  """
  return DiTBlock(model.hidden_size, model.num_heads, model.mlp_ratio, dtype=model.dtype, parent=None)


def apply_block(model, block_params, tokens: jax.Array, c: jax.Array) -> jax.Array:
  """One DiT block: tokens (N, T, D), c (N, D) -> (N, T, D).  block_params: params['blocks_i']."""
  return block_module(model).apply({"params": block_params}, tokens, c)


def fp_block_inputs(model, params, x, t, y, depth: int | None = None):
  """FP forward through the first ``depth`` blocks (default all).

  -> (c (N, D), inputs: list of (N, T, D), the input of block i at index i, and the output of
  the last block at index depth).
  """
  depth = model.depth if depth is None else depth
  tokens, c = embed(model, params, x, t, y)
  inputs = [tokens]
  for i in range(depth):
    tokens = apply_block(model, params[block_name(i)], tokens, c)
    inputs.append(tokens)
  return c, inputs


def blockwise_mse(model, fp_params, quant_params, x, t, y, block_indices: Sequence[int] | None = None):
  """Per-block MSE between FP and quantized block outputs, both fed the FP block input.

  -> (len(block_indices),) float32.  block_indices default: all blocks.
  """
  block_indices = list(range(model.depth)) if block_indices is None else list(block_indices)
  depth = max(block_indices) + 1 if block_indices else 0
  c, inputs = fp_block_inputs(model, fp_params, x, t, y, depth)
  errors = []
  for i in block_indices:
    quantized = apply_block(model, quant_params[block_name(i)], inputs[i], c)
    errors.append(jnp.mean(jnp.square(quantized.astype(jnp.float32) - inputs[i + 1].astype(jnp.float32))))
  return jnp.stack(errors) if errors else jnp.zeros((0,), jnp.float32)
