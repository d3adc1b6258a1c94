"""The main job: quantize the embedded default with every method and write results/.

  python experiments/reproduce.py [--config=configs/reproduce.py[:full]] [--config.sampling.per_class=50]
"""

from absl import app, logging
from ml_collections import config_flags

from dit_quant_jax import pipeline, reproduce

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reproduce.py", "Reproduce config.")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  pipeline.maybe_initialize_distributed()
  reproduce.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
