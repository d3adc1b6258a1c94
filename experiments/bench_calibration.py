"""VQ4DiT calibration throughput on DiT-XL/2 (random weights, real shapes), extrapolated to the
full budgets (issue 12 stage 6; logic: dit_quant_jax/bench/calibration.py).

  python experiments/bench_calibration.py --out_dir=/tmp/calib --steps=20        # GPU
  python experiments/bench_calibration.py --smoke --steps=2 --out_dir=/tmp/calib # CPU check
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dit_quant_jax.bench import calibration

_CONFIG = config_flags.DEFINE_config_file("config", "configs/vq4dit.py:w2",
                                          "VQ4DiT config whose calibration is timed.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny DiT on CPU instead of DiT-XL/2 (a check).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calibration steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "Where the json and markdown go.")


def main(argv):
  del argv
  try:
    path = calibration.run(_CONFIG.value, smoke=_SMOKE.value, steps=_STEPS.value,
                           warmup=_WARMUP.value, out_dir=_OUT_DIR.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  logging.info("wrote %s", path)
  print(open(path).read())


if __name__ == "__main__":
  app.run(main)
