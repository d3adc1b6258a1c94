"""Hopper (sm_90a) version of :func:`fp4_mma.fp4_mma` in Pallas Mosaic GPU: TMA loads, a
pipelined K loop, WGMMA on the int8 / FP8 E4M3 images (FP8 tensor cores are not reachable from
Pallas-Triton: it leaves tt.dot's max_num_imprecise_acc at 0, so Triton picks mma.sync on f16).

Structure (modelled on jax's ``pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py`` and
``ragged_dot_mgpu.py``; written from their ideas, not copied): a persistent grid of one program
per SM walks the (M / block_m) x (N / block_n) output tiles; per tile, ``emit_pipeline`` streams
the two x halves ``(block_m, 64)`` (8-bit image, K-major) and the packed weight tile
``(block_n, 64)``
(4-bit codes in fp4_mma's K-major tiled layout: byte r holds k = r and k = 64 + r) into shared
memory with TMA, ``max_concurrent_steps`` deep.  The warpgroup decodes each nibble plane in
registers (shift / mask / or: ``numerics.fp4``), writes the 8-bit image to a shared-memory
scratch tile, fences (``commit_smem``) and issues ``wgmma(acc, x_half, w_half^T)`` (8-bit wgmma
wants both operands K-major: x rows and the weight rows are).  The epilogue scales by the row and
column scales, adds the bias, casts and stores through shared memory with TMA.

Requires jax >= 0.11 (the Mosaic GPU Pallas API used here; imported lazily, so this module
imports under jax 0.10.2 too) and M, N multiples of the tiles, K_pad = K (a multiple of 128).
What was verified off-GPU: it traces and lowers to a ``mosaic_gpu`` custom call under an
abstract H100 (``lower_for_abstract_h100``; tests/test_kernels_fp4.py runs it where jax >= 0.11),
and in Pallas's GPU interpreter (``interpret=True``, CPU) it matches float64 at the DiT tile.
It has not been compiled to SASS nor run on a GPU (the interpreter does not model the async
proxy, so the fences are unchecked), so the dispatcher must not pick it before a GPU test; the
benchmark times it (``gemm_mosaic_*``) beside the dispatched Triton GEMM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dit_quant_jax.kernels import fp4_mma
from dit_quant_jax.numerics import fp4

HOPPER_SMS = 132  # H100 SXM / H200 streaming multiprocessors (NVIDIA data sheets)
DOT_KINDS = ("int8", "fp8")
MIN_JAX = (0, 11)  # checked: lowers under 0.11.2 and 0.12.0.1; 0.10.2 fails in layout inference


def _mosaic():
  """The Mosaic GPU Pallas module, or a clear error where this jax lacks it."""
  version = tuple(int(part) for part in jax.__version__.split(".")[:2])
  if version < MIN_JAX:
    raise NotImplementedError(f"fp4_mosaic needs jax >= {MIN_JAX[0]}.{MIN_JAX[1]} (jax 0.10's "
                              f"Mosaic GPU layout inference rejects this kernel); this is jax "
                              f"{jax.__version__}")
  try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
  except ImportError as err:  # pragma: no cover (depends on the jax version)
    raise NotImplementedError(f"Pallas Mosaic GPU is not available in jax {jax.__version__}: "
                              f"{err}") from err
  for name in ("kernel", "emit_pipeline", "wgmma", "SMEM", "ACC", "nd_loop", "commit_smem"):
    if not hasattr(plgpu, name):
      raise NotImplementedError(f"jax {jax.__version__}'s Pallas Mosaic GPU lacks plgpu.{name}; "
                                f"fp4_mosaic needs jax >= 0.11")
  return pl, plgpu


def available() -> bool:
  try:
    _mosaic()
  except NotImplementedError:
    return False
  return True


def interpreter_available() -> bool:
  """Pallas's GPU interpreter (plgpu.InterpretGPUParams) is in this jax, with the kernel API."""
  if not available():
    return False
  return hasattr(_mosaic()[1], "InterpretGPUParams")


def _swizzled(plgpu, minor_bytes: int):
  swizzle = plgpu.find_swizzle(minor_bytes * 8)
  return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


def fp4_mosaic_matmul(x, row_scale, weight: fp4_mma.PackedFp4Weight, bias=None, *,
                      dot_kind: str = "int8", block_m: int = 128, block_n: int = 128,
                      max_concurrent_steps: int = 3, num_programs: int = HOPPER_SMS,
                      out_dtype=jnp.bfloat16, interpret: bool = False):
  """Same function as ``fp4_mma.fp4_mma(x, row_scale, weight, bias, dot_kind=...)``.

  x: (M, K) int8 (dot_kind 'int8') or float8_e4m3fn ('fp8'); row_scale: (M,) float32;
  weight: PackedFp4Weight with K a multiple of 128; M % block_m == N % block_n == 0.
  interpret: run in Pallas's GPU interpreter (CPU; jax >= 0.11, one program: pass
  num_programs=1), with its race detector on.  It checks the tiling, the pipeline's block
  indexing, the decode, the wgmma operand layouts and the epilogue; it does not model the
  async proxy (a missing ``commit_smem`` fence goes unnoticed: tried).
  """
  pl, plgpu = _mosaic()
  if interpret and num_programs != 1:
    raise ValueError(f"the GPU interpreter runs one program: pass num_programs=1 with "
                     f"interpret=True (got {num_programs})")
  if dot_kind not in DOT_KINDS:
    raise ValueError(f"fp4_mosaic dot kind must be one of {DOT_KINDS}, got {dot_kind!r}")
  fp4_mma._check_operands(x, row_scale, weight, bias, dot_kind)
  m_rows, k_features = x.shape
  n_features = weight.n_features
  if k_features % fp4_mma.TILE_K:
    raise ValueError(f"fp4_mosaic needs K a multiple of {fp4_mma.TILE_K}, got {k_features}")
  if m_rows % block_m or n_features % block_n:
    raise ValueError(f"fp4_mosaic needs M % {block_m} == 0 and N % {block_n} == 0, got "
                     f"M = {m_rows}, N = {n_features}")
  code = weight.code
  half = fp4_mma.HALF_TILE_K
  k_steps = k_features // fp4_mma.TILE_K
  m_tiles, n_tiles = m_rows // block_m, n_features // block_n
  image_dtype = jnp.int8 if dot_kind == "int8" else jnp.float8_e4m3fn
  acc_dtype = jnp.int32 if dot_kind == "int8" else jnp.float32
  col_scale = weight.column_scale(dot_kind)
  bias = fp4_mma._bias_or_zeros(bias, n_features)
  row_scale = row_scale.astype(jnp.float32)
  half_transforms = _swizzled(plgpu, half)  # x halves and weight tiles: 64-byte rows

  def decode_plane(byte_tile, plane):
    codes = byte_tile.astype(jnp.int32)
    codes = (lax.bitwise_and(codes, np.int32(fp4_mma.NIBBLE_MASK)) if plane == 0
             else lax.shift_right_logical(codes, np.int32(4)))
    if dot_kind == "fp8":
      return lax.bitcast_convert_type(fp4.e4m3_bits(codes, code).astype(jnp.uint8),
                                      jnp.float8_e4m3fn)
    return fp4.int8_values(codes, code).astype(jnp.int8)

  def body(x_gmem, rs_gmem, w_gmem, cs_gmem, b_gmem, out_gmem):

    @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
    def _tile_loop(loop_info):
      (tile,) = loop_info.index
      mi, ni = lax.div(tile, n_tiles), lax.rem(tile, n_tiles)

      def acc_scope(acc_ref, w_image_smem):

        def k_step(_, x_low_smem, x_high_smem, w_smem):
          for plane in (0, 1):
            w_image_smem[plane] = decode_plane(w_smem[...], plane)
          plgpu.commit_smem()
          for plane, x_half in enumerate((x_low_smem, x_high_smem)):
            plgpu.wgmma(acc_ref, x_half, w_image_smem.at[plane].transpose((1, 0)))
          plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(
            k_step,
            grid=(k_steps,),
            in_specs=[
                plgpu.BlockSpec((block_m, half), lambda k: (mi, 2 * k),
                                transforms=half_transforms),
                plgpu.BlockSpec((block_m, half), lambda k: (mi, 2 * k + 1),
                                transforms=half_transforms),
                plgpu.BlockSpec((block_n, half), lambda k: (ni, k), transforms=half_transforms),
            ],
            max_concurrent_steps=max_concurrent_steps,
        )(x_gmem, x_gmem, w_gmem)
        return acc_ref[...]

      # The decoded-image scratch (SMEM) and the accumulator (registers) in separate scopes:
      # the GPU interpreter takes no scope that mixes register and memory allocations.
      def image_scope(w_image_smem):
        return pl.run_scoped(lambda acc_ref: acc_scope(acc_ref, w_image_smem),
                             plgpu.ACC((block_m, block_n), acc_dtype))

      acc = pl.run_scoped(image_scope,
                          plgpu.SMEM((2, block_n, half), image_dtype, transforms=half_transforms))
      @functools.partial(pl.run_scoped,
                         out_smem=plgpu.SMEM((block_m, block_n), out_dtype),
                         rows_smem=plgpu.SMEM((block_m,), jnp.float32),
                         cols_smem=plgpu.SMEM((block_n,), jnp.float32),
                         bias_smem=plgpu.SMEM((block_n,), jnp.float32),
                         barrier=plgpu.Barrier(num_arrivals=3))
      def _store(out_smem, rows_smem, cols_smem, bias_smem, barrier):
        # Epilogue vectors: GMEM -> SMEM by TMA (register loads straight from GMEM are not
        # supported), then broadcast against the accumulator's WGMMA layout.
        plgpu.copy_gmem_to_smem(rs_gmem.at[pl.ds(mi * block_m, block_m)], rows_smem, barrier)
        plgpu.copy_gmem_to_smem(cs_gmem.at[pl.ds(ni * block_n, block_n)], cols_smem, barrier)
        plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(ni * block_n, block_n)], bias_smem, barrier)
        plgpu.barrier_wait(barrier)
        y = (acc.astype(jnp.float32) * rows_smem[...][:, None] * cols_smem[...][None, :]
             + bias_smem[...][None, :])
        out_smem[...] = y.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            out_smem, out_gmem.at[pl.ds(mi * block_m, block_m), pl.ds(ni * block_n, block_n)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m_rows, n_features), out_dtype),
      grid=(num_programs,),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **({"interpret": plgpu.InterpretGPUParams(detect_races=True)} if interpret else {}),
  )
  return kernel(x, row_scale, weight.tiles, col_scale, bias)


def lower_for_abstract_h100(m_rows: int, k_features: int, n_features: int, *,
                            dot_kind: str = "int8", **options) -> str:
  """Lower fp4_mosaic_matmul at (M, K, N) for an abstract H100 (no GPU needed) and return the
  StableHLO text (it holds one ``mosaic_gpu`` custom call when the lowering succeeded)."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                       num_cores=HOPPER_SMS, platform="gpu")
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
  weight = fp4_mma.PackedFp4Weight(
      jax.ShapeDtypeStruct((n_features, fp4_mma.padded_k(k_features) // 2), jnp.uint8),
      jax.ShapeDtypeStruct((n_features,), jnp.float32), "e2m1", k_features)
  args = (jax.ShapeDtypeStruct((m_rows, k_features), fp4_mma.x_dtype_for(dot_kind)),
          jax.ShapeDtypeStruct((m_rows,), jnp.float32), weight)
  fn = jax.jit(functools.partial(fp4_mosaic_matmul, dot_kind=dot_kind, **options))
  checks = [jax.export.DisabledSafetyCheck.custom_call(name)
            for name in ("mosaic_gpu", "mosaic_gpu_v2")]
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args)
  return exported.mlir_module()
