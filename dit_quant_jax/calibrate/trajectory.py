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
  """fp_trajectory on fresh Gaussian noise and uniformly random labels (no dataset)."""
  noise_key, label_key, sample_key = jax.random.split(rng, 3)
  shape = (num_samples, model.input_size, model.input_size, model.in_channels)
  noise = jax.random.normal(noise_key, shape, jnp.float32)
  labels = jax.random.randint(label_key, (num_samples,), 0, model.num_classes)
  return fp_trajectory(model, params, diffusion, labels, noise, sample_key, cfg_scale, sampler)
