"""Train the Fashion-MNIST evaluation classifier and save it where load_classifier() finds it.

  nice -n 10 .venv/bin/python experiments/train_classifier.py --config=configs/fmnist_classifier.py
"""

from absl import app
from absl import logging
from ml_collections import config_flags

from dit_quant_jax.eval import classifier as classifier_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fmnist_classifier.py",
                                          "Classifier training config.")


def main(argv):
  del argv
  config = _CONFIG.value
  trained, summary = classifier_lib.train_classifier(config, log=logging.info)
  classifier_lib.save_classifier(config.output_dir, trained)
  logging.info("test accuracy %.4f after %.0f s; saved to %s", summary["test_accuracy"],
               summary["wall_time_s"], config.output_dir)


if __name__ == "__main__":
  app.run(main)
