"""Multi-process jax for real: 2 local processes (127.0.0.1, gloo CPU collectives) of 2 CPU
devices each, against one process on one device.

tests/multiprocess_worker.py runs the tiny DiT's jobs (sampling with padding and the ADM npz
shards, a few training steps with a resume and an EMA export, a short VQ4DiT calibration, an
HQ-DiT W4A4 quantization) once in a single process on 2 devices (one host with several GPUs:
params restored onto one device must meet batch-sharded arrays) and once in 2 processes that
build their global batches from process-local rows, over 4 devices (2 per process: the batch
is split both within and across processes).  The results must agree (the batch is split
differently over devices, so float sums may differ in the last bits: ``ATOL``), and only
process 0 may write.  The one-device path is what the rest of the suite runs.  Also: the
configuration checks of ``utils/distributed.py``.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dit_quant_jax.utils import distributed
from fast_compile import xla_flags_with

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO_ROOT, "tests", "multiprocess_worker.py")
JOBS = ("sample", "train", "vq4dit", "hqdit")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
# Whole-run bound (the machine is shared: generous, but a hung collective must not hang CI).
RUN_TIMEOUT_S = float(os.environ.get("MULTIPROCESS_TEST_TIMEOUT_S", "2400"))
# Differences from splitting a batch over 2 devices instead of 1 (float32 reduction order);
# a wrong slice or a process computing on the wrong rows differs by O(1).
ATOL = 1e-4


# ----------------------------------------------------------------------- configuration
def test_no_configuration_is_one_process():
  assert distributed.resolve_config(environ={}) is None


def test_environment_configuration():
  config = distributed.resolve_config(environ={
      distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
      distributed.ENV_PROCESS_ID: "3"})
  assert config == distributed.DistributedConfig("10.0.0.1:1234", 4, 3, False)


def test_flags_override_environment():
  config = distributed.resolve_config("h:1", 2, 0, environ={
      distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
      distributed.ENV_PROCESS_ID: "3"})
  assert config == distributed.DistributedConfig("h:1", 2, 0, False)


def test_auto_detection_needs_nothing_else():
  config = distributed.resolve_config(environ={distributed.ENV_AUTO: "1"})
  assert config == distributed.DistributedConfig(None, None, None, True)


@pytest.mark.parametrize("environ, message", [
    ({distributed.ENV_COORDINATOR: "h:1"}, "missing --num_processes / JAX_NUM_PROCESSES, --process_id"),
    ({distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "0"}, "missing --coordinator_address"),
    ({distributed.ENV_COORDINATOR: "h", distributed.ENV_NUM_PROCESSES: "2",
      distributed.ENV_PROCESS_ID: "0"}, "host:port"),
    ({distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "two",
      distributed.ENV_PROCESS_ID: "0"}, "num_processes must be an integer"),
    ({distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2",
      distributed.ENV_PROCESS_ID: "2"}, r"process_id must be in \[0, 2\)"),
    ({distributed.ENV_AUTO: "yes"}, "must be 1"),
])
def test_partial_or_wrong_configuration_is_refused(environ, message):
  with pytest.raises(distributed.DistributedConfigError, match=message):
    distributed.resolve_config(environ=environ)


def test_single_process_helpers_are_plain():
  import jax
  mesh = distributed.data_mesh()
  rows = np.random.default_rng(0).standard_normal((4 * mesh.size, 3)).astype(np.float32)
  array = distributed.global_batch(lambda sl: rows[sl], rows.shape, distributed.batch_sharding(mesh))
  np.testing.assert_array_equal(distributed.to_host(array), rows)
  assert distributed.local_rows(rows.shape[0], distributed.batch_sharding(mesh)) == [slice(0, rows.shape[0])]
  assert distributed.is_primary() and distributed.primary_value({"done": True}) == {"done": True}
  assert isinstance(distributed.replicate({"w": rows}, mesh)["w"], jax.Array)


# ------------------------------------------------------------------- 2 local processes
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out_dir, jobs, log_path, process_id=None, port=None):
  """One worker: a single process (process_id None) or process ``process_id`` of NUM_PROCESSES,
  each with DEVICES_PER_PROCESS devices."""
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             MULTIPROCESS_COMPILATION_CACHE=os.path.join(os.path.dirname(out_dir), "compilation_cache"))
  for key in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
              distributed.ENV_AUTO):
    env.pop(key, None)
  env["JAX_PLATFORMS"] = "cpu"
  # The jobs' time is XLA's CPU compiles: every run inherits the suite's flags (off a GPU the
  # cheap-compile ones, tests/fast_compile.py), so the comparison is like for like.
  env["XLA_FLAGS"] = xla_flags_with(f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
  if process_id is not None:
    env.update({distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                distributed.ENV_NUM_PROCESSES: str(NUM_PROCESSES), distributed.ENV_PROCESS_ID: str(process_id)})
  log = open(log_path, "a")
  proc = subprocess.Popen([sys.executable, WORKER, out_dir, ",".join(jobs)], cwd=REPO_ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
  return proc, log


def _launch_group(root, name, jobs, with_single=False):
  """NUM_PROCESSES workers on a fresh port writing to root/name (and a single-process one)."""
  port = _free_port()
  procs = {f"{name}_process_{i}": _launch(str(root / name), jobs, str(root / f"{name}_process_{i}.log"), i, port)
           for i in range(NUM_PROCESSES)}
  if with_single:
    procs["single"] = _launch(str(root / "single"), jobs, str(root / "single.log"))
  return procs


def _wait_all(procs, timeout_s, until=None):
  """Wait for every process (or for ``until()`` to be true); on a failure or the deadline kill
  them all (SIGKILL: jax's preemption handler swallows SIGTERM).  -> name of the failed one."""
  deadline = time.monotonic() + timeout_s
  pending = dict(procs)
  while pending:
    if until is not None and until():
      return None
    for name, (proc, log) in list(pending.items()):
      code = proc.poll()
      if code is not None:
        log.close()
        del pending[name]
        if code != 0:
          _kill(pending)
          return name
    if time.monotonic() > deadline:
      _kill(pending)
      return "timeout"
    time.sleep(0.5)
  return None


def _kill(pending):
  for proc, log in pending.values():
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()


def _tail(path, lines=40):
  with open(path) as f:
    return "".join(f.readlines()[-lines:])


def _check(root, procs, failed, start):
  if failed is not None:
    logs = {name: _tail(str(root / f"{name}.log")) for name in procs}
    pytest.fail(f"{failed} failed after {time.monotonic() - start:.0f} s:\n" +
                "\n".join(f"--- {name}\n{text}" for name, text in logs.items()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  procs = _launch_group(root, "multi", JOBS, with_single=True)
  start = time.monotonic()
  _check(root, procs, _wait_all(procs, RUN_TIMEOUT_S), start)
  return dict(single=str(root / "single"), multi=str(root / "multi"))


def test_topology_reports_two_processes(runs):
  for i in range(NUM_PROCESSES):
    with open(os.path.join(runs["multi"], f"process_{i}.json")) as f:
      info = json.load(f)
    assert info["process_index"] == i and info["process_count"] == NUM_PROCESSES
    assert info["local_devices"] == DEVICES_PER_PROCESS
    assert info["global_devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
  with open(os.path.join(runs["single"], "process_0.json")) as f:
    info = json.load(f)
  assert info["process_count"] == 1 and info["global_devices"] == DEVICES_PER_PROCESS


@pytest.mark.parametrize("key", [
    "sample_images", "sample_outputs", "adm_images",  # pipeline.generate, sample_adm_shards
    "train_step", "train_kernel", "train_ema_kernel", "train_exported_ema_kernel",  # trainer
    "vq_kernel", "vq_losses",  # VQ4DiT calibration
    "hq_kernel", "hq_images",  # HQ-DiT quantization, sampling the quantized model
])
def test_two_processes_match_one(runs, key):
  with np.load(os.path.join(runs["single"], "result.npz")) as single, \
       np.load(os.path.join(runs["multi"], "result.npz")) as multi:
    a, b = single[key], multi[key]
  assert a.shape == b.shape
  assert np.all(np.isfinite(a.astype(np.float64)))
  np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=0, atol=ATOL)


def test_processes_wrote_nothing_but_process_zero(runs):
  with open(os.path.join(runs["multi"], "process_0.json")) as f:
    written_0 = json.load(f)["written"]
  with open(os.path.join(runs["multi"], "process_1.json")) as f:
    written_1 = json.load(f)["written"]
  assert any(p.endswith("report.json") or p.endswith(".npz") for p in written_0)
  # Process 1 writes its own process_1.json and, inside orbax checkpoints being saved, its
  # per-process array metadata (orbax's multi-process protocol); nothing else.
  others = [p for p in written_1 if p != os.devnull and ".orbax-checkpoint-tmp" not in p]
  assert [os.path.basename(p) for p in others] == ["process_1.json"], written_1
  leftovers = [os.path.join(folder, f) for folder, _, files in os.walk(runs["multi"])
               for f in files if ".partial" in f]  # atomic writes' temporaries
  assert not leftovers
  shards = sorted(os.listdir(os.path.join(runs["multi"], "adm", "shards")))
  assert shards == ["shard_00000.npz", "shard_00001.npz"]


@pytest.mark.skipif(not os.environ.get("DIT_QUANT_SLOW_TESTS"),
                    reason="kill-and-resume of 2 processes: set DIT_QUANT_SLOW_TESTS=1")
def test_training_resumes_after_a_process_is_killed(tmp_path):
  """Kill process 1 once a checkpoint is complete (and process 0, which would wait for it),
  relaunch both: the resumed run ends where one uninterrupted process does."""
  jobs = ("train_resume",)
  procs = _launch_group(tmp_path, "multi", jobs, with_single=True)
  single = {"single": procs.pop("single")}
  state_dir = tmp_path / "multi" / "train_resume" / "state"
  start = time.monotonic()
  failed = _wait_all(procs, RUN_TIMEOUT_S, until=lambda: (state_dir / "2").is_dir())
  _check(tmp_path, procs, failed, start)
  procs["multi_process_1"][0].kill()
  _kill(procs)
  steps_at_kill = sorted(int(d.name) for d in state_dir.iterdir() if d.name.isdigit())
  assert steps_at_kill and max(steps_at_kill) < 6, steps_at_kill  # killed mid-run
  procs = _launch_group(tmp_path, "multi", jobs)
  _check(tmp_path, procs, _wait_all(procs, RUN_TIMEOUT_S), start)
  _check(tmp_path, single, _wait_all(single, RUN_TIMEOUT_S), start)
  with np.load(tmp_path / "single" / "result.npz") as a, np.load(tmp_path / "multi" / "result.npz") as b:
    assert int(a["resume_step"]) == int(b["resume_step"]) == 6
    np.testing.assert_allclose(b["resume_kernel"], a["resume_kernel"], rtol=0, atol=ATOL)
  with open(tmp_path / "multi_process_0.log") as f:
    assert "resumed from step" in f.read()


def test_suite_xla_flags_helpers(monkeypatch):
  """tests/fast_compile.py: the cheap-compile flags are added once, and a started process's own
  flag replaces the inherited one of the same name."""
  from fast_compile import FAST_COMPILE_XLA_FLAGS, with_fast_compile
  once = with_fast_compile("--xla_force_host_platform_device_count=2")
  assert once.split() == ["--xla_force_host_platform_device_count=2", *FAST_COMPILE_XLA_FLAGS]
  assert with_fast_compile(once) == once
  assert "--xla_backend_optimization_level=2" in with_fast_compile("--xla_backend_optimization_level=2").split()
  monkeypatch.setenv("XLA_FLAGS", once)
  assert xla_flags_with("--xla_force_host_platform_device_count=4").split() == [
      *FAST_COMPILE_XLA_FLAGS, "--xla_force_host_platform_device_count=4"]
