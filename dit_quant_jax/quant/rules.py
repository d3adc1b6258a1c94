"""Which layers get quantized: one rule, patterns on parameter paths (as in qwix).

A linear layer is addressed by its module path in the params pytree, joined with '/', e.g.
``blocks_3/attn/qkv``; its kernel lives at ``<path>/kernel``.  A rule is a list of regular
expressions matched (``re.fullmatch``) against those paths; configs hold the patterns.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from flax import traverse_util

# Every linear layer inside the DiT blocks: qkv, attention proj, fc1, fc2, adaLN modulation
# (5 per block, 140 in DiT-XL/2).  Embedders and the final layer stay in full precision.
DIT_BLOCK_LINEARS = (
    r"blocks_\d+/attn/qkv",
    r"blocks_\d+/attn/proj",
    r"blocks_\d+/mlp/fc1",
    r"blocks_\d+/mlp/fc2",
    r"blocks_\d+/adaLN_modulation_1",
)


def linear_paths(params) -> list[str]:
  """Paths of every module that owns a ``kernel`` param of rank 2 (or a quantized kernel)."""
  flat = traverse_util.flatten_dict(_unfreeze(params), sep="/", is_leaf=_is_leaf)
  paths = []
  for key, value in flat.items():
    if key.endswith("/kernel") and (getattr(value, "ndim", 2) == 2):
      paths.append(key[: -len("/kernel")])
  return sorted(paths, key=_natural_key)


def select_layers(params, patterns: Sequence[str] | str = DIT_BLOCK_LINEARS) -> list[str]:
  """Linear-layer paths matching any pattern, in natural order.  Errors if none matches."""
  if isinstance(patterns, str):
    patterns = [patterns]
  compiled = [re.compile(p) for p in patterns]
  selected = [p for p in linear_paths(params) if any(c.fullmatch(p) for c in compiled)]
  if not selected:
    raise ValueError(f"no linear layer matches the patterns {list(patterns)}; "
                     f"layers are e.g. {linear_paths(params)[:6]}")
  return selected


def get_path(tree, path: str):
  node = tree
  for part in path.split("/"):
    node = node[part]
  return node


def set_path(tree, path: str, value):
  """A copy of the nested-dict tree with ``path`` replaced (containers copied along the path)."""
  parts = path.split("/")
  root = dict(tree)
  node = root
  for part in parts[:-1]:
    node[part] = dict(node[part])
    node = node[part]
  node[parts[-1]] = value
  return root


def _is_leaf(path, value) -> bool:
  return not isinstance(value, dict)


def _unfreeze(params):
  try:
    from flax.core import unfreeze
    return unfreeze(params)
  except Exception:  # pragma: no cover - plain dicts
    return params


def _natural_key(path: str) -> Iterable:
  return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path)]
