"""The Flax DiT: sizes of the 12 official configs, embeddings, and parity with the official
PyTorch forward (tests/official_dit_torch.py) through the checkpoint converter."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.models import convert, dit

# Official ImageNet-256 setting: 32x32x4 latents, 1000 classes, learned sigma.
LATENT_SIZE, LATENT_CHANNELS, NUM_CLASSES = 32, 4, 1000
# Parameter counts reported for the official models (DiT paper, Table 4 / the official repo's
# model summary at 256x256).
OFFICIAL_PARAM_COUNTS = {"DiT-XL/2": 675_129_632, "DiT-S/2": 32_963_360}


def closed_form_param_count(depth, hidden, patch, in_channels, num_classes, tokens, learn_sigma=True):
  """Parameters of the official DiT, layer by layer."""
  d, out = hidden, (2 if learn_sigma else 1) * in_channels
  patch_embed = d * in_channels * patch * patch + d
  pos_embed = tokens * d
  t_embedder = (dit.TIMESTEP_FREQ_DIM * d + d) + (d * d + d)
  y_embedder = (num_classes + 1) * d
  # qkv (3d), proj (d), fc1 (4d), fc2 (d out of 4d in), adaLN (6d): weights + biases.
  block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
  final = (2 * d * d + 2 * d) + (d * patch * patch * out + patch * patch * out)
  return patch_embed + pos_embed + t_embedder + y_embedder + depth * block + final


@pytest.fixture(scope="module")
def official_shapes():
  """name -> (param shapes, output shape) for the 12 official configs, via eval_shape."""
  out = {}
  for name in dit.DIT_CONFIGS:
    model = dit.create_model(name)
    x = jax.ShapeDtypeStruct((2, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)

    def init_and_apply(x, t, y, model=model):
      params = dit.init_params(model, jax.random.PRNGKey(0))
      return params, model.apply({"params": params}, x, t, y)

    out[name] = jax.eval_shape(init_and_apply, x, t, y)
  return out


@pytest.mark.parametrize("name", list(dit.DIT_CONFIGS))
def test_param_count_and_output_shape(official_shapes, name):
  params, output = official_shapes[name]
  cfg = dit.DIT_CONFIGS[name]
  tokens = (LATENT_SIZE // cfg["patch_size"]) ** 2
  expected = closed_form_param_count(cfg["depth"], cfg["hidden_size"], cfg["patch_size"],
                                     LATENT_CHANNELS, NUM_CLASSES, tokens)
  assert dit.count_params(params) == expected
  if name in OFFICIAL_PARAM_COUNTS:
    assert dit.count_params(params) == OFFICIAL_PARAM_COUNTS[name]
  assert output.shape == (2, LATENT_SIZE, LATENT_SIZE, 2 * LATENT_CHANNELS)
  assert output.dtype == jnp.float32


def test_sincos_2d_matches_float64_formula():
  embed_dim, grid = 48, 5
  quarter = embed_dim // 4
  omega = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
  expected = np.zeros((grid * grid, embed_dim))
  for row in range(grid):
    for col in range(grid):
      n = row * grid + col  # row-major patch order
      expected[n] = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                                    np.sin(row * omega), np.cos(row * omega)])
  table = dit.sincos_2d(embed_dim, grid)
  assert table.shape == (grid * grid, embed_dim) and table.dtype == np.float32
  np.testing.assert_allclose(table, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [256, 33])
def test_timestep_embedding_matches_float64_formula(dim):
  rng = np.random.default_rng(0)
  t = rng.uniform(0, 1000, size=7)
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
  args = t[:, None] * freqs[None, :]
  expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  if dim % 2:
    expected = np.concatenate([expected, np.zeros((len(t), 1))], axis=1)
  got = np.asarray(dit.timestep_embedding(jnp.asarray(t, jnp.float32), dim))
  assert got.shape == (len(t), dim)
  # float32 phases t * freq (|t| < 1000) carry ~ 1000 * 2**-23 * few absolute error.
  np.testing.assert_allclose(got, expected, rtol=0, atol=3e-4)
  if dim % 2:
    assert np.all(got[:, -1] == 0)


def test_official_init_gives_zero_output():
  """adaLN-Zero: the final layer starts at zero, so a fresh model predicts exactly zero."""
  model = dit.create_model(None, input_size=8, patch_size=2, in_channels=3, hidden_size=32,
                           depth=1, num_heads=2, num_classes=5)
  params = jax.jit(dit.init_params, static_argnums=0)(model, jax.random.PRNGKey(1))
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
  out = jax.jit(model.apply)({"params": params}, x, jnp.array([3.0, 500.0]), jnp.array([0, 4]))
  assert out.shape == (2, 8, 8, 6)
  assert np.all(np.asarray(out) == 0)


def test_wrong_input_shape_is_named():
  model = dit.create_model(None, input_size=8, patch_size=2, in_channels=3, hidden_size=32,
                           depth=1, num_heads=2, num_classes=5)
  with pytest.raises(ValueError, match=r"\(N, 8, 8, 3\).*\(2, 3, 8, 8\)"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 8, 8)),
                                      jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)))


# --------------------------------------------------------------------- PyTorch parity
PARITY_CONFIGS = [
    # input, patch, in_channels, hidden, depth, heads, classes, learn_sigma
    dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
         num_classes=10, learn_sigma=True),
    dict(input_size=16, patch_size=4, in_channels=1, hidden_size=96, depth=2, num_heads=3,
         num_classes=7, learn_sigma=False),
    dict(input_size=12, patch_size=2, in_channels=1, hidden_size=128, depth=2, num_heads=8,
         num_classes=3, learn_sigma=True),
]
PARITY_RTOL = 1e-5  # relative L2 error, float32 on both sides


def _relative_error(ours, reference):
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return np.linalg.norm(ours - reference) / np.linalg.norm(reference)


@pytest.fixture(scope="module", params=range(len(PARITY_CONFIGS)), ids=lambda i: f"cfg{i}")
def parity_case(request):
  torch = pytest.importorskip("torch")
  import official_dit_torch

  config = PARITY_CONFIGS[request.param]
  reference = official_dit_torch.OfficialDiT(**config).eval()
  official_dit_torch.randomize_(reference, seed=100 + request.param)
  state_dict = reference.state_dict()
  model = dit.create_model(None, **config)
  params = convert.params_from_official(state_dict, model)
  return torch, config, reference, model, params


def _random_inputs(config, batch, seed):
  rng = np.random.default_rng(seed)
  size, channels = config["input_size"], config["in_channels"]
  x_nchw = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
  t = rng.uniform(0, 1000, size=batch).astype(np.float32)
  y = rng.integers(0, config["num_classes"] + 1, size=batch)  # null class included
  return x_nchw, t, y


def test_converted_pos_embed_is_our_table(parity_case):
  _, config, reference, model, params = parity_case
  ours = dit.sincos_2d(model.hidden_size, model.input_size // model.patch_size)[None]
  np.testing.assert_allclose(ours, reference.pos_embed.detach().numpy(), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(params["pos_embed"]), reference.pos_embed.detach().numpy())


def test_forward_matches_official_torch(parity_case):
  torch, config, reference, model, params = parity_case
  x_nchw, t, y = _random_inputs(config, batch=3, seed=1)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x_nchw), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  with jax.default_matmul_precision("highest"):
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)),
                                jnp.asarray(t), jnp.asarray(y))
  ours_nchw = np.asarray(ours).transpose(0, 3, 1, 2)
  assert ours_nchw.shape == expected.shape
  assert np.abs(expected).mean() > 1e-2  # non-trivial output (random adaLN and final layer)
  assert _relative_error(ours_nchw, expected) <= PARITY_RTOL


def test_forward_with_cfg_matches_official_torch(parity_case):
  torch, config, reference, model, params = parity_case
  x_nchw, t, _ = _random_inputs(config, batch=4, seed=2)
  t[2:] = t[:2]
  y = np.array([1, config["num_classes"] - 1, config["num_classes"], config["num_classes"]])
  cfg_scale = 4.0
  with torch.no_grad():
    expected = reference.forward_with_cfg(torch.from_numpy(x_nchw), torch.from_numpy(t),
                                          torch.from_numpy(y), cfg_scale).numpy()
  with jax.default_matmul_precision("highest"):
    apply_cfg = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, cfg_scale,
                                                       method=dit.DiT.forward_with_cfg))
    ours = apply_cfg(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t),
                     jnp.asarray(y))
  ours_nchw = np.asarray(ours).transpose(0, 3, 1, 2)
  assert ours_nchw.shape == expected.shape
  assert _relative_error(ours_nchw, expected) <= PARITY_RTOL
  # Guidance acted (cfg_scale != 1): the guided channels differ from the plain forward.
  with torch.no_grad():
    half = torch.from_numpy(x_nchw[:2])
    unguided = reference(torch.cat([half, half]), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  assert not np.allclose(unguided[:, :3], expected[:, :3], atol=1e-3)
