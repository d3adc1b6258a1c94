"""Run a sweep (configs/sweeps.py) one run after another; each run writes its own json.

  python experiments/sweep.py --sweep=configs/sweeps.py:hqdit_ablation --output=runs/sweeps/hq
  python experiments/sweep.py --sweep=configs/sweeps.py:vq_bits_lambda --sweep.model=... --output=...

Resumable: runs with a result.json are skipped.  Ends by printing the aggregated table.
"""

import os

# numpy's BLAS single-threaded (set before numpy loads; an explicit setting wins): this job's
# numpy matrices (FD, k-NN, GPTQ) are at most a few hundred wide, and on a shared CPU the
# OpenBLAS threads' spinning collides with XLA's.  Measured on the 2-core machine under load:
# scoring 250 samples with 200 bootstrap resamples took 39.3 s with OpenBLAS' default
# threads, 0.7 s single-threaded (results equal to ~1e-13 relative: summation order).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app, flags, logging
from ml_collections import config_flags

from dit_quant_jax import pipeline, sweep, validation
from dit_quant_jax.utils import distributed

_SWEEP = config_flags.DEFINE_config_file("sweep", "configs/sweeps.py:tiny", "Sweep definition.")
_OUTPUT = flags.DEFINE_string("output", None, "Sweep directory.")
flags.mark_flag_as_required("output")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  distributed.initialize_from_flags()
  sweep.run_sweep(validation.config_from_flag(_SWEEP, "--sweep"), _OUTPUT.value)  # validated there
  print(sweep.aggregate(_OUTPUT.value))


if __name__ == "__main__":
  app.run(pipeline.run_main(main))
