"""Training config for the embedded default: a small class-conditional pixel-space DiT on
Fashion-MNIST (32x32x1, patch 4 -> 64 tokens).

  python experiments/train.py --config=configs/fmnist_dit.py --workdir=runs/fmnist_dit
  python experiments/train.py --config=configs/fmnist_dit.py:tiny ...   # seconds, for tests

The model size was chosen by measurement so that the main job (quantize with several
methods, sample, score) fits in about 10 minutes on a 2-core CPU (see checkpoints/fmnist_dit/README.md).
"""

import ml_collections


def get_config(arg: str = "default"):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ""  # "" -> $FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist

  config.model = ml_collections.ConfigDict()
  config.model.name = ml_collections.FieldReference(None, field_type=str)  # no zoo name: overrides only
  config.model.overrides = ml_collections.ConfigDict(dict(
      input_size=32,
      in_channels=1,
      patch_size=4,           # 64 tokens
      hidden_size=128,
      depth=4,
      num_heads=4,
      mlp_ratio=4.0,
      num_classes=10,
      class_dropout_prob=0.1,  # official
      learn_sigma=True,        # official
      cfg_channels=None,       # 1-channel images: guide the epsilon channel only
  ))
  config.diffusion_steps = 1000

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3   # official 1e-4 at batch 256 for 400k+ steps; a short CPU run needs more
  config.optimizer.warmup_steps = 100
  config.optimizer.beta1 = 0.9
  config.optimizer.beta2 = 0.999
  config.optimizer.weight_decay = 0.0     # official: AdamW with weight_decay 0
  config.optimizer.grad_clip_norm = 1.0

  config.ema_decay = 0.999
  config.ema_warmup = True
  config.batch_size = 32
  config.num_steps = 10000
  config.log_every = 100
  config.checkpoint_every = 500
  config.keep_checkpoints = 2

  if arg == "tiny":
    config.model.overrides.update(dict(patch_size=8, hidden_size=32, depth=2, num_heads=2))
    config.batch_size = 8
    config.num_steps = 6
    config.log_every = 2
    config.checkpoint_every = 3
    config.optimizer.warmup_steps = 1
  elif arg != "default":
    raise ValueError(f"unknown fmnist_dit config {arg!r}; expected 'default' or 'tiny'")
  return config
