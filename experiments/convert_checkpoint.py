"""Convert an official facebookresearch/DiT ``.pt`` checkpoint to an orbax checkpoint.

  python experiments/convert_checkpoint.py --input=DiT-XL-2-256x256.pt --output=ckpt/dit_xl2_256

The architecture is read from the tensor shapes (head count from the official table unless
``--num_heads``) and every key and shape is checked; the output records the model config,
so ``utils.checkpoint.restore_checkpoint`` knows what it holds.  Needs PyTorch to read the
``.pt`` (``pip install 'dit_quant_jax[torch]'``).
"""

from absl import app, flags, logging

from dit_quant_jax.models import convert

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "official .pt: released weights or a train.py checkpoint (EMA taken)")
flags.DEFINE_string("output", None, "orbax checkpoint directory to write")
flags.DEFINE_integer("num_heads", None, "attention heads (default: official table by hidden size)")
flags.DEFINE_bool("overwrite", False, "replace an existing output directory")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  del argv
  config = convert.convert_official_checkpoint(FLAGS.input, FLAGS.output,
                                               num_heads=FLAGS.num_heads, overwrite=FLAGS.overwrite)
  name = convert.official_config_name(config) or "a non-standard DiT"
  logging.info("wrote %s (%s): %s", FLAGS.output, name, config)
  print(f"wrote {FLAGS.output}: {name} {config}")


if __name__ == "__main__":
  app.run(main)
