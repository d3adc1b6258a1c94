"""The papers' DiT-XL/2 settings, run from a converted official checkpoint.

  python experiments/dit_xl2.py --config=configs/dit_xl2.py:256-250-1.5-50k \
      --config.model=ckpt/dit_xl2_256 --config.vae=sd-vae-ft-ema/ \
      [--config.quant_spec=configs/vq4dit.py:w2] --output=runs/xl2/vq4dit_w2

arg = "<resolution>-<DDPM steps>-<cfg scale>-<samples>", resolution in {256, 512}, steps in
{50, 100, 250}, cfg in {1.5, 4.0}, samples in {10k, 50k} (VQ4DiT reports 50/100/250 steps at
cfg 1.5; HQ-DiT 250 steps; the DiT paper's FID-50K uses 250 DDPM steps, cfg 1.5).
"""

import ml_collections

RESOLUTIONS = (256, 512)
STEPS = (50, 100, 250)
CFG_SCALES = (1.5, 4.0)
SAMPLES = {"10k": 10_000, "50k": 50_000}
NUM_CLASSES = 1000  # ImageNet
LATENT_DOWNSAMPLE = 8  # SD VAE: 256x256 image <-> 32x32x4 latent


def get_config(arg: str = "256-250-1.5-50k"):
  try:
    res, steps, cfg, samples = arg.split("-")
    res, steps, cfg = int(res), int(steps), float(cfg)
    if res not in RESOLUTIONS or steps not in STEPS or cfg not in CFG_SCALES or samples not in SAMPLES:
      raise ValueError
  except ValueError:
    raise ValueError(f"bad DiT-XL/2 setting {arg!r}: expected <{RESOLUTIONS}>-<{STEPS}>-<{CFG_SCALES}>-"
                     f"<{sorted(SAMPLES)}>, e.g. 256-250-1.5-50k") from None
  c = ml_collections.ConfigDict()
  c.model = f"ckpt/dit_xl2_{res}"  # experiments/convert_checkpoint.py output
  c.expected_input_size = res // LATENT_DOWNSAMPLE
  c.vae = "sd-vae-ft-ema"  # diffusers folder or file of stabilityai/sd-vae-ft-ema (or -mse)
  c.quant_spec = ""  # "" = FP; else a quantization config spec, e.g. configs/hqdit.py:w4a4
  c.quant_dir = ""  # where the quantized checkpoint goes (default: <output>/quant)
  c.num_samples = SAMPLES[samples]
  c.respacing = str(steps)  # DDPM steps, official respacing
  c.sampler = "ddpm"
  c.cfg_scale = cfg
  c.seed = 0
  c.batch_size = 64  # latents per sampling batch (sharded over local devices)
  c.vae_batch_size = 32
  c.shard_size = 1000  # samples per resumable shard on disk
  c.compute_dtype = "bfloat16"  # DiT and VAE compute dtype on GPU ('float32' for exactness)
  return c
