"""The main job: quantize the embedded default with every method and write results/.

  python experiments/reproduce.py [--config=configs/reproduce.py[:full]] [--config.sampling.per_class=50]
"""

import os

# numpy's BLAS single-threaded (set before numpy loads; an explicit setting wins): this job's
# numpy matrices (FD, k-NN, GPTQ) are at most a few hundred wide, and on a shared CPU the
# OpenBLAS threads' spinning collides with XLA's.  Measured on the 2-core machine under load:
# scoring 250 samples with 200 bootstrap resamples took 39.3 s with OpenBLAS' default
# threads, 0.7 s single-threaded (results equal to ~1e-13 relative: summation order).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app, logging
from ml_collections import config_flags

from dit_quant_jax import pipeline, reproduce, validation
from dit_quant_jax.utils import distributed

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reproduce.py", "Reproduce config.")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  distributed.initialize_from_flags()
  reproduce.run(validation.config_from_flag(_CONFIG))  # validated at its entry


if __name__ == "__main__":
  app.run(pipeline.run_main(main))
