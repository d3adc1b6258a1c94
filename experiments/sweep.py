"""Run a sweep (configs/sweeps.py) one run after another; each run writes its own json.

  python experiments/sweep.py --sweep=configs/sweeps.py:hqdit_ablation --output=runs/sweeps/hq
  python experiments/sweep.py --sweep=configs/sweeps.py:vq_bits_lambda --sweep.model=... --output=...

Resumable: runs with a result.json are skipped.  Ends by printing the aggregated table.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dit_quant_jax import pipeline, sweep

_SWEEP = config_flags.DEFINE_config_file("sweep", "configs/sweeps.py:tiny", "Sweep definition.")
_OUTPUT = flags.DEFINE_string("output", None, "Sweep directory.")
flags.mark_flag_as_required("output")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  pipeline.maybe_initialize_distributed()
  sweep.run_sweep(_SWEEP.value, _OUTPUT.value)
  print(sweep.aggregate(_OUTPUT.value))


if __name__ == "__main__":
  app.run(main)
