"""Jit-compiled sampling loops (DDPM ancestral, DDIM with eta) and classifier-free guidance.

A *model function* is ``model_fn(x, t, *model_args) -> raw output`` with x: (N, H, W, C) and
t: (N,) int32 ORIGINAL-scale timesteps (the loop maps respaced indices through
``diffusion.timestep_map``).  ``model_args`` are traced (params, labels), so the compiled
loop is reused across calls and params are never baked in as constants.

Deterministic entry point for cross-implementation comparisons: :func:`ddim_deterministic`
(DDIM, eta = 0, explicit initial noise, no randomness at all).

Sharding: the loop is one jitted function of (noise, rng, params, labels); with ``noise``
and labels sharded over a batch mesh (several devices or processes, utils/distributed.py)
each device runs its rows.  The per-step DDPM noise is drawn inside the jit for the whole
global batch shape, and jax's random bits do not depend on how the array is sharded, so a
sharded run draws exactly the noise of a single-device run.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dit_quant_jax.diffusion.gaussian import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim")


@functools.lru_cache(maxsize=None)
def cfg_model_fn(model, cfg_scale: Optional[float]) -> Callable:
  """Model function ``fn(x, t, params, labels)`` for class-conditional sampling.

  With ``cfg_scale`` > 1 (official semantics) the batch is doubled internally: the first
  half with ``labels``, the second with the null class, through ``model.forward_with_cfg``;
  the guided output for the N conditional samples is returned.  Cached per (model, scale)
  so that jit reuses its compilation.
  """
  def fn(x, t, params, labels):
    if cfg_scale is None or cfg_scale == 1.0:
      return model.apply({"params": params}, x, t, labels)
    n = x.shape[0]
    x2 = jnp.concatenate([x, x], axis=0)
    t2 = jnp.concatenate([t, t], axis=0)
    y2 = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)], axis=0)
    out = model.apply({"params": params}, x2, t2, y2, cfg_scale, method=model.forward_with_cfg)
    return out[:n]
  return fn


def class_conditional_fn(model, params, labels, cfg_scale: Optional[float] = None) -> Callable:
  """Convenience closure ``fn(x, t)`` over params and labels (small models, tests)."""
  inner = cfg_model_fn(model, cfg_scale)
  return lambda x, t: inner(x, t, params, labels)


def model_inputs(model, x, t, labels, cfg_scale: Optional[float]):
  """The exact (x, t, y) that ``cfg_model_fn`` passes to ``model.apply`` at one step."""
  if cfg_scale is None or cfg_scale == 1.0:
    return x, t, labels
  return (jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0),
          jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)], 0))


@functools.partial(jax.jit, static_argnames=("diffusion", "model_fn", "sampler", "eta",
                                             "clip_denoised", "return_trajectory"))
def _sample_loop(noise, rng, model_args, *, diffusion: GaussianDiffusion, model_fn, sampler: str,
                 eta: float, clip_denoised: bool, return_trajectory: bool):
  n = noise.shape[0]
  indices = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  keys = jax.random.split(rng, diffusion.num_timesteps)

  def step(x, inputs):
    i, key = inputs
    t = jnp.full((n,), i, jnp.int32)
    t_model = diffusion.model_timesteps(t)
    out = model_fn(x, t_model, *model_args)
    step_noise = jax.random.normal(key, x.shape, x.dtype)
    if sampler == "ddpm":
      x_next, _ = diffusion.p_sample_step(out, x, t, step_noise, clip_denoised)
    else:
      x_next, _ = diffusion.ddim_sample_step(out, x, t, step_noise, eta, clip_denoised)
    record = (x, t_model, out) if return_trajectory else None
    return x_next, record

  x0, records = jax.lax.scan(step, noise, (indices, keys))
  return x0, records


def sample(diffusion: GaussianDiffusion, model_fn: Callable, noise: jax.Array, rng=None,
           sampler: str = "ddpm", eta: float = 0.0, model_args: tuple = (),
           clip_denoised: bool = False, return_trajectory: bool = False):
  """Run the reverse process from ``noise`` (N, H, W, C) to x_0.

  Returns x_0, or with ``return_trajectory`` (x_0, dict(x=(S,N,...), t=(S,N), out=(S,N,...)))
  holding the model input and output at each of the S steps (S = diffusion.num_timesteps).
  DiT's sample.py uses clip_denoised=False; so does the default here.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  if sampler == "ddpm" and eta != 0.0:
    raise ValueError("eta applies to the ddim sampler only")
  if rng is None:
    if sampler == "ddpm" or eta != 0.0:
      raise ValueError(f"the {sampler} sampler with eta={eta} needs an rng")
    rng = jax.random.key(0)  # unused: every noise term is multiplied by sigma = 0
  x0, records = _sample_loop(noise, rng, tuple(model_args), diffusion=diffusion, model_fn=model_fn,
                             sampler=sampler, eta=float(eta), clip_denoised=clip_denoised,
                             return_trajectory=return_trajectory)
  if return_trajectory:
    x, t, out = records
    return x0, dict(x=x, t=t, out=out)
  return x0


def ddim_deterministic(diffusion: GaussianDiffusion, model_fn: Callable, noise: jax.Array,
                       model_args: tuple = ()):
  """DDIM with eta = 0 from explicit initial noise: a pure function of its inputs."""
  return sample(diffusion, model_fn, noise, None, sampler="ddim", eta=0.0, model_args=model_args)
