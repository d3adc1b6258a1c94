"""The library behind the experiment scripts: load a DiT, quantize it, sample, score.

Every step is a function of explicit inputs (params, noise, labels, seeds), so the same
noise and labels can be pushed through the FP and every quantized model (paired metrics).
Sampling batches are sharded over all local devices (1-D ``Mesh`` named ``data``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_quant_jax.utils import distributed
from dit_quant_jax.diffusion import create_diffusion, sampling
from dit_quant_jax.models import dit
from dit_quant_jax import api as quant_api
from dit_quant_jax.errors import CheckpointDamagedError, StaleOutputError, UserError
from dit_quant_jax.quant.qtensor import QuantizedWeight, is_quantized
from dit_quant_jax.utils import atomic, provenance
from dit_quant_jax.utils import checkpoint as ckpt_lib


# ----------------------------------------------------------------------------- models
def load_dit(path: str, expected_config: Optional[dict] = None):
  """An orbax DiT checkpoint (FP or quantized) -> (model, params, metadata)."""
  params, model_config, metadata = ckpt_lib.restore_checkpoint(path, expected_config)
  model = dit.create_model(None, **model_config)
  check_params_match_model(path, model, params)
  check_params_finite(path, params)
  params = jax.tree_util.tree_map(  # weights saved in an older storage layout, converted once
      lambda leaf: leaf.in_current_layout() if isinstance(leaf, QuantizedWeight) else leaf,
      params, is_leaf=is_quantized)
  return model, distributed.on_every_local_device(params), metadata


def check_params_finite(path: str, params) -> None:
  """No float array of a checkpoint may hold NaN or Inf (a model saved after diverging)."""
  for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    array = np.asarray(leaf)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
      raise CheckpointDamagedError(
          f"checkpoint {os.path.abspath(path)}: array {jax.tree_util.keystr(key)} holds "
          f"{int(np.sum(~np.isfinite(array)))} NaN/Inf values; the model it holds diverged, "
          "re-train or re-quantize it")


def check_params_match_model(path: str, model, params) -> None:
  """The params must hold exactly the arrays (names, shapes) that the recorded model config
  builds: a record saying depth 3 over params with 4 blocks is a damaged checkpoint, not a
  3-block model.  Quantized kernels are compared by their dense ``shape``."""
  expected = jax.eval_shape(lambda: dit.init_params(model, jax.random.PRNGKey(0)))
  expected_flat = {jax.tree_util.keystr(k): v.shape
                   for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  actual_flat = {}
  for key, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
    actual_flat[jax.tree_util.keystr(key)] = tuple(leaf.shape)
  missing = sorted(set(expected_flat) - set(actual_flat))
  extra = sorted(set(actual_flat) - set(expected_flat))
  wrong = [k for k in sorted(set(expected_flat) & set(actual_flat))
           if tuple(expected_flat[k]) != tuple(actual_flat[k])]
  if missing or extra or wrong:
    config = {k: model.config_dict()[k] for k in ("depth", "hidden_size", "patch_size", "num_classes")}
    parts = ([f"{len(extra)} arrays the record's model does not have (first {extra[0]})"] if extra else [])
    parts += ([f"{len(missing)} arrays missing (first {missing[0]})"] if missing else [])
    parts += ([f"{wrong[0]} has shape {actual_flat[wrong[0]]}, the record's model needs "
               f"{tuple(expected_flat[wrong[0]])}"] if wrong else [])
    raise CheckpointDamagedError(f"checkpoint {os.path.abspath(path)}: its record ({config}) does not "
                                 f"match its params: {'; '.join(parts)}; re-create or re-convert it")


REPORT_FILE = "report.json"
# Calibration fields that change only logging/checkpoint cadence: resuming across them is safe.
RESUME_IGNORED_FIELDS = ("calibration.log_every", "calibration.checkpoint_every",
                         "calibration.checkpoints_to_keep")


def quantization_provenance(model_path: str, qconfig) -> dict:
  """What a quantized output depends on: the quantization config and the FP model's content
  (its params digest when recorded, else its absolute path)."""
  source = ckpt_lib.content_fingerprint(model_path) or os.path.abspath(model_path)
  return dict(quantization=quant_api.config_to_dict(qconfig), source_model=source)


def read_report(report_path: str) -> Optional[dict]:
  """A quantization report.json, or None when it is cut off (a kill mid-write by older code,
  a damaged disk): the output is then incomplete and is redone."""
  try:
    with open(report_path) as f:
      report = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    logging.warning("%s is cut off or damaged (%s): the output is incomplete and is redone", report_path, e)
    return None
  return report if isinstance(report, dict) else None


def quantize_checkpoint(model_path: str, qconfig, output_dir: str, reuse: bool = True,
                        fp_model_and_params: Optional[tuple] = None,
                        override_flag: str = "--reuse=False") -> dict:
  """Quantize the DiT at ``model_path`` with ``qconfig``; write ``output_dir``/{params, report.json}.

  The report records the config that made it (``provenance``: hash + readable config, FP
  model digest).  With ``reuse`` an existing complete output made by the same config is
  returned as is (its report); one made by another config is refused (StaleOutputError naming
  the difference and ``override_flag``); without ``reuse`` it is redone.  Calibration state
  goes to ``output_dir``/calib_state and is resumed after a kill, only by the same config.
  ``fp_model_and_params``: the already loaded (model, params) of ``model_path`` (skips a reload).
  """
  from dit_quant_jax import validation
  record = validation.check_checkpoint_path(model_path, "FP model", "--model")
  validation.check_not_quantized(record, model_path, "--model")
  validation.check_quantization_config(qconfig, record["model_config"])
  report_path = os.path.join(output_dir, REPORT_FILE)
  params_path = os.path.join(output_dir, "params")
  expected = quantization_provenance(model_path, qconfig)
  # Process 0's disk decides for every process (they must all take the same branch).
  if reuse and distributed.primary_value(os.path.exists(report_path) and os.path.isdir(params_path)):
    report = read_report(report_path)
    if report is not None:
      provenance.check_stamp(f"quantized model in {os.path.abspath(output_dir)}",
                             report.get("provenance"), expected, override_flag)
      logging.info("reusing quantized model in %s (same config %s)", output_dir,
                   report["provenance"]["config_hash"])
      return report
  state_dir = os.path.join(output_dir, "calib_state")
  provenance.guard_state_dir(state_dir, expected, override_flag, ignore=[
      "quantization." + f for f in RESUME_IGNORED_FIELDS], discard_stale=not reuse)
  if fp_model_and_params is None:
    model, params, _ = load_dit(model_path)
  else:
    model, params = fp_model_and_params
  qparams, report = quant_api.quantize(model, params, qconfig, workdir=state_dir)
  report["source_model"] = os.path.abspath(model_path)
  report["config"] = expected["quantization"]
  report["provenance"] = provenance.make_stamp(expected)
  os.makedirs(output_dir, exist_ok=True)
  if distributed.is_primary() and os.path.exists(report_path):
    os.remove(report_path)  # the output is incomplete until the new report is written
  ckpt_lib.save_checkpoint(params_path, qparams, model.config_dict(),
                           dict(quantization=report["config"], source_model=model_path,
                                provenance=report["provenance"]),
                           overwrite=True)
  write_json(report_path, report)
  return report


# ----------------------------------------------------------------------------- sampling
def noise_and_labels(model, per_class: int, seed: int):
  """Identical inputs for every method: ``per_class`` samples of each class, fixed noise.

  Returns (noise (N, H, W, C) float32, labels (N,) int32), N = per_class * num_classes,
  labels in class-major order.
  """
  labels = np.repeat(np.arange(model.num_classes, dtype=np.int32), per_class)
  shape = (labels.shape[0], model.input_size, model.input_size, model.in_channels)
  noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32))
  return noise, labels


def device_mesh() -> Mesh:
  """A 1-D mesh named 'data' over every device of every process (batch sharding)."""
  return distributed.data_mesh()


def generate(model, params, noise, labels, *, respacing: str = "ddim25", sampler: str = "ddim",
             eta: float = 0.0, cfg_scale: Optional[float] = None, seed: int = 0,
             batch_size: int = 256, return_outputs: bool = False, clip: Optional[bool] = None,
             progress: Optional[Callable[[str], None]] = None):
  """Sample x_0 for every (noise, label) pair, in batches, sharded over local devices.

  Returns images (N, H, W, C) (float32 numpy), clipped to [-1, 1] for pixel-space models
  (``clip`` None: clip unless the model is a 4-channel latent model, whose latents the
  official sampler leaves unclipped for the VAE); with ``return_outputs``
  also the raw model outputs at every step (S, N, H, W, C_out), for per-step paired MSE.
  DDPM noise for batch b comes from fold_in(PRNGKey(seed), b): reproducible across methods.
  """
  diffusion = create_diffusion(respacing, learn_sigma=model.learn_sigma)
  if clip is None:
    clip = model.in_channels != 4
  model_fn = sampling.cfg_model_fn(model, cfg_scale)
  mesh = device_mesh()
  params = distributed.on_every_local_device(params, mesh)
  n = noise.shape[0]
  images, outputs = [], []
  start_time = time.time()
  for b, start in enumerate(range(0, n, batch_size)):
    batch_noise = noise[start:start + batch_size]
    batch_labels = labels[start:start + batch_size]
    valid = batch_noise.shape[0]
    pad = (-valid) % mesh.size
    if pad:  # keep every batch divisible by the device count
      batch_noise = np.concatenate([batch_noise, batch_noise[:pad]])
      batch_labels = np.concatenate([batch_labels, batch_labels[:pad]])
    sharding = NamedSharding(mesh, P("data"))
    # Every process holds the whole (seeded) batch and puts only its devices' rows.
    x = distributed.put_batch(batch_noise, sharding)
    y = distributed.put_batch(batch_labels, sharding)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), b)
    result = sampling.sample(diffusion, model_fn, x, rng, sampler=sampler, eta=eta,
                             model_args=(params, y), return_trajectory=return_outputs)
    if return_outputs:
      x0, traj = result
      outputs.append(distributed.to_host(traj["out"])[:, :valid])
    else:
      x0 = result
    x0 = distributed.to_host(x0)[:valid]
    images.append(np.clip(x0, -1.0, 1.0) if clip else x0)
    if progress is not None:
      done = start + valid
      elapsed = time.time() - start_time
      progress(f"sampled {done}/{n} images, {elapsed:.0f} s, ETA {elapsed / done * (n - done):.0f} s")
  images = np.concatenate(images)
  if return_outputs:
    return images, np.concatenate(outputs, axis=1)
  return images


# ----------------------------------------------------------------------------- scoring
def score(images, labels, fp_images=None, outputs=None, fp_outputs=None,
          bootstrap_resamples: int = 0) -> dict:
  """Distribution metrics (FD, IS, class accuracy, precision, recall; with
  ``bootstrap_resamples`` their fd_ci / class_acc_ci intervals) and, when the FP model's
  samples from the same noise are given, paired PSNR/MSE and per-step output MSE."""
  from dit_quant_jax.eval import evaluate, metrics
  result = dict(evaluate.evaluate_samples(images, labels, bootstrap_resamples=bootstrap_resamples))
  if fp_images is not None:
    paired = evaluate.paired_metrics(images, fp_images)
    result["paired_psnr"] = paired["psnr"]
    result["paired_mse"] = paired["mse"]
  if outputs is not None and fp_outputs is not None:
    per_step = metrics.per_step_mse(outputs, fp_outputs)
    result["per_step_output_mse"] = [float(v) for v in per_step]
  return result


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic,)):
    return value.item()
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  return value


def write_json(path: str, payload: dict) -> None:
  """``payload`` as indented JSON, written atomically (temporary name, then rename)."""
  atomic.write_json(path, _jsonable(payload))


# Compilations quicker than this are not worth a disk entry.
COMPILATION_CACHE_MIN_SECONDS = 0.5


def enable_compilation_cache(directory: str) -> None:
  """Keep XLA executables on disk under ``directory`` (jax's persistent compilation cache):
  a later run of the same job skips recompiling its samplers and quantizers.  The outputs
  are the same executables' outputs (measured: images bit-identical, the first sampling call
  of the FP model 18.3 s cold vs 12.9 s warm on the loaded 2-core machine)."""
  if not directory:
    return
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILATION_CACHE_MIN_SECONDS)


def run_main(main: Callable) -> Callable:
  """Wrap an absl ``main``: a :class:`UserError` (bad input, damaged or stale files) ends
  the script with its one-line message and exit status 2, not a traceback."""
  import sys

  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped


# ----------------------------------------------------------------------------- large runs
def sample_adm_shards(model, params, noise_labels, output_dir: str, *, shard_size: int,
                      decode: Optional[Callable] = None, progress: Callable[[str], None] = logging.info,
                      **generate_kwargs) -> str:
  """Sample a large set in resumable shards and merge them into ``output_dir``/samples.npz.

  noise_labels: (noise (N, ...), labels (N,)).  Each shard of ``shard_size`` samples is
  written to ``shards/shard_<i>.npz`` (uint8 NHWC under arr_0, labels under arr_1) as soon
  as it is done, and skipped when present, so a killed run resumes.  ``decode`` maps
  samples to images in [-1, 1] (the VAE for latent models).  Returns the merged npz path.
  """
  from dit_quant_jax.eval import writers
  noise, labels = noise_labels
  shard_dir = os.path.join(output_dir, "shards")
  os.makedirs(shard_dir, exist_ok=True)
  num_shards = -(-noise.shape[0] // shard_size)
  started = time.time()
  for index in range(num_shards):
    path = os.path.join(shard_dir, f"shard_{index:05d}.npz")
    if distributed.primary_value(os.path.exists(path)):  # process 0's disk decides for all
      continue
    sl = slice(index * shard_size, (index + 1) * shard_size)
    samples = generate(model, params, noise[sl], labels[sl], **generate_kwargs)
    images = decode(samples) if decode is not None else samples
    if distributed.is_primary():
      writers.write_adm_npz(path, images, labels[sl])  # atomic: a shard on disk is complete
    elapsed = time.time() - started
    progress(f"shard {index + 1}/{num_shards} done, {elapsed:.0f} s, "
             f"ETA {elapsed / (index + 1) * (num_shards - index - 1):.0f} s")
  merged = os.path.join(output_dir, "samples.npz")
  if distributed.is_primary():
    arrays, shard_labels = [], []
    for index in range(num_shards):
      with np.load(os.path.join(shard_dir, f"shard_{index:05d}.npz")) as shard:
        arrays.append(shard["arr_0"])
        shard_labels.append(shard["arr_1"])
    atomic.savez(merged, arr_0=np.concatenate(arrays), arr_1=np.concatenate(shard_labels))
  distributed.sync("adm shards merged")
  return merged
