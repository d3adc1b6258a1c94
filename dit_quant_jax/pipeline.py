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

from dit_quant_jax.diffusion import create_diffusion, sampling
from dit_quant_jax.models import dit
from dit_quant_jax import api as quant_api
from dit_quant_jax.utils import checkpoint as ckpt_lib


# ----------------------------------------------------------------------------- models
def load_dit(path: str, expected_config: Optional[dict] = None):
  """An orbax DiT checkpoint (FP or quantized) -> (model, params, metadata)."""
  params, model_config, metadata = ckpt_lib.restore_checkpoint(path, expected_config)
  model = dit.create_model(None, **model_config)
  return model, params, metadata


def quantize_checkpoint(model_path: str, qconfig, output_dir: str, reuse: bool = True) -> dict:
  """Quantize the DiT at ``model_path`` with ``qconfig``; write ``output_dir``/{params, report.json}.

  With ``reuse`` an existing complete output is returned as is (its report).  Calibration
  state goes to ``output_dir``/calib_state and is resumed after a kill.
  """
  report_path = os.path.join(output_dir, "report.json")
  params_path = os.path.join(output_dir, "params")
  if reuse and os.path.exists(report_path) and os.path.isdir(params_path):
    logging.info("reusing quantized model in %s", output_dir)
    with open(report_path) as f:
      return json.load(f)
  model, params, fp_meta = load_dit(model_path)
  qparams, report = quant_api.quantize(model, params, qconfig,
                                       workdir=os.path.join(output_dir, "calib_state"))
  report["source_model"] = os.path.abspath(model_path)
  report["config"] = quant_api.config_to_dict(qconfig)
  os.makedirs(output_dir, exist_ok=True)
  ckpt_lib.save_checkpoint(params_path, qparams, model.config_dict(),
                           dict(quantization=report["config"], source_model=model_path),
                           overwrite=True)
  with open(report_path, "w") as f:
    json.dump(_jsonable(report), f, indent=1)
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
  """A 1-D mesh named 'data' over all local devices (batch sharding)."""
  return Mesh(np.array(jax.devices()), ("data",))


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
    x = jax.device_put(jnp.asarray(batch_noise), sharding)
    y = jax.device_put(jnp.asarray(batch_labels), sharding)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), b)
    result = sampling.sample(diffusion, model_fn, x, rng, sampler=sampler, eta=eta,
                             model_args=(params, y), return_trajectory=return_outputs)
    if return_outputs:
      x0, traj = result
      outputs.append(np.asarray(traj["out"])[:, :valid])
    else:
      x0 = result
    x0 = np.asarray(x0)[:valid]
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
def score(images, labels, fp_images=None, outputs=None, fp_outputs=None) -> dict:
  """Distribution metrics (FD, IS, class accuracy, precision, recall) and, when the FP
  model's samples from the same noise are given, paired PSNR/MSE and per-step output MSE."""
  from dit_quant_jax.eval import evaluate, metrics
  result = dict(evaluate.evaluate_samples(images, labels))
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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(_jsonable(payload), f, indent=1)


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
    if os.path.exists(path):
      continue
    sl = slice(index * shard_size, (index + 1) * shard_size)
    samples = generate(model, params, noise[sl], labels[sl], **generate_kwargs)
    images = decode(samples) if decode is not None else samples
    writers.write_adm_npz(path + ".tmp.npz", images, labels[sl])
    os.replace(path + ".tmp.npz", path)  # atomic: a shard on disk is complete
    elapsed = time.time() - started
    progress(f"shard {index + 1}/{num_shards} done, {elapsed:.0f} s, "
             f"ETA {elapsed / (index + 1) * (num_shards - index - 1):.0f} s")
  arrays, shard_labels = [], []
  for index in range(num_shards):
    with np.load(os.path.join(shard_dir, f"shard_{index:05d}.npz")) as shard:
      arrays.append(shard["arr_0"])
      shard_labels.append(shard["arr_1"])
  merged = os.path.join(output_dir, "samples.npz")
  np.savez(merged, arr_0=np.concatenate(arrays), arr_1=np.concatenate(shard_labels))
  return merged


def maybe_initialize_distributed() -> bool:
  """Multi-host: ``jax.distributed.initialize()`` when the environment names a coordinator
  (JAX_COORDINATOR_ADDRESS, or a cluster jax auto-detects with DIT_QUANT_DISTRIBUTED=1).
  The sharded code then spans every host's devices.  Returns whether it initialized."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("DIT_QUANT_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    logging.info("jax.distributed initialized: process %d of %d, %d devices", jax.process_index(),
                 jax.process_count(), jax.device_count())
    return True
  return False
