"""Turn a sweep directory's result.json files into one markdown table (<dir>/table.md).

  python experiments/aggregate.py --sweep_dir=runs/sweeps/hq
"""

from absl import app, flags

from dit_quant_jax import sweep

_DIR = flags.DEFINE_string("sweep_dir", None, "Sweep output directory.")
flags.mark_flag_as_required("sweep_dir")


def main(argv):
  del argv
  print(sweep.aggregate(_DIR.value))


if __name__ == "__main__":
  app.run(main)
