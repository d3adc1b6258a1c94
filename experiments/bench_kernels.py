"""Correctness check and timing of the Pallas kernels against the bf16 XLA dot.

One GPU call checks and times everything:

  .venv/bin/python experiments/bench_kernels.py                    # GPU: full table
  .venv/bin/python experiments/bench_kernels.py --smoke --out_dir=/tmp/bench   # CPU, interpret

1. correctness pass: every kernel vs its plain-jnp reference on fresh random operands;
2. peaks measured in the same run: a large bf16 matmul (TFLOP/s) and a large device copy (GB/s);
3. every kernel vs the bf16 XLA dot on the DiT-XL/2 linear shapes (K x N) and token counts M,
   median of ``--iters`` timed runs after ``--warmup`` (``block_until_ready`` around each run);
   reported: time, ratio to bf16, achieved TFLOP/s and GB/s and their fraction of the peaks;
4. a markdown table under ``--out_dir`` naming device and jax version (rewritten after every
   shape, so a timed-out run still leaves its rows).

``bench_dit_step`` (one DiT-XL/2 sampling step per variant, time and peak device memory) takes
callables; ``dit_step_variants`` builds the FP bf16 / VQ W2 / HQ-DiT W4A4 DiT-XL/2 steps.
"""

from __future__ import annotations

import datetime
import functools
import os
import statistics
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging

from dit_quant_jax.kernels import act_quant as aq
from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import fp4_matmul as fm
from dit_quant_jax.kernels import vq_matmul as vq
from dit_quant_jax.quant import packing

# DiT-XL/2 (hidden 1152, MLP ratio 4): attn qkv, attn proj, mlp fc1, mlp fc2, adaLN modulation.
DIT_XL2_SHAPES = ((1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152), (1152, 6912))
# Tokens per call: 16 (adaLN rows, tiny batch) ... 16384 (64 images x 256 patches at 256px).
DIT_XL2_TOKENS = (16, 256, 1024, 4096, 16384)
SMOKE_SHAPES = ((64, 96), (96, 64))
SMOKE_TOKENS = (8, 37)

# Kernel variants timed against the bf16 dot (name -> description in the report).
VARIANTS = {
    "bf16_xla": "x @ W, bf16 XLA dot (baseline)",
    "w4a16_xla": "full FP4 decode + XLA dot (what runs without the kernel)",
    "vq_w2": "VQ k=256, d=4 (2 bits/weight), Pallas",
    "vq_w3": "VQ k=64, d=2 (3 bits/weight), Pallas",
    "w4a16": "FP4 E2M1 weights, bf16 activations, Pallas",
    "w4a8": "FP4 weights, FP8 E4M3 per-token activations (pre-quantized), Pallas",
    "w4a4": "FP4 weights, 4-bit per-token activations (pre-quantized), int8 dot, Pallas",
    "w4a4_e2e": "act_quant (Hadamard-like transform) + W4A4 matmul, both Pallas",
    "act_quant": "activation transform + per-token 4-bit quantization + packing, Pallas",
}
VQ_CONFIGS = {"vq_w2": (256, 4), "vq_w3": (64, 2)}  # (codewords k, sub-vector length d)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX FP4 magnitudes
SWEEP_CONFIGS = (  # (block_m, block_n, block_k, num_warps, num_stages)
    (16, 64, 64, 4, 3), (16, 128, 64, 4, 4), (32, 128, 64, 4, 3), (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (64, 256, 32, 8, 3))

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes on CPU in interpret mode (a check).")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "Where the markdown table goes.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed runs before timing.")
_ITERS = flags.DEFINE_integer("iters", 30, "Timed runs; the median is reported.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Subset of kernel variants to time.")
_TOKENS = flags.DEFINE_list("tokens", None, "Override the M values (default DiT-XL/2 set).")
_SWEEP = flags.DEFINE_bool("sweep", False, "Time SWEEP_CONFIGS on fc1 (1152x4608) per kernel "
                           "and M, and use the best for every shape (many compiles).")


# ----------------------------------------------------------------------------------------
# Timing and peaks
# ----------------------------------------------------------------------------------------


def time_fn(fn: Callable, *args, warmup: int, iters: int) -> float:
  """Median wall seconds of fn(*args) over iters runs after warmup (blocking on outputs)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_peaks(smoke: bool, warmup: int, iters: int) -> dict:
  """Achievable bf16 matmul TFLOP/s and device-copy GB/s, measured now on this device."""
  size = 256 if smoke else 8192
  key_a, key_b = jax.random.split(jax.random.key(1))
  a = jax.random.normal(key_a, (size, size), jnp.bfloat16)
  b = jax.random.normal(key_b, (size, size), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  seconds = time_fn(matmul, a, b, warmup=warmup, iters=iters)
  tflops = 2 * size**3 / seconds / 1e12
  words = (1 << 16) if smoke else (1 << 28)  # 1 GiB of float32 on GPU
  buffer = jnp.ones((words,), jnp.float32)
  copy = jax.jit(lambda v: v + 1.0)  # one read + one write per element
  seconds = time_fn(copy, buffer, warmup=warmup, iters=iters)
  gbps = 2 * buffer.nbytes / seconds / 1e9
  return dict(matmul_tflops=tflops, matmul_size=size, copy_gbps=gbps, copy_bytes=buffer.nbytes)


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
      packed_weight=packing.pack_bits(w_codes, 4, axis=0), w_scale=w_scale)
  for name, (n_codewords, sub_dim) in VQ_CONFIGS.items():
    indices = jax.random.randint(next(keys), (k_features // sub_dim, n_features), 0, n_codewords)
    operands[name] = (
        jax.random.normal(next(keys), (n_codewords, sub_dim), jnp.float32) * 0.02,
        packing.pack_bits(indices, packing.index_bits(n_codewords), axis=0))
  x_fp8, x_fp8_scale = fm.quantize_fp8_per_token_reference(x)
  operands.update(x_fp8=x_fp8, x_fp8_scale=x_fp8_scale)
  b_size = transform_block(k_features)
  a_size = k_features // b_size
  signs = jnp.where(jax.random.bernoulli(next(keys), 0.5, (k_features,)), 1.0, -1.0)
  operands["transform"] = (signs, _orthogonal(next(keys), a_size), _orthogonal(next(keys), b_size))
  packed_x, x_scale = aq.act_quant_reference(x, operands["transform"], magnitudes=E2M1)
  operands.update(packed_x=packed_x, x_scale=x_scale)
  return operands


def variant_calls(ops: dict, k_features: int, interpret: bool, blocks: Mapping[str, dict]):
  """name -> (kernel fn, reference fn or None, args, flops, bytes moved)."""
  m_rows, n_features = ops["x"].shape[0], ops["bias"].shape[0]
  flops = 2 * m_rows * k_features * n_features
  x_bytes, out_bytes = 2 * m_rows * k_features, 2 * m_rows * n_features
  fp4_weight_bytes = ops["packed_weight"].nbytes + 4 * n_features
  scale_w = ops["w_scale"] / ops["multiplier"]  # integer-lut scale (notes/interfaces.md)
  calls = {}

  def options(name):
    return dict(blocks.get(name) or common.default_matmul_blocks(m_rows, n_features, k_features),
                interpret=interpret)

  calls["bf16_xla"] = (
      jax.jit(lambda x, w, b: (jnp.dot(x, w, preferred_element_type=jnp.float32) + b)
              .astype(jnp.bfloat16)),
      None, (ops["x"], ops["weight"], ops["bias"]), flops,
      x_bytes + ops["weight"].nbytes + out_bytes)
  calls["w4a16_xla"] = (
      jax.jit(fm.w4a16_matmul_reference), None,
      (ops["x"], ops["packed_weight"], ops["lut"], ops["w_scale"], ops["bias"]), flops,
      x_bytes + fp4_weight_bytes + out_bytes)
  for name in VQ_CONFIGS:
    codebook, packed = ops[name]
    calls[name] = (
        jax.jit(functools.partial(vq.vq_matmul, **options(name))),
        jax.jit(vq.vq_matmul_reference), (ops["x"], codebook, packed, ops["bias"]), flops,
        x_bytes + packed.nbytes + codebook.nbytes + out_bytes)
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

  calls["w4a4_e2e"] = (
      jax.jit(w4a4_e2e), None,
      (ops["x"], ops["transform"], ops["int_lut"], ops["packed_weight"], scale_w, ops["bias"]),
      flops, x_bytes + fp4_weight_bytes + out_bytes)
  return calls


# ----------------------------------------------------------------------------------------
# Correctness pass
# ----------------------------------------------------------------------------------------


def _max_rel_error(y, reference):
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  reference = np.asarray(jnp.asarray(reference, jnp.float32), np.float64)
  return float(np.max(np.abs(y - reference)) / max(np.max(np.abs(reference)), 1e-30))


# Tolerances: bf16 operands with float32 accumulation (VQ, W4A16); exact operands with float32
# accumulation + bf16 output (W4A8, W4A4); codes: near-ties may flip (transform order differs).
CHECK_TOLERANCE = {"vq_w2": 2e-2, "vq_w3": 2e-2, "w4a16": 2e-2, "w4a8": 1e-2, "w4a4": 1e-2}
ACT_QUANT_MAX_CODE_MISMATCH = 1e-3  # fraction of codes


def correctness_pass(shape: tuple[int, int, int], interpret: bool, key) -> list[dict]:
  m_rows, k_features, n_features = shape
  ops = make_operands(key, m_rows, k_features, n_features)
  calls = variant_calls(ops, k_features, interpret, {})
  rows = []
  for name, tolerance in CHECK_TOLERANCE.items():
    kernel, reference, args, _, _ = calls[name]
    error = _max_rel_error(kernel(*args), reference(*args))
    rows.append(dict(kernel=name, shape=shape, metric="max rel error", value=error,
                     ok=error < tolerance))
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


def sweep_blocks(names: Sequence[str], tokens: Sequence[int], interpret: bool, warmup: int,
                 iters: int, key) -> dict:
  """(name, M) -> best SWEEP_CONFIGS entry on the fc1 shape (1152 x 4608)."""
  k_features, n_features = 1152, 4608
  best = {}
  for m_rows in tokens:
    ops = make_operands(key, m_rows, k_features, n_features)
    for name in names:
      if name not in ("vq_w2", "vq_w3", "w4a16", "w4a8", "w4a4"):
        continue
      timings = []
      for block_m, block_n, block_k, num_warps, num_stages in SWEEP_CONFIGS:
        config = dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                      num_stages=num_stages)
        kernel, _, args, _, _ = variant_calls(ops, k_features, interpret, {name: config})[name]
        try:
          timings.append((time_fn(kernel, *args, warmup=warmup, iters=iters), config))
        except Exception as error:  # a config that does not compile (e.g. shared memory)
          logging.warning("sweep %s M=%d %s failed: %s", name, m_rows, config, error)
      if timings:
        best[(name, m_rows)] = min(timings, key=lambda t: t[0])[1]
        logging.info("sweep %s M=%d best %s", name, m_rows, best[(name, m_rows)])
  return best


def bench_kernels(shapes, tokens, names, interpret, warmup, iters, peaks, key, sweep,
                  on_rows: Callable[[list], None]) -> list[dict]:
  rows = []
  for k_features, n_features in shapes:
    for m_rows in tokens:
      ops = make_operands(key, m_rows, k_features, n_features)
      blocks = {name: config for (name, m), config in sweep.items() if m == m_rows}
      calls = variant_calls(ops, k_features, interpret, blocks)
      baseline = None
      for name in ["bf16_xla"] + [n for n in names if n != "bf16_xla"]:
        kernel, _, args, flops, moved = calls[name]
        try:
          seconds = time_fn(kernel, *args, warmup=warmup, iters=iters)
        except Exception as error:  # keep the rest of the table if one kernel fails to build
          logging.error("%s M=%d K=%d N=%d failed: %s", name, m_rows, k_features, n_features,
                        error)
          rows.append(dict(kernel=name, m=m_rows, k=k_features, n=n_features, error=str(error)))
          continue
        baseline = seconds if name == "bf16_xla" else baseline
        tflops, gbps = flops / seconds / 1e12, moved / seconds / 1e9
        rows.append(dict(
            kernel=name, m=m_rows, k=k_features, n=n_features, us=seconds * 1e6,
            vs_bf16=seconds / baseline, tflops=tflops, gbps=gbps,
            tflops_frac=tflops / peaks["matmul_tflops"], gbps_frac=gbps / peaks["copy_gbps"]))
      on_rows(rows)
  return rows


# ----------------------------------------------------------------------------------------
# DiT step (filled in by the lead once the quantized types exist)
# ----------------------------------------------------------------------------------------


def _device_memory_stats() -> dict:
  try:
    return jax.local_devices()[0].memory_stats() or {}
  except Exception:  # backends without memory_stats (some CPU builds)
    return {}


def bench_dit_step(variants: Mapping[str, tuple[Callable, tuple]], *, warmup: int = 3,
                   iters: int = 20) -> list[dict]:
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
    seconds = time_fn(step, *args, warmup=warmup, iters=iters)
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
    else:  # HQ-DiT W4A4: E2M1 weights, Hadamard, per-token E2M1 activations
      transform = hadamard.make_transform(k_in, seed + index)
      codes = rng.integers(0, 16, (k_in, n_out)).astype(np.uint8)
      weight = hqdit.FP4Weight.from_codes(
          codes, np.full((n_out,), 0.01, np.float32), "e2m1",
          hadamard_signs=transform.signs, hadamard_block=transform.block,
          hadamard_seed=transform.seed, act_format="e2m1", act_granularity="per_token")
    out = rules.set_path(out, path + "/kernel", weight)
  return out


def dit_step_variants(smoke: bool) -> Mapping[str, tuple[Callable, tuple]]:
  """One DiT-XL/2 (256x256: 32x32x4 latents) DDPM sampling step, batch 8 with CFG (the model
  sees 16), for FP bf16, VQ W2 and HQ-DiT W4A4 with random weights in the real shapes.
  Ordered by increasing memory (see bench_dit_step).  smoke: a tiny DiT instead of XL/2."""
  from dit_quant_jax.diffusion import create_diffusion, sampling
  from dit_quant_jax.models import dit
  if smoke:
    model = dit.create_model("DiT-S/8", input_size=16, depth=1, hidden_size=128, num_heads=2,
                             num_classes=10, dtype=jnp.bfloat16)
  else:
    model = dit.create_model("DiT-XL/2", input_size=32, num_classes=1000, dtype=jnp.bfloat16)
  params = jax.jit(lambda key: dit.init_params(model, key))(jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(  # non-zero adaLN / final layer, as after training
      lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
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
  for name in ("vq_w2", "hqdit_w4a4"):
    variants[name] = (step, (_random_quantized_params(params, name), x, t, labels, noise))
  bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
  variants["fp_bf16"] = (step, (bf16, x, t, labels, noise))
  return variants


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def _bytes_text(value):
  return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def write_report(path: str, header: dict, peaks: dict, checks: list[dict], rows: list[dict],
                 step_rows: list[dict]) -> None:
  lines = [f"# Pallas kernel benchmark: {header['device']}", ""]
  lines += [f"- {key}: {value}" for key, value in header.items()]
  lines += [f"- measured bf16 matmul peak: {peaks['matmul_tflops']:.1f} TFLOP/s "
            f"({peaks['matmul_size']}^3)",
            f"- measured device copy peak: {peaks['copy_gbps']:.0f} GB/s "
            f"({peaks['copy_bytes'] / 2**20:.0f} MiB read + written)", "",
            "Variants:", ""]
  lines += [f"- `{name}`: {text}" for name, text in VARIANTS.items()]
  lines += ["", "## Correctness (kernel vs plain-jnp reference)", "",
            "| kernel | M x K x N | metric | value | ok |", "|---|---|---|---|---|"]
  for check in checks:
    lines.append(f"| {check['kernel']} | {'x'.join(map(str, check['shape']))} | "
                 f"{check['metric']} | {check['value']:.2e} | {'yes' if check['ok'] else 'NO'} |")
  lines += ["", "## Linear layers (median time; TFLOP/s = 2MKN / t; GB/s = bytes read + "
            "written / t; % of the measured peaks)", "",
            "| K x N | M | kernel | time (us) | / bf16 | TFLOP/s | % peak | GB/s | % peak |",
            "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    if "error" in row:
      lines.append(f"| {row['k']}x{row['n']} | {row['m']} | {row['kernel']} | failed: "
                   f"{row['error'][:80]} | | | | | |")
      continue
    lines.append(
        f"| {row['k']}x{row['n']} | {row['m']} | {row['kernel']} | {row['us']:.1f} | "
        f"{row['vs_bf16']:.2f} | {row['tflops']:.2f} | {100 * row['tflops_frac']:.0f} | "
        f"{row['gbps']:.0f} | {100 * row['gbps_frac']:.0f} |")
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


def main(argv):
  del argv
  smoke = _SMOKE.value
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
  if not smoke and not common.on_gpu():
    raise app.UsageError("the benchmark needs a GPU; use --smoke for the CPU interpret check")
  interpret = not common.on_gpu()
  shapes = SMOKE_SHAPES if smoke else DIT_XL2_SHAPES
  tokens = [int(t) for t in _TOKENS.value] if _TOKENS.value else (
      SMOKE_TOKENS if smoke else DIT_XL2_TOKENS)
  warmup, iters = (1, 2) if smoke else (_WARMUP.value, _ITERS.value)
  device = jax.devices()[0]
  header = dict(device=f"{device.device_kind} ({device.platform})", jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                mode="smoke (interpret mode, CPU)" if smoke else "compiled",
                warmup=warmup, iters=iters)
  slug = device.device_kind.lower().replace(" ", "_")
  path = os.path.join(_OUT_DIR.value,
                      f"kernels_{'smoke_' if smoke else ''}{slug}_jax{jax.__version__}.md")
  key = jax.random.key(0)

  check_shape = (tokens[-1], shapes[0][0], shapes[0][1]) if smoke else (256, 1152, 1152)
  checks = correctness_pass(check_shape, interpret, key)
  for check in checks:
    logging.info("check %s", check)
  peaks = measure_peaks(smoke, warmup, iters)
  logging.info("peaks %s", peaks)
  sweep = {}
  if _SWEEP.value:
    sweep = sweep_blocks(_VARIANTS.value, tokens, interpret, warmup, iters, key)

  def on_rows(rows):
    write_report(path, header, peaks, checks, rows, [])

  rows = bench_kernels(shapes, tokens, _VARIANTS.value, interpret, warmup, iters, peaks, key,
                       sweep, on_rows)
  step_rows = bench_dit_step(dit_step_variants(smoke), warmup=warmup, iters=iters)
  write_report(path, header, peaks, checks, rows, step_rows)
  failed = [c for c in checks if not c["ok"]]
  logging.info("wrote %s (%d timing rows); %d correctness check(s) failed", path, len(rows),
               len(failed))
  print(f"wrote {path}; correctness: {len(checks) - len(failed)}/{len(checks)} ok")


if __name__ == "__main__":
  app.run(main)
