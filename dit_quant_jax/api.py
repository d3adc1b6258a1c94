"""One entry point for every quantization method: params pytree -> quantized params pytree.

This module sits above both ``quant/`` (the quantizers) and ``calibrate/`` (trajectories,
calibration loops): it imports them, and neither imports it.

``quantize(model, params, qconfig)`` builds the zero-data calibration set the method asks
for (the FP model's own sampling trajectory, ``qconfig.calib``), runs the method and returns
``(qparams, report)``.  Methods (``qconfig.method``):

  fp       identity (the reference row)
  vq4dit   VQ4DiT (configs/vq4dit.py): k-means codebooks, candidate ratios, calibration;
           with ``calibration.steps == 0`` the "k-means only" ablation
  hqdit    HQ-DiT and the RTN/FP4/INT baselines (configs/hqdit.py)

The report always carries ``method``, ``wall_time_s`` (quantization, calibration set
included) and ``size`` (:func:`model_size`).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from dit_quant_jax.calibrate.trajectory import random_calibration_set
from dit_quant_jax.diffusion import create_diffusion
from dit_quant_jax.quant.qtensor import QuantizedWeight, is_quantized
from dit_quant_jax.utils import distributed

METHODS = ("fp", "vq4dit", "hqdit")


def method_of(qconfig) -> str:
  method = qconfig.get("method")
  if method is None:
    raise ValueError("quantization config has no 'method' field; expected one of " + str(METHODS))
  if method not in METHODS:
    raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
  return method


# Fields of a ``calib`` block that determine its trajectory (calibration_inputs reads these).
TRAJECTORY_FIELDS = ("num_samples", "timestep_respacing", "sampler", "cfg_scale", "seed")
# FP trajectories kept in memory: rows of one process that ask for the same one share it.
TRAJECTORY_CACHE_SIZE = 4
_TRAJECTORY_CACHE: list = []  # [(params, key, trajectory)], newest last


def cached_calibration_inputs(model, params, calib_cfg, seed_offset: int = 0):
  """:func:`calibration_inputs`, computed once per (model, params object, trajectory fields).

  The trajectory is a deterministic function of these, so a reused one is identical to a
  recomputed one.  The cache holds a reference to ``params`` (an id cannot be reused while
  its entry lives) and at most TRAJECTORY_CACHE_SIZE entries.
  """
  key = (repr(sorted(model.config_dict().items())), seed_offset,
         tuple((f, repr(calib_cfg.get(f))) for f in TRAJECTORY_FIELDS))
  for cached_params, cached_key, trajectory in _TRAJECTORY_CACHE:
    if cached_params is params and cached_key == key:
      logging.info("reusing the FP calibration trajectory computed for an earlier row")
      return trajectory
  trajectory = jax.block_until_ready(calibration_inputs(model, params, calib_cfg, seed_offset))
  _TRAJECTORY_CACHE.append((params, key, trajectory))
  del _TRAJECTORY_CACHE[:-TRAJECTORY_CACHE_SIZE]
  return trajectory


def calibration_inputs(model, params, calib_cfg, seed_offset: int = 0):
  """The FP trajectory described by a config's ``calib`` block (see calibrate/trajectory.py)."""
  diffusion = create_diffusion(calib_cfg.timestep_respacing, learn_sigma=model.learn_sigma)
  rng = jax.random.PRNGKey(int(calib_cfg.seed) + seed_offset)
  return random_calibration_set(model, params, diffusion, int(calib_cfg.num_samples), rng,
                                cfg_scale=calib_cfg.get("cfg_scale"),
                                sampler=calib_cfg.get("sampler", "ddpm"))


def quantize(model, params, qconfig, workdir: Optional[str] = None):
  """-> (qparams, report).  ``workdir`` holds resumable calibration state (VQ4DiT)."""
  method = method_of(qconfig)
  start = time.perf_counter()
  params = distributed.on_every_local_device(params)  # several devices: beside sharded batches
  if method == "fp":
    qparams, report = params, {}
  else:
    calib = None
    # VQ4DiT draws its FP trajectories on the fly, inside calibration (calibrate/vq_calibrate.py).
    needs_calib = method == "hqdit"
    if needs_calib:
      logging.info("collecting the FP calibration trajectory (%d samples, %s steps)",
                   qconfig.calib.num_samples, qconfig.calib.timestep_respacing)
      calib_start = time.perf_counter()
      calib = cached_calibration_inputs(model, params, qconfig.calib)
      calib_set_time_s = time.perf_counter() - calib_start
    if method == "vq4dit":
      from dit_quant_jax.calibrate import vq_calibrate
      from dit_quant_jax.quant import vq4dit
      qparams, report = vq_calibrate.quantize_from_config(model, params, qconfig, workdir=workdir)
      act = qconfig.get("act")
      if act is not None and act.get("format"):
        qparams = jax.tree_util.tree_map(
            lambda w: w.with_activation_quant(act.format, act.clip_ratio)
            if isinstance(w, vq4dit.VQWeight) else w, qparams, is_leaf=is_quantized)
    else:
      from dit_quant_jax.quant import hqdit
      qparams, report = hqdit.quantize_from_config(model, params, qconfig, calib)
  report = dict(report)
  if method != "fp" and calib is not None:
    report["calib_set_time_s"] = calib_set_time_s
  report["method"] = method
  report["setting"] = qconfig.get("name", method)
  report["wall_time_s"] = time.perf_counter() - start
  report["size"] = model_size(qparams)
  return qparams, report


def model_size(params) -> dict:
  """Stored bytes of a (possibly quantized) params pytree.

  Dense arrays count their nbytes; quantized nodes their ``nbytes_breakdown()``, summed by
  component (e.g. codebook, assignments, codes, scales).  ``total_mb`` is in 2**20 bytes.
  """
  by_component: dict[str, int] = {}
  dense = 0
  for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_quantized):
    if isinstance(leaf, QuantizedWeight):
      for name, nbytes in leaf.nbytes_breakdown().items():
        by_component[name] = by_component.get(name, 0) + int(nbytes)
    elif is_quantized(leaf):  # activation quantizers: their few scalars
      dense += sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(leaf))
    else:
      dense += int(np.dtype(leaf.dtype).itemsize * np.prod(np.shape(leaf)))
  total = dense + sum(by_component.values())
  return dict(total_bytes=total, total_mb=total / 2**20, dense_bytes=dense,
              quantized_components=by_component)


def config_to_dict(config: Any) -> dict:
  """A JSON-friendly dict of an ml_collections config (for reports and checkpoint metadata)."""
  import json
  return json.loads(config.to_json_best_effort())
