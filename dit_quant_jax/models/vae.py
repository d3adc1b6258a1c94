"""The Stable Diffusion VAE (``AutoencoderKL``) in Flax linen, NHWC.

DiT (Peebles & Xie, 2023) trains and samples in the latent space of the Stable Diffusion
VAE (``stabilityai/sd-vae-ft-ema`` / ``sd-vae-ft-mse``): an image (N, 8h, 8w, 3) in [-1, 1]
encodes to latents (N, h, w, 4), and the diffusion model sees latents multiplied by
:data:`SD_LATENT_SCALE`.  This module mirrors the diffusers ``AutoencoderKL`` module for
module so that its state dicts convert by a rename and a transpose (``convert_vae.py``):

  encoder      conv_in 3x3 -> down_blocks_i (``layers_per_block`` ResnetBlocks, then a
               stride-2 conv after asymmetric (0, 1) padding, except in the last block)
               -> mid_block -> GroupNorm, SiLU -> conv_out 3x3 (2 * latent_channels)
  quant_conv   1x1 conv on the posterior moments (mean | logvar)
  post_quant_conv  1x1 conv on the sampled latent
  decoder      conv_in 3x3 -> mid_block -> up_blocks_i (``layers_per_block + 1``
               ResnetBlocks, then nearest 2x upsampling + 3x3 conv, except in the last
               block; channels run through ``reversed(block_out_channels)``)
               -> GroupNorm, SiLU -> conv_out 3x3 (out_channels)
  mid_block    ResnetBlock -> single-head self-attention (GroupNorm, q/k/v/out linear,
               residual) -> ResnetBlock
  ResnetBlock  x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), 1x1 ``conv_shortcut`` on x when the
               channel count changes

``dtype`` is the computation dtype (params stay float32); GroupNorm statistics and the
attention softmax are computed in float32 whatever it is.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_quant_jax.models.layers import Linear

# Latent scale of the SD VAE used by DiT (sample.py: ``vae.decode(samples / 0.18215)``;
# diffusers AutoencoderKL config ``scaling_factor``): makes the latents roughly unit variance.
SD_LATENT_SCALE = 0.18215
# diffusers ResnetBlock2D / Attention / Encoder / Decoder GroupNorm eps for the SD VAE.
SD_NORM_EPS = 1e-6
# diffusers DiagonalGaussianDistribution clamps logvar to this range.
LOGVAR_CLAMP = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an ``AutoencoderKL``; the defaults are the SD VAE (diffusers config)."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = SD_NORM_EPS

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError("VAEConfig.block_out_channels must name at least one block")
    if self.layers_per_block < 1:
      raise ValueError(f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block}")
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        raise ValueError(f"block channels {channels} are not divisible by norm_num_groups "
                         f"{self.norm_num_groups} (block_out_channels={self.block_out_channels})")

  @classmethod
  def sd_vae(cls) -> "VAEConfig":
    """The Stable Diffusion VAE (sd-vae-ft-ema / sd-vae-ft-mse), as used by DiT."""
    return cls()

  @property
  def downsample_factor(self) -> int:
    """Image size / latent size: one 2x step between consecutive blocks (SD VAE: 8)."""
    return 2 ** (len(self.block_out_channels) - 1)


# ---------------------------------------------------------------------------- layers
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               eps: float = SD_NORM_EPS) -> jax.Array:
  """GroupNorm over (spatial, channels-in-group), statistics in float32 (torch semantics).

  x: (N, ..., C) with C divisible by num_groups; group g holds the contiguous channels
  [g * C/G, (g + 1) * C/G).  scale, bias: (C,).  Returns float32 of x's shape.
  """
  channels = x.shape[-1]
  if channels % num_groups:
    raise ValueError(f"GroupNorm: {channels} channels are not divisible by {num_groups} groups")
  x32 = x.astype(jnp.float32)
  grouped = x32.reshape(x.shape[0], -1, num_groups, channels // num_groups)
  mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(grouped - mean), axis=(1, 3), keepdims=True)  # biased, as torch
  normed = ((grouped - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  return normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class GroupNorm(nn.Module):
  """Affine GroupNorm; params ``scale``, ``bias``: (C,).  x: (N, ..., C) -> same, ``dtype``."""

  num_groups: int
  epsilon: float = SD_NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  """A conv with torch's ``padding=kernel // 2`` (stride 1) and float32 params."""
  if padding == "SAME":
    pad = kernel // 2
    padding = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding.  x: (N, H, W, C_in) -> (N, H, W, out)."""

  out_channels: int
  num_groups: int
  epsilon: float = SD_NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(GroupNorm(self.num_groups, self.epsilon, self.dtype, name="norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = nn.silu(GroupNorm(self.num_groups, self.epsilon, self.dtype, name="norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
    shortcut = x.astype(self.dtype)
    if x.shape[-1] != self.out_channels:
      shortcut = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(shortcut)
    return shortcut + h


class AttentionBlock(nn.Module):
  """Single-head spatial self-attention with a residual (diffusers Attention, VAE mid block).

  x: (N, H, W, C) -> x + to_out(softmax(q k^T / sqrt(C)) v), q, k, v = to_{q,k,v}(GN(x)).
  """

  num_groups: int
  epsilon: float = SD_NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, height, width, channels = x.shape
    h = GroupNorm(self.num_groups, self.epsilon, self.dtype, name="group_norm")(x)
    h = h.reshape(n, height * width, channels)
    q = Linear(channels, dtype=self.dtype, name="to_q")(h)  # (N, T, C)
    k = Linear(channels, dtype=self.dtype, name="to_k")(h)
    v = Linear(channels, dtype=self.dtype, name="to_v")(h)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (channels**-0.5), axis=-1).astype(v.dtype)
    out = jnp.einsum("nqk,nkc->nqc", probs, v)
    out = Linear(channels, dtype=self.dtype, name="to_out")(out)
    return x.astype(self.dtype) + out.reshape(n, height, width, channels)


class MidBlock(nn.Module):
  """ResnetBlock -> AttentionBlock -> ResnetBlock at constant channels."""

  num_groups: int
  epsilon: float = SD_NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.num_groups, self.epsilon, self.dtype, name="resnets_0")(x)
    x = AttentionBlock(self.num_groups, self.epsilon, self.dtype, name="attentions_0")(x)
    return ResnetBlock(channels, self.num_groups, self.epsilon, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Pad (bottom, right) by one, then a stride-2 3x3 conv: (N, H, W, C) -> (N, H/2, W/2, C)."""

  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # diffusers Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)) pads W right and H bottom.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x, then a 3x3 conv: (N, H, W, C) -> (N, 2H, 2W, C)."""

  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # out[i, j] = in[i // 2, j // 2]
    return _conv(self.out_channels, 3, self.dtype, "conv")(x)


class DownEncoderBlock(nn.Module):
  """``num_layers`` ResnetBlocks, then (optionally) a Downsample.  (N, H, W, C_in) ->
  (N, H/2, W/2, out_channels) with downsampling, else (N, H, W, out_channels)."""

  out_channels: int
  num_layers: int
  num_groups: int
  epsilon: float = SD_NORM_EPS
  add_downsample: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.num_groups, self.epsilon, self.dtype,
                      name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock(nn.Module):
  """``num_layers`` ResnetBlocks, then (optionally) an Upsample.  (N, H, W, C_in) ->
  (N, 2H, 2W, out_channels) with upsampling, else (N, H, W, out_channels)."""

  out_channels: int
  num_layers: int
  num_groups: int
  epsilon: float = SD_NORM_EPS
  add_upsample: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.num_groups, self.epsilon, self.dtype,
                      name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images (N, H, W, in_channels) -> moments (N, H/f, W/f, 2 * latent_channels)."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    groups, eps = cfg.norm_num_groups, cfg.norm_eps
    h = _conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
    last = len(cfg.block_out_channels) - 1
    for i, channels in enumerate(cfg.block_out_channels):
      h = DownEncoderBlock(channels, cfg.layers_per_block, groups, eps, add_downsample=i != last,
                           dtype=self.dtype, name=f"down_blocks_{i}")(h)
    h = MidBlock(groups, eps, self.dtype, name="mid_block")(h)
    h = nn.silu(GroupNorm(groups, eps, self.dtype, name="conv_norm_out")(h))
    return _conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """Latents (N, h, w, latent_channels) -> images (N, h*f, w*f, out_channels)."""

  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    groups, eps = cfg.norm_num_groups, cfg.norm_eps
    reversed_channels = cfg.block_out_channels[::-1]
    h = _conv(reversed_channels[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
    h = MidBlock(groups, eps, self.dtype, name="mid_block")(h)
    last = len(reversed_channels) - 1
    for i, channels in enumerate(reversed_channels):
      # diffusers UpDecoderBlock2D(num_layers=layers_per_block + 1).
      h = UpDecoderBlock(channels, cfg.layers_per_block + 1, groups, eps, add_upsample=i != last,
                         dtype=self.dtype, name=f"up_blocks_{i}")(h)
    h = nn.silu(GroupNorm(groups, eps, self.dtype, name="conv_norm_out")(h))
    return _conv(cfg.out_channels, 3, self.dtype, "conv_out")(h)


# ------------------------------------------------------------------------- autoencoder
def sample_posterior(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
  """Diagonal Gaussian posterior sample: mean + exp(logvar / 2) * noise (all the same shape)."""
  return mean + jnp.exp(0.5 * logvar) * noise


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder.  Unscaled latents: multiply by the latent scale
  (:data:`SD_LATENT_SCALE`) before the diffusion model, divide before :meth:`decode`.
  """

  config: VAEConfig = VAEConfig()
  dtype: Any = jnp.float32  # computation dtype (params stay float32)

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
    self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")
    self.decoder = Decoder(cfg, self.dtype)

  def encode(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Images x: (N, H, W, in_channels) in [-1, 1] -> (mean, logvar), each float32
    (N, H/f, W/f, latent_channels); logvar clamped to :data:`LOGVAR_CLAMP`."""
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
      raise ValueError(f"AutoencoderKL.encode expects NHWC images (N, H, W, "
                       f"{self.config.in_channels}), got {tuple(x.shape)}")
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_CLAMP)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents z: (N, h, w, latent_channels) -> images (N, h*f, w*f, out_channels),
    float32, not clipped."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"AutoencoderKL.decode expects NHWC latents (N, h, w, "
                       f"{self.config.latent_channels}), got {tuple(z.shape)}")
    z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, noise: Optional[jax.Array] = None) -> jax.Array:
    """Reconstruction: decode(posterior mean), or decode(mean + std * noise) given noise
    (N, H/f, W/f, latent_channels)."""
    mean, logvar = self.encode(x)
    z = mean if noise is None else sample_posterior(mean, logvar, noise)
    return self.decode(z)


def init_vae_params(config: VAEConfig, rng: jax.Array) -> dict:
  """Random params (flax default initialisers) for ``AutoencoderKL(config)``.

  Initialised on one image of the smallest valid size (f x f), so shapes are the same for
  every image size.  Wrap in ``jax.eval_shape`` for shapes only.  (XLA compiles the many
  random initialisers slowly on CPU, tens of seconds: load converted weights instead.)
  """
  f = config.downsample_factor
  x = jnp.zeros((1, f, f, config.in_channels), jnp.float32)
  return jax.jit(AutoencoderKL(config).init)(rng, x)["params"]  # one compile, not op by op


# --------------------------------------------------------------------- batched helpers
def make_decode_fn(config: VAEConfig, scale: float = SD_LATENT_SCALE,
                   dtype: Any = jnp.float32) -> Callable[[Any, jax.Array], jax.Array]:
  """Pure ``decode_fn(params, latents) -> images``: latents (N, h, w, latent_channels) as
  the diffusion model sees them (scaled) -> images (N, h*f, w*f, out_channels) float32,
  clipped to [-1, 1]."""
  model = AutoencoderKL(config, dtype)

  def decode_fn(params, latents):
    images = model.apply({"params": params}, latents / scale, method=AutoencoderKL.decode)
    return jnp.clip(images, -1.0, 1.0)

  return decode_fn


def make_encode_fn(config: VAEConfig, scale: float = SD_LATENT_SCALE,
                   dtype: Any = jnp.float32) -> Callable[..., jax.Array]:
  """Pure ``encode_fn(params, images, noise=None) -> scaled latents``: images (N, H, W,
  in_channels) in [-1, 1] -> scale * (posterior mean, or mean + std * noise)."""
  model = AutoencoderKL(config, dtype)

  def encode_fn(params, images, noise=None):
    mean, logvar = model.apply({"params": params}, images, method=AutoencoderKL.encode)
    latents = mean if noise is None else sample_posterior(mean, logvar, noise)
    return latents * scale

  return encode_fn


@functools.lru_cache(maxsize=None)
def _jitted_fn(kind: str, config: VAEConfig, scale: float, dtype: Any) -> Callable:
  """Jitted decode/encode fn, cached so repeated helper calls reuse compiled code."""
  make = {"decode": make_decode_fn, "encode": make_encode_fn}[kind]
  return jax.jit(make(config, scale, dtype))


ShardingSpec = Union[None, Mesh, NamedSharding]


def _placements(sharding: ShardingSpec, chunk: int):
  """(params placement, batch placement) for ``sharding``, or (None, None) to leave
  placement to jax.  A Mesh shards the batch axis over all its devices when they divide
  the chunk; otherwise the batch is replicated."""
  if sharding is None:
    return None, None
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec()), sharding
  if not isinstance(sharding, Mesh):
    raise TypeError(f"sharding must be a jax.sharding.Mesh or NamedSharding, got "
                    f"{type(sharding).__name__}")
  replicated = NamedSharding(sharding, PartitionSpec())
  if chunk % sharding.size:
    logging.warning("batch of %d does not divide over %d devices: batch is replicated, not "
                    "sharded", chunk, sharding.size)
    return replicated, replicated
  return replicated, NamedSharding(sharding, PartitionSpec(tuple(sharding.axis_names)))


def _map_batches(jitted_fn: Callable, params, inputs: Sequence[np.ndarray], batch_size: int,
                 sharding: ShardingSpec) -> np.ndarray:
  """``jitted_fn(params, *chunks)`` over the leading axis of ``inputs`` in chunks of
  ``batch_size`` (the last chunk zero-padded, so one compiled shape), results concatenated
  as float32 numpy."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  total = inputs[0].shape[0]
  if total == 0:
    raise ValueError("nothing to process: the batch is empty")
  chunk = min(batch_size, total)
  params_placement, batch_placement = _placements(sharding, chunk)
  if params_placement is not None:
    params = jax.device_put(params, params_placement)
  outputs = []
  for start in range(0, total, chunk):
    pieces = [np.asarray(a[start:start + chunk]) for a in inputs]
    valid = pieces[0].shape[0]
    if valid < chunk:
      pieces = [np.concatenate([p, np.zeros((chunk - valid,) + p.shape[1:], p.dtype)]) for p in pieces]
    if batch_placement is not None:
      pieces = [jax.device_put(p, batch_placement) for p in pieces]
    outputs.append(np.asarray(jitted_fn(params, *pieces), dtype=np.float32)[:valid])
  return np.concatenate(outputs, axis=0)


def decode_latents(params, latents, config: VAEConfig, batch_size: int,
                   scale: float = SD_LATENT_SCALE, *, dtype: Any = jnp.float32,
                   sharding: ShardingSpec = None) -> np.ndarray:
  """Scaled latents (N, h, w, latent_channels) -> images (N, h*f, w*f, out_channels) in
  [-1, 1], float32 numpy.  Divides by ``scale``, decodes ``batch_size`` at a time.

  ``sharding``: a Mesh (params replicated, each batch split over all its devices when
  they divide it) or a NamedSharding for the batch (params replicated on its mesh).
  """
  latents = np.asarray(latents, dtype=np.float32)
  if latents.ndim != 4 or latents.shape[-1] != config.latent_channels:
    raise ValueError(f"decode_latents expects NHWC latents (N, h, w, {config.latent_channels}), "
                     f"got {latents.shape}")
  decode_fn = _jitted_fn("decode", config, float(scale), jnp.dtype(dtype))
  return _map_batches(decode_fn, params, [latents], batch_size, sharding)


def encode_images(params, images, config: VAEConfig, batch_size: int,
                  scale: float = SD_LATENT_SCALE, *, rng: Optional[jax.Array] = None,
                  dtype: Any = jnp.float32, sharding: ShardingSpec = None) -> np.ndarray:
  """Images (N, H, W, in_channels) in [-1, 1] -> scaled latents (N, H/f, W/f,
  latent_channels), float32 numpy: ``scale * mean``, or with ``rng`` a posterior sample
  ``scale * (mean + std * noise)`` (noise drawn for the whole batch at once, so the result
  does not depend on ``batch_size``).  ``sharding`` as in :func:`decode_latents`."""
  images = np.asarray(images, dtype=np.float32)
  if images.ndim != 4 or images.shape[-1] != config.in_channels:
    raise ValueError(f"encode_images expects NHWC images (N, H, W, {config.in_channels}), "
                     f"got {images.shape}")
  n, height, width, _ = images.shape
  f = config.downsample_factor
  if height % f or width % f:
    raise ValueError(f"image size {height}x{width} is not a multiple of the VAE's "
                     f"downsampling factor {f}")
  latent_shape = (n, height // f, width // f, config.latent_channels)
  if rng is None:  # mean + std * 0 == mean exactly (logvar is clamped, so std is finite)
    noise = np.zeros(latent_shape, np.float32)
  else:
    noise = np.asarray(jax.random.normal(rng, latent_shape, jnp.float32))
  encode_fn = _jitted_fn("encode", config, float(scale), jnp.dtype(dtype))
  return _map_batches(encode_fn, params, [images, noise], batch_size, sharding)

