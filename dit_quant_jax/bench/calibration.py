"""VQ4DiT calibration throughput on DiT-XL/2 (issue 12, stage 6): steps per second of the
configured calibration procedure (calibrate/vq_calibrate.py), timed over a few steps after a
warm-up, and extrapolated to full budgets.

The layers start from random codebooks drawn from their own sub-vectors (k-means on XL/2 takes
minutes and does not change the cost of a step: the same shapes, candidates and ratios), so
the number measures the calibration step only: the FP teacher's forward and DDPM step on the
on-the-fly trajectory, the quantized student's forward and backward, the optimiser update and
the freezing check.  Budgets: ``steps`` of the config (ours: 1,000) and the public code's
1,000 trajectories of 50 steps (50,000 steps); the paper reports 20 min to 5 h on one A100.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dit_quant_jax.bench import kernels
from dit_quant_jax.calibrate import vq_calibrate
from dit_quant_jax.quant import rules, vq4dit
from dit_quant_jax.utils import atomic

PUBLIC_CODE_STEPS = 1000 * 50  # sample_quant.py: 1,000 trajectories x 50 DDPM steps


def random_soft_layers(params, qconfig, seed: int = 0) -> dict:
  """{path: SoftVQWeight} of every selected layer from a codebook of k random sub-vectors of
  the layer itself (the shapes and candidate structure of the k-means start)."""
  rng = np.random.default_rng(seed)
  d = int(qconfig.subvector_dim)
  soft = {}
  for path in rules.select_layers(params, list(qconfig.layer_patterns)):
    kernel = jnp.asarray(rules.get_path(params, path + "/kernel"), jnp.float32)
    vq4dit.check_layer_shape(kernel.shape, d)
    subvectors = vq4dit.kernel_to_subvectors(kernel, d).reshape(-1, d)
    k = vq4dit.effective_codebook_size(subvectors.shape[0], int(qconfig.codebook_size))
    codebook = subvectors[jnp.asarray(rng.choice(subvectors.shape[0], k, replace=False))]
    soft[path] = vq4dit.init_soft(kernel, codebook, int(qconfig.num_candidates),
                                  chunk_elements=int(qconfig.kmeans.chunk_elements))
  return soft


def _peak_bytes():
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def calibration_throughput(qconfig, *, smoke: bool, steps: int, warmup: int = 3,
                           model_and_params=None) -> dict:
  """Time ``steps`` calibration steps after ``warmup`` (compilation) on DiT-XL/2 (smoke: a tiny
  DiT).  -> dict(steps_per_second, seconds_per_step, extrapolated budgets, peak memory, ...)."""
  if steps < 1 or warmup < 1:
    raise ValueError(f"steps and warmup must be >= 1, got {steps} and {warmup}")
  model, params = model_and_params or kernels.random_dit(smoke)
  budget = int(qconfig.calibration.steps)  # the config's own budget, extrapolated to below
  qconfig = qconfig.copy_and_resolve_references()
  qconfig.calibration.steps = warmup + steps
  qconfig.calibration.checkpoint_every = 0
  qconfig.calibration.log_every = max(1, (warmup + steps) // 4)
  start = time.perf_counter()
  soft = random_soft_layers(params, qconfig)
  jax.block_until_ready(soft)
  setup_s = time.perf_counter() - start
  marks = {}

  def callback(step, metrics):  # metrics are already on the host: the step has finished
    del metrics
    if step in (warmup, warmup + steps):
      marks[step] = time.perf_counter()

  _, _, report = vq_calibrate.calibrate(model, params, soft, qconfig, callback=callback)
  seconds_per_step = (marks[warmup + steps] - marks[warmup]) / steps
  return dict(
      model="tiny DiT (smoke)" if smoke else "DiT-XL/2 256 px (random weights)",
      device=str(jax.devices()[0].device_kind), jax=jax.__version__,
      layers=len(soft), codebook_size=int(qconfig.codebook_size),
      subvector_dim=int(qconfig.subvector_dim), num_candidates=int(qconfig.num_candidates),
      images_per_trajectory=int(qconfig.calib.num_samples),
      cfg_scale=float(qconfig.calib.cfg_scale), loss=str(qconfig.calibration.loss),
      setup_seconds=setup_s, warmup_steps=warmup, timed_steps=steps,
      first_steps_seconds=marks[warmup] - start - setup_s,
      seconds_per_step=seconds_per_step, steps_per_second=1.0 / seconds_per_step,
      extrapolated_seconds={str(budget): budget * seconds_per_step,
                            str(PUBLIC_CODE_STEPS): PUBLIC_CODE_STEPS * seconds_per_step},
      peak_bytes_in_use=_peak_bytes(), calibration_report_seconds=report["seconds"])


def markdown(result: dict) -> str:
  hours = {k: v / 3600 for k, v in result["extrapolated_seconds"].items()}
  budgets = ", ".join(f"{int(k):,} steps: {h:.2f} h" for k, h in hours.items())
  peak = result["peak_bytes_in_use"]
  return "\n".join([
      f"# VQ4DiT calibration throughput: {result['model']} on {result['device']} "
      f"(jax {result['jax']})", "",
      f"k = {result['codebook_size']}, d = {result['subvector_dim']}, "
      f"{result['num_candidates']} candidates, {result['layers']} layers, "
      f"{result['images_per_trajectory']} images per trajectory at CFG {result['cfg_scale']} "
      f"(batch x2), loss {result['loss']}.", "",
      "| seconds / step | steps / s | extrapolated | peak device memory |", "|---|---|---|---|",
      f"| {result['seconds_per_step']:.4f} | {result['steps_per_second']:.2f} | {budgets} | "
      f"{'n/a' if peak is None else f'{peak / 2**30:.1f} GiB'} |", "",
      f"Timed: {result['timed_steps']} steps after {result['warmup_steps']} warm-up steps "
      f"(compilation: {result['first_steps_seconds']:.1f} s); set-up (random codebooks, "
      f"candidates): {result['setup_seconds']:.1f} s.  The paper reports 20 min to 5 h on one "
      "A100 for its budget.", ""])


def run(qconfig, *, smoke: bool, steps: int, warmup: int, out_dir: str) -> str:
  result = calibration_throughput(qconfig, smoke=smoke, steps=steps, warmup=warmup)
  atomic.write_json(os.path.join(out_dir, "calibration_throughput.json"), result)
  path = os.path.join(out_dir, "calibration_throughput.md")
  atomic.write_text(path, markdown(result))
  return path
