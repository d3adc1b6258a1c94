"""Diffusion Transformer (Peebles & Xie, 2023) in Flax linen, faithful to the official code.

Module for module this mirrors facebookresearch/DiT ``models.py`` so that the official
checkpoints convert by a rename and a transpose (see ``convert.py``):

  x_embedder   p x p conv, stride p                              (PatchEmbed)
  pos_embed    fixed 2D sin-cos table, (1, tokens, hidden), stored but never trained
  t_embedder   256-dim sinusoid (cos half first, max period 1e4) -> Linear, SiLU, Linear
  y_embedder   table of num_classes + 1 rows; the last row is the null (CFG) class
  blocks_i     adaLN-Zero DiT block:  x += gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
                                      x += gate_mlp * MLP (modulate(LN(x), shift_mlp, scale_mlp))
  final_layer  modulate(LN(x), shift, scale) -> Linear(p*p*out_channels) -> unpatchify

Layout: NHWC images, ``(batch, tokens, hidden)`` token sequences, tokens in row-major patch
order (as ``Conv2d(...).flatten(2).transpose(1, 2)`` in PyTorch).  Every linear layer is
:class:`dit_quant_jax.models.layers.Linear`, the single module that quantized weights plug
into.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_quant_jax.models.layers import LAYER_NORM_EPS
from dit_quant_jax.models.layers import Linear
from dit_quant_jax.models.layers import NormModulated
from dit_quant_jax.models.layers import layer_norm  # noqa: F401 (public here too)
from dit_quant_jax.models.layers import modulate  # noqa: F401 (public here too)
from dit_quant_jax.quant.qtensor import ActivationQuantizer

# Official model zoo: name -> (depth, hidden_size, patch_size, num_heads).
DIT_CONFIGS = {
    "DiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "DiT-XL/4": dict(depth=28, hidden_size=1152, patch_size=4, num_heads=16),
    "DiT-XL/8": dict(depth=28, hidden_size=1152, patch_size=8, num_heads=16),
    "DiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "DiT-L/4": dict(depth=24, hidden_size=1024, patch_size=4, num_heads=16),
    "DiT-L/8": dict(depth=24, hidden_size=1024, patch_size=8, num_heads=16),
    "DiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "DiT-B/4": dict(depth=12, hidden_size=768, patch_size=4, num_heads=12),
    "DiT-B/8": dict(depth=12, hidden_size=768, patch_size=8, num_heads=12),
    "DiT-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "DiT-S/4": dict(depth=12, hidden_size=384, patch_size=4, num_heads=6),
    "DiT-S/8": dict(depth=12, hidden_size=384, patch_size=8, num_heads=6),
}

TIMESTEP_FREQ_DIM = 256  # official TimestepEmbedder.frequency_embedding_size
TIMESTEP_MAX_PERIOD = 10000


# --------------------------------------------------------------------------- embeddings
def timestep_embedding(t: jax.Array, dim: int, max_period: int = TIMESTEP_MAX_PERIOD) -> jax.Array:
  """Sinusoidal timestep features, official layout [cos | sin].  t: (N,) -> (N, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
  return embedding


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """1D sin-cos table, [sin | cos], float64.  pos: any shape -> (pos.size, embed_dim)."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """2D sin-cos table (grid_size**2, embed_dim), float32, as the official MAE/DiT code.

  Token n = row * grid_size + col; the first half of the features encodes the column, the
  second half the row (the official code's meshgrid puts w first).
  """
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


_normal_002 = nn.initializers.normal(stddev=0.02)


class PatchEmbed(nn.Module):
  """p x p conv with stride p: (N, H, W, C) -> (N, (H/p)*(W/p), hidden)."""

  patch_size: int
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    # Official init: xavier_uniform on the weight viewed as (out, in * p * p).
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", kernel_init=init,
                dtype=self.dtype, name="proj")(x)
    n, h, w, d = x.shape
    return x.reshape(n, h * w, d)


class TimestepEmbedder(nn.Module):
  hidden_size: int
  frequency_embedding_size: int = TIMESTEP_FREQ_DIM
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t):
    """t: (N,) -> (N, hidden)."""
    t_freq = timestep_embedding(t, self.frequency_embedding_size).astype(self.dtype)
    h = Linear(self.hidden_size, kernel_init=_normal_002, dtype=self.dtype, name="mlp_0")(t_freq)
    h = nn.silu(h)
    return Linear(self.hidden_size, kernel_init=_normal_002, dtype=self.dtype, name="mlp_2")(h)


class LabelEmbedder(nn.Module):
  """Class embedding with an extra null class (index num_classes) for classifier-free guidance."""

  num_classes: int
  hidden_size: int
  dropout_prob: float

  @nn.compact
  def __call__(self, labels, train: bool, force_drop_ids=None):
    """labels: (N,) int -> (N, hidden).  force_drop_ids: (N,), 1 replaces by the null class."""
    use_cfg_embedding = int(self.dropout_prob > 0)
    table = nn.Embed(self.num_classes + use_cfg_embedding, self.hidden_size,
                     embedding_init=_normal_002, name="embedding_table")
    if (train and self.dropout_prob > 0) or force_drop_ids is not None:
      if force_drop_ids is None:
        drop_ids = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob
      else:
        drop_ids = force_drop_ids == 1
      labels = jnp.where(drop_ids, self.num_classes, labels)
    return table(labels)


# ---------------------------------------------------------------------------- transformer
class Attention(nn.Module):
  """Multi-head self-attention with fused qkv, laid out as timm's (3, heads, head_dim).

  Optional activation quantizers for the attention matmuls (HQ-DiT's option) live in the
  params pytree next to qkv/proj as ``q_quant``, ``k_quant``, ``probs_quant``, ``v_quant``
  (each an :class:`ActivationQuantizer`); absent, the matmuls run in full precision.
  """

  hidden_size: int
  num_heads: int
  dtype: Any = jnp.float32

  def _maybe_quant(self, name, x):
    if self.has_variable("params", name):
      quantizer = self.get_variable("params", name)
      if not isinstance(quantizer, ActivationQuantizer):
        raise TypeError(f"params entry {name!r} must be an ActivationQuantizer, got {type(quantizer)}")
      return quantizer(x)
    return x

  @nn.compact
  def __call__(self, x):
    """x: (N, T, D) -> (N, T, D)."""
    n, t, d = x.shape
    head_dim = d // self.num_heads
    qkv = Linear(3 * d, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(n, t, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, T, heads, head_dim)
    q = self._maybe_quant("q_quant", q)
    k = self._maybe_quant("k_quant", k)
    v = self._maybe_quant("v_quant", v)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) * (head_dim**-0.5)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    probs = self._maybe_quant("probs_quant", probs)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, t, d)
    return Linear(d, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  hidden_features: int
  out_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # official: nn.GELU(approximate="tanh"); fused into fc1's epilogue by quantized kernels
    h = Linear(self.hidden_features, dtype=self.dtype, name="fc1", activation="gelu_tanh")(x)
    return Linear(self.out_features, dtype=self.dtype, name="fc2")(h)


class DiTBlock(nn.Module):
  """adaLN-Zero block.  x: (N, T, D), c: (N, D) -> (N, T, D)."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    d = self.hidden_size
    mod = Linear(6 * d, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                 name="adaLN_modulation_1")(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    attn = Attention(d, self.num_heads, dtype=self.dtype, name="attn")
    # The modulated LayerNorm outputs go in deferred (layers.NormModulated): an HQ-DiT W4A4 /
    # W4A8 kernel fuses them into its act-quant step; every other layer computes them.
    x = x + gate_msa[:, None, :] * attn(NormModulated(x, shift_msa, scale_msa, LAYER_NORM_EPS))
    mlp = Mlp(int(d * self.mlp_ratio), d, dtype=self.dtype, name="mlp")
    x = x + gate_mlp[:, None, :] * mlp(NormModulated(x, shift_mlp, scale_mlp, LAYER_NORM_EPS))
    return x


class FinalLayer(nn.Module):
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    """x: (N, T, D), c: (N, D) -> (N, T, p*p*out_channels)."""
    mod = Linear(2 * self.hidden_size, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                 name="adaLN_modulation_1")(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = NormModulated(x, shift, scale, LAYER_NORM_EPS)
    return Linear(self.patch_size**2 * self.out_channels, kernel_init=nn.initializers.zeros,
                  dtype=self.dtype, name="linear")(x)


class DiT(nn.Module):
  """Class-conditional DiT.  ``__call__(x, t, y)``: x (N, H, W, C) NHWC, t (N,), y (N,)."""

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  # forward_with_cfg guides the first `cfg_channels` output channels (official: 3, which for
  # 4-channel latents leaves the 4th unguided, kept for exact reproducibility).  None
  # guides every epsilon channel (all in_channels).
  cfg_channels: Optional[int] = 3
  dtype: Any = jnp.float32  # computation dtype (params stay float32)

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def num_patches(self) -> int:
    return (self.input_size // self.patch_size) ** 2

  def config_dict(self) -> dict:
    """The architecture as a plain dict (recorded with checkpoints)."""
    fields = [f.name for f in dataclasses.fields(self) if f.name not in ("parent", "name", "dtype")]
    return {k: getattr(self, k) for k in fields}

  def block_module(self) -> DiTBlock:
    """A standalone DiTBlock with this model's hyperparameters (for block-wise calibration)."""
    return DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, dtype=self.dtype, parent=None)

  def setup(self):
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    self.x_embedder = PatchEmbed(self.patch_size, self.hidden_size, dtype=self.dtype)
    self.t_embedder = TimestepEmbedder(self.hidden_size, dtype=self.dtype)
    self.y_embedder = LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob)
    grid = self.input_size // self.patch_size
    self.pos_embed = self.param(
        "pos_embed", lambda _: jnp.asarray(sincos_2d(self.hidden_size, grid))[None],
    )
    self.blocks = [DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                            name=f"blocks_{i}") for i in range(self.depth)]
    self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels,
                                  dtype=self.dtype)

  def unpatchify(self, x):
    """(N, T, p*p*C) -> (N, H, W, C), official order (h, w, p, q, c)."""
    c, p = self.out_channels, self.patch_size
    n, t, _ = x.shape
    h = w = int(round(t**0.5))
    x = x.reshape(n, h, w, p, p, c)
    x = jnp.einsum("nhwpqc->nhpwqc", x)
    return x.reshape(n, h * p, w * p, c)

  def embed(self, x, t, y, train: bool = False, force_drop_ids=None):
    """Tokens and conditioning: x (N,H,W,C) -> ((N, T, D), c: (N, D))."""
    expected = (self.input_size, self.input_size, self.in_channels)
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f"DiT expects NHWC input of shape (N, {expected[0]}, {expected[1]}, "
                       f"{expected[2]}), got {tuple(x.shape)}")
    x = x.astype(self.dtype)
    tokens = self.x_embedder(x) + jax.lax.stop_gradient(self.pos_embed).astype(self.dtype)
    c = self.t_embedder(t) + self.y_embedder(y, train, force_drop_ids).astype(self.dtype)
    return tokens, c

  def __call__(self, x, t, y, train: bool = False, force_drop_ids=None):
    """x: (N, H, W, C); t: (N,) timesteps; y: (N,) labels -> (N, H, W, out_channels)."""
    tokens, c = self.embed(x, t, y, train, force_drop_ids)
    for block in self.blocks:
      tokens = block(tokens, c)
    out = self.final_layer(tokens, c)
    return self.unpatchify(out).astype(jnp.float32)

  def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels: bool = False):
    """Classifier-free guidance, official semantics.

    The batch's first half is conditional, the second half unconditional (labels =
    num_classes); only the first half of x is used.  Guidance is applied to the first
    ``cfg_channels`` output channels (all epsilon channels if ``guide_all_channels`` or
    ``cfg_channels is None``), and the guided epsilon is repeated for both halves.
    """
    half = x[: x.shape[0] // 2]
    combined = jnp.concatenate([half, half], axis=0)
    model_out = self(combined, t, y)
    ch = self.in_channels if (guide_all_channels or self.cfg_channels is None) else self.cfg_channels
    eps, rest = model_out[..., :ch], model_out[..., ch:]
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = jnp.concatenate([half_eps, half_eps], axis=0)
    return jnp.concatenate([eps, rest], axis=-1)


def create_model(name: Optional[str] = "DiT-XL/2", **overrides) -> DiT:
  """An official config by name (``DiT-{S,B,L,XL}/{2,4,8}``) with keyword overrides.

  ``create_model("DiT-S/4", input_size=32, in_channels=1, num_classes=10, depth=4)``.
  ``name=None`` builds from the overrides alone (on top of the DiT defaults).
  """
  if name is None:
    base = {}
  elif name in DIT_CONFIGS:
    base = dict(DIT_CONFIGS[name])
  else:
    raise ValueError(f"unknown DiT config {name!r}; known: {sorted(DIT_CONFIGS)}")
  known = {f.name for f in dataclasses.fields(DiT)} - {"parent", "name"}
  unknown = set(overrides) - known
  if unknown:
    raise ValueError(f"unknown DiT option(s) {sorted(unknown)}; known: {sorted(known)}")
  base.update(overrides)
  return DiT(**base)


def init_params(model: DiT, rng, batch: int = 1):
  """Random params with the official initialisation (adaLN-Zero: zeroed modulation)."""
  x = jnp.zeros((batch, model.input_size, model.input_size, model.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  y = jnp.zeros((batch,), jnp.int32)
  return model.init(rng, x, t, y)["params"]


def count_params(params) -> int:
  return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
