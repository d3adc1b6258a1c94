"""Which config made an output: a stamp (hash + readable config) stored with it, and the check
that an output or resumable state on disk is reused only by the config that made it.

  stamp = make_stamp(config)                      # {"config_hash": ..., "config": {...}}
  check_stamp("quantized model runs/q/w2", stored, config, override="--reuse=False")
  guard_state_dir("runs/x/calib_state", config, override="--reuse=False")

A mismatch raises :class:`StaleOutputError` naming every differing field (dotted path,
stored value, asked value) and the flag that overrides the check.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Optional

from dit_quant_jax.errors import StaleOutputError
from dit_quant_jax.utils import atomic
from dit_quant_jax.utils import distributed

STAMP_SUFFIX = ".config.json"  # <state_dir>.config.json records the config of <state_dir>
MAX_LISTED_DIFFERENCES = 8


def plain(config: Any) -> Any:
  """ConfigDict / mapping / sequence -> JSON-friendly plain Python (tuples become lists)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=repr))


def config_hash(config: Any) -> str:
  """sha256 (first 16 hex digits) of the canonical JSON of ``config``."""
  text = json.dumps(plain(config), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_stamp(config: Any) -> dict:
  return {"config_hash": config_hash(config), "config": plain(config)}


def flatten(tree: Any, prefix: str = "") -> dict:
  """Nested dicts -> {"a.b.c": leaf}; lists stay leaves."""
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def differences(stored: Any, asked: Any, ignore: Iterable[str] = ()) -> list[str]:
  """``field: stored X, asked Y`` for every dotted field that differs (``ignore``d fields skipped)."""
  stored_flat, asked_flat = flatten(plain(stored)), flatten(plain(asked))
  ignore = set(ignore)
  out = []
  for key in sorted(set(stored_flat) | set(asked_flat)):
    if key in ignore:
      continue
    if key not in stored_flat:
      out.append(f"{key}: absent on disk, asked {asked_flat[key]!r}")
    elif key not in asked_flat:
      out.append(f"{key}: on disk {stored_flat[key]!r}, absent from the asked config")
    elif stored_flat[key] != asked_flat[key]:
      out.append(f"{key}: on disk {stored_flat[key]!r}, asked {asked_flat[key]!r}")
  return out


def _summary(diffs: list[str]) -> str:
  shown = "; ".join(diffs[:MAX_LISTED_DIFFERENCES])
  if len(diffs) > MAX_LISTED_DIFFERENCES:
    shown += f"; and {len(diffs) - MAX_LISTED_DIFFERENCES} more"
  return shown


def check_stamp(what: str, stored: Optional[Mapping], config: Any, override: str,
                ignore: Iterable[str] = ()) -> None:
  """Raise StaleOutputError unless ``stored`` (a stamp) was made by ``config``.

  what: the output, for the message (e.g. "quantized model in runs/q/w2"); override: the flag
  that discards the output (e.g. "--config.reuse=False").
  """
  if stored is None or "config" not in stored:
    raise StaleOutputError(f"{what} records no config, so it cannot be trusted for this one; "
                           f"delete it or pass {override}")
  ignore = tuple(ignore)
  if not ignore and stored.get("config_hash") == config_hash(config):
    return
  diffs = differences(stored["config"], config, ignore)
  if diffs:
    raise StaleOutputError(f"{what} was made by another config: {_summary(diffs)}. "
                           f"Pass {override} to discard it, or choose another output directory")


def stamp_path(state_dir: str) -> str:
  return os.path.abspath(state_dir).rstrip(os.sep) + STAMP_SUFFIX


def read_stamp(path: str) -> Optional[dict]:
  """The stamp at ``path``; None if absent; StaleOutputError if cut off or not a stamp."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StaleOutputError(f"{path} is cut off or damaged ({e.msg if hasattr(e, 'msg') else e}); "
                           "delete it and the state beside it") from None
  if not isinstance(stored, dict) or "config" not in stored:
    raise StaleOutputError(f"{path} is not a config stamp; delete it and the state beside it")
  return stored


def guard_state_dir(state_dir: str, config: Any, override: str, ignore: Iterable[str] = (),
                    discard_stale: bool = False) -> None:
  """Before resuming from (or starting) resumable state in ``state_dir``.

  No state yet: record ``config`` in ``<state_dir>.config.json``.  State from the same config
  (up to ``ignore``d fields): resumed.  State from another config, or with no stamp:
  StaleOutputError naming the difference and ``override``, or with ``discard_stale`` (what
  ``override`` sets) the state is removed and the job starts over.
  """
  import shutil
  path = stamp_path(state_dir)
  if os.path.isdir(state_dir) and os.listdir(state_dir):
    try:
      check_stamp(f"resumable state in {os.path.abspath(state_dir)}", read_stamp(path), config,
                  override, ignore)
    except StaleOutputError:
      if not discard_stale:
        raise
      if distributed.is_primary():  # one process deletes; the barrier below orders the others
        shutil.rmtree(state_dir)
  atomic.write_json(path, make_stamp(config))
  distributed.sync("resumable state guarded")  # no process resumes before process 0 decided
