"""An independent PyTorch port of the official DiT forward pass (tests only).

Written from the structure of facebookresearch/DiT ``models.py`` (and the timm modules it
imports: PatchEmbed, Attention, Mlp) so that its ``state_dict()`` has exactly the official
key layout and its forward follows the official NCHW computation.  The parity tests fill it
with random weights, convert them with ``models.convert.params_from_official`` and compare
our Flax forward against it.  Nothing here is imported by the library.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def official_modulate(x, shift, scale):
  """x: (N, T, D); shift, scale: (N, D)."""
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def official_sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """MAE/DiT 2D table, (grid_size**2, embed_dim): meshgrid puts the column (w) first."""
  def one_axis(dim, positions):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None].astype(np.float64) * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  coords = np.arange(grid_size, dtype=np.float32)
  first, second = np.meshgrid(coords, coords)  # "xy" indexing: first[i, j] = j (column)
  return np.concatenate([one_axis(embed_dim // 2, first), one_axis(embed_dim // 2, second)], axis=1)


class PatchEmbed(nn.Module):
  """timm PatchEmbed (flatten, no norm): (N, C, H, W) -> (N, T, D)."""

  def __init__(self, patch_size, in_channels, hidden_size):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

  def forward(self, x):
    x = self.proj(x)                     # (N, D, H/p, W/p)
    return x.flatten(2).transpose(1, 2)  # (N, T, D), row-major patches


class Attention(nn.Module):
  """timm Attention, qkv_bias=True, unfused path: softmax(q k^T * scale) v."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = self.head_dim ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)             # (N, heads, T, head_dim)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return self.proj(x)


class Mlp(nn.Module):
  def __init__(self, in_features, hidden_features):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU(approximate="tanh")
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
  def __init__(self, hidden_size, frequency_embedding_size=256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                             nn.Linear(hidden_size, hidden_size))
    self.frequency_embedding_size = frequency_embedding_size

  @staticmethod
  def timestep_embedding(t, dim, max_period=10000):
    """GLIDE sinusoid, [cos | sin] (+ a zero column for odd dim): (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
      embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding

  def forward(self, t):
    return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
  """Eval-mode label embedding; the table has a null-class row when dropout_prob > 0."""

  def __init__(self, num_classes, hidden_size, dropout_prob):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

  def forward(self, labels):
    return self.embedding_table(labels)


class DiTBlock(nn.Module):
  def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden_size, num_heads)
    self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

  def forward(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * self.attn(official_modulate(self.norm1(x), shift_msa, scale_msa))
    x = x + gate_mlp.unsqueeze(1) * self.mlp(official_modulate(self.norm2(x), shift_mlp, scale_mlp))
    return x


class FinalLayer(nn.Module):
  def __init__(self, hidden_size, patch_size, out_channels):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(official_modulate(self.norm_final(x), shift, scale))


class OfficialDiT(nn.Module):
  """The official DiT, eval mode.  forward: x (N, C, H, W), t (N,), y (N,) -> (N, out_C, H, W)."""

  def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
               num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
               learn_sigma=True):
    super().__init__()
    self.in_channels = in_channels
    self.out_channels = in_channels * 2 if learn_sigma else in_channels
    self.patch_size = patch_size
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    grid = input_size // patch_size
    table = torch.from_numpy(official_sincos_2d(hidden_size, grid)).float().unsqueeze(0)
    self.pos_embed = nn.Parameter(table, requires_grad=False)
    self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

  def unpatchify(self, x):
    """(N, T, p*p*C) -> (N, C, H, W)."""
    c, p = self.out_channels, self.patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)

  def forward(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder(y)
    for block in self.blocks:
      x = block(x, c)
    return self.unpatchify(self.final_layer(x, c))

  def forward_with_cfg(self, x, t, y, cfg_scale):
    """Official guidance: first half of x, the first 3 output channels guided."""
    half = x[: len(x) // 2]
    model_out = self.forward(torch.cat([half, half], dim=0), t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def randomize_(model: nn.Module, seed: int) -> None:
  """Fill every parameter except pos_embed (a fixed table) with non-zero random values.

  Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases of linear/conv layers,
  N(0, 1) for the label table: adaLN and final-layer weights included (never zero).
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.Linear, nn.Conv2d)):
        fan_in = module.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        for param in (module.weight, module.bias):
          param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
      elif isinstance(module, nn.Embedding):
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
