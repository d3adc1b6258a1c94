"""XLA flags that make the test suite's CPU compiles cheap, shared by conftest.py and the tests
that start their own processes.

The suite's time is XLA compiling small programs (the tiny DiT, interpret-mode kernels), which
then run in milliseconds: LLVM's cheap pipeline (no backend optimization, no expensive passes)
compiles them about a third faster.  Measured on the 2-core machine, Python 3.11, jax 0.10.2:
the suite's summed test time 1430 s -> 989 s, wall 12:22 -> 8:50, every test passing either
way (the flags change how fast the CPU code is generated, not what it computes: no fast-math).
"""

import os

FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0",
                          "--xla_llvm_disable_expensive_passes=true")


def has_nvidia_gpu() -> bool:
  """A machine with an NVIDIA driver: its tests compile for the GPU, with the default flags."""
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def with_fast_compile(xla_flags: str = "") -> str:
  """``xla_flags`` plus the cheap-compile flags it does not already set."""
  flags = xla_flags.split()
  names = {flag.split("=", 1)[0] for flag in flags}
  flags += [flag for flag in FAST_COMPILE_XLA_FLAGS if flag.split("=", 1)[0] not in names]
  return " ".join(flags)


def xla_flags_with(*extra: str) -> str:
  """This process's XLA_FLAGS (the suite's choice: conftest.py) with ``extra`` flags, for a
  process a test starts: an extra flag replaces the inherited one of the same name."""
  names = {flag.split("=", 1)[0] for flag in extra}
  inherited = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
               if flag.split("=", 1)[0] not in names]
  return " ".join(inherited + list(extra))
