"""The DiT's Linear dispatches quantized weights to the Pallas kernels (forced here in
interpret mode on CPU, compiled on a GPU) and matches the plain-jnp reference path, for one
forward pass and for a short sampling run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax import config_spec
from dit_quant_jax.diffusion import create_diffusion, sampling
from dit_quant_jax.kernels import common
from dit_quant_jax import api
from tiny_model import tiny_model_and_params

ON_GPU = jax.default_backend() == "gpu"


@functools.lru_cache(maxsize=None)
def _quantized_cached(spec, overrides):
  model, params = tiny_model_and_params()
  qconfig = config_spec.load(spec, dict(overrides))
  qparams, _ = api.quantize(model, params, qconfig)
  return model, qparams


def _quantized(spec, overrides):
  """The tiny model quantized with spec + overrides, once per setting in this file (the
  parameters are immutable arrays, shared by the tests)."""
  return _quantized_cached(spec, tuple(sorted(overrides.items())))


SETTINGS = {
    "vq_w2": ("configs/vq4dit.py:kmeans_w2", {}),
    "hqdit_w4a4": ("configs/hqdit.py:w4a4", {"calib.num_samples": 2, "calib.timestep_respacing": "ddim2",
                                              "gptq.enabled": False}),
    "w4a16": ("configs/hqdit.py:w4a16", {"calib.num_samples": 2, "calib.timestep_respacing": "ddim2",
                                          "gptq.enabled": False, "hadamard.enabled": False}),
    "w4a8": ("configs/hqdit.py:w4a8", {"calib.num_samples": 2, "calib.timestep_respacing": "ddim2",
                                        "gptq.enabled": False}),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_kernel_path_matches_reference(setting):
  model, qparams = _quantized(*SETTINGS[setting])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 1)), jnp.float32)
  t = jnp.asarray([3, 700])
  y = jnp.asarray([1, 8])
  with common.kernel_impl("reference"):
    ref = model.apply({"params": qparams}, x, t, y)
  with common.kernel_impl("pallas"):
    out = model.apply({"params": qparams}, x, t, y)
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  # bf16 tensor-core operands in the VQ/W4A16/W4A8 kernels; W4A4 is exact integer arithmetic
  # but a code may flip where the transformed activation sits on a rounding midpoint.
  assert err < 2e-2, err


def test_quantized_sampling_with_kernels_matches_dequantized_path():
  model, qparams = _quantized(*SETTINGS["hqdit_w4a4"])
  diffusion = create_diffusion("ddim2")
  labels = jnp.asarray([0, 5])
  noise = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 1))
  results = {}
  for impl in ("reference", "pallas"):
    with common.kernel_impl(impl):
      # A fresh model function per impl: the dispatch is read at trace time.
      fn = lambda x, t, p, y: model.apply({"params": p}, x, t, y)  # noqa: E731
      results[impl] = sampling.ddim_deterministic(diffusion, fn, noise, model_args=(qparams, labels))
  err = float(jnp.linalg.norm(results["pallas"] - results["reference"]) /
              jnp.linalg.norm(results["reference"]))
  assert err < 2e-2, err


FUSED_SETTINGS = {
    "hqdit_w4a4": SETTINGS["hqdit_w4a4"],
    "w4a8": SETTINGS["w4a8"],
    # SmoothQuant: its per-channel factor folded into the prologue's affine
    "w4a4_smooth": (SETTINGS["hqdit_w4a4"][0], dict(SETTINGS["hqdit_w4a4"][1],
                                                    **{"smooth.enabled": True})),
}


@pytest.mark.parametrize("setting", sorted(FUSED_SETTINGS))
def test_fused_row_norm_is_taken_and_matches_unfused(monkeypatch, setting):
  """HQ-DiT W4A4 / W4A8 on the kernel path: the blocks' qkv / fc1 inputs (modulated LayerNorm)
  go to the act-quant kernel un-normalized (layers.NormModulated -> FP4Weight.linear_row_norm),
  fc1's GELU runs in its matmul's epilogue, and the model computes what it computes with the
  LayerNorm materialized and the GELU applied afterwards."""
  from dit_quant_jax.kernels import act_quant
  from dit_quant_jax.kernels import fp4_matmul
  from dit_quant_jax.quant import hqdit
  model, qparams = _quantized(*FUSED_SETTINGS[setting])
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 1)), jnp.float32)
  t, y = jnp.asarray([5, 600]), jnp.asarray([2, 7])
  fused_calls, activations = [], []
  original, original_linear = act_quant.quantize_rows, fp4_matmul.linear

  def spy(*args, **kwargs):
    if kwargs.get("norm_mul") is not None:
      fused_calls.append(args[0].shape)
    return original(*args, **kwargs)

  def linear_spy(*args, **kwargs):
    activations.append(kwargs.get("activation"))
    return original_linear(*args, **kwargs)

  monkeypatch.setattr(act_quant, "quantize_rows", spy)
  monkeypatch.setattr(fp4_matmul, "linear", linear_spy)
  with common.kernel_impl("pallas"):
    fused = model.apply({"params": qparams}, x, t, y)
  # depth 2: qkv and fc1 per block (tokens = 2 samples x 16 patches)
  assert fused_calls == [(32, 32)] * 4, fused_calls
  # fc1's GELU in its matmul's epilogue (no separate pass), once per block
  assert activations.count("gelu_tanh") == 2, activations
  monkeypatch.setattr(hqdit.FP4Weight, "fuses_row_norm", lambda self: False)
  monkeypatch.setattr(hqdit.FP4Weight, "fuses_activation", lambda self, name: False)
  with common.kernel_impl("pallas"):
    unfused = model.apply({"params": qparams}, x, t, y)
  err = float(jnp.linalg.norm(fused - unfused) / jnp.linalg.norm(unfused))
  # float32 model: the same function, summed in another order (compiled on a GPU: the
  # epilogue's tanh.approx.f32)
  assert err < (3e-3 if ON_GPU else 1e-4), err


def test_linear_inputs_are_the_materialized_norm():
  """Calibration sees each layer's real input: the modulated LayerNorm, not its parts."""
  from dit_quant_jax.models import layers
  model, params = tiny_model_and_params()
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 1)), jnp.float32)
  t, y = jnp.asarray([1, 400]), jnp.asarray([0, 3])
  _, state = model.apply({"params": params}, x, t, y, mutable=[layers.LINEAR_INPUTS])
  sown = state[layers.LINEAR_INPUTS]["blocks_0"]["attn"]["qkv"]["x"][0]
  # The same input built by hand: block 0's adaLN shift / scale applied to LayerNorm(tokens).
  tokens, c = model.apply({"params": params}, x, t, y, method=model.embed)
  ada = params["blocks_0"]["adaLN_modulation_1"]
  mod = jax.nn.silu(c) @ ada["kernel"] + ada["bias"]
  shift, scale = mod[:, :32], mod[:, 32:64]
  expected = layers.modulate(layers.layer_norm(tokens), shift, scale)
  assert isinstance(sown, jax.Array) and sown.shape == (2, 16, 32)
  np.testing.assert_allclose(np.asarray(sown), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_dense_linear_applies_its_activation_as_before():
  """A dense Linear with activation='gelu_tanh' (DiT's fc1) computes exactly jax.nn.gelu of
  x @ W + b, as the model did before the activation moved into Linear (the quantized model's
  fused GELU: test_fused_row_norm_is_taken_and_matches_unfused)."""
  from dit_quant_jax.models import layers
  rng = np.random.default_rng(2)
  dense = layers.Linear(7, activation="gelu_tanh")
  xs = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  params = dense.init(jax.random.PRNGKey(0), xs)
  kernel, bias = params["params"]["kernel"], params["params"]["bias"]
  np.testing.assert_array_equal(np.asarray(dense.apply(params, xs)),
                                np.asarray(jax.nn.gelu(xs @ kernel + bias, approximate=True)))
