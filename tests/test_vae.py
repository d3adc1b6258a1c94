"""The Flax SD VAE against diffusers' AutoencoderKL (random weights, nothing downloaded),
its converter's checks, its batched/sharded helpers and its output shapes at 256 / 512."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_quant_jax.models import convert_vae, vae
from dit_quant_jax.models.convert import CheckpointMismatchError
from fast_compile import xla_flags_with

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PARITY_RTOL = 1e-5  # relative L2 error, float32 with 'highest' matmul precision

# Tiny but structurally complete: 3 blocks (two 2x steps), a channel change in each
# direction (so conv_shortcut layers exist), GroupNorm with 4 groups.
TINY = vae.VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4)


def _torch_vae(config: vae.VAEConfig, seed: int):
  """diffusers AutoencoderKL with every parameter re-randomised (norms included)."""
  num_blocks = len(config.block_out_channels)
  with torch.device("meta"):  # skip diffusers' own initialisation: every value is set below
    model = diffusers.AutoencoderKL(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups)
  model = model.to_empty(device="cpu")
  assert not list(model.buffers())  # all state is parameters, so all of it is randomised
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if param.ndim > 1:  # conv / linear: fan-in scaled, keeps activations O(1)
        param.copy_(noise / np.sqrt(param[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        param.copy_(1.0 + 0.3 * noise)
      else:
        param.copy_(0.3 * noise)
  return model.eval()


def _state_dict_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def tiny():
  model = _torch_vae(TINY, seed=0)
  state_dict = _state_dict_numpy(model)
  params = convert_vae.params_from_diffusers(state_dict, TINY)
  return model, state_dict, params


@pytest.fixture(scope="module")
def tiny_fns():
  """Jitted float32 decode and encode of the tiny model (compiled once per module)."""
  model = vae.AutoencoderKL(TINY)
  return {
      "decode": jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae.AutoencoderKL.decode)),
      "encode": jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae.AutoencoderKL.encode)),
  }


@pytest.fixture(scope="module")
def sd_param_shapes():
  return jax.eval_shape(lambda: vae.init_vae_params(vae.VAEConfig.sd_vae(), jax.random.PRNGKey(0)))


# ---------------------------------------------------------------------------- parity
def test_tiny_decoder_and_encoder_match_diffusers(tiny, tiny_fns):
  model, _, params = tiny
  rng = np.random.default_rng(1)
  # Non-square on purpose: an H/W mix-up in a layout or the asymmetric pad shows.
  latents = rng.standard_normal((2, 4, 6, 4)).astype(np.float32)
  images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    decoded = tiny_fns["decode"](params, latents)
    mean, logvar = tiny_fns["encode"](params, images)
  with torch.no_grad():
    expected = _nhwc(model.decode(_nchw(latents)).sample)
    posterior = model.encode(_nchw(images)).latent_dist
  assert decoded.shape == (2, 16, 24, 3) and decoded.dtype == jnp.float32
  assert mean.shape == logvar.shape == (2, 4, 6, 4)
  assert _rel_err(decoded, expected) <= PARITY_RTOL
  assert _rel_err(mean, _nhwc(posterior.mean)) <= PARITY_RTOL
  assert _rel_err(logvar, _nhwc(posterior.logvar)) <= PARITY_RTOL


def test_sd_vae_channels_decoder_matches_diffusers():
  """Real SD VAE widths (128, 256, 512, 512), 32 groups, on 4x4 latents (32x32 images)."""
  config = vae.VAEConfig.sd_vae()
  model = _torch_vae(config, seed=2)
  params = convert_vae.params_from_diffusers(model.state_dict(), config)  # torch tensors in
  latents = np.random.default_rng(3).standard_normal((1, 4, 4, 4)).astype(np.float32)
  flax_model = vae.AutoencoderKL(config)
  with jax.default_matmul_precision("highest"):
    decoded = jax.jit(lambda p, z: flax_model.apply({"params": p}, z, method=vae.AutoencoderKL.decode))(
        params, latents)
  with torch.no_grad():
    expected = _nhwc(model.decode(_nchw(latents)).sample)
  assert decoded.shape == (1, 32, 32, 3)
  assert _rel_err(decoded, expected) <= PARITY_RTOL


def test_bfloat16_compute_stays_close_and_returns_float32(tiny, tiny_fns):
  _, _, params = tiny
  latents = np.random.default_rng(4).standard_normal((2, 4, 4, 4)).astype(np.float32)
  full = np.clip(tiny_fns["decode"](params, latents), -1, 1)
  half = vae.decode_latents(params, latents, TINY, 2, scale=1.0, dtype=jnp.bfloat16)
  assert half.dtype == np.float32
  err = _rel_err(half, full)
  assert 0 < err < 5e-2  # bf16 rounding is visible but small


def test_group_norm_statistics_in_float32():
  rng = np.random.default_rng(5)
  # Offset mean: a one-pass E[x^2] - E[x]^2 in low precision would lose the variance.
  x = (3.0 + rng.standard_normal((2, 5, 3, 12))).astype(np.float32)
  scale = rng.standard_normal(12).astype(np.float32)
  bias = rng.standard_normal(12).astype(np.float32)
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  out = vae.group_norm(x_bf16, scale, bias, num_groups=3, eps=1e-6)
  ref_x = np.asarray(x_bf16.astype(jnp.float32), np.float64).reshape(2, -1, 3, 4)
  mean = ref_x.mean(axis=(1, 3), keepdims=True)
  var = ref_x.var(axis=(1, 3), keepdims=True)
  ref = ((ref_x - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="12 channels are not divisible by 5 groups"):
    vae.group_norm(x, scale, bias, num_groups=5)


# ------------------------------------------------------------------------- converter
def test_legacy_attention_names_convert_identically(tiny):
  _, state_dict, params = tiny
  legacy_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
                  ".to_out.0.": ".proj_attn."}
  legacy = {}
  for key, value in state_dict.items():
    for new, old in legacy_names.items():
      key = key.replace(new, old)
    legacy[key] = value
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
  converted = convert_vae.params_from_diffusers(legacy, TINY)
  flat_new = jax.tree_util.tree_leaves_with_path(params)
  flat_old = dict(jax.tree_util.tree_leaves_with_path(converted))
  assert len(flat_new) == len(flat_old)
  for path, leaf in flat_new:
    np.testing.assert_array_equal(np.asarray(flat_old[path]), np.asarray(leaf))


def test_converter_layouts_and_key_mapping(tiny):
  _, state_dict, params = tiny
  w = state_dict["decoder.up_blocks.0.resnets.0.conv1.weight"]  # (out, in, kh, kw)
  np.testing.assert_array_equal(params["decoder"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"],
                                np.transpose(w, (2, 3, 1, 0)))
  w = state_dict["encoder.mid_block.attentions.0.to_out.0.weight"]  # (out, in)
  np.testing.assert_array_equal(params["encoder"]["mid_block"]["attentions_0"]["to_out"]["kernel"], w.T)
  np.testing.assert_array_equal(params["decoder"]["conv_norm_out"]["scale"],
                                state_dict["decoder.conv_norm_out.weight"])
  # Decoder channels run reversed: up_blocks.0 is the deepest (16 ch), the last 8 ch with a
  # shortcut from 16; each up block has layers_per_block + 1 resnets.
  assert params["decoder"]["up_blocks_2"]["resnets_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 16, 8)
  assert sorted(params["decoder"]["up_blocks_1"]) == ["resnets_0", "resnets_1", "resnets_2",
                                                     "upsamplers_0"]
  for path in [("decoder", "mid_block", "attentions_0", "to_out", "kernel"),
               ("encoder", "down_blocks_1", "downsamplers_0", "conv", "bias")]:
    key = convert_vae.flax_path_to_diffusers_key(path)
    assert key in state_dict
    assert convert_vae.diffusers_key_to_module_path(key) == (path[:-1], key.rsplit(".", 1)[1])


def test_converter_missing_key_is_an_error(tiny):
  _, state_dict, _ = tiny
  broken = dict(state_dict)
  del broken["decoder.up_blocks.1.resnets.2.norm2.bias"]
  with pytest.raises(CheckpointMismatchError,
                     match=r"missing key 'decoder\.up_blocks\.1\.resnets\.2\.norm2\.bias' "
                           r"\(expected shape \(16,\)\)"):
    convert_vae.params_from_diffusers(broken, TINY)


def test_converter_unexpected_key_is_an_error(tiny):
  _, state_dict, _ = tiny
  broken = dict(state_dict, **{"decoder.up_blocks.0.resnets.0.norm1.running_mean": np.ones(16, np.float32)})
  with pytest.raises(CheckpointMismatchError,
                     match=r"unexpected key 'decoder\.up_blocks\.0\.resnets\.0\.norm1\.running_mean' "
                           r"\(shape \(16,\)\)"):
    convert_vae.params_from_diffusers(broken, TINY)
  broken = dict(state_dict, **{"decoder.up_blocks.3.resnets.0.conv1.weight": np.ones((8, 8, 3, 3))})
  with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'decoder\.up_blocks\.3\."):
    convert_vae.params_from_diffusers(broken, TINY)


def test_converter_misshaped_key_names_both_shapes(tiny):
  _, state_dict, _ = tiny
  broken = dict(state_dict)
  broken["encoder.mid_block.attentions.0.to_k.weight"] = np.ones((16, 8), np.float32)
  with pytest.raises(CheckpointMismatchError,
                     match=r"'encoder\.mid_block\.attentions\.0\.to_k\.weight' has shape \(16, 8\), "
                           r"model expects \(16, 16\)"):
    convert_vae.params_from_diffusers(broken, TINY)
  # The tiny checkpoint does not fit the SD VAE: the first conv already differs.
  with pytest.raises(CheckpointMismatchError, match=r"key .decoder\.conv_in\.bias. has shape \(16,\), model expects \(512,\)"):
    convert_vae.params_from_diffusers(state_dict, vae.VAEConfig.sd_vae())


def test_converter_duplicate_legacy_and_new_name_is_an_error(tiny):
  _, state_dict, _ = tiny
  broken = dict(state_dict)
  broken["decoder.mid_block.attentions.0.query.bias"] = state_dict["decoder.mid_block.attentions.0.to_q.bias"]
  with pytest.raises(CheckpointMismatchError, match=r"both name the Flax param"):
    convert_vae.params_from_diffusers(broken, TINY)


def test_load_safetensors_bin_and_folder(tiny, tmp_path):
  model, state_dict, _ = tiny
  from safetensors.numpy import save_file
  save_file(state_dict, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  bin_path = tmp_path / "vae.bin"
  torch.save(model.state_dict(), str(bin_path))
  for path in (tmp_path / "diffusion_pytorch_model.safetensors", bin_path, tmp_path):
    loaded = convert_vae.load_vae_state_dict(str(path))
    assert sorted(loaded) == sorted(state_dict)
    for key, value in state_dict.items():
      np.testing.assert_array_equal(loaded[key], value)
  fp16_path = tmp_path / "half.safetensors"
  save_file({k: v.astype(np.float16) for k, v in state_dict.items()}, str(fp16_path))
  half = convert_vae.load_vae_params(str(fp16_path), TINY)
  assert half["decoder"]["conv_out"]["kernel"].dtype == jnp.float32
  from safetensors.torch import save_file as save_torch_file
  bf16_path = tmp_path / "bf16.safetensors"
  save_torch_file({k: v.bfloat16() for k, v in model.state_dict().items()}, str(bf16_path))
  loaded = convert_vae.load_vae_state_dict(str(bf16_path))
  key = "decoder.conv_in.weight"
  assert loaded[key].dtype == np.float32
  np.testing.assert_array_equal(loaded[key], model.state_dict()[key].bfloat16().float().numpy())
  (tmp_path / "weights.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown VAE weights format"):
    convert_vae.load_vae_state_dict(str(tmp_path / "weights.ckpt"))
  with pytest.raises(FileNotFoundError, match="VAE weights not found"):
    convert_vae.load_vae_state_dict(str(tmp_path / "absent.safetensors"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="folder without any of"):
    convert_vae.load_vae_state_dict(str(tmp_path / "empty"))


# ------------------------------------------------------------------- batched helpers
def test_decode_latents_batches_shards_and_clips(tiny):
  model, _, params = tiny
  scale = vae.SD_LATENT_SCALE
  latents = np.random.default_rng(6).standard_normal((5, 4, 4, 4)).astype(np.float32)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  with jax.default_matmul_precision("highest"):
    # batch 2 over 5 latents: a padded last batch; on a multi-device host, 2 must divide.
    batch = 2 * len(jax.devices())
    images = vae.decode_latents(params, latents, TINY, batch, sharding=mesh)
  with torch.no_grad():
    expected = _nhwc(model.decode(_nchw(latents / scale)).sample)
  assert np.abs(expected).max() > 1  # so clipping is exercised
  expected = np.clip(expected, -1, 1)
  assert images.shape == (5, 16, 16, 3) and images.dtype == np.float32
  assert images.min() >= -1 and images.max() <= 1
  assert _rel_err(images, expected) <= PARITY_RTOL
  spec = NamedSharding(mesh, PartitionSpec("data"))
  with jax.default_matmul_precision("highest"):
    images_named = vae.decode_latents(params, latents, TINY, batch, sharding=spec)
  np.testing.assert_allclose(images_named, images, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"expects NHWC latents \(N, h, w, 4\), got \(5, 4, 4, 3\)"):
    vae.decode_latents(params, latents[..., :3], TINY, 2)
  with pytest.raises(TypeError, match="Mesh or NamedSharding"):
    vae.decode_latents(params, latents, TINY, 2, sharding="data")


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh
    from dit_quant_jax.models import vae
    assert len(jax.devices()) == 4, jax.devices()
    config = vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    shapes = jax.eval_shape(lambda: vae.init_vae_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)  # (random init through jax compiles slowly on CPU)
    params = jax.tree_util.tree_map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    latents = rng.standard_normal((6, 4, 4, 4)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    params_at, batch_at = vae._placements(mesh, 4)
    shards = jax.device_put(latents[:4], batch_at).addressable_shards
    assert sorted(s.data.shape for s in shards) == [(1, 4, 4, 4)] * 4  # one image per device
    sharded = vae.decode_latents(params, latents, config, 4, sharding=mesh)
    plain = vae.decode_latents(params, latents, config, 6)
    np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-5)
    print("OK")
""")


def test_decode_latents_shards_over_several_devices():
  """Four host devices (XLA flag, so in a fresh process): each batch is split four ways."""
  env = dict(os.environ, XLA_FLAGS=xla_flags_with("--xla_force_host_platform_device_count=4"), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_encode_images_mean_and_posterior_sample(tiny):
  model, _, params = tiny
  scale = vae.SD_LATENT_SCALE
  images = np.random.default_rng(7).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  rng = jax.random.PRNGKey(8)
  with jax.default_matmul_precision("highest"):
    latents = vae.encode_images(params, images, TINY, 2)
    sampled = vae.encode_images(params, images, TINY, 2, rng=rng)
  with torch.no_grad():
    posterior = model.encode(_nchw(images)).latent_dist
  mean, logvar = _nhwc(posterior.mean), _nhwc(posterior.logvar)
  assert latents.shape == (3, 4, 4, 4)
  assert _rel_err(latents, scale * mean) <= PARITY_RTOL
  noise = np.asarray(jax.random.normal(rng, (3, 4, 4, 4)))
  assert _rel_err(sampled, scale * (mean + np.exp(0.5 * logvar) * noise)) <= PARITY_RTOL
  with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 4"):
    vae.encode_images(params, images[:, :10], TINY, 2)


# -------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("image_size", [256, 512])
def test_sd_vae_shapes_at_dit_resolutions(image_size, sd_param_shapes):
  config = vae.VAEConfig.sd_vae()
  assert config.downsample_factor == 8
  param_shapes = sd_param_shapes
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(param_shapes))
  assert num_params == 83_653_863  # diffusers AutoencoderKL(sd-vae config).num_parameters()
  latent_size = image_size // 8
  latents = jax.ShapeDtypeStruct((2, latent_size, latent_size, 4), jnp.float32)
  out = jax.eval_shape(vae.make_decode_fn(config), param_shapes, latents)
  assert out.shape == (2, image_size, image_size, 3) and out.dtype == jnp.float32
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  enc = jax.eval_shape(vae.make_encode_fn(config, dtype=jnp.bfloat16), param_shapes, images)
  assert enc.shape == (2, latent_size, latent_size, 4) and enc.dtype == jnp.float32


def test_config_validation():
  with pytest.raises(ValueError, match="not divisible by norm_num_groups 32"):
    vae.VAEConfig(block_out_channels=(8, 16))
  with pytest.raises(ValueError, match="layers_per_block"):
    vae.VAEConfig(layers_per_block=0)
  assert vae.VAEConfig(block_out_channels=[8, 16], norm_num_groups=4).block_out_channels == (8, 16)
