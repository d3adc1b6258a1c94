"""Train a class-conditional DiT (default: the embedded Fashion-MNIST model).

  python experiments/train.py --config=configs/fmnist_dit.py --workdir=runs/fmnist_dit \
      [--export=checkpoints/fmnist_dit] [--config.num_steps=...]

Resumes from the latest checkpoint in --workdir after a kill.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dit_quant_jax import pipeline, trainer, validation
from dit_quant_jax.utils import distributed

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fmnist_dit.py", "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/fmnist_dit", "Checkpoints and training curve.")
_EXPORT = flags.DEFINE_string("export", "", "If set, write the EMA params + model config here.")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  distributed.initialize_from_flags()
  config = validation.config_from_flag(_CONFIG)  # validated in trainer.train
  state = trainer.train(config, _WORKDIR.value)
  if _EXPORT.value:
    trainer.export_ema(config, state, _EXPORT.value)
    logging.info("exported EMA params to %s", _EXPORT.value)


if __name__ == "__main__":
  app.run(pipeline.run_main(main))
