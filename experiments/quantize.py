"""Quantize a DiT checkpoint with any method config; write the quantized params + a json report.

  python experiments/quantize.py --model=checkpoints/fmnist_dit \
      --config=configs/vq4dit.py:w2 --output=runs/quant/vq4dit_w2
  python experiments/quantize.py --config=configs/hqdit.py:w4a4 --config.gptq.enabled=False ...

The calibration state is checkpointed under <output>/calib_state and resumed after a kill.
The output is an orbax checkpoint (<output>/params) that sample.py and reproduce.py read.
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

from dit_quant_jax import pipeline, validation
from dit_quant_jax.utils import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Quantization config (method:setting).")
_MODEL = flags.DEFINE_string("model", "checkpoints/fmnist_dit", "FP DiT checkpoint (orbax).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_REUSE = flags.DEFINE_bool("reuse", True, "Return an existing complete output unchanged.")
flags.mark_flags_as_required(["config", "output"])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  distributed.initialize_from_flags()
  qconfig = validation.config_from_flag(_CONFIG)  # validated (with the model's shapes) at entry
  report = pipeline.quantize_checkpoint(_MODEL.value, qconfig, _OUTPUT.value, reuse=_REUSE.value)
  logging.info("quantized (%s) in %.1f s: %.3f MB", report.get("setting"),
               report.get("wall_time_s", float("nan")), report["size"]["total_mb"])


if __name__ == "__main__":
  app.run(pipeline.run_main(main))
