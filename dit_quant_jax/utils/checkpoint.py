"""Orbax checkpoints that name their architecture, and resumable state for long jobs.

``save_checkpoint`` writes one directory with two orbax items:

  params   the params pytree as plain nested dicts of arrays (orbax StandardSave)
  record   JSON: the model config (``DiT.config_dict()``), free metadata (e.g. quantization
           settings) and, for every quantized node in the params, its class name, module and
           static fields, so that ``restore_checkpoint`` rebuilds the same pytree.

Quantized nodes are instances of the types registered with
``dit_quant_jax.quant.qtensor.register_quantized_type``: ``flax.struct.dataclass``-es whose
array fields are pytree nodes and whose static fields are JSON-friendly.  Static tuples
(e.g. ``shape``) come back as tuples.

``save_state`` / ``latest_step`` / ``restore_state`` keep numbered snapshots of any pytree
(training or calibration state) with an orbax ``CheckpointManager``: each save is written to
a temporary directory and renamed when complete, so a job killed mid-save leaves the last
finished step intact and resumable.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dit_quant_jax.quant import qtensor

FORMAT_VERSION = 1
_PARAMS_ITEM = "params"
_RECORD_ITEM = "record"
_TUPLE_TAG = "__tuple__"
_DTYPE_TAG = "__dtype__"


class ConfigMismatchError(ValueError):
  """A checkpoint was saved for another architecture than the one expected."""


# ------------------------------------------------------------------------- JSON coding
def _encode(value, where: str):
  """JSON-friendly value with tuples and dtypes tagged (lists stay lists)."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, tuple):
    return {_TUPLE_TAG: [_encode(v, where) for v in value]}
  if isinstance(value, list):
    return [_encode(v, where) for v in value]
  if isinstance(value, Mapping):
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
      raise TypeError(f"{where}: dict keys must be strings to be saved, got {bad[0]!r}")
    return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, np.dtype) or (isinstance(value, type) and (
      issubclass(value, np.generic) or hasattr(value, "dtype"))):  # np.float32, jnp.bfloat16
    return {_DTYPE_TAG: jnp.dtype(value).name}
  raise TypeError(f"{where}: {type(value).__name__} value {value!r} cannot be saved as JSON "
                  "(use ints, floats, strings, bools, None, dtypes, lists/tuples/dicts of those)")


def _decode(value):
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if isinstance(value, dict):
    if set(value) == {_TUPLE_TAG}:
      return tuple(_decode(v) for v in value[_TUPLE_TAG])
    if set(value) == {_DTYPE_TAG}:
      return jnp.dtype(value[_DTYPE_TAG])
    return {k: _decode(v) for k, v in value.items()}
  return value


# -------------------------------------------------------------------- quantized nodes
def _registered_type(node) -> bool:
  cls = type(node)
  return qtensor.QUANTIZED_TYPES.get(cls.__name__) is cls


def _split_quantized(tree, path: tuple, nodes: dict):
  """Params pytree -> nested dicts of arrays; each quantized node's type recorded in ``nodes``."""
  where = "/".join(path) or "<root>"
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      if not isinstance(key, str):
        raise TypeError(f"{where}: params keys must be strings, got {key!r}")
      out[key] = _split_quantized(value, path + (key,), nodes)
    return out
  if _registered_type(tree):
    if not dataclasses.is_dataclass(tree):
      raise TypeError(f"{where}: registered quantized type {type(tree).__name__} must be a "
                      "flax.struct.dataclass")
    arrays, static, none_fields = {}, {}, []
    for field in dataclasses.fields(tree):
      value = getattr(tree, field.name)
      if not field.metadata.get("pytree_node", True):
        static[field.name] = _encode(value, f"{where}.{field.name}")
      elif value is None:
        none_fields.append(field.name)
      else:
        arrays[field.name] = _split_quantized(value, path + (field.name,), nodes)
    nodes[where] = {"type": type(tree).__name__, "module": type(tree).__module__,
                    "static": static, "none_fields": none_fields}
    return arrays
  if qtensor.is_quantized(tree) or dataclasses.is_dataclass(tree):
    raise TypeError(f"{where}: {type(tree).__name__} is not registered with "
                    "dit_quant_jax.quant.qtensor.register_quantized_type; it cannot be saved")
  return tree


def _quantized_class(name: str, module: str, where: str):
  if name not in qtensor.QUANTIZED_TYPES:
    try:  # the defining module registers the type on import
      importlib.import_module(module)
    except ImportError as e:
      raise TypeError(f"{where}: quantized type {name} (module {module}) cannot be imported: {e}")
  if name not in qtensor.QUANTIZED_TYPES:
    raise TypeError(f"{where}: quantized type {name} is not registered "
                    f"(known: {sorted(qtensor.QUANTIZED_TYPES)})")
  return qtensor.QUANTIZED_TYPES[name]


def _join_quantized(tree, path: tuple, nodes: Mapping[str, dict]):
  """Inverse of :func:`_split_quantized` on the restored nested dicts."""
  where = "/".join(path) or "<root>"
  if isinstance(tree, Mapping):
    tree = {k: _join_quantized(v, path + (k,), nodes) for k, v in tree.items()}
  if where not in nodes:
    return tree
  spec = nodes[where]
  cls = _quantized_class(spec["type"], spec["module"], where)
  fields = dict(tree)
  fields.update({name: None for name in spec["none_fields"]})
  fields.update({k: _decode(v) for k, v in spec["static"].items()})
  try:
    return cls(**fields)
  except TypeError as e:
    raise TypeError(f"{where}: cannot rebuild {spec['type']} from fields {sorted(fields)}: {e}")


# ------------------------------------------------------------------------- checkpoints
def _composite_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(path: str, params, model_config: Mapping[str, Any],
                    metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> str:
  """Write ``params`` with their model config and metadata to the directory ``path``.

  Args:
    path: checkpoint directory (must not exist unless ``overwrite``).
    params: params pytree (nested dicts; may hold registered quantized nodes).
    model_config: the architecture, e.g. ``model.config_dict()``.
    metadata: anything else JSON-friendly (quantization settings, provenance, ...).
  Returns the absolute path written.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"checkpoint directory already exists: {path} (pass overwrite=True)")
  nodes: dict = {}
  plain_params = _split_quantized(params, (), nodes)
  record = {
      "format_version": FORMAT_VERSION,
      "model_config": _encode(dict(model_config), "model_config"),
      "metadata": _encode(dict(metadata or {}), "metadata"),
      "quantized_nodes": nodes,
  }
  _composite_checkpointer().save(
      path,
      args=ocp.args.Composite(**{_PARAMS_ITEM: ocp.args.StandardSave(plain_params),
                                 _RECORD_ITEM: ocp.args.JsonSave(record)}),
      force=overwrite)
  return path


def read_checkpoint_record(path: str) -> dict:
  """The JSON record of a checkpoint (model_config, metadata, ...) without loading params."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if not os.path.isdir(os.path.join(path, _RECORD_ITEM)):
    raise FileNotFoundError(f"{path} is not a dit_quant_jax checkpoint (no '{_RECORD_ITEM}' item)")
  restored = _composite_checkpointer().restore(
      path, args=ocp.args.Composite(**{_RECORD_ITEM: ocp.args.JsonRestore()}))
  record = restored[_RECORD_ITEM]
  if record.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: checkpoint format version {record.get('format_version')}, "
                     f"this code reads version {FORMAT_VERSION}")
  return record


def config_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
  """``field: checkpoint X, expected Y`` for every field of ``expected`` that differs."""
  out = []
  for key in sorted(expected):
    if key not in saved:
      out.append(f"{key}: absent from checkpoint, expected {expected[key]!r}")
    elif saved[key] != expected[key]:
      out.append(f"{key}: checkpoint {saved[key]!r}, expected {expected[key]!r}")
  return out


def restore_checkpoint(path: str, expected_config: Optional[Mapping[str, Any]] = None):
  """Read a checkpoint written by :func:`save_checkpoint`.

  Returns ``(params, model_config, metadata)``.  With ``expected_config`` (e.g. the
  ``config_dict()`` of the model about to use the params), every field it lists must match
  the saved config, else :class:`ConfigMismatchError` names the differing fields (raised
  before the params are read).
  """
  path = os.path.abspath(path)
  record = read_checkpoint_record(path)
  model_config = _decode(record["model_config"])
  if expected_config is not None:
    expected = _decode(_encode(dict(expected_config), "expected_config"))
    differences = config_differences(model_config, expected)
    if differences:
      raise ConfigMismatchError(f"checkpoint {path} was saved for another architecture: "
                                + "; ".join(differences))
  restored = _composite_checkpointer().restore(
      path, args=ocp.args.Composite(**{_PARAMS_ITEM: ocp.args.StandardRestore()}))
  params = _join_quantized(restored[_PARAMS_ITEM], (), record["quantized_nodes"])
  return params, model_config, _decode(record["metadata"])


# ------------------------------------------------------------------- resumable state
def _manager(directory: str, keep: Optional[int] = None, create: bool = False):
  # cleanup_tmp_directories: remove what a job killed mid-save left behind (when saving).
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         cleanup_tmp_directories=create)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_state(directory: str, step: int, state_pytree, keep: int = 2) -> bool:
  """Snapshot ``state_pytree`` as ``directory/<step>``, keeping the ``keep`` latest steps.

  Atomic: orbax writes to a temporary directory and renames it when complete.  Returns
  False (and writes nothing) if ``step`` is already saved.
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  manager = _manager(directory, keep=keep, create=True)
  try:
    if step in manager.all_steps():
      logging.info("save_state: step %d already saved in %s", step, directory)
      return False
    manager.save(step, args=ocp.args.StandardSave(state_pytree))
    manager.wait_until_finished()
    return True
  finally:
    manager.close()


def latest_step(directory: str) -> Optional[int]:
  """The last completely saved step in ``directory`` (None if there is none)."""
  if not os.path.isdir(directory):
    return None
  manager = _manager(directory)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_state(directory: str, target_pytree=None, step: Optional[int] = None):
  """The state saved at ``step`` (default: the latest) in ``directory``.

  ``target_pytree`` (concrete arrays or ``jax.ShapeDtypeStruct``s) gives the structure,
  dtypes and shardings to restore into; None returns the saved structure as nested dicts.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no saved state directory at {os.path.abspath(directory)}")
  manager = _manager(directory)
  try:
    steps = manager.all_steps()
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no completed step saved in {os.path.abspath(directory)}")
    elif step not in steps:
      raise FileNotFoundError(f"step {step} is not saved in {os.path.abspath(directory)}; "
                              f"saved steps: {sorted(steps)}")
    return manager.restore(step, args=ocp.args.StandardRestore(target_pytree))
  finally:
    manager.close()
