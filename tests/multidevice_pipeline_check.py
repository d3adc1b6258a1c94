"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N: samples and a
calibration trajectory from the tiny model, saved to an .npz for comparison across N."""

import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from tiny_model import tiny_model_and_params  # noqa: E402

from dit_quant_jax import config_spec, pipeline  # noqa: E402
from dit_quant_jax import api  # noqa: E402
from dit_quant_jax.calibrate.trajectory import random_calibration_set  # noqa: E402
from dit_quant_jax.diffusion import create_diffusion  # noqa: E402


def main(out_path):
  model, params = tiny_model_and_params()
  noise, labels = pipeline.noise_and_labels(model, 2, seed=3)
  images = pipeline.generate(model, params, noise, labels, respacing="ddim4", sampler="ddpm",
                             cfg_scale=2.0, seed=5, batch_size=8)
  traj = random_calibration_set(model, params, create_diffusion("ddim3"), 4, jax.random.PRNGKey(7),
                                cfg_scale=2.0)
  # VQ4DiT calibration (block-wise, optax) with its batch sharded over the devices.
  qconfig = config_spec.load("configs/vq4dit.py:tiny", {
      "calibration.steps": 4, "calibration.checkpoint_every": 0, "calib.num_samples": 4,
      "calib.timestep_respacing": "ddim2", "kmeans.num_iters": 5})
  qparams, report = api.quantize(model, params, qconfig)
  kernel = qparams["blocks_0"]["mlp"]["fc1"]["kernel"].dequantize()
  losses = report["calibration"]["loss_curve"]
  np.savez(out_path, images=images, traj_x=np.asarray(traj["x"]), devices=len(jax.devices()),
           vq_kernel=np.asarray(kernel), vq_losses=np.asarray(losses))


if __name__ == "__main__":
  main(sys.argv[1])
