"""Kernel benchmark library: correctness pass, device-side timing against the bf16 dot, paths.

``experiments/bench_kernels.py`` is the thin absl front end; everything it does lives here.

1. correctness: every kernel (and every VQ path the dispatcher can pick) vs its plain-jnp
   reference on fresh random operands;
2. peaks measured in the same run: a large bf16 matmul (FLOP/s) and a large device copy (B/s);
3. every variant at the DiT-XL/2 linear shapes (K x N) and token counts M against the
   bf16-output XLA dot: device time per call, speedup = t_bf16 / t_kernel, achieved FLOP/s and
   B/s, the roofline floor (bench/roofline.py, with the measured peaks) and, for the
   dispatched ops, the path the dispatcher took;
4. a markdown report (rewritten after every shape, so a run cut short keeps its rows).

Timing (``device_time``): one jitted program runs the call ``reps`` times back to back on the
device inside a ``lax.fori_loop``, each repetition cycling through ``sets`` independent copies of
the operands whose total size exceeds the L2 cache (so the weight is read from HBM, as in a
model where each layer's weight is touched once per step); the host synchronises once per
program, so launch and dispatch overhead from Python is amortised over reps x sets calls.  The
median over ``trials`` programs, divided by reps x sets, is the time per call.  Outputs pass an
``optimization_barrier`` so XLA cannot shrink the work, and each call's operands pass one with
the loop carry so XLA cannot hoist the call out of the loop (``repetition_program``).  This is device-stream time (kernel
time plus the in-stream gaps between kernels), not a per-kernel CUPTI trace.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import statistics
import time
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from dit_quant_jax.bench import roofline
from dit_quant_jax.kernels import act_quant as aq
from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import dispatch
from dit_quant_jax.kernels import fp4_matmul as fm
from dit_quant_jax.kernels import fp4_mma
from dit_quant_jax.kernels import vq_matmul as vq
from dit_quant_jax.numerics import activation as activation_fn
from dit_quant_jax.numerics import packing
from dit_quant_jax.quant import hadamard

# DiT-XL/2 (hidden 1152, MLP ratio 4): attn qkv, attn proj, mlp fc1, mlp fc2, adaLN modulation.
DIT_XL2_SHAPES = ((1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152), (1152, 6912))
# Tokens per call: 16 (adaLN rows, tiny batch) ... 16384 (64 images x 256 patches at 256px).
DIT_XL2_TOKENS = (16, 256, 1024, 4096, 16384)
SMOKE_SHAPES = ((64, 96), (96, 64))
SMOKE_TOKENS = (8, 37)
L2_BYTES = 60 * 2**20  # H200: 60 MiB (H100: 50 MiB); rotate operand sets beyond this
ROTATION_FACTOR = 2  # operand bytes across all sets >= ROTATION_FACTOR x L2_BYTES
MAX_SETS = 16

# Kernel variants timed against the bf16 dot (name -> description in the report).
VARIANTS = {
    "bf16_xla": "x @ W + b, bf16 operands, bf16 output, XLA dot (baseline)",
    "w4a16_xla": "full FP4 decode + XLA dot (what runs without the kernel)",
    "vq_w2": "VQ k=256, d=4 (2 bits/weight), the dispatcher's path",
    "vq_w3": "VQ k=64, d=2 (3 bits/weight), the dispatcher's path",
    "vq_w2_splitk": "VQ W2, split-K kernel (GEMV path) forced",
    "vq_w2_tiled": "VQ W2, tiled kernel forced",
    "vq_w2_dequant_dot": "VQ W2, XLA decode to bf16 + bf16 dot forced",
    "vq_w2_no_stream_k": "VQ W2, tiled kernel forced, its best launch without stream-K "
                         "(against vq_w2 where the dispatcher streams)",
    "fp4_w4a16_no_stream_k": "fp4_w4a16's Triton kernel forced, its best launch without "
                             "stream-K",
    "vq_w2_splitk_128": "VQ W2, split-K kernel with 128-column tiles only (its K split "
                        "re-chosen; against vq_w2 where the dispatcher takes narrower tiles)",
    "fp4_w4a16_splitk_128": "fp4_w4a16's small-M kernel with 128-column tiles only (against "
                            "fp4_w4a16 where the dispatcher takes narrower tiles)",
    "w4a16": "FP4 E2M1 weights, bf16 activations, Pallas",
    "w4a8": "FP4 weights, FP8 E4M3 per-token activations (pre-quantized), Pallas",
    "w4a4": "FP4 weights, 4-bit per-token activations (pre-quantized), int8 dot, Pallas",
    "w4a4_e2e": "act_quant (Hadamard-like transform) + W4A4 matmul, both Pallas",
    "act_quant": "activation transform + per-token 4-bit quantization + packing, Pallas",
    "fp4_w4a16": "FP4 E2M1 weights (tiled K-major layout), bf16 x, the dispatcher's path",
    "fp4_w4a8": "FP4 weights, per-token FP8 act-quant included, the dispatcher's path",
    "fp4_w4a4": "FP4 weights, per-token E2M1 act-quant included, the dispatcher's path",
    "fp4_w4a4_had": "fp4_w4a4 with the model's Hadamard (quant/hadamard.py block at this K), "
                    "through fp4_matmul.linear",
    "bf16_ln": "LayerNorm + per-sample modulate (XLA) then the bf16 dot: a DiT qkv / fc1, "
               "at fc1's shape (1152x4608) followed by its GELU (baseline of the _ln rows)",
    "fp4_w4a4_ln": "fp4_w4a4_had on un-normalized rows, LayerNorm + modulate fused into the "
                   "act-quant (act_quant.RowNorm), at fc1's shape with the GELU fused into the "
                   "matmul epilogue; speedup vs bf16_ln",
    # The GEMM alone on a pre-quantized 8-bit x (the act-quant's image), M >= MOSAIC_MIN_M:
    # the dispatched Triton kernel against the Mosaic GPU one the dispatcher does not take yet.
    "gemm_triton_int8": "int8 x (pre-quantized) x 4-bit weights: XLA decode pass + Triton int8 "
                        "GEMM on the image, scales in its epilogue (W4A4's large-M GEMM up to "
                        "session 23)",
    "gemm_triton_int8_inloop": "the same GEMM reading the 4-bit tiles, decoded in the K loop "
                               "(compiled: byte permutes; W4A4's dispatched GEMM at every M)",
    "gemm_mosaic_int8": "the same GEMM in Pallas Mosaic GPU (kernels/fp4_mosaic.py: TMA "
                        "pipeline, in-loop decode, wgmma s8; Hopper, jax >= 0.11)",
    "gemm_mosaic_fp8": "kernels/fp4_mosaic.py on an E4M3 x (wgmma e4m3)",
}
MOSAIC_VARIANTS = ("gemm_mosaic_int8", "gemm_mosaic_fp8")
GEMM_VARIANTS = ("gemm_triton_int8", "gemm_triton_int8_inloop") + MOSAIC_VARIANTS
MOSAIC_MIN_M = 1024  # the GEMM variants are timed at token-row M only (Mosaic: 128-row tiles)
LN_BASELINE = "bf16_ln"  # variants ending in _ln are timed against this one
FC1_SHAPE = (1152, 4608)  # DiT-XL/2's fc1 (K, N): the _ln variants add the GELU there
LN_EPS = 1e-6
FP4_OPS = {"fp4_w4a16": "w4a16", "fp4_w4a8": "w4a8", "fp4_w4a4": "w4a4"}
VQ_CONFIGS = {"vq_w2": (256, 4), "vq_w3": (64, 2)}  # (codewords k, sub-vector length d)
VQ_FORCED = {"vq_w2_splitk": "vq_splitk", "vq_w2_tiled": "vq_tiled",
             "vq_w2_dequant_dot": "vq_dequant_dot"}
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX FP4 magnitudes


# ----------------------------------------------------------------------------------------
# Timing and peaks
# ----------------------------------------------------------------------------------------


def rotation_sets(operand_bytes: int, l2_bytes: int = L2_BYTES) -> int:
  """Operand copies so that all of them together exceed ROTATION_FACTOR x the L2 cache."""
  return int(min(MAX_SETS, max(1, math.ceil(ROTATION_FACTOR * l2_bytes / max(operand_bytes, 1)))))


def _tree_bytes(tree) -> int:
  return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "nbytes"))


def _first_scalar(tree):
  leaf = jax.tree_util.tree_leaves(tree)[0]
  return jnp.ravel(leaf)[0].astype(jnp.float32)


def repetition_program(fn: Callable, reps: int):
  """The jitted program device_time times: ``reps`` rounds of ``fn(*operands)`` over every
  operand set inside a ``lax.fori_loop``.

  Each call's operands first pass an ``optimization_barrier`` together with the loop carry, so
  they depend on the iteration: without it XLA's while-loop-invariant code motion hoists the
  whole call out of the loop (its operands are loop-invariant) and the loop only re-adds one
  precomputed scalar; seen in the CPU compiler's HLO (the GPU pipeline runs the same pass),
  which made every time per call ``reps`` times too small.  The barrier is an identity: no
  copy, no extra pass over the operands."""

  @jax.jit
  def program(sets):
    def body(_, carry):
      for operands in sets:
        carry, operands = lax.optimization_barrier((carry, operands))
        out = lax.optimization_barrier(fn(*operands))
        carry = carry + _first_scalar(out)
      return carry
    return lax.fori_loop(0, reps, body, jnp.zeros((), jnp.float32))

  return program


def device_time(fn: Callable, operand_sets: Sequence[tuple], *, reps: int, trials: int) -> float:
  """Seconds per call of ``fn(*operands)``: see the module doc (in-graph repetition)."""
  program = repetition_program(fn, reps)
  jax.block_until_ready(program(operand_sets))  # compile + warm up
  times = []
  for _ in range(trials):
    start = time.perf_counter()
    jax.block_until_ready(program(operand_sets))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / (reps * len(operand_sets))


def measure_peaks(smoke: bool, trials: int) -> dict:
  """Achievable bf16 matmul FLOP/s, device-copy B/s and L2 read B/s, measured now on this
  device.  The L2 figure checks kernels/dispatch.L2_BANDWIDTH, an estimate that sizes the
  tile choice and the static report's L2 floors: 32 dependent passes of a reduction over a
  16 MiB buffer (L2-resident on an H100 / H200 / A100), a lower bound on what L2 delivers."""
  size = 256 if smoke else 8192
  key_a, key_b = jax.random.split(jax.random.key(1))
  a = jax.random.normal(key_a, (size, size), jnp.bfloat16)
  b = jax.random.normal(key_b, (size, size), jnp.bfloat16)
  matmul = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)  # noqa: E731
  seconds = device_time(matmul, [(a, b)], reps=1 if smoke else 10, trials=trials)
  words = (1 << 16) if smoke else (1 << 28)  # 1 GiB of float32 on GPU
  buffer = jax.random.normal(key_a, (words,), jnp.float32)
  copy = lambda v: v * 1.5  # noqa: E731  one read + one write per element
  copy_seconds = device_time(copy, [(buffer,)], reps=1 if smoke else 10, trials=trials)
  resident = buffer[:(1 << 10) if smoke else (1 << 22)]
  passes = 32

  def l2_reads(v):  # each pass depends on the last, so XLA cannot merge or hoist them
    return lax.fori_loop(0, passes, lambda i, acc: acc + jnp.sum(jnp.abs(v - acc)),
                         jnp.float32(0.0))

  l2_seconds = device_time(l2_reads, [(resident,)], reps=1 if smoke else 5, trials=trials)
  return dict(matmul_flops=2 * size**3 / seconds, matmul_size=size,
              bandwidth=2 * buffer.nbytes / copy_seconds, copy_bytes=2 * buffer.nbytes,
              l2_bandwidth=passes * resident.nbytes / l2_seconds, l2_bytes=resident.nbytes)


# ----------------------------------------------------------------------------------------
# Operands and variants
# ----------------------------------------------------------------------------------------


def transform_block(k_features: int) -> int:
  """b of the benchmark's kron(A, B) transform: the largest power of two <= 128 dividing K."""
  b_size = 128
  while b_size >= 32:
    if k_features % b_size == 0:
      return b_size
    b_size //= 2
  raise ValueError(f"in_features {k_features} has no power-of-two factor >= 32 for a transform")


def _orthogonal(key, n):
  q, r = jnp.linalg.qr(jax.random.normal(key, (n, n), jnp.float32))
  return q * jnp.sign(jnp.diagonal(r))


def make_operands(key, m_rows: int, k_features: int, n_features: int) -> dict:
  """Random operands of every variant for one (M, K, N), built on device."""
  keys = iter(jax.random.split(key, 16))
  lut = np.concatenate([np.asarray(E2M1), -np.asarray(E2M1)]).astype(np.float32)
  int_lut, multiplier = common.int_lut_from_lut(lut)
  x = jax.random.normal(next(keys), (m_rows, k_features), jnp.bfloat16)
  w_codes = jax.random.randint(next(keys), (k_features, n_features), 0, 16)
  w_scale = jax.random.uniform(next(keys), (n_features,), jnp.float32, 0.01, 0.02)
  operands = dict(
      x=x,
      weight=jax.random.normal(next(keys), (k_features, n_features), jnp.bfloat16),
      bias=jax.random.normal(next(keys), (n_features,), jnp.float32),
      lut=jnp.asarray(lut), int_lut=jnp.asarray(int_lut), multiplier=multiplier,
      packed_weight=packing.pack_bits(w_codes, 4, axis=0), w_scale=w_scale,
      fp4_weight=fp4_mma.pack_weight(w_codes, w_scale, "e2m1"))
  for name, (n_codewords, sub_dim) in VQ_CONFIGS.items():
    indices = jax.random.randint(next(keys), (k_features // sub_dim, n_features), 0, n_codewords)
    operands[name] = (
        jax.random.normal(next(keys), (n_codewords, sub_dim), jnp.float32) * 0.02,
        packing.pack_bits(indices, packing.index_bits(n_codewords), axis=0))
  x_fp8, x_fp8_scale = fm.quantize_fp8_per_token_reference(x)
  operands.update(x_fp8=x_fp8, x_fp8_scale=x_fp8_scale,
                  x_int8=jnp.clip(jnp.round(x.astype(jnp.float32) * 16), -127, 127).astype(
                      jnp.int8))
  b_size = transform_block(k_features)
  a_size = k_features // b_size
  signs = jnp.where(jax.random.bernoulli(next(keys), 0.5, (k_features,)), 1.0, -1.0)
  operands["transform"] = (signs, _orthogonal(next(keys), a_size), _orthogonal(next(keys), b_size))
  packed_x, x_scale = aq.act_quant_reference(x, operands["transform"], magnitudes=E2M1)
  operands.update(packed_x=packed_x, x_scale=x_scale)
  model_transform = hadamard.make_transform(k_features, seed=0)
  samples = m_rows // tokens_per_sample(m_rows)
  operands.update(
      had_signs=jnp.asarray(model_transform.signs), had_block=jnp.asarray(model_transform.block),
      # a residual-stream-like input (offset, spread) and an adaLN-like affine per sample
      h=(x.astype(jnp.float32) * 2.0 + 0.5).astype(jnp.bfloat16),
      ln_mul=1.0 + 0.3 * jax.random.normal(next(keys), (samples, k_features), jnp.float32),
      ln_add=0.2 * jax.random.normal(next(keys), (samples, k_features), jnp.float32))
  return operands


def tokens_per_sample(m_rows: int) -> int:
  """DiT-XL/2 at 256 px: 256 tokens per image (one sample when M is not a multiple)."""
  return 256 if m_rows % 256 == 0 else m_rows


def _config_text(config: dict) -> str:
  short = dict(block_m="bm", block_n="bn", block_k="bk", split_k="sk", num_warps="w",
               num_stages="s")
  return " ".join(f"{short.get(k, k)}{v}" for k, v in config.items())


def _mosaic_gemm(x, row_scale, weight, bias, *, dot_kind: str, interpret: bool):
  from dit_quant_jax.kernels import fp4_mosaic
  options = dict(num_programs=1, interpret=True) if interpret else {}
  return fp4_mosaic.fp4_mosaic_matmul(x, row_scale, weight, bias, dot_kind=dot_kind, **options)


def variant_calls(ops: dict, k_features: int, interpret: bool, blocks: Mapping[str, dict]):
  """(name -> (kernel fn, reference fn or None, args, flops, bytes moved), name -> path text).

  Kernel functions are plain (unjitted) callables; device_time jits them inside its loop."""
  m_rows, n_features = ops["x"].shape[0], ops["bias"].shape[0]
  flops = 2 * m_rows * k_features * n_features
  x_bytes, out_bytes = 2 * m_rows * k_features, 2 * m_rows * n_features
  fp4_weight_bytes = ops["packed_weight"].nbytes + 4 * n_features
  scale_w = ops["w_scale"] / ops["multiplier"]  # integer-lut scale (notes/interfaces.md)
  calls, paths = {}, {}

  def options(name):
    return dict(blocks.get(name) or common.default_matmul_blocks(m_rows, n_features, k_features),
                interpret=interpret)

  calls["bf16_xla"] = (
      lambda x, w, b: (jnp.dot(x, w, preferred_element_type=jnp.float32) + b).astype(
          jnp.bfloat16),
      None, (ops["x"], ops["weight"], ops["bias"]), flops,
      x_bytes + ops["weight"].nbytes + out_bytes)
  calls["w4a16_xla"] = (
      jax.jit(fm.w4a16_matmul_reference), None,
      (ops["x"], ops["packed_weight"], ops["lut"], ops["w_scale"], ops["bias"]), flops,
      x_bytes + fp4_weight_bytes + out_bytes)
  for name in list(VQ_CONFIGS) + list(VQ_FORCED):
    codebook, packed = ops[name if name in VQ_CONFIGS else "vq_w2"]
    choice = dispatch.choose("vq", m_rows, k_features, n_features)
    if name in VQ_FORCED:
      path = VQ_FORCED[name]
      choice = dispatch.Choice(path, dispatch.default_config("vq", path, m_rows, k_features,
                                                             n_features))
    config = dict(choice.config, **(blocks.get(name) or {}))
    calls[name] = (
        functools.partial(vq.run_path, choice.path, config=config, interpret=interpret),
        vq.vq_matmul_reference, (ops["x"], codebook, packed, ops["bias"]), flops,
        x_bytes + packed.nbytes + codebook.nbytes + out_bytes)
    paths[name] = f"{choice.path} {_config_text(config)}"
  # the tiled kernels' best launch without stream-K (forced: at small M they are timed too)
  cls = dispatch.device_class()
  config = dispatch.default_config("vq", "vq_tiled", m_rows, k_features, n_features, cls,
                                   stream_k=False)
  codebook, packed = ops["vq_w2"]
  calls["vq_w2_no_stream_k"] = (
      functools.partial(vq.run_path, "vq_tiled", config=config, interpret=interpret),
      vq.vq_matmul_reference, (ops["x"], codebook, packed, ops["bias"]), flops,
      x_bytes + packed.nbytes + codebook.nbytes + out_bytes)
  paths["vq_w2_no_stream_k"] = f"vq_tiled {_config_text(config)}"
  config = fm.default_mma_config(m_rows, n_features, k_features, dot_kind="bf16",
                                 predecode=False, stream_k=False)
  calls["fp4_w4a16_no_stream_k"] = (
      functools.partial(fm.PATHS["w4a16"]["triton_bf16"], config=config),
      fm.PATHS["w4a16"]["reference"], (ops["x"], ops["fp4_weight"], ops["bias"]), flops,
      x_bytes + ops["fp4_weight"].tiles.nbytes + 4 * n_features + out_bytes)
  paths["fp4_w4a16_no_stream_k"] = f"triton_bf16 {_config_text(config)}"
  # the small-M launches restricted to 128-column tiles (the widths' trade, timed)
  config = dispatch.default_config("vq", "vq_splitk", m_rows, k_features, n_features, cls,
                                   splitk_block_ns=(128,))
  calls["vq_w2_splitk_128"] = (
      functools.partial(vq.run_path, "vq_splitk", config=config, interpret=interpret),
      vq.vq_matmul_reference, (ops["x"], codebook, packed, ops["bias"]), flops,
      x_bytes + packed.nbytes + codebook.nbytes + out_bytes)
  paths["vq_w2_splitk_128"] = f"vq_splitk {_config_text(config)}"
  config = fm.default_mma_config(min(m_rows, fm.SPLITK_MAX_M), n_features, k_features,
                                 dot_kind="bf16", predecode=False, splitk_block_ns=(128,))
  calls["fp4_w4a16_splitk_128"] = (
      functools.partial(fm.PATHS["w4a16"]["triton_bf16"], config=config),
      fm.PATHS["w4a16"]["reference"], (ops["x"], ops["fp4_weight"], ops["bias"]), flops,
      x_bytes + ops["fp4_weight"].tiles.nbytes + 4 * n_features + out_bytes)
  paths["fp4_w4a16_splitk_128"] = f"triton_bf16 {_config_text(config)}"
  calls["w4a16"] = (
      jax.jit(functools.partial(fm.w4a16_matmul, **options("w4a16"))),
      jax.jit(fm.w4a16_matmul_reference),
      (ops["x"], ops["packed_weight"], ops["lut"], ops["w_scale"], ops["bias"]), flops,
      x_bytes + fp4_weight_bytes + out_bytes)
  calls["w4a8"] = (
      jax.jit(functools.partial(fm.w4a8_matmul, out_dtype=jnp.bfloat16, **options("w4a8"))),
      jax.jit(lambda *a: fm.w4a8_matmul_reference(*a, out_dtype=jnp.bfloat16)),
      (ops["x_fp8"], ops["x_fp8_scale"], ops["packed_weight"], ops["lut"], ops["w_scale"],
       ops["bias"]), flops, m_rows * k_features + 4 * m_rows + fp4_weight_bytes + out_bytes)
  w4a4_args = (ops["packed_x"], ops["x_scale"], ops["int_lut"], ops["packed_weight"],
               ops["int_lut"], scale_w, ops["bias"])
  w4a4_bytes = ops["packed_x"].nbytes + 4 * m_rows + fp4_weight_bytes + out_bytes
  calls["w4a4"] = (
      jax.jit(functools.partial(fm.w4a4_matmul, k_features=k_features, out_dtype=jnp.bfloat16,
                                **options("w4a4"))),
      jax.jit(lambda *a: fm.w4a4_matmul_reference(*a, k_features=k_features,
                                                  out_dtype=jnp.bfloat16)),
      w4a4_args, flops, w4a4_bytes)
  act_options = dict(block_m=common.block_size_for(m_rows, 16, 32),
                     block_k=common.block_size_for(k_features, 32, 128), interpret=interpret)

  def quantize(x, transform):
    return aq.act_quant(x, transform, magnitudes=E2M1, **act_options)

  calls["act_quant"] = (
      jax.jit(quantize), jax.jit(lambda x, t: aq.act_quant_reference(x, t, magnitudes=E2M1)),
      (ops["x"], ops["transform"]), 0, x_bytes + ops["packed_x"].nbytes + 4 * m_rows)

  w4a4_options = options("w4a4")

  def w4a4_e2e(x, transform, int_lut, packed_weight, w_scale, bias):
    packed_x, x_scale = quantize(x, transform)
    return fm.w4a4_matmul(packed_x, x_scale, int_lut, packed_weight, int_lut, w_scale, bias,
                          k_features=k_features, out_dtype=jnp.bfloat16, **w4a4_options)

  for name, op in FP4_OPS.items():
    choice = dispatch.choose(op, m_rows, k_features, n_features)
    path_fn = fm.PATHS[op][choice.path]
    extra = dict(act_format="e2m1") if op == "w4a4" else {}
    config = choice.config or None
    calls[name] = (
        functools.partial(path_fn, config=config, **extra),
        functools.partial(fm.PATHS[op]["reference"], **extra),
        (ops["x"], ops["fp4_weight"], ops["bias"]), flops,
        x_bytes + ops["fp4_weight"].tiles.nbytes + 4 * n_features + out_bytes)
    paths[name] = choice.path
  m_per_sample = tokens_per_sample(m_rows)
  fp4_bytes = ops["fp4_weight"].tiles.nbytes + 4 * n_features

  def w4a4_model(x, weight, bias, signs, block, path=None):
    return fm.linear("w4a4", x, weight, bias, act_format="e2m1", transform=(signs, block),
                     transform_kind="hadamard",
                     path=path, out_dtype=jnp.bfloat16)

  # fc1 is followed by the MLP's GELU: in the FP4 matmul's epilogue, a pass after the bf16 dot
  gelu = "gelu_tanh" if (k_features, n_features) == FC1_SHAPE else None

  def w4a4_ln(h, weight, bias, signs, block, mul, add, path=None):
    return fm.linear("w4a4", h, weight, bias, act_format="e2m1", transform=(signs, block),
                     transform_kind="hadamard",
                     norm=aq.RowNorm(mul, add, m_per_sample, LN_EPS), path=path,
                     out_dtype=jnp.bfloat16, activation=gelu)

  def bf16_ln(h, w, b, mul, add):
    x = aq.apply_row_norm(h, mul, add, m_per_sample, LN_EPS).astype(jnp.bfloat16)
    y = (jnp.dot(x, w, preferred_element_type=jnp.float32) + b).astype(jnp.bfloat16)
    return activation_fn.unfused(gelu, y)

  had = (ops["had_signs"], ops["had_block"])
  calls["fp4_w4a4_had"] = (
      w4a4_model, functools.partial(w4a4_model, path="reference"),
      (ops["x"], ops["fp4_weight"], ops["bias"]) + had, flops, x_bytes + fp4_bytes + out_bytes)
  calls["fp4_w4a4_ln"] = (
      w4a4_ln, functools.partial(w4a4_ln, path="reference"),
      (ops["h"], ops["fp4_weight"], ops["bias"]) + had + (ops["ln_mul"], ops["ln_add"]), flops,
      x_bytes + fp4_bytes + out_bytes)
  calls["bf16_ln"] = (
      bf16_ln, None, (ops["h"], ops["weight"], ops["bias"], ops["ln_mul"], ops["ln_add"]), flops,
      x_bytes + ops["weight"].nbytes + out_bytes)
  model_choice = fm.choose_path("w4a4", m_rows, k_features, n_features, transform=had,
                                act_format="e2m1", weight_format="e2m1")
  paths["fp4_w4a4_had"] = paths["fp4_w4a4_ln"] = model_choice.path
  gemm_bytes = m_rows * k_features + 4 * m_rows + fp4_bytes + out_bytes
  triton_int8 = fm.default_mma_config(m_rows, n_features, k_features, dot_kind="int8")
  calls["gemm_triton_int8"] = (
      functools.partial(fp4_mma.fp4_mma, dot_kind="int8", predecode=True, interpret=interpret,
                        out_dtype=jnp.bfloat16, **triton_int8),
      functools.partial(fp4_mma.xla_dot, dot_kind="int8", out_dtype=jnp.bfloat16),
      (ops["x_int8"], ops["x_fp8_scale"], ops["fp4_weight"], ops["bias"]), flops, gemm_bytes)
  paths["gemm_triton_int8"] = f"unpacked_triton_int8 {_config_text(triton_int8)}"
  inloop = fm.default_mma_config(m_rows, n_features, k_features, dot_kind="int8",
                                 predecode=False)
  calls["gemm_triton_int8_inloop"] = (
      functools.partial(fp4_mma.fp4_mma, dot_kind="int8", predecode=False, interpret=interpret,
                        out_dtype=jnp.bfloat16, **inloop),) + calls["gemm_triton_int8"][1:]
  paths["gemm_triton_int8_inloop"] = f"triton_int8 {_config_text(inloop)}"
  for name in MOSAIC_VARIANTS:
    kind = name.rsplit("_", 1)[1]
    calls[name] = (
        functools.partial(_mosaic_gemm, dot_kind=kind, interpret=interpret),
        functools.partial(fp4_mma.xla_dot, dot_kind=kind, out_dtype=jnp.bfloat16),
        (ops["x_int8" if kind == "int8" else "x_fp8"], ops["x_fp8_scale"], ops["fp4_weight"],
         ops["bias"]), flops, gemm_bytes)
    paths[name] = "fp4_mosaic bm128 bn128"
  calls["w4a4_e2e"] = (
      jax.jit(w4a4_e2e), None,
      (ops["x"], ops["transform"], ops["int_lut"], ops["packed_weight"], scale_w, ops["bias"]),
      flops, x_bytes + fp4_weight_bytes + out_bytes)
  return calls, paths


# ----------------------------------------------------------------------------------------
# Correctness pass
# ----------------------------------------------------------------------------------------


def _max_rel_error(y, reference):
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  reference = np.asarray(jnp.asarray(reference, jnp.float32), np.float64)
  return float(np.max(np.abs(y - reference)) / max(np.max(np.abs(reference)), 1e-30))


# Tolerances: bf16 operands with float32 accumulation (VQ, W4A16); exact operands with float32
# accumulation + bf16 output (W4A8, W4A4); codes: near-ties may flip (transform order differs).
CHECK_TOLERANCE = {"vq_w2": 2e-2, "vq_w3": 2e-2, "vq_w2_splitk": 2e-2, "vq_w2_tiled": 2e-2,
                   "vq_w2_dequant_dot": 2e-2, "w4a16": 2e-2, "w4a8": 1e-2, "w4a4": 1e-2,
                   "fp4_w4a16": 2e-2, "fp4_w4a8": 2e-2, "fp4_w4a4": 2e-2,
                   "fp4_w4a4_had": 2e-2, "fp4_w4a4_ln": 2e-2, "gemm_triton_int8": 1e-2,
                   "gemm_triton_int8_inloop": 1e-2,
                   "gemm_mosaic_int8": 1e-2, "gemm_mosaic_fp8": 1e-2,
                   "vq_w2_no_stream_k": 2e-2, "fp4_w4a16_no_stream_k": 2e-2,
                   "vq_w2_splitk_128": 2e-2, "fp4_w4a16_splitk_128": 2e-2}
ACT_QUANT_MAX_CODE_MISMATCH = 1e-3  # fraction of codes
# (M, K, N) of the compiled correctness pass -> the variants checked there (None: all): a
# mid-M shape, and fc2 at M = 1024, where the Hopper dispatcher runs VQ's and W4A16's kernels
# as stream-K launches (those and their tiled alternatives only: the GPU stage is time-boxed).
CHECK_SHAPES = {(256, 1152, 1152): None,
                (1024, 4608, 1152): ("vq_w2", "fp4_w4a16", "vq_w2_no_stream_k",
                                     "fp4_w4a16_no_stream_k"),
                # proj at M = 16: the small-M launches' narrow tiles and the 128-column ones
                (16, 1152, 1152): ("vq_w2", "fp4_w4a16", "vq_w2_splitk_128",
                                   "fp4_w4a16_splitk_128")}


def correctness_pass(shape: tuple[int, int, int], interpret: bool, key,
                     names: Sequence[str] = tuple(CHECK_TOLERANCE)) -> list[dict]:
  m_rows, k_features, n_features = shape
  ops = make_operands(key, m_rows, k_features, n_features)
  calls, paths = variant_calls(ops, k_features, interpret, {})
  rows = []
  for name in names:
    if name not in CHECK_TOLERANCE:
      continue
    if name in MOSAIC_VARIANTS and not mosaic_fits(m_rows, k_features, n_features):
      continue
    kernel, reference, args, _, _ = calls[name]
    try:
      error = _max_rel_error(kernel(*args), reference(*args))
    except Exception as failure:  # the unverified Mosaic kernels must not stop the others
      if name not in MOSAIC_VARIANTS:
        raise
      logging.error("%s at %s failed: %s", name, shape, failure)
      rows.append(dict(kernel=name, shape=shape, metric="max rel error", value=math.nan,
                       ok=False, error=str(failure)[:500], path=paths.get(name, "")))
      continue
    rows.append(dict(kernel=name, shape=shape, metric="max rel error", value=error,
                     ok=error < CHECK_TOLERANCE[name], path=paths.get(name, "")))
  if "act_quant" in names:
    kernel, reference, args, _, _ = calls["act_quant"]
    (packed, scale), (packed_ref, scale_ref) = kernel(*args), reference(*args)
    codes = packing.unpack_bits(np.asarray(packed), 4, k_features, axis=1)
    codes_ref = packing.unpack_bits(np.asarray(packed_ref), 4, k_features, axis=1)
    mismatch = float(np.mean(codes != codes_ref))
    scale_error = _max_rel_error(scale, scale_ref)
    rows.append(dict(kernel="act_quant", shape=shape, metric="code mismatch fraction",
                     value=mismatch, ok=mismatch <= ACT_QUANT_MAX_CODE_MISMATCH))
    rows.append(dict(kernel="act_quant", shape=shape, metric="scale max rel error",
                     value=scale_error, ok=scale_error < 1e-4))
  return rows


# ----------------------------------------------------------------------------------------
# Kernel timing
# ----------------------------------------------------------------------------------------


def _floor(name: str, m_rows: int, k_features: int, n_features: int, flops: float,
           moved: float, peaks: roofline.Peaks, path: str = "") -> float:
  if name == LN_BASELINE:
    return (roofline.bf16_dot_floor(m_rows, k_features, n_features, peaks)["floor_s"]
            + roofline.layer_norm_pass_floor(m_rows, k_features, peaks)["floor_s"])
  if name in ("fp4_w4a4_had", "fp4_w4a4_ln"):
    return roofline.fp4_path_floor("w4a4", path, m_rows, k_features, n_features, peaks,
                                   hadamard.hadamard_block_order(k_features),
                                   norm_fused=name.endswith("_ln"))["floor_s"]
  if name in VQ_CONFIGS or name in VQ_FORCED or name in ("vq_w2_no_stream_k",
                                                         "vq_w2_splitk_128"):
    codewords, sub_dim = VQ_CONFIGS.get(name, VQ_CONFIGS["vq_w2"])
    forced = {"vq_w2_no_stream_k": "vq_tiled", "vq_w2_splitk_128": "vq_splitk"}
    path = (VQ_FORCED.get(name) or forced.get(name)
            or dispatch.choose("vq", m_rows, k_features, n_features).path)
    return roofline.vq_path_floor(path, m_rows, k_features, n_features, peaks, codewords,
                                  sub_dim)["floor_s"]
  eight_bit = ("w4a4", "w4a4_e2e", "w4a8", "fp4_w4a8", "fp4_w4a4") + GEMM_VARIANTS
  integer_dot = 2.0 if name in eight_bit else 1.0
  return roofline.floor_seconds(flops, moved, peaks, integer_dot)["floor_s"]


def mosaic_fits(m_rows: int, k_features: int, n_features: int) -> bool:
  """This jax has Pallas Mosaic GPU and the shape fits fp4_mosaic's tiles (M, N multiples of
  128, K of 128)."""
  from dit_quant_jax.kernels import fp4_mosaic
  return (fp4_mosaic.available() and m_rows % 128 == 0 and n_features % 128 == 0
          and k_features % fp4_mma.TILE_K == 0)


def gemm_variant_runs(name: str, m_rows: int, k_features: int, n_features: int) -> bool:
  """The GEMM-only variants are timed at token-row M (>= MOSAIC_MIN_M), the Mosaic ones where
  they fit (mosaic_fits)."""
  if m_rows < MOSAIC_MIN_M:
    return False
  return name not in MOSAIC_VARIANTS or mosaic_fits(m_rows, k_features, n_features)


NO_STREAM_K_VARIANTS = ("vq_w2_no_stream_k", "fp4_w4a16_no_stream_k")
WIDE_SPLITK_VARIANTS = ("vq_w2_splitk_128", "fp4_w4a16_splitk_128")


def dispatched_narrow_splitk(name: str, m_rows: int, k_features: int, n_features: int) -> bool:
  """Whether the dispatched small-M launch that a *_splitk_128 variant is the alternative to
  (vq_w2's split-K kernel, fp4_w4a16's Triton kernel at small M) takes tiles narrower than 128
  columns at this shape on this device."""
  if name == "vq_w2_splitk_128":
    choice = dispatch.choose("vq", m_rows, k_features, n_features)
    return choice.path == "vq_splitk" and choice.config["block_n"] < 128
  if m_rows > fm.SPLITK_MAX_M or dispatch.choose("w4a16", m_rows, k_features,
                                              n_features).path != "triton_bf16":
    return False
  config = fm.default_mma_config(m_rows, n_features, k_features, dot_kind="bf16",
                                 predecode=False)
  return config["block_n"] < 128


def dispatched_stream_k(name: str, m_rows: int, k_features: int, n_features: int) -> bool:
  """Whether the dispatched launch that a *_no_stream_k variant is the alternative to (vq_w2's
  tiled kernel, fp4_w4a16's Triton kernel) runs stream-K at this shape on this device."""
  if name == "vq_w2_no_stream_k":
    choice = dispatch.choose("vq", m_rows, k_features, n_features)
    return choice.path == "vq_tiled" and bool(choice.config.get("stream_k"))
  if dispatch.choose("w4a16", m_rows, k_features, n_features).path != "triton_bf16":
    return False
  config = fm.default_mma_config(m_rows, n_features, k_features, dot_kind="bf16",
                                 predecode=False)
  return bool(config.get("stream_k"))


def _times_at(name: str, m_rows: int, k_features: int, n_features: int) -> bool:
  """The LayerNorm variants (bf16_ln, *_ln) are timed at the DiT-XL/2 shapes whose input is a
  LayerNorm (qkv, fc1) only, to keep the GPU stage within its time box; any other shape
  (smoke runs, --shapes) times every variant.  The *_no_stream_k variants are timed where the
  launch they are the alternative to runs stream-K (dispatched_stream_k), the *_splitk_128
  ones where it takes narrower tiles (dispatched_narrow_splitk)."""
  if name in GEMM_VARIANTS:
    return gemm_variant_runs(name, m_rows, k_features, n_features)
  if name in NO_STREAM_K_VARIANTS:  # only where the dispatched launch is stream-K
    return dispatched_stream_k(name, m_rows, k_features, n_features)
  if name in WIDE_SPLITK_VARIANTS:  # only where the dispatched small-M tiles are narrower
    return dispatched_narrow_splitk(name, m_rows, k_features, n_features)
  if name != LN_BASELINE and not name.endswith("_ln"):
    return True
  shape = (k_features, n_features)
  return shape in roofline.LN_FED_SHAPES or shape not in DIT_XL2_SHAPES


def bench_kernels(shapes, tokens, names, interpret, reps, trials, peaks: roofline.Peaks, key,
                  on_rows: Callable[[list], None], l2_bytes: int = L2_BYTES) -> list[dict]:
  rows = []
  for k_features, n_features in shapes:
    for m_rows in tokens:
      keys = jax.random.split(key, MAX_SETS)
      first = make_operands(keys[0], m_rows, k_features, n_features)
      calls, paths = variant_calls(first, k_features, interpret, {})
      sets_needed = rotation_sets(_tree_bytes(calls["bf16_xla"][2]), l2_bytes)
      operand_sets = [first] + [make_operands(keys[i], m_rows, k_features, n_features)
                                for i in range(1, sets_needed)]
      set_calls = [variant_calls(ops, k_features, interpret, {})[0] for ops in operand_sets]
      baseline = None
      baselines = {}
      order = ["bf16_xla"] + ([LN_BASELINE] if any(n.endswith("_ln") for n in names) else [])
      for name in order + [n for n in names if n not in order]:
        if not _times_at(name, m_rows, k_features, n_features):
          continue
        kernel, _, args, flops, moved = calls[name]
        try:
          seconds = device_time(kernel, [c[name][2] for c in set_calls], reps=reps,
                                trials=trials)
        except Exception as error:  # keep the rest of the table if one kernel fails to build
          logging.error("%s M=%d K=%d N=%d failed: %s", name, m_rows, k_features, n_features,
                        error)
          rows.append(dict(kernel=name, m=m_rows, k=k_features, n=n_features, error=str(error)))
          continue
        if name in order:
          baselines[name] = seconds
        # no speedup when the baseline itself failed to build
        baseline = baselines.get(LN_BASELINE if name.endswith("_ln") else "bf16_xla",
                                 seconds if name in order else math.nan)
        floor = _floor(name, m_rows, k_features, n_features, flops, moved, peaks,
                       paths.get(name, ""))
        rows.append(dict(
            kernel=name, m=m_rows, k=k_features, n=n_features, us=seconds * 1e6,
            speedup=baseline / seconds, tflops=flops / seconds / 1e12, gbps=moved / seconds / 1e9,
            floor_us=floor * 1e6, of_floor=floor / seconds, sets=len(operand_sets),
            path=paths.get(name, "")))
        print(f"K={k_features} N={n_features} M={m_rows} {name}: {seconds * 1e6:.1f} us, "
              f"speedup {baseline / seconds:.2f}x, floor {floor * 1e6:.1f} us"
              + (f", path {paths[name]}" if name in paths else ""), flush=True)
      on_rows(rows)
  return rows


# ----------------------------------------------------------------------------------------
# DiT step
# ----------------------------------------------------------------------------------------


def _device_memory_stats() -> dict:
  try:
    return jax.local_devices()[0].memory_stats() or {}
  except Exception:  # backends without memory_stats (some CPU builds)
    return {}


def bench_dit_step(variants: Mapping[str, tuple[Callable, tuple]], *, reps: int = 5,
                   trials: int = 3) -> list[dict]:
  """Time one sampling step per variant and record device memory.

  variants: name -> (step, args) where ``step(*args)`` runs one DiT-XL/2 sampling step (a
    jitted function: model apply + sampler update) and ``args`` holds its params (dense or
    quantized pytree) and inputs.  Run the variants in increasing expected memory: the device's
    ``peak_bytes_in_use`` is a process-wide high-water mark, so each row also reports the bytes
    in use with the arguments resident and the compiled program's own temp / argument sizes.
  Returns rows: name, ms, param_bytes, in_use_bytes, peak_bytes (high-water mark after this
    variant, None where the backend has no memory_stats), compiled_temp_bytes,
    compiled_argument_bytes.
  """
  rows = []
  for name, (step, args) in variants.items():
    param_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(args[0])
                      if hasattr(leaf, "nbytes"))
    compiled_temp = compiled_arguments = None
    try:
      analysis = step.lower(*args).compile().memory_analysis()
      compiled_temp = getattr(analysis, "temp_size_in_bytes", None)
      compiled_arguments = getattr(analysis, "argument_size_in_bytes", None)
    except Exception as error:  # not a jitted function, or no analysis on this backend
      logging.info("no memory analysis for %s: %s", name, error)
    seconds = device_time(step, [args], reps=reps, trials=trials)
    stats = _device_memory_stats()
    rows.append(dict(name=name, ms=seconds * 1e3, param_bytes=param_bytes,
                     in_use_bytes=stats.get("bytes_in_use"),
                     peak_bytes=stats.get("peak_bytes_in_use"),
                     compiled_temp_bytes=compiled_temp,
                     compiled_argument_bytes=compiled_arguments))
    logging.info("DiT step %s: %s", name, rows[-1])
  return rows


def _random_quantized_params(params, kind: str, seed: int = 0):
  """Replace every DiT-block linear kernel by a random quantized weight in the real layout
  (timing and memory do not depend on the values; k-means on XL/2 would take minutes)."""
  from dit_quant_jax.quant import formats, hadamard, hqdit, rules, vq4dit
  rng = np.random.default_rng(seed)
  out = params
  for index, path in enumerate(rules.select_layers(params)):
    k_in, n_out = rules.get_path(params, path + "/kernel").shape
    if kind == "vq_w2":  # k = 256, d = 4: 2 bits per weight
      codebook = rng.standard_normal((256, 4)).astype(np.float32) * 0.02
      indices = rng.integers(0, 256, (k_in // 4, n_out))
      weight = vq4dit.VQWeight.from_indices(codebook, indices, (k_in, n_out))
    else:  # HQ-DiT: E2M1 weights, Hadamard, per-token E2M1 (W4A4) or FP8 E4M3 (W4A8) acts
      act_format = {"hqdit_w4a4": "e2m1", "hqdit_w4a8": "fp8_e4m3"}[kind]
      transform = hadamard.make_transform(k_in, seed + index)
      codes = rng.integers(0, 16, (k_in, n_out)).astype(np.uint8)
      weight = hqdit.FP4Weight.from_codes(
          codes, np.full((n_out,), 0.01, np.float32), "e2m1",
          hadamard_signs=transform.signs, hadamard_block=transform.block,
          hadamard_seed=transform.seed, hadamard_kind=transform.kind, act_format=act_format,
          act_granularity="per_token")
    out = rules.set_path(out, path + "/kernel", weight)
  return out


def random_dit(smoke: bool, depth: Optional[int] = None):
  """(model, float32 params): DiT-XL/2 for 256 px latents (32 x 32 x 4, 1000 classes, bf16
  compute) with random weights, non-zero adaLN / final layer as after training; smoke: a
  one-block 128-wide DiT (CPU).  depth: fewer blocks of the same model (lowering tests)."""
  from dit_quant_jax.models import dit
  if smoke:
    model = dit.create_model("DiT-S/8", input_size=16, depth=1, hidden_size=128, num_heads=2,
                             num_classes=10, dtype=jnp.bfloat16)
  else:
    overrides = {} if depth is None else dict(depth=depth)
    model = dit.create_model("DiT-XL/2", input_size=32, num_classes=1000, dtype=jnp.bfloat16,
                             **overrides)
  params = jax.jit(lambda key: dit.init_params(model, key))(jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(
      lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
  return model, params


def dit_step_variants(smoke: bool, depth: Optional[int] = None,
                      ) -> Mapping[str, tuple[Callable, tuple]]:
  """One DiT-XL/2 (256x256: 32x32x4 latents) DDPM sampling step, batch 8 with CFG (the model
  sees 16), for FP bf16, VQ W2, HQ-DiT W4A4 and W4A8 with random weights in the real shapes.
  Ordered by increasing memory (see bench_dit_step).  smoke: a tiny DiT instead of XL/2;
  depth: XL/2 with fewer blocks."""
  from dit_quant_jax.diffusion import create_diffusion, sampling
  model, params = random_dit(smoke, depth)
  diffusion = create_diffusion("250")
  model_fn = sampling.cfg_model_fn(model, 1.5)
  batch = 8
  x = jax.random.normal(jax.random.PRNGKey(2), (batch, model.input_size, model.input_size,
                                                model.in_channels), jnp.bfloat16)
  labels = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
  t = jnp.full((batch,), 125, jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(3), x.shape, jnp.float32)

  @jax.jit
  def step(step_params, x, t, labels, noise):
    out = model_fn(x, diffusion.model_timesteps(t), step_params, labels)
    x_next, _ = diffusion.p_sample_step(out.astype(jnp.float32), x.astype(jnp.float32), t, noise)
    return x_next

  variants = {}
  for name in ("vq_w2", "hqdit_w4a4", "hqdit_w4a8"):
    variants[name] = (step, (_random_quantized_params(params, name), x, t, labels, noise))
  bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
  variants["fp_bf16"] = (step, (bf16, x, t, labels, noise))
  return variants


# ----------------------------------------------------------------------------------------
# Report and the whole run
# ----------------------------------------------------------------------------------------


def _bytes_text(value):
  return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def write_report(path: str, header: dict, peaks: dict, checks: list[dict], rows: list[dict],
                 step_rows: list[dict], dispatch_rows: list[dict]) -> None:
  lines = [f"# Pallas kernel benchmark: {header['device']}", ""]
  lines += [f"- {key}: {value}" for key, value in header.items()]
  lines += [f"- measured bf16 matmul peak: {peaks['matmul_flops'] / 1e12:.1f} TFLOP/s "
            f"({peaks['matmul_size']}^3)",
            f"- measured device copy: {peaks['bandwidth'] / 1e9:.0f} GB/s "
            f"({peaks['copy_bytes'] / 2**20:.0f} MiB read + written)",
            f"- measured L2 reads: {peaks['l2_bandwidth'] / 1e9:.0f} GB/s (a reduction over "
            f"{peaks['l2_bytes'] / 2**20:.0f} MiB, 32 passes; kernels/dispatch.L2_BANDWIDTH "
            f"assumes {dispatch.L2_BANDWIDTH[dispatch.device_class()] / 1e9:.0f} GB/s here)", "",
            "Timing: in-graph repetition over operand sets larger than L2 "
            "(dit_quant_jax/bench/kernels.py); speedup = t_bf16 / t_kernel; floor = "
            "max(FLOPs / measured matmul peak, bytes / measured copy bandwidth), int8/fp8 dots "
            "at twice the bf16 rate.", "", "Variants:", ""]
  lines += [f"- `{name}`: {text}" for name, text in VARIANTS.items()]
  lines += ["", "## Dispatch (op, K x N, M -> path)", "", "| op | K x N | M | path | config |",
            "|---|---|---|---|---|"]
  for row in dispatch_rows:
    lines.append(f"| {row['op']} | {row['k']}x{row['n']} | {row['m']} | {row['path']} | "
                 f"{_config_text(row['config'])} |")
  lines += ["", "## Correctness (kernel vs plain-jnp reference)", "",
            "| kernel | M x K x N | path | metric | value | ok |", "|---|---|---|---|---|---|"]
  for check in checks:
    lines.append(f"| {check['kernel']} | {'x'.join(map(str, check['shape']))} | "
                 f"{check.get('path', '')} | {check['metric']} | {check['value']:.2e} | "
                 f"{'yes' if check['ok'] else 'NO'} |")
  lines += ["", "## Linear layers", "",
            "| K x N | M | kernel | path | time (us) | speedup vs bf16 (_ln rows: vs bf16_ln) "
            "| floor (us) | floor / t | TFLOP/s | GB/s | operand sets |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    if "error" in row:
      lines.append(f"| {row['k']}x{row['n']} | {row['m']} | {row['kernel']} | | failed: "
                   f"{row['error'][:80]} | | | | | | |")
      continue
    lines.append(
        f"| {row['k']}x{row['n']} | {row['m']} | {row['kernel']} | {row['path']} | "
        f"{row['us']:.1f} | {row['speedup']:.2f} | {row['floor_us']:.1f} | "
        f"{row['of_floor']:.2f} | {row['tflops']:.1f} | {row['gbps']:.0f} | {row['sets']} |")
  if step_rows:
    lines += ["", "## DiT-XL/2 sampling step", "",
              "| variant | time (ms) | params | bytes in use | peak (process) | compiled temp |",
              "|---|---|---|---|---|---|"]
    for row in step_rows:
      lines.append(f"| {row['name']} | {row['ms']:.2f} | {_bytes_text(row['param_bytes'])} | "
                   f"{_bytes_text(row['in_use_bytes'])} | {_bytes_text(row['peak_bytes'])} | "
                   f"{_bytes_text(row['compiled_temp_bytes'])} |")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def run(*, smoke: bool, out_dir: str, names: Sequence[str], tokens=None, shapes=None,
        reps: int = 20, trials: int = 5, dit_step: bool = True, check: bool = True,
        linears: bool = True) -> str:
  """The whole benchmark; returns the report path.  smoke: tiny shapes, interpret mode on CPU
  (numbers meaningless; checks the code path)."""
  unknown = set(names) - set(VARIANTS)
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
  if not smoke and not common.on_gpu():
    raise ValueError("the benchmark needs a GPU; use smoke mode for the CPU interpret check")
  interpret = not common.on_gpu()
  shapes = tuple(shapes or (SMOKE_SHAPES if smoke else DIT_XL2_SHAPES))
  tokens = tuple(tokens or (SMOKE_TOKENS if smoke else DIT_XL2_TOKENS))
  if smoke:
    reps, trials = 1, 1
  device = jax.devices()[0]
  header = dict(device=f"{device.device_kind} ({device.platform})", jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                mode="smoke (interpret mode, CPU)" if smoke else "compiled",
                reps=reps, trials=trials)
  slug = device.device_kind.lower().replace(" ", "_")
  path = os.path.join(out_dir, f"kernels_{'smoke_' if smoke else ''}{slug}_jax{jax.__version__}.md")
  key = jax.random.key(0)
  dispatch_rows = dispatch.describe("vq", shapes, tokens)
  for row in dispatch_rows:
    print(f"dispatch vq K={row['k']} N={row['n']} M={row['m']}: {row['path']} "
          f"{_config_text(row['config'])}", flush=True)
  checks = []
  if check:
    check_shapes = ({(tokens[-1], shapes[0][0], shapes[0][1]): None} if smoke
                    else CHECK_SHAPES)
    for check_shape, only in check_shapes.items():
      checks += correctness_pass(check_shape, interpret, key,
                                 [n for n in names if only is None or n in only])
    for item in checks:
      print(f"check {item['kernel']} {item['metric']}: {item['value']:.2e} "
            f"{'ok' if item['ok'] else 'FAILED'}", flush=True)
  measured = measure_peaks(smoke, trials)
  peaks = roofline.Peaks(measured["matmul_flops"], measured["bandwidth"], "measured")
  print(f"peaks: {measured['matmul_flops'] / 1e12:.1f} TFLOP/s, "
        f"{measured['bandwidth'] / 1e9:.0f} GB/s", flush=True)

  def on_rows(rows):
    write_report(path, header, measured, checks, rows, [], dispatch_rows)

  rows = (bench_kernels(shapes, tokens, names, interpret, reps, trials, peaks, key, on_rows)
          if linears else [])
  step_rows = []
  if dit_step:
    step_rows = bench_dit_step(dit_step_variants(smoke), reps=max(1, reps // 4), trials=trials)
  write_report(path, header, measured, checks, rows, step_rows, dispatch_rows)
  failed = [c for c in checks if not c["ok"]]
  print(f"wrote {path}; correctness: {len(checks) - len(failed)}/{len(checks)} ok", flush=True)
  return path
