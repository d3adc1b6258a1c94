"""Diffusion process and samplers (official DiT semantics)."""
from dit_quant_jax.diffusion import sampling
from dit_quant_jax.diffusion.gaussian import GaussianDiffusion, create_diffusion, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion", "space_timesteps", "sampling"]
