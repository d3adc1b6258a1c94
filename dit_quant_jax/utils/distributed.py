"""Multi-process (multi-host) JAX: the one place that starts the distributed runtime, and the
helpers every batched job uses to build global arrays, gather results and write once.

Configuration (flags override the environment):

  --coordinator_address / JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator
  --num_processes       / JAX_NUM_PROCESSES         how many processes take part
  --process_id          / JAX_PROCESS_ID            this process, 0 .. num_processes - 1
  --distributed_auto    / DIT_QUANT_DISTRIBUTED=1   let jax detect the cluster (SLURM, Open MPI,
                                                    Kubernetes, TPU pods): no other value needed

Nothing set: a single process (every helper below then reduces to plain numpy/device_put).
The three explicit values go together; a partial or malformed set is refused with the missing
or wrong name before anything starts.  jax 0.10.2 reads neither JAX_NUM_PROCESSES nor
JAX_PROCESS_ID itself, hence this module.  CPU processes exchange collectives over gloo
(``jax_cpu_collectives_implementation``), so the same code is tested with local processes.

Data layout: every job builds its batch on the global 1-D mesh named ``data``
(:func:`data_mesh`) from a *global* description of the batch (a host array every process can
compute cheaply and identically, e.g. noise from a seed, or a function returning given rows);
:func:`global_batch` asks each process only for the rows its own devices hold, so results are
identical to one process for the same seed.  :func:`to_host` gathers a sharded result to every
process, :func:`is_primary` guards every write (results, grids, reports, npz shards).  Orbax
checkpoints are written by all processes together (``utils/checkpoint.py``): call them from
every process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_quant_jax.errors import ConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_AUTO = "DIT_QUANT_DISTRIBUTED"
DATA_AXIS = "data"
# Seconds process 0 waits for the others to connect (jax's default is 300).
DEFAULT_INIT_TIMEOUT_S = 300

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, f"Multi-process: host:port of process 0 (env {ENV_COORDINATOR}).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"Multi-process: number of processes (env {ENV_NUM_PROCESSES}).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, f"Multi-process: this process's id, 0..num_processes-1 (env {ENV_PROCESS_ID}).")
_AUTO = flags.DEFINE_bool(
    "distributed_auto", None, f"Multi-process on a cluster jax detects (SLURM, MPI, ...) (env {ENV_AUTO}=1).")


class DistributedConfigError(ConfigError):
  """A partial or malformed multi-process configuration (scripts print it as one line)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """What ``jax.distributed.initialize`` is called with (None: jax detects it)."""

  coordinator_address: Optional[str]
  num_processes: Optional[int]
  process_id: Optional[int]
  auto: bool


@dataclasses.dataclass(frozen=True)
class Topology:
  process_index: int
  process_count: int
  local_device_count: int
  global_device_count: int
  platform: str

  def describe(self) -> str:
    return (f"process {self.process_index} of {self.process_count}: {self.local_device_count} local / "
            f"{self.global_device_count} global {self.platform} devices")


# ------------------------------------------------------------------------ configuration
def _parse_int(value, name: str, source: str) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedConfigError(f"{name} must be an integer, got {value!r} (from {source})") from None


def resolve_config(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                   process_id: Optional[int] = None, auto: Optional[bool] = None,
                   environ: Optional[Mapping[str, str]] = None) -> Optional[DistributedConfig]:
  """Merge explicit values over the environment.  None: single process.

  Raises :class:`DistributedConfigError` naming what is missing or wrong.
  """
  environ = os.environ if environ is None else environ
  sources = {}

  def pick(value, env_name, flag_name):
    if value is not None and value != "":
      sources[flag_name] = f"--{flag_name}"
      return value
    sources[flag_name] = env_name
    return environ.get(env_name) or None

  address = pick(coordinator_address, ENV_COORDINATOR, "coordinator_address")
  count = _parse_int(pick(num_processes, ENV_NUM_PROCESSES, "num_processes"), "num_processes",
                     sources["num_processes"])
  index = _parse_int(pick(process_id, ENV_PROCESS_ID, "process_id"), "process_id", sources["process_id"])
  if auto is None:
    raw = environ.get(ENV_AUTO, "")
    if raw not in ("", "0", "1"):
      raise DistributedConfigError(f"{ENV_AUTO} must be 1 (jax detects the cluster) or 0, got {raw!r}")
    auto = raw == "1"
  given = {"coordinator_address": address, "num_processes": count, "process_id": index}
  if not auto and all(v is None for v in given.values()):
    return None
  if not auto:
    missing = [f"--{k} / {env}" for k, env in (("coordinator_address", ENV_COORDINATOR),
                                               ("num_processes", ENV_NUM_PROCESSES),
                                               ("process_id", ENV_PROCESS_ID)) if given[k] is None]
    if missing:
      present = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None)
      raise DistributedConfigError(
          f"incomplete multi-process configuration ({present}): missing {', '.join(missing)}. "
          f"Set all three, or {ENV_AUTO}=1 / --distributed_auto on a cluster jax detects (SLURM, MPI), "
          "or none for a single process")
  if address is not None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise DistributedConfigError(f"coordinator_address must be host:port, got {address!r}")
  if count is not None and count < 1:
    raise DistributedConfigError(f"num_processes must be >= 1, got {count}")
  if index is not None and count is not None and not 0 <= index < count:
    raise DistributedConfigError(f"process_id must be in [0, {count}), got {index}")
  return DistributedConfig(address, count, index, bool(auto))


def _use_gloo_on_cpu() -> None:
  """Cross-process collectives for the CPU backend (affects the CPU client only)."""
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError) as e:  # renamed or gone in a later jax
    logging.warning("could not select gloo CPU collectives: %s", e)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: Optional[bool] = None, *,
               timeout_s: int = DEFAULT_INIT_TIMEOUT_S) -> Topology:
  """Start the distributed runtime when configured (see the module docstring); report the topology.

  Call once, before any other jax computation.  Calling it again is a no-op.
  """
  config = resolve_config(coordinator_address, num_processes, process_id, auto)
  if config is not None and not _is_initialized():
    _use_gloo_on_cpu()
    try:
      jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id,
                                 initialization_timeout=int(timeout_s))
    except RuntimeError as e:
      raise RuntimeError(f"jax.distributed.initialize failed for {config}: {e}. It must run before any "
                         "jax computation, every process must reach the coordinator, and the "
                         "coordinator port must be free on process 0's host") from e
  found = topology()
  if config is not None and config.num_processes is not None and found.process_count != config.num_processes:
    raise RuntimeError(f"asked for {config.num_processes} processes, jax sees {found.process_count}")
  logging.info("topology: %s", found.describe())
  return found


def initialize_from_flags() -> Topology:
  """:func:`initialize` with this module's absl flags (each falls back to its env variable)."""
  return initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _AUTO.value)


def _is_initialized() -> bool:
  is_init = getattr(jax.distributed, "is_initialized", None)
  if is_init is not None:
    return bool(is_init())
  from jax._src import distributed as _impl  # jax without the public query
  return _impl.global_state.client is not None


def topology() -> Topology:
  return Topology(jax.process_index(), jax.process_count(), jax.local_device_count(),
                  jax.device_count(), jax.devices()[0].platform)


def is_primary() -> bool:
  """True on the one process that writes results, grids, reports and npz shards."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across processes (no-op with one): e.g. before others read what process 0 wrote."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def primary_value(value):
  """Process 0's value of a small host pytree, on every process (e.g. 'is this shard done?'),
  so that all processes take the same branch around collective work."""
  if jax.process_count() == 1:
    return value
  leaves, treedef = jax.tree_util.tree_flatten(value)
  host = [np.asarray(leaf) for leaf in leaves]
  # Booleans travel as int32 (the broadcast is a sum over processes).
  sent = [h.astype(np.int32) if h.dtype == np.bool_ else h for h in host]
  received = multihost_utils.broadcast_one_to_all(sent)
  out = [np.asarray(r).astype(h.dtype) for r, h in zip(received, host)]
  out = [o.item() if np.ndim(leaf) == 0 and not isinstance(leaf, np.ndarray) else o
         for o, leaf in zip(out, leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------------ arrays
def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over every device of every process (batch sharding)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def local_rows(global_batch: int, sharding: NamedSharding) -> list[slice]:
  """The row ranges of a (global_batch, ...) array that this process's devices hold."""
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  rows = sorted({(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop)
                 for idx in index_map.values()})
  return [slice(start, stop) for start, stop in rows]


def global_batch(rows: Callable[[slice], Any] | np.ndarray, global_shape, sharding: NamedSharding,
                 dtype=None) -> jax.Array:
  """A global array sharded as ``sharding`` over its leading (batch) axis, built per process.

  rows: a host array of ``global_shape`` (every process holds the same, e.g. seeded noise), or
  a function ``rows(slice) -> array (stop - start, *global_shape[1:])`` that loads or
  generates only those rows.  Each process is asked only for the rows of its own devices.
  """
  fetch = (lambda sl: rows[sl]) if not callable(rows) else rows
  global_shape = tuple(int(s) for s in global_shape)

  def shard(index):
    block = np.asarray(fetch(index[0] if index else slice(None)))
    if dtype is not None:
      block = block.astype(dtype, copy=False)
    return block[(slice(None),) + tuple(index[1:])] if len(index) > 1 else block

  return jax.make_array_from_callback(global_shape, sharding, shard)


def put_batch(array, sharding: NamedSharding) -> jax.Array:
  """Shard a host array that every process holds whole (see :func:`global_batch`)."""
  array = np.asarray(array)
  return global_batch(array, array.shape, sharding)


def on_every_local_device(tree, mesh: Mesh | None = None):
  """One process with several devices: every leaf committed to fewer devices than the mesh
  (orbax restores onto device 0) replicated over the mesh, so that it can meet batch-sharded
  arrays in one jitted call.  Uncommitted and already-spread leaves pass unchanged; with one
  device, or several processes (:func:`replicate` places those), the tree is returned as is.
  """
  if jax.process_count() > 1 or jax.device_count() == 1:
    return tree
  sharding = replicated_sharding(data_mesh() if mesh is None else mesh)

  def one(leaf):
    if isinstance(leaf, jax.Array) and leaf.committed and leaf.sharding.device_set != sharding.device_set:
      return jax.device_put(leaf, sharding)
    return leaf

  return jax.tree_util.tree_map(one, tree)


def replicate(tree, mesh: Mesh):
  """Every leaf replicated on every device of ``mesh`` (all processes pass the same values).

  Leaves already on devices pass through the host: in multi-process jax 0.10,
  ``device_put`` of a single-device jax array onto a cross-process sharding builds an
  array that orbax cannot save.
  """
  sharding = replicated_sharding(mesh)

  def one(leaf):
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
      return leaf
    if jax.process_count() > 1:
      host = np.asarray(leaf) if getattr(leaf, "is_fully_addressable", True) else to_host(leaf)
      return jax.make_array_from_callback(np.shape(host), sharding, lambda idx: host[idx])
    return jax.device_put(leaf, sharding)

  return jax.tree_util.tree_map(one, tree)


def to_host(tree):
  """numpy copies of every leaf on every process; sharded arrays are gathered across processes."""

  def one(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)

  return jax.tree_util.tree_map(one, tree)
