"""Atomic file writes: every output is written under a temporary name, then renamed.

A reader (or a run resumed after a kill) therefore sees either the previous complete file or
the new complete file, never a half-written one.  ``os.replace`` is atomic on POSIX when the
temporary file lies in the same directory as the target, which is where it is created here.

  with atomic.open_for_write("results/results.md") as f: f.write(text)
  atomic.write_json(path, payload)           # strict JSON (NaN/Inf refused unless allow_nan)
  atomic.save_image(path, pil_image)         # PNG
  atomic.savez(path, arr_0=..., arr_1=...)   # numpy .npz
  atomic.savefig(path, matplotlib_figure)

In a multi-process run only process 0 writes (``utils/distributed.is_primary``): on the
others every function here is a no-op that returns ``path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Callable, Iterator

from dit_quant_jax.utils import distributed

TEMP_SUFFIX = ".partial"  # temporary names end with this (cleaned up on failure)


def _ensure_parent(path: str) -> str:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  return parent


def _temporary_name(path: str) -> str:
  """A fresh empty file next to ``path``: ``.<stem>.<random>.partial<ext>``."""
  parent = _ensure_parent(path)
  stem, ext = os.path.splitext(os.path.basename(path))
  handle, temporary = tempfile.mkstemp(prefix=f".{stem}.", suffix=TEMP_SUFFIX + ext, dir=parent)
  os.close(handle)
  return temporary


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[str]:
  """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``,
  on any exception remove it (``path`` is left as it was)."""
  temporary = _temporary_name(path)
  try:
    yield temporary
    with open(temporary, "rb") as f:
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def write_with(path: str, writer: Callable[[str], Any]) -> str:
  """Call ``writer(temporary_path)`` then rename the temporary file to ``path``.

  The temporary file sits next to ``path`` (same file system) and keeps ``path``'s extension
  before the suffix, so extension-sniffing writers (PIL, numpy) see the right format.  On any
  exception the temporary file is removed and ``path`` is left as it was.  Returns ``path``.
  """
  if not distributed.is_primary():
    return path
  with _replacing(path) as temporary:
    writer(temporary)
  return path


@contextlib.contextmanager
def open_for_write(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
  """``with open_for_write(path) as f:`` writes ``path`` atomically (text or ``mode='wb'``)."""
  if "w" not in mode:
    raise ValueError(f"open_for_write needs a write mode, got {mode!r}")
  encoding = None if "b" in mode else encoding
  if not distributed.is_primary():
    with open(os.devnull, mode, encoding=encoding) as f:
      yield f
    return
  with _replacing(path) as temporary:
    with open(temporary, mode, encoding=encoding) as f:
      yield f


def write_text(path: str, text: str) -> str:
  with open_for_write(path) as f:
    f.write(text)
  return path


def write_json(path: str, payload: Any, *, indent: int = 1, allow_nan: bool = True,
               sort_keys: bool = False) -> str:
  """``payload`` (already JSON-friendly) as JSON, atomically."""
  text = json.dumps(payload, indent=indent, allow_nan=allow_nan, sort_keys=sort_keys) + "\n"
  return write_text(path, text)


def save_image(path: str, image, format: str = "PNG") -> str:
  """A PIL image, atomically."""
  return write_with(path, lambda temporary: image.save(temporary, format=format))


def savez(path: str, **arrays) -> str:
  """``np.savez(path, **arrays)``, atomically (``path`` should end with .npz)."""
  import numpy as np
  return write_with(path, lambda temporary: np.savez(temporary, **arrays))


def savefig(path: str, figure, **kwargs) -> str:
  """A matplotlib figure, atomically (format from ``path``'s extension)."""
  fmt = os.path.splitext(path)[1].lstrip(".") or "png"
  return write_with(path, lambda temporary: figure.savefig(temporary, format=fmt, **kwargs))
