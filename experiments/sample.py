"""Sample N images per class from any DiT checkpoint (FP or quantized) and score them.

  python experiments/sample.py --model=checkpoints/fmnist_dit --output=runs/samples/fp \
      --per_class=100 --sampler=ddim --steps=25 --cfg_scale=3.0 --seed=0
  python experiments/sample.py --model=runs/quant/vq4dit_w2/params --fp_model=checkpoints/fmnist_dit ...

Writes <output>/grid.png (one row per class), <output>/samples.npz (ADM evaluation-suite
layout: uint8 NHWC under arr_0) and <output>/metrics.json (FD, IS analogue, class accuracy,
precision, recall; with --fp_model also paired PSNR/MSE and per-step output MSE against the
FP model on the same noise and labels).  Batches are sharded over all local devices.
"""

import os

# numpy's BLAS single-threaded (set before numpy loads; an explicit setting wins): this job's
# numpy matrices (FD, k-NN, GPTQ) are at most a few hundred wide, and on a shared CPU the
# OpenBLAS threads' spinning collides with XLA's.  Measured on the 2-core machine under load:
# scoring 250 samples with 200 bootstrap resamples took 39.3 s with OpenBLAS' default
# threads, 0.7 s single-threaded (results equal to ~1e-13 relative: summation order).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


from absl import app, flags, logging

from dit_quant_jax import pipeline, validation
from dit_quant_jax.utils import distributed
from dit_quant_jax.eval import writers

_MODEL = flags.DEFINE_string("model", "checkpoints/fmnist_dit", "DiT checkpoint (FP or quantized).")
_FP_MODEL = flags.DEFINE_string("fp_model", "", "FP checkpoint for paired metrics (optional).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_PER_CLASS = flags.DEFINE_integer("per_class", 100, "Samples per class.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm"], "Sampler.")
_STEPS = flags.DEFINE_string("steps", "25", "Sampling steps (respacing: '25', '250', ...).")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta.")
_CFG = flags.DEFINE_float("cfg_scale", 3.0, "Classifier-free guidance scale (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial noise and DDPM noise.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per sampling batch.")
_SCORE = flags.DEFINE_bool("score", True, "Compute metrics (Fashion-MNIST models).")
_VAE = flags.DEFINE_string("vae", "", "Latent-space models: SD VAE weights (diffusers folder, "
                           ".safetensors or .bin) to decode latents into images.")
_VAE_BATCH = flags.DEFINE_integer("vae_batch_size", 32, "Latents per VAE decoding batch.")
flags.mark_flags_as_required(["output"])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  distributed.initialize_from_flags()
  respacing = ("ddim" + _STEPS.value) if (_SAMPLER.value == "ddim" and _STEPS.value.isdigit()) else _STEPS.value
  validation.check_sample_flags(per_class=_PER_CLASS.value, batch_size=_BATCH.value,
                                respacing_name=respacing, sampler=_SAMPLER.value, eta=_ETA.value,
                                cfg=_CFG.value, seed=_SEED.value, score=_SCORE.value and not _VAE.value)
  validation.check_checkpoint_path(_MODEL.value, "model", "--model")
  if _FP_MODEL.value:
    validation.check_checkpoint_path(_FP_MODEL.value, "FP model", "--fp_model")
  if _SCORE.value and not _VAE.value:
    validation.check_dataset_available(None, "test", "--score (needs the Fashion-MNIST test set)")
  model, params, _ = pipeline.load_dit(_MODEL.value)
  noise, labels = pipeline.noise_and_labels(model, _PER_CLASS.value, _SEED.value)
  kwargs = dict(respacing=respacing, sampler=_SAMPLER.value, eta=_ETA.value,
                cfg_scale=_CFG.value, seed=_SEED.value, batch_size=_BATCH.value,
                progress=logging.info)
  paired = bool(_FP_MODEL.value)
  result = pipeline.generate(model, params, noise, labels, return_outputs=paired, **kwargs)
  images, outputs = result if paired else (result, None)
  os.makedirs(_OUTPUT.value, exist_ok=True)
  if _VAE.value:
    import numpy as np
    from dit_quant_jax.models import convert_vae, vae
    from dit_quant_jax.utils import atomic
    atomic.savez(os.path.join(_OUTPUT.value, "latents.npz"), arr_0=images, arr_1=labels)
    vae_config = vae.VAEConfig.sd_vae()
    vae_params = convert_vae.load_vae_params(_VAE.value, vae_config)
    images = vae.decode_latents(vae_params, images, vae_config, _VAE_BATCH.value,
                                sharding=pipeline.device_mesh())
  elif model.in_channels == 4:
    raise ValueError("this is a latent-space model: pass --vae=<SD VAE weights> to decode its samples")
  writers.write_sample_grid(os.path.join(_OUTPUT.value, "grid.png"), images[:, ...], labels,
                            num_classes=model.num_classes, per_class=min(_PER_CLASS.value, 16))
  writers.write_adm_npz(os.path.join(_OUTPUT.value, "samples.npz"), images, labels)
  if _SCORE.value and not _VAE.value:
    fp_images = fp_outputs = None
    if paired:
      fp_model, fp_params, _ = pipeline.load_dit(_FP_MODEL.value)
      fp_images, fp_outputs = pipeline.generate(fp_model, fp_params, noise, labels,
                                                return_outputs=True, **kwargs)
    metrics = pipeline.score(images, labels, fp_images, outputs, fp_outputs)
    metrics.update(model=_MODEL.value, sampler=_SAMPLER.value, steps=_STEPS.value,
                   cfg_scale=_CFG.value, seed=_SEED.value, per_class=_PER_CLASS.value)
    pipeline.write_json(os.path.join(_OUTPUT.value, "metrics.json"), metrics)
    logging.info("metrics: %s", {k: v for k, v in metrics.items() if k != "per_step_output_mse"})


if __name__ == "__main__":
  app.run(pipeline.run_main(main))
