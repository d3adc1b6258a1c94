"""Errors a user can act on: each message names the problem and the fix in one line.

The experiment scripts catch :class:`UserError` (see ``pipeline.run_main``) and print its
message as one line instead of a traceback.  Each subclass also derives from the builtin
exception a caller would expect (ValueError, FileNotFoundError, ...).
"""


class UserError(Exception):
  """Base class: bad input, damaged files or stale outputs, reported as one line."""


class ConfigError(UserError, ValueError):
  """A config field or flag has a value the job cannot run with (raised before any work)."""


class DataError(UserError, ValueError):
  """A dataset file is damaged or inconsistent (truncated, labels out of range, counts differ)."""


class CheckpointDamagedError(UserError, ValueError):
  """A checkpoint's files are missing or its contents do not match their recorded digests."""


class StaleOutputError(UserError, RuntimeError):
  """An output or resumable state on disk was made by another config than the one asked for."""


class TrainingDivergedError(UserError, FloatingPointError):
  """Training produced a non-finite loss or parameters; no checkpoint was written."""
