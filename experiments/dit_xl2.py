"""DiT-XL/2 at the papers' settings: (quantize) -> sample latents -> SD VAE -> ADM npz.

  python experiments/dit_xl2.py --config=configs/dit_xl2.py:256-250-1.5-50k \
      --config.model=ckpt/dit_xl2_256 --config.vae=sd-vae-ft-ema/ \
      --config.quant_spec=configs/hqdit.py:w4a4 --output=runs/xl2/hqdit_w4a4

Resumable (quantized checkpoint reused, samples written in shards).  Score the resulting
<output>/samples.npz with the ADM evaluation suite (see README).
"""

import os

import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from dit_quant_jax import config_spec, pipeline, validation
from dit_quant_jax.utils import distributed
from dit_quant_jax.models import convert_vae, vae

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dit_xl2.py", "DiT-XL/2 setting.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
flags.mark_flag_as_required("output")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  distributed.initialize_from_flags()
  c = validation.config_from_flag(_CONFIG)
  validation.check_dit_xl2_config(c)
  model_path = c.model
  if c.quant_spec:
    quant_dir = c.quant_dir or os.path.join(_OUTPUT.value, "quant")
    pipeline.quantize_checkpoint(c.model, config_spec.load(c.quant_spec), quant_dir,
                                 override_flag="another --config.quant_dir")
    model_path = os.path.join(quant_dir, "params")
  model, params, _ = pipeline.load_dit(model_path)
  if model.input_size != c.expected_input_size or model.in_channels != 4:
    raise ValueError(f"{model_path}: expected a 4-channel latent DiT of input size "
                     f"{c.expected_input_size}, got {model.in_channels} channels at {model.input_size}")
  dtype = jnp.dtype(c.compute_dtype)
  model = model.clone(dtype=dtype)
  vae_config = vae.VAEConfig.sd_vae()
  vae_params = convert_vae.load_vae_params(c.vae, vae_config)
  mesh = pipeline.device_mesh()
  decode = lambda latents: vae.decode_latents(vae_params, latents, vae_config, c.vae_batch_size,  # noqa: E731
                                              dtype=dtype, sharding=mesh)
  per_class = -(-c.num_samples // model.num_classes)
  noise, labels = pipeline.noise_and_labels(model, per_class, c.seed)
  noise, labels = noise[:c.num_samples], labels[:c.num_samples]
  path = pipeline.sample_adm_shards(model, params, (noise, labels), _OUTPUT.value,
                                    shard_size=c.shard_size, decode=decode,
                                    respacing=c.respacing, sampler=c.sampler,
                                    cfg_scale=c.cfg_scale, seed=c.seed, batch_size=c.batch_size)
  logging.info("wrote %s", path)


if __name__ == "__main__":
  app.run(pipeline.run_main(main))
