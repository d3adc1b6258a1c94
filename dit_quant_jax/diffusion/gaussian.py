"""Gaussian diffusion as in the official DiT (itself from OpenAI's improved/guided diffusion).

Schedule arithmetic is float64 numpy; a table entry is gathered per timestep and cast to
float32 (as the official ``_extract_into_tensor``).  Arrays are NHWC; "mean_flat" reduces
over every non-batch axis.  Model outputs with ``learn_sigma`` hold epsilon in the first C
channels and the learned-range variance interpolation v in [-1, 1] in the last C:
``log var = (v + 1)/2 * log(beta_t) + (1 - (v + 1)/2) * log(posterior variance, clipped)``.

Respacing (``"250"``, ``"ddim50"``, ``"10,15,20"``) keeps a subset of the original 1000
steps, recomputes betas from the kept alphas_cumprod, and calls the model with the
original timestep index (``timestep_map``), exactly as ``SpacedDiffusion`` does.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# Official linear schedule endpoints for 1000 steps (Ho et al. 2020), scaled by 1000 / N.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
  if name == "linear":
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END,
                       num_diffusion_timesteps, dtype=np.float64)
  if name == "squaredcos_cap_v2":
    def alpha_bar(t):
      return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                    dtype=np.float64)
  raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'squaredcos_cap_v2'")


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> set:
  """The original timesteps kept by a respacing spec (official semantics).

  ``"ddimN"``: the evenly strided set range(0, T, stride) of exactly N steps.  Otherwise a
  comma list: the T steps are cut into equal sections and each is sampled evenly with the
  given count (``"250"`` -> 250 steps spread over all 1000).
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return set(range(0, num_timesteps, stride))
      raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start, steps = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot divide a section of {size} steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  return set(steps)


def mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood of data in [-1, 1] discretized to 8 bits (bin width 2/255)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
  """Schedule tables (float64 numpy) and the per-step arithmetic (jnp).

  Instances are immutable and hashed by identity, so they can be static arguments of jit;
  :func:`create_diffusion` caches them.
  """

  def __init__(self, betas: np.ndarray, learn_sigma: bool = True,
               timestep_map: Optional[np.ndarray] = None):
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must be a 1-D array in (0, 1]")
    self.betas = betas
    self.learn_sigma = learn_sigma
    self.num_timesteps = int(betas.shape[0])
    self.timestep_map = (np.arange(self.num_timesteps) if timestep_map is None
                         else np.asarray(timestep_map, dtype=np.int64))
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas, axis=0)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    # log(0) at t = 0 is replaced by the t = 1 value, as the official code does.
    self.posterior_log_variance_clipped = (
        np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        if self.num_timesteps > 1 else np.array([]))
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - self.alphas_cumprod))
    # Fixed-large variance for models without learn_sigma (official FIXED_LARGE).
    fixed_large = np.append(self.posterior_variance[1], betas[1:])
    self.fixed_large_log_variance = np.log(fixed_large)

  # ---------------------------------------------------------------- helpers
  @staticmethod
  def _extract(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] as float32, broadcastable to an array of rank ndim.  t: (N,) int."""
    values = jnp.asarray(table, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)[t]
    return values.astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))

  def model_timesteps(self, t: jax.Array) -> jax.Array:
    """Spaced index -> the original timestep the model was trained on."""
    return jnp.asarray(self.timestep_map, dtype=jnp.int32)[t]

  # ---------------------------------------------------------------- forward process
  def q_mean_variance(self, x_start, t):
    mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
    variance = self._extract(1.0 - self.alphas_cumprod, t, x_start.ndim)
    log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.ndim)
    return mean, variance, log_variance

  def q_sample(self, x_start, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (self._extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    nd = x_t.ndim
    mean = (self._extract(self.posterior_mean_coef1, t, nd) * x_start
            + self._extract(self.posterior_mean_coef2, t, nd) * x_t)
    variance = self._extract(self.posterior_variance, t, nd)
    log_variance = self._extract(self.posterior_log_variance_clipped, t, nd)
    return mean, variance, log_variance

  def predict_xstart_from_eps(self, x_t, t, eps):
    nd = x_t.ndim
    return (self._extract(self.sqrt_recip_alphas_cumprod, t, nd) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, nd) * eps)

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    nd = x_t.ndim
    return ((self._extract(self.sqrt_recip_alphas_cumprod, t, nd) * x_t - pred_xstart)
            / self._extract(self.sqrt_recipm1_alphas_cumprod, t, nd))

  # ---------------------------------------------------------------- reverse process
  def p_mean_variance(self, model_output, x, t, clip_denoised: bool = False):
    """From the raw model output at (x, t): mean, variance, log variance, predicted x_0.

    model_output: (N, H, W, 2C) with learn_sigma, else (N, H, W, C).
    """
    c = x.shape[-1]
    nd = x.ndim
    if self.learn_sigma:
      if model_output.shape[-1] != 2 * c:
        raise ValueError(f"learn_sigma model output needs {2 * c} channels, got {model_output.shape}")
      eps, var_values = model_output[..., :c], model_output[..., c:]
      min_log = self._extract(self.posterior_log_variance_clipped, t, nd)
      max_log = self._extract(np.log(self.betas), t, nd)
      frac = (var_values + 1) / 2
      log_variance = frac * max_log + (1 - frac) * min_log
    else:
      eps = model_output
      log_variance = jnp.broadcast_to(self._extract(self.fixed_large_log_variance, t, nd), x.shape)
    pred_xstart = self.predict_xstart_from_eps(x, t, eps)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return dict(mean=mean, variance=jnp.exp(log_variance), log_variance=log_variance,
                pred_xstart=pred_xstart, eps=eps)

  def p_sample_step(self, model_output, x, t, noise, clip_denoised: bool = False):
    """Ancestral DDPM step: x_{t-1} = mean + [t > 0] exp(log var / 2) * noise."""
    out = self.p_mean_variance(model_output, x, t, clip_denoised)
    nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise, out["pred_xstart"]

  def ddim_sample_step(self, model_output, x, t, noise, eta: float = 0.0,
                       clip_denoised: bool = False):
    """DDIM step (Song et al. 2021, eq. 12) with stochasticity eta."""
    out = self.p_mean_variance(model_output, x, t, clip_denoised)
    eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
    nd = x.ndim
    alpha_bar = self._extract(self.alphas_cumprod, t, nd)
    alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, nd)
    sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
             * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
    mean_pred = (out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
                 + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps)
    nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (nd - 1))
    return mean_pred + nonzero * sigma * noise, out["pred_xstart"]

  # ---------------------------------------------------------------- training
  def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised: bool = False):
    """Variational bound term in bits per dim: KL for t > 0, decoder NLL at t = 0."""
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
    nll = mean_flat(nll) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def training_losses(self, model_fn: Callable, x_start, t, noise):
    """Official DiT loss: MSE on epsilon + (learn_sigma) the VB term with a frozen mean.

    model_fn(x_t, model_timesteps) -> raw output.  Returns dict(loss, mse, vb), each (N,).
    """
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.model_timesteps(t))
    c = x_start.shape[-1]
    terms = {}
    if self.learn_sigma:
      eps, var_values = model_output[..., :c], model_output[..., c:]
      frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
      terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
    else:
      eps = model_output
      terms["vb"] = jnp.zeros(x_start.shape[:1], jnp.float32)
    terms["mse"] = mean_flat(jnp.square(noise - eps))
    terms["loss"] = terms["mse"] + terms["vb"]
    return terms


def create_diffusion(timestep_respacing: Union[str, Sequence[int], None] = "",
                     noise_schedule: str = "linear", learn_sigma: bool = True,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
  """As the official ``create_diffusion``: respaced for sampling, "" or None for all steps.

  timestep_respacing: "250", "ddim50", "10,15,20" or a sequence of section counts.  Cached:
  equal arguments give the same (hashable) object, so jit reuses its compilations.
  """
  if timestep_respacing is not None and not isinstance(timestep_respacing, str):
    timestep_respacing = ",".join(str(int(c)) for c in timestep_respacing)
  return _create_diffusion(timestep_respacing, noise_schedule, learn_sigma, diffusion_steps)


@functools.lru_cache(maxsize=None)
def _create_diffusion(timestep_respacing, noise_schedule, learn_sigma, diffusion_steps):
  base = GaussianDiffusion(get_named_beta_schedule(noise_schedule, diffusion_steps), learn_sigma)
  if not timestep_respacing:
    return base
  use = space_timesteps(diffusion_steps, timestep_respacing)
  new_betas, timestep_map, last = [], [], 1.0
  for i, alpha_cumprod in enumerate(base.alphas_cumprod):
    if i in use:
      new_betas.append(1 - alpha_cumprod / last)
      last = alpha_cumprod
      timestep_map.append(i)
  return GaussianDiffusion(np.array(new_betas), learn_sigma, np.array(timestep_map))
