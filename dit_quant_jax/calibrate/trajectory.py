"""The FP model's own sampling trajectory: the zero-data calibration set of both quantizers.

Draw Gaussian noise and class labels, run the full-precision model's sampler, and record at
every step exactly what ``model.apply`` received (with CFG the doubled batch: conditional
half, then the null-class half).  A quantized model is then calibrated on the FP model's
x_t at each step (VQ4DiT, HQ-DiT activation ranges).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dit_quant_jax.diffusion import sampling
from dit_quant_jax.utils import distributed


def fp_trajectory(model, params, diffusion, labels, noise, rng, cfg_scale: Optional[float] = None,
                  sampler: str = "ddpm", eta: float = 0.0):
  """Returns dict(x=(S, B, H, W, C), t=(S, B), y=(S, B)), B = 2N with CFG else N.

  labels: (N,) int; noise: (N, H, W, C).  S = diffusion.num_timesteps sampling steps.
  """
  model_fn = sampling.cfg_model_fn(model, cfg_scale)
  _, traj = sampling.sample(diffusion, model_fn, noise, rng, sampler=sampler, eta=eta,
                            model_args=(params, labels), return_trajectory=True)
  x_steps, t_steps = traj["x"], traj["t"]
  xs, ts, ys = jax.vmap(lambda x, t: sampling.model_inputs(model, x, t, labels, cfg_scale))(
      x_steps, t_steps)
  return dict(x=xs, t=ts, y=ys)


def random_calibration_set(model, params, diffusion, num_samples: int, rng,
                           cfg_scale: Optional[float] = None, sampler: str = "ddpm"):
  """fp_trajectory on fresh Gaussian noise and uniformly random labels (no dataset).

  With several devices (of one or several processes) and N divisible by their count, each
  device samples its share of the N trajectories (the 'data' mesh of utils/distributed.py)
  and every process gets the whole trajectory back as host arrays.
  """
  noise_key, label_key, sample_key = jax.random.split(rng, 3)
  shape = (num_samples, model.input_size, model.input_size, model.in_channels)
  noise = jax.random.normal(noise_key, shape, jnp.float32)
  labels = jax.random.randint(label_key, (num_samples,), 0, model.num_classes)
  mesh = distributed.data_mesh()
  if mesh.size == 1 or num_samples % mesh.size:
    return fp_trajectory(model, params, diffusion, labels, noise, sample_key, cfg_scale, sampler)
  sharding = distributed.batch_sharding(mesh)
  trajectory = fp_trajectory(model, distributed.replicate(params, mesh), diffusion,
                             distributed.put_batch(labels, sharding), distributed.put_batch(noise, sharding),
                             sample_key, cfg_scale, sampler)
  return distributed.to_host(trajectory)


# ------------------------------------------------------------- on-the-fly trajectories
# VQ4DiT calibration draws a fresh FP trajectory every diffusion.num_timesteps optimisation
# steps (public VQ4DiT code, sample_quant.py: new noise and labels per trajectory; one
# optimisation step per sampling step in gaussian_diffusion.py p_sample_loop_progressive_quant).
# Everything below is a pure function of (key, trajectory index, step), so a calibration that
# stores only the current x_t and the step number resumes bit-identically.


def class_order(key, num_classes: int) -> jax.Array:
  """(num_classes,) a seeded permutation of the classes; trajectories walk it in turn."""
  return jax.random.permutation(jax.random.fold_in(key, 0), num_classes)


def stratified_labels(order: jax.Array, trajectory_index, num_samples: int) -> jax.Array:
  """(num_samples,) labels of trajectory j: order[(j * n + i) mod C], i < n.

  Consecutive trajectories walk the class permutation, so over ceil(C / n) trajectories
  every class is seen and no class is seen twice before all have been seen once.
  """
  offsets = trajectory_index * num_samples + jnp.arange(num_samples)
  return order[offsets % order.shape[0]]


def initial_noise(key, trajectory_index, shape) -> jax.Array:
  """x_T of trajectory j: (N, H, W, C) standard normal."""
  return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), trajectory_index), shape,
                           jnp.float32)


def step_noise(key, trajectory_index, position, shape) -> jax.Array:
  """The sampler's noise at sampling step ``position`` of trajectory j: (N, H, W, C)."""
  trajectory_key = jax.random.fold_in(jax.random.fold_in(key, 2), trajectory_index)
  return jax.random.normal(jax.random.fold_in(trajectory_key, position), shape, jnp.float32)


def sampler_step(diffusion, model_output, x, t, noise, sampler: str = "ddpm", eta: float = 0.0):
  """One reverse step x_t -> x_{t-1} (t: (N,) respaced indices), as ``sampling.sample`` takes it."""
  if sampler == "ddpm":
    return diffusion.p_sample_step(model_output, x, t, noise, False)[0]
  if sampler == "ddim":
    return diffusion.ddim_sample_step(model_output, x, t, noise, eta, False)[0]
  raise ValueError(f"unknown sampler {sampler!r}; expected one of {sampling.SAMPLERS}")
