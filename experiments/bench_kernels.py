"""Correctness check and device-side timing of the quantized-linear kernels vs the bf16 dot.

  .venv/bin/python experiments/bench_kernels.py                                # GPU: full table
  .venv/bin/python experiments/bench_kernels.py --smoke --out_dir=/tmp/bench   # CPU, interpret

All logic: dit_quant_jax/bench/kernels.py (what is timed and how: its module doc).
"""

from absl import app
from absl import flags

from dit_quant_jax.bench import kernels

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes on CPU in interpret mode (a check).")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "Where the markdown table goes.")
_REPS = flags.DEFINE_integer("reps", 20, "Calls per timed program (x operand sets).")
_TRIALS = flags.DEFINE_integer("trials", 5, "Timed programs; the median is reported.")
_VARIANTS = flags.DEFINE_list("variants", list(kernels.VARIANTS), "Kernel variants to time.")
_TOKENS = flags.DEFINE_list("tokens", None, "Override the M values (default DiT-XL/2 set).")
_DIT_STEP = flags.DEFINE_bool("dit_step", True, "Also time one DiT-XL/2 sampling step.")
_LINEARS = flags.DEFINE_bool("linears", True, "Time the linear layers (off: DiT step only).")
_CHECK = flags.DEFINE_bool("check", True, "Run the correctness pass first.")


def main(argv):
  del argv
  try:
    kernels.run(smoke=_SMOKE.value, out_dir=_OUT_DIR.value, names=_VARIANTS.value,
                tokens=[int(t) for t in _TOKENS.value] if _TOKENS.value else None,
                reps=_REPS.value, trials=_TRIALS.value, dit_step=_DIT_STEP.value,
                linears=_LINEARS.value, check=_CHECK.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from error


if __name__ == "__main__":
  app.run(main)
