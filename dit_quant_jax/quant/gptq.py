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

import jax.numpy as jnp
import numpy as np

from dit_quant_jax.quant import formats

DEFAULT_DAMP = 0.01  # GPTQ paper, Section 4 ("dampening ... 1% of the average diagonal")
DEFAULT_BLOCK_SIZE = 128  # GPTQ paper, lazy batch updates of B = 128 columns


def gptq_quantize(kernel, hessian, fmt, scales, *, damp: float = DEFAULT_DAMP,
                  block_size: int = DEFAULT_BLOCK_SIZE, act_order: bool = False):
  """GPTQ-quantize kernel (K, N) on ``fmt`` with per-output-channel ``scales`` (N,).

  hessian: (K, K), H = 2 X^T X / n of the layer inputs.  Returns (codes (K, N) uint8
  sign-magnitude codes of W / scale, dequantized kernel (K, N) float32).

  Runs in float64 numpy on the host: every rounding decision is taken on float64 values, so
  the thread-count- and build-dependent last bits of BLAS/LAPACK (float64 ~1e-16 relative)
  practically never flip a code.  The previous float32 XLA version gave different codes
  under different XLA CPU thread settings on the same inputs (README, HQ-DiT determinism)."""
  fmt = formats.get_format(fmt)
  kernel = np.asarray(kernel, np.float64)
  hessian = np.asarray(hessian, np.float64)
  if kernel.ndim != 2:
    raise ValueError(f"expected a (in_features, out_features) kernel, got {kernel.shape}")
  k, n = kernel.shape
  if hessian.shape != (k, k):
    raise ValueError(f"Hessian of shape {hessian.shape} does not match a kernel with {k} inputs")
  scales = np.asarray(scales, np.float32)
  if scales.shape != (n,):
    raise ValueError(f"scales of shape {scales.shape} do not match {n} output channels")
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  if damp < 0:
    raise ValueError(f"damp must be non-negative, got {damp}")
  block_size = int(min(block_size, k))
  dequant = _gptq_numpy(kernel, hessian, scales.astype(np.float64), float(damp), fmt, block_size,
                        bool(act_order))
  safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
  dequant32 = dequant.astype(np.float32)
  codes = formats.encode(jnp.asarray(dequant32 / safe[None, :]), fmt.name)
  return codes, jnp.asarray(dequant32)


def round_to_grid_numpy(x: np.ndarray, fmt: formats.Format) -> np.ndarray:
  """Nearest grid value of x (float64, any shape), ties to the even magnitude index,
  saturating: the rounding rule of ``quant.formats`` in numpy."""
  mags = np.asarray(fmt.magnitudes, np.float64)
  mid = (mags[1:] + mags[:-1]) / 2
  a = np.abs(x)
  idx = np.searchsorted(mid, a, side="left")  # midpoints strictly below |x|
  tie = (idx < len(mid)) & (a == mid[np.minimum(idx, len(mid) - 1)])
  idx = np.where(tie & (idx % 2 == 1), idx + 1, idx)
  return np.sign(x) * mags[idx]


def _gptq_numpy(kernel, hessian, scales, damp, fmt, block_size, act_order):
  """Algorithm 1 of the module doc; returns the dequantized (K, N) kernel, float64."""
  k, n = kernel.shape
  safe_scales = np.where(scales > 0, scales, 1.0)
  w = kernel.T.copy()  # (N, K): rows are output channels, columns the inputs GPTQ walks over
  hessian = hessian.copy()
  dead = np.diag(hessian) == 0
  hessian[dead, dead] = 1.0
  w[:, dead] = 0.0
  perm = None
  if act_order:
    perm = np.argsort(-np.diag(hessian), kind="stable")
    w = w[:, perm]
    hessian = hessian[perm][:, perm]
  hessian[np.diag_indices(k)] += damp * np.mean(np.diag(hessian))
  # Upper Cholesky factor of H^-1 (Hinv = U^T U): with H = L L^T, H^-1 = L^-T L^-1.
  lower = np.linalg.cholesky(hessian)
  lower_inv = np.linalg.solve(lower, np.eye(k))  # L^-1 (lower triangular)
  upper = np.linalg.cholesky(lower_inv.T @ lower_inv).T
  q = np.zeros_like(w)
  for start in range(0, k, block_size):
    stop = min(start + block_size, k)
    w_block = w[:, start:stop].copy()
    err_block = np.zeros_like(w_block)
    u_block = upper[start:stop, start:stop]
    for i in range(stop - start):
      col = w_block[:, i]
      q_col = round_to_grid_numpy(col / safe_scales, fmt) * safe_scales
      err = (col - q_col) / u_block[i, i]
      # u_block[i, j] = 0 for j < i: only the columns not yet quantized move.
      w_block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
      q[:, start + i] = q_col
      err_block[:, i] = err
    # Lazy batch update of every later column.
    w[:, stop:] -= err_block @ upper[start:stop, stop:]
  if perm is not None:
    q = q[:, np.argsort(perm, kind="stable")]
  return q.T


def layer_output_error(kernel, dequantized, inputs) -> float:
  """Relative output error ||X W - X W_q||_F / ||X W||_F on inputs X: (n, K)."""
  x = np.asarray(inputs, np.float64)
  ref = x @ np.asarray(kernel, np.float64)
  diff = ref - x @ np.asarray(dequantized, np.float64)
  return float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
