"""Dump or compare every quantized leaf of an HQ-DiT quantization (results/hqdit_determinism.md).

  python experiments/hqdit_determinism.py --spec=configs/hqdit.py:w4a4 --dump=a.npz
  OPENBLAS_NUM_THREADS=1 ... python experiments/hqdit_determinism.py --spec=... --dump=b.npz
  python experiments/hqdit_determinism.py --compare=a.npz,b.npz
"""

from absl import app, flags
import jax
import numpy as np

from dit_quant_jax import api, config_spec, pipeline

_SPEC = flags.DEFINE_string("spec", "configs/hqdit.py:w4a4", "quantization config spec")
_MODEL = flags.DEFINE_string("model", "checkpoints/fmnist_dit", "FP checkpoint")
_CALIB = flags.DEFINE_integer("calib_samples", 8, "calibration trajectory images (main job: 8)")
_DUMP = flags.DEFINE_string("dump", "", "write every quantized leaf to this .npz")
_COMPARE = flags.DEFINE_list("compare", [], "two .npz dumps to compare leaf by leaf")


def main(argv):
  del argv
  if _COMPARE.value:
    a, b = (np.load(p) for p in _COMPARE.value)
    diff = [k for k in a.files if k not in b.files or not np.array_equal(a[k], b[k])]
    print(f"{len(a.files) - len(diff)}/{len(a.files)} leaves bit-identical")
    for k in diff:
      print("differs:", k)
    return
  if not _DUMP.value:
    raise app.UsageError("give --dump=FILE.npz or --compare=A.npz,B.npz")
  qconfig = config_spec.load(_SPEC.value, {"calib.num_samples": _CALIB.value})
  model, params, _ = pipeline.load_dit(_MODEL.value)
  qparams, report = api.quantize(model, params, qconfig)
  leaves = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(qparams):
    value = np.asarray(leaf)
    leaves[jax.tree_util.keystr(path)] = value.view(np.uint16) if value.dtype.name == "bfloat16" else value
  np.savez(_DUMP.value, **leaves)
  print(f"saved {len(leaves)} leaves to {_DUMP.value}; quantization {report['wall_time_s']:.1f} s")


if __name__ == "__main__":
  app.run(main)
