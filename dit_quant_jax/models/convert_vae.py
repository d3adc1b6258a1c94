"""diffusers ``AutoencoderKL`` state dicts (the SD VAE) -> our Flax params (``models/vae.py``).

The Flax module tree mirrors diffusers', so conversion is a rename and a transpose:

  diffusers key                                          Flax path                                        layout
  ``decoder.up_blocks.0.resnets.2.conv1.weight``         ``decoder/up_blocks_0/resnets_2/conv1/kernel``   (out, in, kh, kw) -> (kh, kw, in, out)
  ``encoder.down_blocks.1.downsamplers.0.conv.weight``   ``encoder/down_blocks_1/downsamplers_0/conv/kernel``
  ``decoder.mid_block.attentions.0.to_q.weight``         ``decoder/mid_block/attentions_0/to_q/kernel``   (out, in) -> (in, out)
  ``decoder.mid_block.attentions.0.to_out.0.weight``     ``decoder/mid_block/attentions_0/to_out/kernel``
  ``*.norm1.weight``, ``*.group_norm.weight``, ...      ``*/norm1/scale``, ...                           as is
  ``post_quant_conv.weight``                             ``post_quant_conv/kernel``                       1x1 conv
  ``*.bias``                                             ``*/bias``                                       as is

A numeric ModuleList index is joined to its parent's name with ``_``.  Checkpoints saved
by older diffusers name the attention layers ``query``, ``key``, ``value``, ``proj_attn``;
they are read as ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.  Note the decoder's
``up_blocks.0`` is the *deepest* block (``reversed(block_out_channels)``), and each decoder
up block holds ``layers_per_block + 1`` resnets.

Every key and shape is checked against the model: a missing, unexpected or mis-shaped key
raises :class:`CheckpointMismatchError` naming it (and both shapes), never a partial load.
Nothing is downloaded: the caller supplies the file.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from dit_quant_jax.models.convert import CheckpointMismatchError, join_numeric_indices, to_numpy
from dit_quant_jax.models.vae import VAEConfig, init_vae_params

# Older diffusers (before the Attention refactor, ~0.14) -> current attention layer names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                          "proj_attn": "to_out.0"}
# diffusers' file names inside a model folder (``save_pretrained``), in order of preference.
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

_TO_FLAX_PERM = {2: (1, 0),         # Linear (out, in) -> (in, out)
                 4: (2, 3, 1, 0)}   # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
_INDEXED_MODULE = re.compile(r"^(.+)_(\d+)$")  # Flax "resnets_2" <-> diffusers "resnets.2"


# -------------------------------------------------------------------------------- keys
def canonical_key(key: str) -> str:
  """Rename legacy attention layers: ``...attentions.0.query.weight`` -> ``...to_q.weight``."""
  parts = key.split(".")
  if len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION_NAMES:
    parts = parts[:-2] + LEGACY_ATTENTION_NAMES[parts[-2]].split(".") + parts[-1:]
  return ".".join(parts)


def diffusers_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
  """``decoder.up_blocks.0.resnets.1.conv1.weight`` ->
  ``(('decoder', 'up_blocks_0', 'resnets_1', 'conv1'), 'weight')``; ``to_out.0`` -> ``to_out``."""
  parts = canonical_key(key).split(".")
  modules = join_numeric_indices(parts[:-1], key, CheckpointMismatchError)
  if modules and modules[-1] == "to_out_0":  # diffusers: to_out = [Linear, Dropout]
    modules[-1] = "to_out"
  return tuple(modules), parts[-1]


def flax_path_to_diffusers_key(path: tuple[str, ...]) -> str:
  """``('decoder', 'mid_block', 'attentions_0', 'to_out', 'kernel')`` ->
  ``decoder.mid_block.attentions.0.to_out.0.weight`` (current diffusers names)."""
  modules = []
  for name in path[:-1]:
    match = _INDEXED_MODULE.match(name)
    modules.append(f"{match.group(1)}.{match.group(2)}" if match else name)
    if name == "to_out":
      modules.append("0")
  leaf = "bias" if path[-1] == "bias" else "weight"  # kernel (conv, linear), scale (norm)
  return ".".join(modules + [leaf])


def _flax_to_torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The shape diffusers stores for a Flax leaf of ``flax_shape``."""
  if leaf != "kernel":
    return tuple(flax_shape)
  perm = _TO_FLAX_PERM[len(flax_shape)]
  inverse = np.argsort(perm)
  return tuple(int(flax_shape[i]) for i in inverse)


# ------------------------------------------------------------------------------ arrays


def expected_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{Flax param path: shape}`` of ``AutoencoderKL(config)`` (shapes only, no allocation)."""
  return dict(_expected_shapes_cached(config))


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(config: VAEConfig) -> tuple:
  shapes = jax.eval_shape(lambda: init_vae_params(config, jax.random.PRNGKey(0)))
  flat = traverse_util.flatten_dict(shapes)
  return tuple((path, tuple(leaf.shape)) for path, leaf in flat.items())


def _natural_key(key: str):
  return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", key)]


def _arch_text(config: VAEConfig) -> str:
  return (f"AutoencoderKL(block_out_channels={config.block_out_channels}, "
          f"layers_per_block={config.layers_per_block}, latent_channels={config.latent_channels}, "
          f"in_channels={config.in_channels}, out_channels={config.out_channels})")


# ------------------------------------------------------------------------ conversion
def params_from_diffusers(state_dict: Mapping[str, Any], config: VAEConfig) -> dict:
  """diffusers ``AutoencoderKL`` state dict -> Flax params for ``AutoencoderKL(config)``.

  Args:
    state_dict: ``{diffusers key: numpy array or torch tensor}``, current or legacy
      attention names.
    config: the architecture (``VAEConfig.sd_vae()`` for the SD VAE).

  Returns nested dict of float32 jax arrays.  Raises :class:`CheckpointMismatchError` on
  the first missing, unexpected, duplicated or mis-shaped key (keys in natural order).
  """
  expected = expected_shapes(config)
  arch = _arch_text(config)
  expected_modules = {}
  for path in expected:
    expected_modules.setdefault(path[:-1], set()).add(path[-1])

  filled: dict[tuple[str, ...], np.ndarray] = {}
  source_key: dict[tuple[str, ...], str] = {}
  for key in sorted(state_dict, key=_natural_key):
    value = state_dict[key]
    shape = tuple(np.shape(value))
    module, leaf = diffusers_key_to_module_path(key)
    leaves = expected_modules.get(module, set())
    if leaf == "bias" and "bias" in leaves:
      flax_leaf = "bias"
    elif leaf == "weight" and "kernel" in leaves:
      flax_leaf = "kernel"
    elif leaf == "weight" and "scale" in leaves:
      flax_leaf = "scale"
    else:
      raise CheckpointMismatchError(f"checkpoint has unexpected key {key!r} (shape {shape}) for {arch}")
    path = module + (flax_leaf,)
    if path in source_key:
      raise CheckpointMismatchError(
          f"checkpoint keys {source_key[path]!r} and {key!r} both name the Flax param "
          f"{'/'.join(path)}")
    want = _flax_to_torch_shape(expected[path], flax_leaf)
    if shape != want:
      raise CheckpointMismatchError(
          f"checkpoint key {key!r} has shape {shape}, model expects {want} for {arch}")
    try:
      array = to_numpy(value, require_float=True)
    except CheckpointMismatchError as e:
      raise CheckpointMismatchError(f"checkpoint key {key!r}: {e}") from None
    if flax_leaf == "kernel":
      array = np.transpose(array, _TO_FLAX_PERM[array.ndim])
    filled[path] = array
    source_key[path] = key

  missing = [path for path in expected if path not in filled]
  if missing:
    first = min(missing, key=lambda p: _natural_key(flax_path_to_diffusers_key(p)))
    want = _flax_to_torch_shape(expected[first], first[-1])
    raise CheckpointMismatchError(
        f"checkpoint is missing key {flax_path_to_diffusers_key(first)!r} (expected shape "
        f"{want}) for {arch}; {len(missing)} key(s) missing in all")
  # One copy per array: the (possibly transposed) numpy view straight to a jax array.
  return traverse_util.unflatten_dict({p: jax.numpy.asarray(a) for p, a in filled.items()})


# ------------------------------------------------------------------------------ loading
def resolve_weights_file(path: str) -> str:
  """A weights file, or a diffusers model folder (``.../vae``) holding one of
  :data:`DIFFUSERS_WEIGHT_FILES` (safetensors preferred)."""
  if os.path.isdir(path):
    for name in DIFFUSERS_WEIGHT_FILES:
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f"{path} is a folder without any of {list(DIFFUSERS_WEIGHT_FILES)}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VAE weights not found: {path}")
  return path


def load_vae_state_dict(path: str) -> dict[str, np.ndarray]:
  """Read a diffusers VAE state dict: ``.safetensors`` (safetensors' numpy API) or
  ``.bin``/``.pt``/``.pth`` (torch, imported only here), or a folder holding one.

  Returns ``{key: float32 numpy array}``.  Nothing is downloaded.
  """
  path = resolve_weights_file(path)
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError("reading .safetensors needs the safetensors package: "
                        "pip install safetensors") from e
    try:
      state_dict = load_file(path)
    except (TypeError, ValueError):
      # numpy has no bfloat16: read through torch instead.
      from safetensors.torch import load_file as load_torch_file
      state_dict = load_torch_file(path, device="cpu")
  elif path.endswith((".bin", ".pt", ".pth")):
    try:
      import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError("reading .bin VAE weights needs PyTorch: "
                        "pip install 'dit_quant_jax[torch]' (torch==2.13.0)") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
      state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
      raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
  else:
    raise ValueError(f"{path}: unknown VAE weights format; expected .safetensors, .bin, .pt "
                     "or .pth")
  out = {}
  for key, value in state_dict.items():
    if not hasattr(value, "shape"):
      raise ValueError(f"{path}: entry {key!r} is not a tensor; not a VAE state dict")
    out[key] = to_numpy(value, require_float=True)
  return out


def load_vae_params(path: str, config: VAEConfig | None = None) -> dict:
  """``.safetensors`` / ``.bin`` / model folder -> checked Flax params (SD VAE by default)."""
  config = VAEConfig.sd_vae() if config is None else config
  return params_from_diffusers(load_vae_state_dict(path), config)
