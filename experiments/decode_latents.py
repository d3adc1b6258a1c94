"""Decode DiT latents with the SD VAE and write an ADM-evaluation ``.npz``.

  python experiments/decode_latents.py --latents=latents.npz --vae=sd-vae-ft-ema/ \
      --output=samples.npz [--batch_size=32] [--dtype=bfloat16] [--shard]

``--latents``: a ``.npy`` or ``.npz`` of scaled latents (N, h, w, 4) NHWC, as the DiT samples
them (``arr_0`` or ``latents``; labels, when present as ``arr_1`` or ``labels``, are copied
to the output).  ``--vae``: a diffusers VAE weights file (``diffusion_pytorch_model
.safetensors`` / ``.bin``) or the folder holding it; nothing is downloaded.  The output holds
``arr_0``: uint8 (N, 8h, 8w, 3) as the official DiT sampler writes it.
"""

import numpy as np
from absl import app, flags, logging

import jax
from jax.sharding import Mesh

from dit_quant_jax.eval import writers
from dit_quant_jax.models import convert_vae, vae

FLAGS = flags.FLAGS
flags.DEFINE_string("latents", None, ".npy / .npz of scaled latents (N, h, w, 4), NHWC")
flags.DEFINE_string("vae", None, "diffusers VAE .safetensors / .bin, or the folder holding it")
flags.DEFINE_string("output", None, ".npz to write (arr_0: uint8 images, arr_1: labels if any)")
flags.DEFINE_integer("batch_size", 32, "latents decoded per step")
flags.DEFINE_float("scale", vae.SD_LATENT_SCALE, "latent scale the DiT was trained with")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "VAE computation dtype")
flags.DEFINE_bool("shard", False, "split each batch over all local devices")
flags.mark_flags_as_required(["latents", "vae", "output"])


def _read_latents(path: str):
  """-> (latents, labels or None)."""
  if path.endswith(".npy"):
    return np.load(path), None
  with np.load(path) as data:
    key = "latents" if "latents" in data else "arr_0"
    if key not in data:
      raise ValueError(f"{path}: no 'latents' or 'arr_0' array (has {sorted(data.files)})")
    label_key = next((k for k in ("labels", "arr_1") if k in data), None)
    return data[key], (data[label_key] if label_key else None)


def main(argv):
  del argv
  latents, labels = _read_latents(FLAGS.latents)
  config = vae.VAEConfig.sd_vae()
  params = convert_vae.load_vae_params(FLAGS.vae, config)
  mesh = Mesh(np.array(jax.local_devices()), ("data",)) if FLAGS.shard else None
  images = vae.decode_latents(params, latents, config, FLAGS.batch_size, FLAGS.scale,
                              dtype=FLAGS.dtype, sharding=mesh)
  writers.write_adm_npz(FLAGS.output, images, labels)
  logging.info("decoded %d latents %s -> %s", len(images), latents.shape[1:], FLAGS.output)
  print(f"wrote {FLAGS.output}: {images.shape[0]} images of {images.shape[1:]}")


if __name__ == "__main__":
  app.run(main)
