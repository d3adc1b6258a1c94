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

Integrity: the record holds a sha256 digest of every params array (its dtype, shape and
bytes), checked on restore, and ``files.json`` (written after the checkpoint is complete)
lists every file with its size.  A flipped byte, a deleted file or a cut-off file gives one
:class:`CheckpointDamagedError` line naming the checkpoint, the array and "missing" or
"damaged".  The record's model config is checked against the params' shapes by the loader
(``pipeline.load_dit``).

``save_state`` / ``latest_step`` / ``restore_state`` keep numbered snapshots of any pytree
(training or calibration state) with an orbax ``CheckpointManager``: each save is written to
a temporary directory and renamed when complete, so a job killed mid-save leaves the last
finished step intact and resumable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import importlib
import json
import logging
import os
import re
import sys
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dit_quant_jax.errors import CheckpointDamagedError
from dit_quant_jax.quant import qtensor
from dit_quant_jax.utils import atomic
from dit_quant_jax.utils import distributed

FORMAT_VERSION = 1
_PARAMS_ITEM = "params"
_RECORD_ITEM = "record"
_TUPLE_TAG = "__tuple__"
_DTYPE_TAG = "__dtype__"
_FILES_MANIFEST = "files.json"  # {relative path: size in bytes}, written once the save completed


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


# ---------------------------------------------------------------------------- integrity
def array_digest(array) -> str:
  """sha256 of an array's dtype, shape and C-order bytes (hex)."""
  array = np.ascontiguousarray(np.asarray(array))
  h = hashlib.sha256(f"{array.dtype.name}{array.shape}".encode())
  h.update(array.tobytes())
  return h.hexdigest()


def _flat_arrays(plain_params) -> dict:
  """Nested dicts of arrays -> {"a/b/c": array}."""
  out = {}

  def walk(tree, path):
    if isinstance(tree, Mapping):
      for key, value in tree.items():
        walk(value, path + (key,))
    else:
      out["/".join(path)] = tree
  walk(plain_params, ())
  return out


def params_digests(plain_params) -> dict:
  return {where: array_digest(a) for where, a in _flat_arrays(plain_params).items()}


def _list_files(path: str) -> dict:
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if rel != _FILES_MANIFEST:
        files[rel] = os.path.getsize(full)
  return files


def _write_files_manifest(path: str) -> None:
  atomic.write_json(os.path.join(path, _FILES_MANIFEST), _list_files(path), sort_keys=True)


def file_problems(path: str) -> list[str]:
  """Files of checkpoint ``path`` that are missing or changed in size against files.json
  ([] when it has no manifest, i.e. was saved before manifests existed)."""
  manifest_path = os.path.join(path, _FILES_MANIFEST)
  if not os.path.isfile(manifest_path):
    return []
  try:
    with open(manifest_path) as f:
      expected = json.load(f)
  except json.JSONDecodeError:
    return [f"{_FILES_MANIFEST} damaged"]
  problems = []
  for rel, size in sorted(expected.items()):
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
      problems.append(f"file {rel} missing")
    elif os.path.getsize(full) != size:
      problems.append(f"file {rel} damaged ({os.path.getsize(full)} bytes, saved {size})")
  return problems


_ARRAY_IN_ERROR = re.compile(r'Error (?:reading|opening) "([^"/]+)')


_ORBAX_READ_COROUTINE = "_read_array_index_and_device_put"  # orbax's per-array read task


def _drop_orbax_read_noise(unraisable) -> None:
  """sys.unraisablehook filter: after one array's read failed, orbax drops the other pending
  read coroutines, and each prints "Exception ignored in <coroutine ...>" (or "Event loop is
  closed") when garbage-collected, possibly at exit.  The first error is reported as one
  line instead; everything else goes to the previous hook."""
  text = repr(getattr(unraisable, "object", ""))
  if _ORBAX_READ_COROUTINE in text or "Event loop is closed" in str(unraisable.exc_value):
    return
  _PREVIOUS_UNRAISABLE_HOOK(unraisable)


_PREVIOUS_UNRAISABLE_HOOK = sys.unraisablehook


@contextlib.contextmanager
def _quiet_failed_reads():
  """Run an orbax restore; if it raises, silence the noise of its dropped reads from then on."""
  global _PREVIOUS_UNRAISABLE_HOOK
  asyncio_logger = logging.getLogger("asyncio")
  try:
    yield
  except BaseException:
    if sys.unraisablehook is not _drop_orbax_read_noise:
      _PREVIOUS_UNRAISABLE_HOOK = sys.unraisablehook
      sys.unraisablehook = _drop_orbax_read_noise
    asyncio_logger.setLevel(logging.CRITICAL)  # "Task exception was never retrieved"
    raise
  finally:
    gc.collect()


def _error_chain_text(error: BaseException) -> str:
  parts, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    parts.append(str(error))
    error = error.__cause__ or error.__context__
  return "\n".join(parts)


def _damaged(path: str, item: str, error: BaseException) -> CheckpointDamagedError:
  """One line for a restore that failed inside orbax/tensorstore."""
  text = _error_chain_text(error)
  match = _ARRAY_IN_ERROR.search(text)
  array = match.group(1).split("/")[0].replace(".", "/") if match else None
  problems = file_problems(path)
  kind = "missing" if any(p.endswith("missing") for p in problems) else "damaged"
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  where = f"array {array}" if array else f"item '{item}'"
  detail = "; ".join(problems[:3]) if problems else first[:300]
  return CheckpointDamagedError(f"checkpoint {path}: {where} {kind} ({detail}); restore it from "
                                "a copy or re-create it")


def _check_digests(path: str, plain_params, expected: Optional[Mapping[str, str]]) -> None:
  if expected is None:
    return  # saved before digests existed
  actual = _flat_arrays(plain_params)
  for where in sorted(expected):
    if where not in actual:
      raise CheckpointDamagedError(f"checkpoint {path}: array {where} missing from the params")
    if array_digest(actual[where]) != expected[where]:
      raise CheckpointDamagedError(f"checkpoint {path}: array {where} damaged (its content digest "
                                   "differs from the one recorded at save); restore it from a copy "
                                   "or re-create it")
  extra = sorted(set(actual) - set(expected))
  if extra:
    raise CheckpointDamagedError(f"checkpoint {path}: array {extra[0]} is not in the record "
                                 f"({len(extra)} unrecorded arrays)")


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
  if distributed.topology().process_count > 1:
    # Host copies on every process (sharded arrays gathered): orbax writes numpy leaves once.
    plain_params = distributed.to_host(plain_params)
  record = {
      "format_version": FORMAT_VERSION,
      "model_config": _encode(dict(model_config), "model_config"),
      "metadata": _encode(dict(metadata or {}), "metadata"),
      "quantized_nodes": nodes,
      "digests": params_digests(plain_params),
  }
  _composite_checkpointer().save(
      path,
      args=ocp.args.Composite(**{_PARAMS_ITEM: ocp.args.StandardSave(plain_params),
                                 _RECORD_ITEM: ocp.args.JsonSave(record)}),
      force=overwrite)
  _write_files_manifest(path)
  return path


def read_checkpoint_record(path: str) -> dict:
  """The JSON record of a checkpoint (model_config, metadata, ...) without loading params."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if not os.path.isdir(os.path.join(path, _RECORD_ITEM)):
    raise FileNotFoundError(f"{path} is not a dit_quant_jax checkpoint (no '{_RECORD_ITEM}' item)")
  try:
    restored = _composite_checkpointer().restore(
        path, args=ocp.args.Composite(**{_RECORD_ITEM: ocp.args.JsonRestore()}))
  except Exception as e:  # orbax/tensorstore: many exception types
    raise _damaged(path, _RECORD_ITEM, e) from None
  record = restored[_RECORD_ITEM]
  if not isinstance(record, Mapping):
    raise CheckpointDamagedError(f"checkpoint {path}: item '{_RECORD_ITEM}' damaged (not a JSON object)")
  if record.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: checkpoint format version {record.get('format_version')}, "
                     f"this code reads version {FORMAT_VERSION}")
  return record


def record_model_config(record: Mapping[str, Any]) -> dict:
  """The decoded model config of a record from :func:`read_checkpoint_record`."""
  return _decode(record["model_config"])


def content_fingerprint(path: str) -> Optional[str]:
  """A short hash of a checkpoint's recorded array digests (its content identity, without
  reading the params); None for checkpoints saved before digests existed."""
  digests = read_checkpoint_record(path).get("digests")
  if not digests:
    return None
  return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


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
  try:
    with _quiet_failed_reads():
      restored = _composite_checkpointer().restore(
          path, args=ocp.args.Composite(**{_PARAMS_ITEM: ocp.args.StandardRestore()}))
  except Exception as e:  # orbax/tensorstore: many exception types
    raise _damaged(path, _PARAMS_ITEM, e) from None
  _check_digests(path, restored[_PARAMS_ITEM], record.get("digests"))
  problems = file_problems(path)
  if problems:  # the arrays read back intact, but the files differ from those saved
    raise CheckpointDamagedError(f"checkpoint {path}: {'; '.join(problems[:3])}")
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
