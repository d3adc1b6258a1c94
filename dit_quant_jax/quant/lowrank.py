"""SVDQuant-style low-rank branch (Li et al., 2025, "SVDQuant: Absorbing Outliers by Low-Rank
Components for 4-Bit Diffusion Models"): ``W = L1 @ L2 + R``.

The rank-r branch ``L1: (K, r)``, ``L2: (r, N)`` is the truncated SVD of W (``L1 = U_r
sqrt(S_r)``, ``L2 = sqrt(S_r) V_r^T``), stored and run in bfloat16 on the unquantized input;
the residual ``R = W - L1 @ L2`` goes through the 4-bit path (Hadamard, formats, clipping,
GPTQ in ``quant.hqdit``).  The residual is computed from the *bfloat16-rounded* factors, so
``L1 @ L2 + R == W`` holds before R is quantized (float64, to rounding), and the branch adds
no error of its own.  SVDQuant first smooths (``quant.smoothquant``) so that the branch
absorbs the activation outliers migrated into W; both are switches of the HQ-DiT config.
Computed in float64 numpy (LAPACK SVD; the product L1 @ L2 does not depend on the sign
convention of the singular vectors).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

BRANCH_DTYPE = jnp.bfloat16  # SVDQuant runs the branch in 16-bit


def split_low_rank(kernel, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """kernel: (K, N) -> (down (K, r) bf16, up (r, N) bf16, residual (K, N) float64)."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2:
    raise ValueError(f"expected a (in_features, out_features) kernel, got shape {kernel.shape}")
  if not 1 <= int(rank) <= min(kernel.shape):
    raise ValueError(f"low-rank branch rank must be in [1, {min(kernel.shape)}] for a kernel of "
                     f"shape {kernel.shape}, got {rank}")
  rank = int(rank)
  u, s, vt = np.linalg.svd(kernel, full_matrices=False)
  root = np.sqrt(s[:rank])
  down = np.asarray(jnp.asarray(u[:, :rank] * root[None, :], BRANCH_DTYPE))
  up = np.asarray(jnp.asarray(root[:, None] * vt[:rank], BRANCH_DTYPE))
  residual = kernel - down.astype(np.float64) @ up.astype(np.float64)
  return down, up, residual


def branch_output(x, down, up):
  """(x @ L1) @ L2 in bfloat16 with float32 accumulation.  x: (..., K) -> (..., N) float32."""
  h = jnp.dot(x.astype(BRANCH_DTYPE), down, preferred_element_type=jnp.float32)
  return jnp.dot(h.astype(BRANCH_DTYPE), up, preferred_element_type=jnp.float32)
