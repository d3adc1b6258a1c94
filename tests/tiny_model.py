"""A tiny Fashion-MNIST-shaped DiT with non-zero random weights, saved as a checkpoint.

Shared by the pipeline tests (and run in subprocesses for the multi-device checks).
adaLN-Zero initialisation makes a fresh DiT output zeros; every weight is re-drawn so that
samples depend on noise, labels and every layer.
"""

import functools

import jax
import jax.numpy as jnp

from dit_quant_jax.models import dit
from dit_quant_jax.utils import checkpoint as ckpt_lib

TINY_MODEL = dict(input_size=32, in_channels=1, patch_size=8, hidden_size=32, depth=2,
                  num_heads=2, num_classes=10, cfg_channels=None)


def tiny_model_and_params(seed: int = 0):
  model = dit.create_model(None, **TINY_MODEL)
  return model, _redrawn_params(model, seed)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _redrawn_params(model, seed: int):
  """One compile for the whole tree (drawn leaf by leaf outside jit, every leaf shape and
  the scaling compiled apart: seconds per process)."""
  params = dit.init_params(model, jax.random.PRNGKey(seed))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  new = []
  for (path, leaf), key in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    if "pos_embed" in name:
      new.append(leaf)
    else:
      scale = 0.3 / max(1.0, float(leaf.shape[0]) ** 0.5) if leaf.ndim >= 2 else 0.05
      new.append(scale * jax.random.normal(key, leaf.shape, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, new)


def save_tiny_checkpoint(path: str, seed: int = 0) -> str:
  model, params = tiny_model_and_params(seed)
  ckpt_lib.save_checkpoint(path, params, model.config_dict(), {"note": "tiny test model"})
  return path
