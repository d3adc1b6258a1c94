"""Load ml_collections configs from ``path/to/file.py:arg`` specs with dotted overrides.

The same spelling as ``config_flags.DEFINE_config_file`` on the command line, for code that
runs several configs in one process (reproduce.py, the sweep launcher).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping, Optional

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(spec: str, overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """``"configs/vq4dit.py:w2"`` (relative to the cwd or the repo root) -> ConfigDict.

  overrides: {"calibration.steps": 100, ...} applied with dotted paths; an unknown path is
  an error naming it.
  """
  path, _, arg = spec.partition(":")
  candidates = [path, os.path.join(REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise FileNotFoundError(f"config file {path!r} not found (looked in {candidates})")
  module_spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(found))[0], found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for dotted, value in (overrides or {}).items():
    set_dotted(config, dotted, value)
  return config


def set_dotted(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  node = config
  parts = dotted.split(".")
  for part in parts[:-1]:
    if part not in node:
      raise KeyError(f"config has no field {dotted!r} (missing {part!r})")
    node = node[part]
  if parts[-1] not in node:
    raise KeyError(f"config has no field {dotted!r}")
  with node.ignore_type():
    node[parts[-1]] = value
