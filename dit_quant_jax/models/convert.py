"""Official facebookresearch/DiT PyTorch checkpoints <-> our Flax params.

The Flax model (``models/dit.py``) mirrors the official module tree, so conversion is a
rename and a transpose:

  official key                               Flax path                                 layout
  ``pos_embed``                              ``pos_embed``                             (1, T, D) as is
  ``x_embedder.proj.weight``                 ``x_embedder/proj/kernel``                (D, C, p, p) -> (p, p, C, D)
  ``t_embedder.mlp.0.weight``                ``t_embedder/mlp_0/kernel``               (out, in) -> (in, out)
  ``y_embedder.embedding_table.weight``      ``y_embedder/embedding_table/embedding``  (classes + 1, D) as is
  ``blocks.3.attn.qkv.weight``               ``blocks_3/attn/qkv/kernel``              (out, in) -> (in, out)
  ``blocks.3.adaLN_modulation.1.weight``     ``blocks_3/adaLN_modulation_1/kernel``    (out, in) -> (in, out)
  ``final_layer.linear.weight``              ``final_layer/linear/kernel``             (out, in) -> (in, out)
  ``*.bias``                                 ``*/bias``                                as is

i.e. a numeric module index (``nn.Sequential`` / ``nn.ModuleList`` position) is joined to
its parent's name with ``_``, ``weight`` becomes ``kernel`` (linear, conv) or ``embedding``
(the label table).  Whenever a model is given (or inferred), every key and shape is
checked: a missing, unexpected or mis-shaped key is an error naming it, never a partial
load.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from dit_quant_jax.models import dit as dit_lib
from dit_quant_jax.quant.qtensor import is_quantized
from dit_quant_jax.utils import checkpoint

# Official hidden size -> number of attention heads (models.py, DiT_{S,B,L,XL}_* configs).
# Head counts cannot be read from shapes (qkv is (3D, D) whatever the split).
OFFICIAL_NUM_HEADS = {
    cfg["hidden_size"]: cfg["num_heads"] for cfg in dit_lib.DIT_CONFIGS.values()
}

# Official training default (train.py / models.py: class_dropout_prob=0.1): the label table
# then holds num_classes + 1 rows, the last one the null class of classifier-free guidance.
OFFICIAL_CLASS_DROPOUT_PROB = 0.1

# Permutations from the official (PyTorch) layout to ours, by weight rank.
_TO_FLAX_PERM = {2: (1, 0),          # Linear (out, in) -> (in, out)
                 4: (2, 3, 1, 0)}    # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
_TO_OFFICIAL_PERM = {2: (1, 0), 4: (3, 2, 0, 1)}

_EMBEDDING_PARENT = "embedding_table"  # the one nn.Embedding (LabelEmbedder)
_INDEXED_MODULE = re.compile(r"^(.+)_(\d+)$")  # Flax "blocks_3" <-> official "blocks.3"


class CheckpointMismatchError(ValueError):
  """A checkpoint's keys or shapes do not fit the model."""


# -------------------------------------------------------------------------------- keys
def join_numeric_indices(parts, key: str, error_cls=ValueError) -> list[str]:
  """PyTorch module path parts -> Flax module names: ``['blocks', '3', 'attn']`` ->
  ``['blocks_3', 'attn']`` (ModuleList / Sequential indices join their parent's name)."""
  modules: list[str] = []
  for part in parts:
    if part.isdigit():
      if not modules:
        raise error_cls(f"checkpoint key {key!r} starts with a numeric index")
      modules[-1] = f"{modules[-1]}_{part}"
    else:
      modules.append(part)
  return modules


def official_key_to_path(key: str) -> tuple[str, ...]:
  """``blocks.3.attn.qkv.weight`` -> ``('blocks_3', 'attn', 'qkv', 'kernel')``."""
  parts = key.split(".")
  modules = join_numeric_indices(parts[:-1], key)
  leaf = parts[-1]
  if not modules:  # top-level parameter, e.g. pos_embed
    return (leaf,)
  if leaf == "weight":
    leaf = "embedding" if modules[-1] == _EMBEDDING_PARENT else "kernel"
  return tuple(modules) + (leaf,)


def path_to_official_key(path: tuple[str, ...]) -> str:
  """``('blocks_3', 'attn', 'qkv', 'kernel')`` -> ``blocks.3.attn.qkv.weight``."""
  if len(path) == 1:
    return path[0]
  modules = []
  for name in path[:-1]:
    match = _INDEXED_MODULE.match(name)
    modules.append(f"{match.group(1)}.{match.group(2)}" if match else name)
  leaf = "weight" if path[-1] in ("kernel", "embedding") else path[-1]
  return ".".join(modules + [leaf])


def _to_flax_perm(path: tuple[str, ...], ndim: int) -> Optional[tuple[int, ...]]:
  if path[-1] != "kernel":
    return None
  if ndim not in _TO_FLAX_PERM:
    raise CheckpointMismatchError(
        f"{path_to_official_key(path)}: a weight of rank {ndim} is neither a linear (2) nor a "
        f"conv (4) weight")
  return _TO_FLAX_PERM[ndim]


def _permute_shape(shape, perm) -> tuple[int, ...]:
  return tuple(shape) if perm is None else tuple(shape[i] for i in perm)


# ------------------------------------------------------------------------------ arrays
def to_numpy(value, require_float: bool = False) -> np.ndarray:
  """numpy / jax array or torch tensor (any device, bf16 included) -> numpy, floating
  dtypes (ml_dtypes' bfloat16 too) as float32.  ``require_float``: a non-float tensor is a
  CheckpointMismatchError (checkpoints whose every tensor is a weight, e.g. the VAE)."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  array = np.asarray(value)
  if jnp.issubdtype(array.dtype, jnp.floating):
    return array.astype(np.float32, copy=False)
  if require_float:
    raise CheckpointMismatchError(f"expected a floating-point tensor, got dtype {array.dtype}")
  return array


def _strip_ddp_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """A DistributedDataParallel state dict has every key prefixed by ``module.``."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return state_dict


# ------------------------------------------------------------------------ conversions
def params_from_official(state_dict: Mapping[str, Any], model: Optional[dit_lib.DiT] = None,
                         check: bool = True) -> dict:
  """Official PyTorch state dict -> Flax params (nested dict of float32 jax arrays).

  Args:
    state_dict: ``{official key: numpy array or torch tensor}``.
    model: the DiT the params are for.  ``None`` checks against the architecture inferred
      from the state dict (:func:`infer_config`; head count is irrelevant to shapes).
    check: verify keys and shapes (default).  Raises :class:`CheckpointMismatchError` on
      the first missing, unexpected or mis-shaped key.
  """
  state_dict = _strip_ddp_prefix(state_dict)
  if check:
    if model is None:
      model = dit_lib.create_model(None, **infer_config(state_dict, num_heads=1))
    check_official_state_dict(state_dict, model)
  flat = {}
  for key, value in state_dict.items():
    path = official_key_to_path(key)
    array = to_numpy(value)
    perm = _to_flax_perm(path, array.ndim)
    if perm is not None:
      array = np.transpose(array, perm)
    flat[path] = jnp.asarray(np.ascontiguousarray(array))
  return traverse_util.unflatten_dict(flat)


def params_to_official(params) -> dict[str, np.ndarray]:
  """Flax params -> official state dict ``{key: float32 numpy array}`` (inverse of above).

  Only dense (unquantized) params can be exported.
  """
  flat = traverse_util.flatten_dict(unfreeze(params), is_leaf=lambda _, v: not isinstance(v, dict))
  state_dict = {}
  for path, value in flat.items():
    key = path_to_official_key(path)
    if is_quantized(value):
      raise TypeError(f"{'/'.join(path)} holds a quantized {type(value).__name__}; only dense "
                      "params convert to the official layout")
    array = to_numpy(value)
    if path[-1] == "kernel":
      if array.ndim not in _TO_OFFICIAL_PERM:
        raise ValueError(f"{'/'.join(path)}: kernel of rank {array.ndim} has no official layout")
      array = np.transpose(array, _TO_OFFICIAL_PERM[array.ndim])
    state_dict[key] = np.ascontiguousarray(array)
  return state_dict


# --------------------------------------------------------------------------- checking
def official_shapes(model: dit_lib.DiT) -> dict[str, tuple[int, ...]]:
  """``{official key: shape}`` of the state dict that ``model`` expects (no allocation)."""
  shapes = jax.eval_shape(lambda: dit_lib.init_params(model, jax.random.PRNGKey(0)))
  flat = traverse_util.flatten_dict(unfreeze(shapes))
  out = {}
  for path, leaf in flat.items():
    perm = _TO_OFFICIAL_PERM.get(len(leaf.shape)) if path[-1] == "kernel" else None
    out[path_to_official_key(path)] = _permute_shape(leaf.shape, perm)
  return out


def check_official_state_dict(state_dict: Mapping[str, Any], model: dit_lib.DiT) -> None:
  """Raise :class:`CheckpointMismatchError` naming the first key that does not fit ``model``."""
  state_dict = _strip_ddp_prefix(state_dict)
  expected = official_shapes(model)
  arch = _arch_text(model)
  for key in sorted(expected, key=_natural_key):
    if key not in state_dict:
      raise CheckpointMismatchError(
          f"checkpoint is missing key {key!r} (expected shape {expected[key]}) for {arch}")
  for key in sorted(state_dict, key=_natural_key):
    shape = tuple(np.shape(state_dict[key]))
    if key not in expected:
      raise CheckpointMismatchError(
          f"checkpoint has unexpected key {key!r} (shape {shape}) for {arch}")
    if shape != expected[key]:
      raise CheckpointMismatchError(
          f"checkpoint key {key!r} has shape {shape}, model expects {expected[key]} for {arch}")


def _arch_text(model: dit_lib.DiT) -> str:
  return (f"DiT(depth={model.depth}, hidden_size={model.hidden_size}, "
          f"patch_size={model.patch_size}, in_channels={model.in_channels}, "
          f"input_size={model.input_size}, num_classes={model.num_classes}, "
          f"learn_sigma={model.learn_sigma})")


def _natural_key(key: str):
  return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", key)]


# ------------------------------------------------------------------------ architecture
def infer_config(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                 class_dropout_prob: float = OFFICIAL_CLASS_DROPOUT_PROB) -> dict:
  """The DiT architecture of an official state dict, as ``create_model(None, **config)`` kwargs.

  Read from shapes: depth, hidden_size, patch_size, in_channels, input_size, mlp_ratio,
  num_classes (label-table rows minus the null class when ``class_dropout_prob > 0``),
  learn_sigma (output channels = 2 * in_channels).  ``num_heads`` is not in the shapes: it
  defaults to the official head count for the hidden size (S: 6, B: 12, L: 16, XL: 16).
  """
  state_dict = _strip_ddp_prefix(state_dict)

  def shape_of(key):
    if key not in state_dict:
      raise CheckpointMismatchError(f"not an official DiT state dict: key {key!r} is missing")
    return tuple(np.shape(state_dict[key]))

  pos_shape = shape_of("pos_embed")
  if len(pos_shape) != 3 or pos_shape[0] != 1:
    raise CheckpointMismatchError(f"pos_embed has shape {pos_shape}, expected (1, tokens, hidden)")
  _, num_tokens, hidden_size = pos_shape
  conv_shape = shape_of("x_embedder.proj.weight")
  if len(conv_shape) != 4 or conv_shape[2] != conv_shape[3] or conv_shape[0] != hidden_size:
    raise CheckpointMismatchError(
        f"x_embedder.proj.weight has shape {conv_shape}, expected ({hidden_size}, C, p, p)")
  _, in_channels, patch_size, _ = conv_shape
  grid = math.isqrt(num_tokens)
  if grid * grid != num_tokens:
    raise CheckpointMismatchError(f"pos_embed has {num_tokens} tokens, not a square grid")

  block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
  depth = len(block_ids)
  if block_ids != set(range(depth)):
    raise CheckpointMismatchError(f"block indices are not contiguous from 0: {sorted(block_ids)}")
  mlp_ratio = 4.0
  if depth:
    mlp_hidden = shape_of("blocks.0.mlp.fc1.weight")[0]
    mlp_ratio = mlp_hidden / hidden_size

  table_rows = shape_of("y_embedder.embedding_table.weight")[0]
  num_classes = table_rows - 1 if class_dropout_prob > 0 else table_rows

  out_features = shape_of("final_layer.linear.weight")[0]
  out_channels, remainder = divmod(out_features, patch_size**2)
  if remainder or out_channels not in (in_channels, 2 * in_channels):
    raise CheckpointMismatchError(
        f"final_layer.linear.weight has {out_features} outputs; expected patch_size**2 * "
        f"in_channels ({patch_size**2 * in_channels}) or twice that (learn_sigma)")

  if num_heads is None:
    if hidden_size not in OFFICIAL_NUM_HEADS:
      raise ValueError(f"hidden size {hidden_size} is not an official DiT width "
                       f"{sorted(OFFICIAL_NUM_HEADS)}: pass num_heads explicitly")
    num_heads = OFFICIAL_NUM_HEADS[hidden_size]
  if hidden_size % num_heads:
    raise ValueError(f"num_heads {num_heads} does not divide hidden size {hidden_size}")
  return dict(
      input_size=grid * patch_size,
      patch_size=patch_size,
      in_channels=in_channels,
      hidden_size=hidden_size,
      depth=depth,
      num_heads=num_heads,
      mlp_ratio=mlp_ratio,
      class_dropout_prob=class_dropout_prob,
      num_classes=num_classes,
      learn_sigma=out_channels == 2 * in_channels,
  )


def official_config_name(config: Mapping[str, Any]) -> Optional[str]:
  """``'DiT-XL/2'`` if (depth, hidden_size, patch_size, num_heads) match an official config."""
  for name, cfg in dit_lib.DIT_CONFIGS.items():
    if all(config.get(k) == v for k, v in cfg.items()):
      return name
  return None


# ------------------------------------------------------------------------------ loading
def load_official_checkpoint(path: str) -> dict[str, Any]:
  """Read an official ``.pt``: a plain state dict (released weights) or a training
  checkpoint ``{"model", "ema", "opt", "args"}`` (train.py), whose EMA weights are taken.

  Returns ``{key: torch.Tensor}`` (convert with :func:`params_from_official`).
  """
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading official .pt checkpoints needs PyTorch: "
                      "pip install 'dit_quant_jax[torch]' (torch==2.13.0)") from e
  if not os.path.exists(path):
    raise FileNotFoundError(f"official DiT checkpoint not found: {path}")
  # Tensors only; train.py also pickles its argparse.Namespace under "args".
  with torch.serialization.safe_globals([argparse.Namespace]):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{path}: expected a state dict or a training checkpoint dict, "
                     f"got {type(checkpoint).__name__}")
  if "ema" in checkpoint:
    checkpoint = checkpoint["ema"]
  elif "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
    checkpoint = checkpoint["model"]
  bad = [k for k, v in checkpoint.items() if not hasattr(v, "shape")]
  if bad:
    raise ValueError(f"{path}: entry {bad[0]!r} is not a tensor; not a DiT state dict")
  return dict(checkpoint)


def load_official_params(path: str, num_heads: Optional[int] = None, **overrides):
  """``.pt`` -> ``(model, params)``: infers the architecture, checks every key and shape.

  ``overrides`` are non-shape DiT options (e.g. ``cfg_channels``), applied to the model.
  """
  state_dict = load_official_checkpoint(path)
  config = infer_config(state_dict, num_heads=num_heads)
  config.update(overrides)
  model = dit_lib.create_model(None, **config)
  return model, params_from_official(state_dict, model)


def convert_official_checkpoint(pt_path: str, output_dir: str, num_heads: Optional[int] = None,
                                overwrite: bool = False) -> dict:
  """Official ``.pt`` -> orbax checkpoint (``utils.checkpoint``) that records the architecture.

  Returns the model config written (``DiT.config_dict()``).
  """
  model, params = load_official_params(pt_path, num_heads=num_heads)
  config = model.config_dict()
  metadata = {"source": os.path.basename(pt_path), "source_format": "facebookresearch/DiT .pt",
              "official_name": official_config_name(config)}
  checkpoint.save_checkpoint(output_dir, params, config, metadata, overwrite=overwrite)
  return config
