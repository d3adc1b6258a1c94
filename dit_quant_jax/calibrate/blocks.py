"""Block-wise views of a DiT for calibration: embed, run blocks one by one, compare outputs.

VQ4DiT calibration compares the FP and the quantized model block by block, in one of two
ways (:func:`student_block_outputs`):

  end to end   the quantized model runs as a whole on the FP model's x_t, so block i sees
               the quantized block i-1's output and gradients flow through the earlier
               quantized blocks (public VQ4DiT code: forward hooks on every DiTBlock of the
               student, sample_quant.py / gaussian_diffusion.py p_sample_loop_progressive_quant);
  FP input     every block is fed its FP input (stop-gradient), so block i's error measures
               block i's weights alone.

Blocks run as standalone modules (:func:`block_module`) on the ``blocks_i`` sub-tree of the
params; the conditioning c comes from the (unquantized) embedders.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dit_quant_jax.models.dit import DiTBlock

BLOCK_LOSSES = ("end_to_end", "fp_input")


def block_name(index: int) -> str:
  return f"blocks_{index}"


def embed(model, params, x: jax.Array, t: jax.Array, y: jax.Array, dropout_rng=None):
  """x (N, H, W, C), t (N,), y (N,) -> (tokens (N, T, D), c (N, D)), as DiT.__call__ computes them.

  dropout_rng: run the label embedder in training mode (labels drop to the null class with
  the model's class_dropout_prob) with this key; None: inference mode.
  """
  if dropout_rng is None:
    return model.apply({"params": params}, x, t, y, method=type(model).embed)
  return model.apply({"params": params}, x, t, y, True, method=type(model).embed,
                     rngs={"dropout": dropout_rng})


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


def fp_outputs_and_block_outputs(model, params, x, t, y, cfg_scale=None):
  """One FP forward (``forward_with_cfg`` when cfg_scale is set, as the sampler calls it).

  x (N, H, W, C), t (N,), y (N,) -> (model output (N, H, W, C_out), [block i output (N, T, D)]).
  """
  is_block = lambda module, _: isinstance(module, DiTBlock)  # noqa: E731
  if cfg_scale is None or cfg_scale == 1.0:
    out, state = model.apply({"params": params}, x, t, y, capture_intermediates=is_block)
  else:
    out, state = model.apply({"params": params}, x, t, y, cfg_scale, method=type(model).forward_with_cfg,
                             capture_intermediates=is_block)
  captured = state["intermediates"]
  return out, [captured[block_name(i)]["__call__"][0] for i in range(model.depth)]


def student_block_outputs(model, params, x, t, y, fp_block_outputs, depth: int, loss: str = "end_to_end",
                          dropout_rng=None):
  """Outputs of blocks 0..depth-1 of the model ``params`` (possibly quantized) -> list of (N, T, D).

  loss "end_to_end": block i's input is this model's block i-1 output; "fp_input": it is
  stop_gradient(fp_block_outputs[i-1]).  Block 0's input is this model's token embedding
  (FP embedders).  dropout_rng: see :func:`embed`.
  """
  if loss not in BLOCK_LOSSES:
    raise ValueError(f"unknown block loss {loss!r}; expected one of {BLOCK_LOSSES}")
  tokens, c = embed(model, params, x, t, y, dropout_rng)
  outputs = []
  for i in range(depth):
    if loss == "fp_input" and i > 0:
      tokens = jax.lax.stop_gradient(fp_block_outputs[i - 1])
    tokens = apply_block(model, params[block_name(i)], tokens, c)
    outputs.append(tokens)
  return outputs
