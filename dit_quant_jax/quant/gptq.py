"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1) on an arbitrary quantization grid.

For a layer y = x @ W with W: (K, N) and the input Hessian of the layer-wise squared error
``H = 2 X^T X / n`` (X: (n, K) calibration inputs), input rows of W are quantized one at a
time in order, and each row's rounding error is compensated on the rows not yet quantized
using the upper Cholesky factor U of H^-1 (Hinv = U^T U):

  q_k = Q(w_k);  e = (w_k - q_k) / U[k, k];  w_j -= e * U[k, j]  for j > k.

Updates are applied lazily per block of ``block_size`` rows (inside a block row by row,
to the rest of the matrix once per block with one matmul).  The grid enters only through
Q(w) = scale[n] * round_to_grid(w / scale[n]) with fixed per-output-channel scales, so every
``quant.formats`` format works (FP4 E1M2/E2M1/E3M0, FP8, INT-b).  Options: damping
``damp * mean(diag H)`` added to the diagonal (paper: 1%), act-order (rows in descending
diag(H), paper's "act-order" heuristic).  Rows with diag(H) = 0 (inputs never active) are
set to zero, as in the reference implementation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dit_quant_jax.quant import formats

DEFAULT_DAMP = 0.01  # GPTQ paper, Section 4 ("dampening ... 1% of the average diagonal")
DEFAULT_BLOCK_SIZE = 128  # GPTQ paper, lazy batch updates of B = 128 columns


def gptq_quantize(kernel, hessian, fmt, scales, *, damp: float = DEFAULT_DAMP,
                  block_size: int = DEFAULT_BLOCK_SIZE, act_order: bool = False):
  """GPTQ-quantize kernel (K, N) on ``fmt`` with per-output-channel ``scales`` (N,).

  hessian: (K, K), H = 2 X^T X / n of the layer inputs.  Returns (codes (K, N) uint8
  sign-magnitude codes of W / scale, dequantized kernel (K, N) float32)."""
  fmt = formats.get_format(fmt)
  kernel = jnp.asarray(kernel, jnp.float32)
  hessian = jnp.asarray(hessian, jnp.float32)
  if kernel.ndim != 2:
    raise ValueError(f"expected a (in_features, out_features) kernel, got {kernel.shape}")
  k, n = kernel.shape
  if hessian.shape != (k, k):
    raise ValueError(f"Hessian of shape {hessian.shape} does not match a kernel with {k} inputs")
  scales = jnp.asarray(scales, jnp.float32)
  if scales.shape != (n,):
    raise ValueError(f"scales of shape {scales.shape} do not match {n} output channels")
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  if damp < 0:
    raise ValueError(f"damp must be non-negative, got {damp}")
  block_size = int(min(block_size, k))
  return _gptq(kernel, hessian, scales, jnp.float32(damp), fmt.name, block_size, bool(act_order))


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _gptq(kernel, hessian, scales, damp, fmt_name, block_size, act_order):
  k, n = kernel.shape
  safe_scales = jnp.where(scales > 0, scales, 1.0)
  w = kernel.T  # (N, K): rows are output channels, columns the inputs GPTQ walks over
  diag = jnp.diag(hessian)
  dead = diag == 0
  hessian = hessian + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[None, :], 0.0, w)
  if act_order:
    perm = jnp.argsort(-jnp.diag(hessian))
    w = w[:, perm]
    hessian = hessian[perm][:, perm]
  hessian = hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(k, dtype=hessian.dtype)

  padded = -(-k // block_size) * block_size
  pad = padded - k
  if pad:  # identity Hessian and zero weights on padding: quantized to 0, no error
    w = jnp.pad(w, ((0, 0), (0, pad)))
    hessian = jnp.pad(hessian, ((0, pad), (0, pad))) + jnp.diag(
        jnp.concatenate([jnp.zeros((k,)), jnp.ones((pad,))]))
  lower = jnp.linalg.cholesky(hessian)
  hessian_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(padded, dtype=hessian.dtype))
  upper = jnp.linalg.cholesky(hessian_inv).T  # Hinv = U^T U, U upper triangular

  def quant(col):  # col: (N,)
    return formats.quantize_to_grid(col / safe_scales, fmt_name) * safe_scales

  def block_step(b, carry):
    w, q = carry
    start = b * block_size
    w_block = jax.lax.dynamic_slice(w, (0, start), (n, block_size))
    u_block = jax.lax.dynamic_slice(upper, (start, start), (block_size, block_size))

    def column_step(i, inner):
      w_block, q_block, err_block = inner
      col = w_block[:, i]
      q_col = quant(col)
      err = (col - q_col) / u_block[i, i]
      # u_block[i, j] = 0 for j < i: only the columns not yet quantized move.
      w_block = w_block - err[:, None] * u_block[i][None, :]
      return w_block, q_block.at[:, i].set(q_col), err_block.at[:, i].set(err)

    zeros = jnp.zeros((n, block_size), w.dtype)
    _, q_block, err_block = jax.lax.fori_loop(0, block_size, column_step, (w_block, zeros, zeros))
    q = jax.lax.dynamic_update_slice(q, q_block, (0, start))
    # Lazy batch update of every later column (rows of U before `start` are zero there; the
    # block's own columns are already final in q).
    u_rows = jax.lax.dynamic_slice(upper, (start, 0), (block_size, padded))
    w = w - err_block @ u_rows
    return w, q

  _, q = jax.lax.fori_loop(0, padded // block_size, block_step, (w, jnp.zeros_like(w)))
  q = q[:, :k]
  if act_order:
    q = q[:, jnp.argsort(perm)]
  dequant = q.T
  codes = formats.encode(dequant / safe_scales[None, :], fmt_name)
  return codes, dequant


def layer_output_error(kernel, dequantized, inputs) -> float:
  """Relative output error ||X W - X W_q||_F / ||X W||_F on inputs X: (n, K)."""
  x = np.asarray(inputs, np.float64)
  ref = x @ np.asarray(kernel, np.float64)
  diff = ref - x @ np.asarray(dequantized, np.float64)
  return float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
