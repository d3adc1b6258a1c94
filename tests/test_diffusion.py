"""Gaussian diffusion, respacing and samplers against independent float64 numpy references.

References are written from the papers: Ho et al. 2020 (DDPM: linear schedule, q(x_t | x_0),
posterior q(x_{t-1} | x_t, x_0), eq. 6-7, ancestral step), Nichol & Dhariwal 2021 (improved
DDPM: learned-range variance, eq. 15; hybrid loss with the VB term in bits per dim, the
discretized Gaussian decoder at t = 0; respacing by a subsequence of steps) and Song et al.
2021 (DDIM, eq. 12, with eta).  Respacing specs follow the official improved-diffusion /
DiT ``space_timesteps`` semantics, re-derived here with exact rational arithmetic.
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.calibrate import trajectory
from dit_quant_jax.diffusion import create_diffusion, sampling, space_timesteps
from dit_quant_jax.diffusion import gaussian
from dit_quant_jax.models import dit

# Ho et al. 2020, Sec. 4: beta_1 = 1e-4 ... beta_T = 0.02 for T = 1000; improved-DDPM scales
# both endpoints by 1000 / T for other step counts.
HO_BETA_FIRST, HO_BETA_LAST, HO_STEPS = 1e-4, 0.02, 1000
# 8-bit data in [-1, 1]: the decoder's bins have half-width 1/255 (Ho et al. 2020, eq. 13).
BIN_HALF_WIDTH = 1.0 / 255.0
NULL_CLASS = 10  # the tiny DiT below has 10 classes; the null (CFG) class is index 10


# ------------------------------------------------------------------ numpy references
def ref_linear_betas(num_steps):
  scale = HO_STEPS / num_steps
  first, last = HO_BETA_FIRST * scale, HO_BETA_LAST * scale
  return np.array([first + (last - first) * i / (num_steps - 1) for i in range(num_steps)])


def ref_tables(betas):
  """Schedule quantities in float64, each written from its definition."""
  betas = np.asarray(betas, np.float64)
  alphas = 1.0 - betas
  abar = np.exp(np.cumsum(np.log1p(-betas)))  # prod_{s<=t} alpha_s, via logs
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)  # beta~_t, Ho eq. 7
  # beta~_0 = 0: its log is replaced by log beta~_1 (improved DDPM's "clipped" log variance).
  post_logvar_clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
  coef_x0 = np.sqrt(abar_prev) * betas / (1.0 - abar)
  coef_xt = np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar)
  return dict(betas=betas, alphas=alphas, abar=abar, abar_prev=abar_prev, post_var=post_var,
              post_logvar_clipped=post_logvar_clipped, coef_x0=coef_x0, coef_xt=coef_xt)


def ref_space_timesteps(num_steps, spec):
  """Kept steps: ddimN = range(0, T, k) with exactly N elements; else each of the equal
  sections (the first T % len sections one step longer) sampled at round(j * (size-1)/(n-1))."""
  if spec.startswith("ddim"):
    wanted = int(spec[4:])
    strides = [k for k in range(1, num_steps) if -(-num_steps // k) == wanted]
    if not strides:
      return None
    return set(range(0, num_steps, strides[0]))
  counts = [int(c) for c in spec.split(",")]
  sizes = [num_steps // len(counts) + (1 if i < num_steps % len(counts) else 0)
           for i in range(len(counts))]
  kept, start = [], 0
  for size, count in zip(sizes, counts):
    for j in range(count):
      offset = 0 if count == 1 else Fraction(j * (size - 1), count - 1)
      kept.append(start + round(offset))
    start += size
  return set(kept)


def ref_normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(m1, v1) || N(m2, v2)) = 1/2 [log(v2/v1) + (v1 + (m1 - m2)^2) / v2 - 1]."""
  v1, v2 = np.exp(logvar1), np.exp(logvar2)
  return 0.5 * (np.log(v2 / v1) + (v1 + (mean1 - mean2) ** 2) / v2 - 1.0)


def ref_cdf_tanh(x):
  """The tanh approximation of the standard normal CDF used by the official decoder."""
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_decoder_loglik(x, mean, log_scale):
  """log P(bin of x) under N(mean, e^{2 log_scale}); edge bins extend to +-infinity."""
  stdv = np.exp(log_scale)
  upper = ref_cdf_tanh((x - mean + BIN_HALF_WIDTH) / stdv)
  lower = ref_cdf_tanh((x - mean - BIN_HALF_WIDTH) / stdv)
  prob = np.where(x < -0.999, upper, np.where(x > 0.999, 1.0 - lower, upper - lower))
  return np.log(np.maximum(prob, 1e-12))


def ref_p_mean_variance(tab, output, x, t, learn_sigma=True, clip=False):
  """Reverse-step mean / log variance / x0 from a raw eps (+ v) output, float64."""
  c = x.shape[-1]
  bshape = (-1,) + (1,) * (x.ndim - 1)
  pick = lambda name: tab[name][t].reshape(bshape)  # noqa: E731
  eps = output[..., :c]
  if learn_sigma:
    frac = (output[..., c:] + 1.0) / 2.0  # improved DDPM eq. 15: v in [-1, 1] -> [0, 1]
    logvar = frac * np.log(pick("betas")) + (1.0 - frac) * pick("post_logvar_clipped")
  else:  # fixed-large: beta_t, with beta~_1 at t = 0
    large = np.concatenate([[tab["post_var"][1]], tab["betas"][1:]])
    logvar = np.broadcast_to(np.log(large[t]).reshape(bshape), x.shape)
  abar = pick("abar")
  x0 = (x - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
  if clip:
    x0 = np.clip(x0, -1.0, 1.0)
  mean = pick("coef_x0") * x0 + pick("coef_xt") * x
  return dict(mean=mean, logvar=logvar, x0=x0)


def ref_ddim_step(tab, output, x, t, noise, eta, clip=False):
  """Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16."""
  bshape = (-1,) + (1,) * (x.ndim - 1)
  out = ref_p_mean_variance(tab, output, x, t, clip=clip)
  abar, abar_prev = tab["abar"][t].reshape(bshape), tab["abar_prev"][t].reshape(bshape)
  eps = (x - np.sqrt(abar) * out["x0"]) / np.sqrt(1.0 - abar)
  sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
  nonzero = (t > 0).reshape(bshape)
  return np.sqrt(abar_prev) * out["x0"] + np.sqrt(1 - abar_prev - sigma ** 2) * eps + nonzero * sigma * noise


def f64(x):
  return np.asarray(x, np.float64)


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _full_precision_matmuls():
  """float32 matmuls without TF32/bf16 passes (GPU), so DiT outputs compare at 1e-5."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def base():
  return create_diffusion("")


@pytest.fixture(scope="module")
def rand():
  return np.random.default_rng(20240601)


@pytest.fixture(scope="module")
def tiny_dit():
  """Tiny class-conditional DiT with every param re-drawn from N(0, 0.1^2).

  (adaLN-Zero init gives a zero output; with std 0.02 the conditional and unconditional
  outputs differ by ~2e-4, too little to test guidance at float32 precision.)
  """
  model = dit.create_model("DiT-S/4", input_size=16, in_channels=1, num_classes=10, depth=1,
                           hidden_size=32, num_heads=2, cfg_channels=None)
  return model, _random_params(model, seed=1)


def _random_params(model, seed, std=0.1):
  """Params of ``model``'s structure drawn from N(0, std^2) (numpy: no per-shape compiles)."""
  shapes = jax.eval_shape(lambda: dit.init_params(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32), shapes)


@pytest.fixture(scope="module")
def apply_fn():
  """Jitted plain forward (the reference for CFG): fn(model, params, x, t, y)."""
  return jax.jit(lambda model, params, x, t, y: model.apply({"params": params}, x, t, y),
                 static_argnums=0)


# ------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("num_steps", [1000, 250])
def test_linear_schedule_tables(num_steps):
  diffusion = gaussian.GaussianDiffusion(gaussian.get_named_beta_schedule("linear", num_steps))
  ref = ref_tables(ref_linear_betas(num_steps))
  scale = HO_STEPS / num_steps
  assert diffusion.num_timesteps == num_steps
  np.testing.assert_allclose(diffusion.betas[[0, -1]], [HO_BETA_FIRST * scale, HO_BETA_LAST * scale],
                             rtol=1e-12)
  np.testing.assert_allclose(diffusion.betas, ref["betas"], rtol=1e-12)
  np.testing.assert_allclose(diffusion.alphas_cumprod, ref["abar"], rtol=1e-10)
  np.testing.assert_allclose(diffusion.alphas_cumprod_prev, ref["abar_prev"], rtol=1e-10)
  np.testing.assert_allclose(diffusion.posterior_variance, ref["post_var"], rtol=1e-9)
  assert diffusion.posterior_variance[0] == 0.0
  np.testing.assert_allclose(diffusion.posterior_log_variance_clipped, ref["post_logvar_clipped"],
                             rtol=1e-9)
  np.testing.assert_allclose(diffusion.posterior_mean_coef1, ref["coef_x0"], rtol=1e-9)
  np.testing.assert_allclose(diffusion.posterior_mean_coef2, ref["coef_xt"], rtol=1e-9)
  # Posterior variance lies between the two DDPM choices: beta~_t <= beta_t (Ho et al. 3.2).
  assert np.all(diffusion.posterior_variance[1:] <= diffusion.betas[1:])


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="unknown beta schedule"):
    gaussian.get_named_beta_schedule("cosine-ish", 10)


@pytest.mark.parametrize("spec", ["250", "ddim50", "ddim25", "10,15,20", "1000", "ddim1000", "7"])
def test_space_timesteps_matches_reference(spec):
  kept = space_timesteps(1000, spec)
  assert kept == ref_space_timesteps(1000, spec)
  counts = [int(spec[4:])] if spec.startswith("ddim") else [int(c) for c in spec.split(",")]
  assert len(kept) == sum(counts)
  assert min(kept) == 0


def test_space_timesteps_known_sets():
  assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
  assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
  kept = sorted(space_timesteps(1000, "250"))
  assert kept[0] == 0 and kept[-1] == 999  # sections are sampled end to end
  kept = sorted(space_timesteps(1000, "10,15,20"))
  # Sections of 334, 333, 333 steps; each starts at its first step and ends at its last.
  assert {0, 333, 334, 666, 667, 999} <= set(kept)
  assert all(0 <= k < 334 for k in kept[:10]) and all(334 <= k < 667 for k in kept[10:25])
  assert space_timesteps(10, [3, 2]) == ref_space_timesteps(10, "3,2")


@pytest.mark.parametrize("spec", ["ddim999", "ddim400", "ddim1"])
def test_space_timesteps_impossible_ddim(spec):
  assert ref_space_timesteps(1000, spec) is None
  with pytest.raises(ValueError, match="exactly"):
    space_timesteps(1000, spec)


def test_space_timesteps_section_too_small():
  with pytest.raises(ValueError, match="cannot divide"):
    space_timesteps(10, "3,6")  # sections of 5 steps: 6 do not fit


@pytest.mark.parametrize("spec", ["250", "ddim25", "10,15,20"])
def test_respaced_diffusion(base, spec):
  spaced = create_diffusion(spec)
  kept = np.array(sorted(ref_space_timesteps(1000, spec)))
  abar = ref_tables(ref_linear_betas(1000))["abar"]
  np.testing.assert_array_equal(spaced.timestep_map, kept)
  assert spaced.num_timesteps == len(kept)
  abar_kept = abar[kept]
  betas_expected = 1.0 - abar_kept / np.concatenate([[1.0], abar_kept[:-1]])
  np.testing.assert_allclose(spaced.betas, betas_expected, rtol=1e-9)
  # The respaced chain has exactly the kept marginals q(x_t | x_0) of the original one.
  np.testing.assert_allclose(spaced.alphas_cumprod, abar_kept, rtol=1e-10)
  ref = ref_tables(betas_expected)
  np.testing.assert_allclose(spaced.posterior_log_variance_clipped, ref["post_logvar_clipped"], rtol=1e-9)
  np.testing.assert_allclose(spaced.posterior_mean_coef1, ref["coef_x0"], rtol=1e-9)
  # Model timesteps go through the map (the model was trained on original indices).
  idx = jnp.array([0, 3, len(kept) - 1])
  np.testing.assert_array_equal(np.asarray(spaced.model_timesteps(idx)), kept[[0, 3, len(kept) - 1]])
  assert create_diffusion(spec) is spaced  # cached: usable as a static jit argument


# ------------------------------------------------------------------ per-step arithmetic
T_VALUES = np.array([0, 1, 17, 500, 998, 999])


def _batch(rand, channels=2):
  n = len(T_VALUES)
  x0 = rand.uniform(-1, 1, (n, 4, 4, channels))
  noise = rand.standard_normal((n, 4, 4, channels))
  return x0, noise


def test_q_sample_and_posterior(base, rand):
  tab = ref_tables(ref_linear_betas(1000))
  x0, noise = _batch(rand)
  t = T_VALUES
  b = (-1, 1, 1, 1)
  xt_ref = np.sqrt(tab["abar"][t]).reshape(b) * x0 + np.sqrt(1 - tab["abar"][t]).reshape(b) * noise
  xt = base.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
  np.testing.assert_allclose(f64(xt), xt_ref, rtol=1e-5, atol=1e-5)

  mean, var, logvar = base.q_mean_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(t))
  np.testing.assert_allclose(f64(mean), np.sqrt(tab["abar"][t]).reshape(b) * x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f64(var).ravel(), 1 - tab["abar"][t], rtol=1e-5)

  mean, var, logvar = base.q_posterior_mean_variance(
      jnp.asarray(x0, jnp.float32), jnp.asarray(xt_ref, jnp.float32), jnp.asarray(t))
  # Ho et al. eq. 7, written with alphas directly.
  abar, abar_prev = tab["abar"][t].reshape(b), tab["abar_prev"][t].reshape(b)
  alpha, beta = tab["alphas"][t].reshape(b), tab["betas"][t].reshape(b)
  mean_ref = (np.sqrt(abar_prev) * beta * x0 + np.sqrt(alpha) * (1 - abar_prev) * xt_ref) / (1 - abar)
  np.testing.assert_allclose(f64(mean), mean_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f64(var).ravel(), tab["post_var"][t], rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(f64(logvar).ravel(), tab["post_logvar_clipped"][t], rtol=1e-5)
  # At t = 0 the posterior mean is x_0 itself (abar_prev = 1).
  np.testing.assert_allclose(f64(mean[0]), x0[0], atol=1e-5)


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance(rand, learn_sigma, clip):
  diffusion = create_diffusion("", learn_sigma=learn_sigma)
  tab = ref_tables(ref_linear_betas(1000))
  x0, noise = _batch(rand)
  t = T_VALUES
  x = rand.standard_normal(x0.shape)
  eps = rand.standard_normal(x0.shape)
  output = np.concatenate([eps, rand.uniform(-1, 1, x0.shape)], -1) if learn_sigma else eps
  got = diffusion.p_mean_variance(jnp.asarray(output, jnp.float32), jnp.asarray(x, jnp.float32),
                                  jnp.asarray(t), clip_denoised=clip)
  ref = ref_p_mean_variance(tab, output, x, t, learn_sigma=learn_sigma, clip=clip)
  # x0 = x/sqrt(abar) - ...: float32 error scales with 1/sqrt(abar) (~156 at t = 999).
  scale = (1.0 / np.sqrt(tab["abar"][t])).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(f64(got["pred_xstart"]) / scale, ref["x0"] / scale, atol=2e-6)
  np.testing.assert_allclose(f64(got["mean"]), ref["mean"], rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(f64(got["log_variance"]), ref["logvar"], rtol=1e-5)
  np.testing.assert_allclose(f64(got["variance"]), np.exp(ref["logvar"]), rtol=1e-5)
  if learn_sigma:
    # The interpolation spans [log beta~_t, log beta_t] (clipped at t = 0).
    lo = tab["post_logvar_clipped"][t].reshape(-1, 1, 1, 1) - 1e-5
    hi = np.log(tab["betas"][t]).reshape(-1, 1, 1, 1) + 1e-5
    assert np.all((f64(got["log_variance"]) >= lo) & (f64(got["log_variance"]) <= hi))


def test_p_mean_variance_rejects_wrong_channels(base):
  with pytest.raises(ValueError, match="needs 4 channels"):
    base.p_mean_variance(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4, 2)), jnp.array([5]))


def test_xstart_eps_round_trip(base, rand):
  tab = ref_tables(ref_linear_betas(1000))
  x0, eps = _batch(rand)
  t = T_VALUES
  b = (-1, 1, 1, 1)
  x = np.sqrt(tab["abar"][t]).reshape(b) * x0 + np.sqrt(1 - tab["abar"][t]).reshape(b) * eps
  x32, t32 = jnp.asarray(x, jnp.float32), jnp.asarray(t)
  got_x0 = base.predict_xstart_from_eps(x32, t32, jnp.asarray(eps, jnp.float32))
  scale = (1.0 / np.sqrt(tab["abar"][t])).reshape(b)
  np.testing.assert_allclose(f64(got_x0) / scale, x0 / scale, atol=2e-6)
  got_eps = base.predict_eps_from_xstart(x32, t32, jnp.asarray(x0, jnp.float32))
  # eps = (x - sqrt(abar) x0)/sqrt(1 - abar): 1/sqrt(1 - abar) = 100 at t = 0 amplifies rounding.
  np.testing.assert_allclose(f64(got_eps), eps, atol=2e-4)
  np.testing.assert_allclose(f64(got_eps[2:]), eps[2:], atol=2e-5)


def test_normal_kl_closed_form(rand):
  m1, m2 = rand.standard_normal(50), rand.standard_normal(50)
  lv1, lv2 = rand.uniform(-6, 1, 50), rand.uniform(-6, 1, 50)
  got = gaussian.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
  np.testing.assert_allclose(f64(got), ref_normal_kl(m1, lv1, m2, lv2), rtol=1e-4, atol=1e-5)
  same = gaussian.normal_kl(jnp.asarray(m1), jnp.asarray(lv1), jnp.asarray(m1), jnp.asarray(lv1))
  np.testing.assert_allclose(f64(same), 0.0, atol=1e-6)


def test_discretized_gaussian_likelihood(rand):
  # Every 8-bit value, including the edge bins.
  grid = np.arange(256) / 127.5 - 1.0
  log_scale = rand.uniform(np.log(0.005), np.log(0.5), 256)
  # Means within 2.5 scales of the data: further out, a bin's probability is a difference of
  # two CDF values near 0 or 1 that float32 (as the official torch code) cannot resolve.
  mean = grid + np.exp(log_scale) * np.clip(rand.standard_normal(256), -2.5, 2.5)
  got = gaussian.discretized_gaussian_log_likelihood(
      jnp.asarray(grid, jnp.float32), jnp.asarray(mean, jnp.float32), jnp.asarray(log_scale, jnp.float32))
  np.testing.assert_allclose(f64(got), ref_decoder_loglik(grid, mean, log_scale), rtol=2e-3, atol=2e-4)
  # For one (mean, scale) the 256 bin probabilities tile the real line: they sum to 1.
  total = np.exp(f64(gaussian.discretized_gaussian_log_likelihood(
      jnp.asarray(grid, jnp.float32), jnp.float32(0.3), jnp.float32(np.log(0.2))))).sum()
  assert abs(total - 1.0) < 1e-4


def test_vb_terms_bpd(base, rand):
  tab = ref_tables(ref_linear_betas(1000))
  t = T_VALUES
  n = len(t)
  x0 = rand.integers(0, 256, (n, 4, 4, 2)) / 127.5 - 1.0  # 8-bit data, with -1 and 1 present
  x0[0, 0, 0, 0], x0[0, 0, 1, 0] = -1.0, 1.0
  noise = rand.standard_normal(x0.shape)
  b = (-1, 1, 1, 1)
  xt = np.sqrt(tab["abar"][t]).reshape(b) * x0 + np.sqrt(1 - tab["abar"][t]).reshape(b) * noise
  # A model output near the truth so that the t = 0 decoder NLL is a finite, typical value.
  eps = noise + 0.3 * rand.standard_normal(x0.shape)
  output = np.concatenate([eps, rand.uniform(-1, 1, x0.shape)], -1)
  got = base.vb_terms_bpd(jnp.asarray(output, jnp.float32), jnp.asarray(x0, jnp.float32),
                          jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  pred = ref_p_mean_variance(tab, output, xt, t)
  true_mean = tab["coef_x0"][t].reshape(b) * x0 + tab["coef_xt"][t].reshape(b) * xt
  true_logvar = np.broadcast_to(tab["post_logvar_clipped"][t].reshape(b), x0.shape)
  kl = ref_normal_kl(true_mean, true_logvar, pred["mean"], pred["logvar"]).mean((1, 2, 3)) / math.log(2)
  nll = -ref_decoder_loglik(x0, pred["mean"], 0.5 * pred["logvar"]).mean((1, 2, 3)) / math.log(2)
  expected = np.where(t == 0, nll, kl)
  assert np.all(expected > 0)
  np.testing.assert_allclose(f64(got), expected, rtol=2e-3, atol=1e-5)


def test_training_losses_and_frozen_mean(base, rand):
  """loss = mean((eps - noise)^2) + VB, and the VB term sends no gradient to eps."""
  tab = ref_tables(ref_linear_betas(1000))
  t = T_VALUES
  x0 = rand.integers(0, 256, (len(t), 4, 4, 1)) / 127.5 - 1.0
  noise = rand.standard_normal(x0.shape)
  output = np.concatenate([rand.standard_normal(x0.shape), rand.uniform(-1, 1, x0.shape)], -1)
  seen_t = []

  def losses(output):
    def model_fn(x_t, t_model):
      seen_t.append(t_model)
      return output
    return base.training_losses(model_fn, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                                jnp.asarray(noise, jnp.float32))

  terms = losses(jnp.asarray(output, jnp.float32))
  mse_ref = ((output[..., :1] - noise) ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(f64(terms["mse"]), mse_ref, rtol=1e-5)
  b = (-1, 1, 1, 1)
  xt = np.sqrt(tab["abar"][t]).reshape(b) * x0 + np.sqrt(1 - tab["abar"][t]).reshape(b) * noise
  vb = base.vb_terms_bpd(jnp.asarray(output, jnp.float32), jnp.asarray(x0, jnp.float32),
                         jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  np.testing.assert_allclose(f64(terms["vb"]), f64(vb), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(f64(terms["loss"]), f64(terms["mse"]) + f64(terms["vb"]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(seen_t[0]), t)

  grad = jax.jit(jax.grad(lambda o: jnp.sum(losses(o)["loss"])))(jnp.asarray(output, jnp.float32))
  per_sample = x0[0].size
  np.testing.assert_allclose(f64(grad[..., :1]), 2 * (output[..., :1] - noise) / per_sample,
                             rtol=1e-4, atol=1e-7)
  assert np.abs(f64(grad[..., 1:])).max() > 0  # the variance channels learn from VB only


def test_training_losses_call_the_model_with_original_timesteps(rand):
  spaced = create_diffusion("ddim25")
  t = np.array([0, 5, 24])
  seen_t = []

  def model_fn(x_t, t_model):
    seen_t.append(np.asarray(t_model))
    return jnp.zeros(x_t.shape[:-1] + (2,), jnp.float32)

  x0 = jnp.asarray(rand.uniform(-1, 1, (3, 4, 4, 1)), jnp.float32)
  spaced.training_losses(model_fn, x0, jnp.asarray(t), jnp.asarray(rand.standard_normal(x0.shape)))
  np.testing.assert_array_equal(seen_t[0], 40 * t)  # ddim25 keeps every 40th step


# ------------------------------------------------------------------------ sampler steps
def test_ddpm_step_matches_numpy(base, rand):
  tab = ref_tables(ref_linear_betas(1000))
  x0, noise = _batch(rand, channels=1)
  t = T_VALUES
  x = rand.standard_normal(x0.shape)
  output = np.concatenate([rand.standard_normal(x0.shape), rand.uniform(-1, 1, x0.shape)], -1)
  got, pred_x0 = base.p_sample_step(jnp.asarray(output, jnp.float32), jnp.asarray(x, jnp.float32),
                                    jnp.asarray(t), jnp.asarray(noise, jnp.float32))
  ref = ref_p_mean_variance(tab, output, x, t)
  expected = ref["mean"] + (t > 0).reshape(-1, 1, 1, 1) * np.exp(0.5 * ref["logvar"]) * noise
  np.testing.assert_allclose(f64(got), expected, rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(f64(got[0]), ref["mean"][0], atol=1e-5)  # t = 0: no noise


@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.7, False), (1.0, True)])
def test_ddim_step_matches_numpy(rand, eta, clip):
  spaced = create_diffusion("ddim25")
  tab = ref_tables(spaced.betas)
  t = np.array([0, 1, 12, 24])
  shape = (len(t), 4, 4, 1)
  x, noise = rand.standard_normal(shape), rand.standard_normal(shape)
  output = np.concatenate([rand.standard_normal(shape), rand.uniform(-1, 1, shape)], -1)
  got, _ = spaced.ddim_sample_step(jnp.asarray(output, jnp.float32), jnp.asarray(x, jnp.float32),
                                   jnp.asarray(t), jnp.asarray(noise, jnp.float32), eta=eta,
                                   clip_denoised=clip)
  np.testing.assert_allclose(f64(got), ref_ddim_step(tab, output, x, t, noise, eta, clip),
                             rtol=1e-4, atol=5e-5)


def _true_eps_model(x0, learn_sigma=True):
  """A model that knows x_0: at original timestep t it returns the exact eps of x_t."""
  abar = jnp.asarray(ref_tables(ref_linear_betas(1000))["abar"], jnp.float32)
  x0 = jnp.asarray(x0, jnp.float32)

  def model_fn(x, t_model):
    a = abar[t_model].reshape(-1, 1, 1, 1)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return jnp.concatenate([eps, jnp.zeros_like(eps)], -1) if learn_sigma else eps
  return model_fn


@pytest.mark.parametrize("spec", ["ddim25", "10,15,20"])
def test_ddim_eta0_recovers_x0_from_true_eps(rand, spec):
  """With the exact eps, every DDIM (eta = 0) step stays on the line sqrt(abar) x0 +
  sqrt(1 - abar) z, so the last step returns x0 (a check of the respaced tables and the map)."""
  diffusion = create_diffusion(spec)
  x0 = rand.uniform(-1, 1, (3, 8, 8, 1))
  noise = jnp.asarray(rand.standard_normal(x0.shape), jnp.float32)
  out = sampling.ddim_deterministic(diffusion, _true_eps_model(x0), noise)
  np.testing.assert_allclose(f64(out), x0, atol=2e-4)


def test_ddim_trajectory_follows_eq12(rand):
  diffusion = create_diffusion("ddim10")
  tab = ref_tables(diffusion.betas)
  model_fn = lambda x, t: jnp.concatenate([jnp.sin(x) - 0.2, jnp.tanh(x)], -1)  # noqa: E731
  noise = jnp.asarray(rand.standard_normal((2, 8, 8, 1)), jnp.float32)
  x_final, traj = sampling.sample(diffusion, model_fn, noise, None, sampler="ddim",
                                  return_trajectory=True)
  steps = diffusion.num_timesteps
  assert traj["x"].shape == (steps, 2, 8, 8, 1) and traj["out"].shape == (steps, 2, 8, 8, 2)
  np.testing.assert_array_equal(np.asarray(traj["x"][0]), np.asarray(noise))
  np.testing.assert_array_equal(np.asarray(traj["t"]),
                                np.repeat(diffusion.timestep_map[::-1, None], 2, axis=1))
  xs = list(f64(traj["x"])) + [f64(x_final)]
  zeros = np.zeros_like(xs[0])
  for k in range(steps):
    t = np.full(2, steps - 1 - k)
    np.testing.assert_allclose(f64(traj["out"][k]), f64(model_fn(traj["x"][k], None)), atol=1e-6)
    np.testing.assert_allclose(xs[k + 1], ref_ddim_step(tab, f64(traj["out"][k]), xs[k], t, zeros, 0.0),
                               rtol=1e-4, atol=5e-5)


def test_ddpm_loop_noise_statistics(rand):
  """Each DDPM step adds exp(logvar/2) * z with fresh z ~ N(0, 1); the last step adds none."""
  diffusion = create_diffusion("10")
  tab = ref_tables(diffusion.betas)
  model_fn = lambda x, t: jnp.concatenate([0.5 * x, 0.8 * jnp.tanh(x)], -1)  # noqa: E731
  noise = jnp.asarray(rand.standard_normal((8, 16, 16, 1)), jnp.float32)
  x_final, traj = sampling.sample(diffusion, model_fn, noise, jax.random.key(3), sampler="ddpm",
                                  return_trajectory=True)
  xs = list(f64(traj["x"])) + [f64(x_final)]
  steps = diffusion.num_timesteps
  draws = []
  for k in range(steps):
    t = np.full(8, steps - 1 - k)
    ref = ref_p_mean_variance(tab, f64(traj["out"][k]), xs[k], t)
    if k == steps - 1:
      np.testing.assert_allclose(xs[k + 1], ref["mean"], rtol=1e-4, atol=2e-5)
    else:
      z = (xs[k + 1] - ref["mean"]) / np.exp(0.5 * ref["logvar"])
      assert abs(z.mean()) < 0.12 and 0.88 < z.std() < 1.12, (k, z.mean(), z.std())
      draws.append(z.ravel())
  corr = np.corrcoef(np.stack(draws))
  assert np.abs(corr[np.triu_indices(len(draws), 1)]).max() < 0.15  # fresh noise per step
  # Same key -> same samples; another key -> others.
  again, _ = sampling.sample(diffusion, model_fn, noise, jax.random.key(3), sampler="ddpm",
                             return_trajectory=True)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(x_final))
  other, _ = sampling.sample(diffusion, model_fn, noise, jax.random.key(4), sampler="ddpm",
                             return_trajectory=True)
  assert np.abs(np.asarray(other) - np.asarray(x_final)).max() > 1e-3


def test_sample_argument_errors():
  diffusion = create_diffusion("ddim10")
  fn = lambda x, t: jnp.concatenate([x, x], -1)  # noqa: E731
  noise = jnp.ones((1, 4, 4, 1))
  with pytest.raises(ValueError, match="unknown sampler"):
    sampling.sample(diffusion, fn, noise, jax.random.key(0), sampler="euler")
  with pytest.raises(ValueError, match="ddim sampler only"):
    sampling.sample(diffusion, fn, noise, jax.random.key(0), sampler="ddpm", eta=0.5)
  with pytest.raises(ValueError, match="needs an rng"):
    sampling.sample(diffusion, fn, noise, None, sampler="ddpm")


# ---------------------------------------------------------------- CFG on a tiny DiT
@pytest.mark.parametrize("in_channels,cfg_channels,no_cfg", [(1, None, None), (4, 3, 1.0)])
def test_cfg_model_fn_is_guided_combination(rand, apply_fn, in_channels, cfg_channels, no_cfg):
  model = dit.create_model("DiT-S/4", input_size=16, in_channels=in_channels, num_classes=10,
                           depth=1, hidden_size=32, num_heads=2, cfg_channels=cfg_channels)
  params = _random_params(model, seed=2)
  x = jnp.asarray(rand.standard_normal((3, 16, 16, in_channels)), jnp.float32)
  t = jnp.array([999, 400, 3])
  labels = jnp.array([0, 4, 9])
  scale = 4.0
  cond = f64(apply_fn(model, params, x, t, labels))
  uncond = f64(apply_fn(model, params, x, t, jnp.full_like(labels, NULL_CLASS)))
  assert np.abs(cond - uncond).mean() > 1e-2  # the label matters: guidance is visible
  guided = f64(jax.jit(sampling.cfg_model_fn(model, scale))(x, t, params, labels))
  assert guided.shape == cond.shape == (3, 16, 16, 2 * in_channels)
  # Official forward_with_cfg: the first cfg_channels (default all eps channels) are guided;
  # every other channel (an unguided eps channel, the variance) is the conditional output.
  guided_channels = in_channels if cfg_channels is None else cfg_channels
  expected = cond.copy()
  expected[..., :guided_channels] = (uncond + scale * (cond - uncond))[..., :guided_channels]
  np.testing.assert_allclose(guided, expected, rtol=1e-4, atol=1e-5)
  # No guidance (scale None or 1.0): the plain conditional forward.
  plain = jax.jit(sampling.cfg_model_fn(model, no_cfg))(x, t, params, labels)
  np.testing.assert_allclose(f64(plain), cond, rtol=1e-5, atol=1e-6)
  assert sampling.cfg_model_fn(model, scale) is sampling.cfg_model_fn(model, scale)


def test_ddim_deterministic_dit_is_repeatable(tiny_dit, rand):
  model, params = tiny_dit
  diffusion = create_diffusion("ddim5")
  noise = jnp.asarray(rand.standard_normal((2, 16, 16, 1)), jnp.float32)
  labels = jnp.array([3, 8])
  fn = sampling.cfg_model_fn(model, 2.5)
  first = sampling.ddim_deterministic(diffusion, fn, noise, (params, labels))
  second = sampling.ddim_deterministic(diffusion, fn, noise, (params, labels))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  assert np.all(np.isfinite(np.asarray(first)))
  # Params are an argument, not a baked-in constant: other params give other samples.
  params2 = jax.tree_util.tree_map(lambda p: 1.1 * p, params)
  third = sampling.ddim_deterministic(diffusion, fn, noise, (params2, labels))
  assert np.abs(np.asarray(third) - np.asarray(first)).max() > 1e-4


@pytest.fixture(scope="module")
def cfg_trajectory(tiny_dit):
  model, params = tiny_dit
  diffusion = create_diffusion("5")
  rng = np.random.default_rng(7)
  noise = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)
  labels = jnp.array([1, 6])
  key = jax.random.key(11)
  traj = trajectory.fp_trajectory(model, params, diffusion, labels, noise, key, cfg_scale=3.0)
  _, sampled = sampling.sample(diffusion, sampling.cfg_model_fn(model, 3.0), noise, key,
                               model_args=(params, labels), return_trajectory=True)
  return dict(model=model, params=params, diffusion=diffusion, noise=noise, labels=labels,
              traj=traj, sampled=sampled)


def test_fp_trajectory_with_cfg(cfg_trajectory, apply_fn):
  c = cfg_trajectory
  traj, sampled, noise, labels = c["traj"], c["sampled"], c["noise"], c["labels"]
  steps = c["diffusion"].num_timesteps
  assert traj["x"].shape == (steps, 4, 16, 16, 1)
  assert traj["t"].shape == traj["y"].shape == (steps, 4)
  # First model input: the initial noise, doubled for CFG.
  np.testing.assert_array_equal(np.asarray(traj["x"][0]), np.concatenate([noise, noise]))
  np.testing.assert_array_equal(np.asarray(traj["x"][:, :2]), np.asarray(traj["x"][:, 2:]))
  np.testing.assert_array_equal(np.asarray(traj["x"][:, :2]), np.asarray(sampled["x"]))
  # Labels: conditional half, then the null class; timesteps: original indices, descending.
  np.testing.assert_array_equal(np.asarray(traj["y"][:, :2]), np.tile(np.asarray(labels), (steps, 1)))
  np.testing.assert_array_equal(np.asarray(traj["y"][:, 2:]), NULL_CLASS)
  t_expected = np.repeat(c["diffusion"].timestep_map[::-1, None], 4, axis=1)
  np.testing.assert_array_equal(np.asarray(traj["t"]), t_expected)
  # The steps differ (the sampler moved) and the recorded output is the guided model output.
  assert np.abs(np.asarray(traj["x"][1] - traj["x"][0])).max() > 1e-3
  k = 2
  raw = f64(apply_fn(c["model"], c["params"], traj["x"][k], traj["t"][k], traj["y"][k]))
  cond, uncond = raw[:2], raw[2:]
  guided_eps = uncond[..., :1] + 3.0 * (cond[..., :1] - uncond[..., :1])
  np.testing.assert_allclose(f64(sampled["out"][k]), np.concatenate([guided_eps, cond[..., 1:]], -1),
                             rtol=1e-4, atol=1e-5)


def test_fp_trajectory_without_cfg(tiny_dit):
  model, params = tiny_dit
  diffusion = create_diffusion("ddim5")
  rng = np.random.default_rng(8)
  noise = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)
  labels = jnp.array([2, 5])
  traj = trajectory.fp_trajectory(model, params, diffusion, labels, noise, None, cfg_scale=None,
                                  sampler="ddim")
  assert traj["x"].shape == (5, 2, 16, 16, 1) and traj["y"].shape == (5, 2)
  np.testing.assert_array_equal(np.asarray(traj["x"][0]), np.asarray(noise))
  np.testing.assert_array_equal(np.asarray(traj["y"]), np.tile(np.asarray(labels), (5, 1)))
