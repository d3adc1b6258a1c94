"""VQ4DiT: ``get_config(arg)`` for ``quant.vq4dit.quantize_from_config`` / ``kmeans_only``.

arg (``--config=configs/vq4dit.py:w2``):
  w2          k = 256 codewords of d = 4 weights: log2(256)/4 = 2 bits per weight (paper W2).
  w3          k = 64, d = 2: log2(64)/2 = 3 bits per weight (paper W3).
  w4          k = 256, d = 2: 4 bits per weight.
  kmeans_w2   w2 codebooks and nearest-codeword assignments, no calibration (ablation row).
  kmeans_w3   likewise for w3.
  kmeans_w4   likewise for w4.
  w2a4        w2 weights with dynamic per-token FP4 (E2M1) activations: the combination
              neither paper tried (activations quantized on the fly in VQWeight.linear).
  tiny        w2 with a short calibration, for smoke tests on small models.
Any other (k, d) is a matter of setting ``codebook_size`` and ``subvector_dim``.
"""

from __future__ import annotations

import ml_collections

from dit_quant_jax.quant import rules

# (codebook_size k, subvector_dim d) of each bit width.
BIT_SETTINGS = {"w2": (256, 4), "w3": (64, 2), "w4": (256, 2)}
SETTINGS = ("w2", "w3", "w4", "kmeans_w2", "kmeans_w3", "kmeans_w4", "w2a4", "tiny")


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "vq4dit"  # dispatch key of dit_quant_jax/api.py
  c.name = "w2"
  # Regexes on linear-layer paths (quant/rules.py); default: every linear inside the DiT
  # blocks (qkv, proj, fc1, fc2, adaLN); embedders and final layer stay FP.
  c.layer_patterns = list(rules.DIT_BLOCK_LINEARS)

  c.codebook_size = 256  # k codewords per layer (clamped per layer to a power of two <= #sub-vectors/4)
  c.subvector_dim = 4  # d consecutive input-channel weights per sub-vector; bits/weight = log2(k)/d
  c.num_candidates = 2  # n nearest codewords per sub-vector mixed by learnable ratios (paper: 2; 1..4)

  c.kmeans = ml_collections.ConfigDict()
  c.kmeans.num_iters = 100  # Lloyd iterations (public code: 100)
  c.kmeans.tol = 0.0  # stop when an iteration lowers the objective by <= tol * objective (0: fixed point)
  c.kmeans.seed = 0  # layer i seeds k-means++ with seed + i
  c.kmeans.chunk_elements = 1 << 24  # distance block bound (points x codewords) per step: memory knob

  # Block-wise calibration of codebooks and ratio logits (calibrate/vq_calibrate.py).
  c.calibration = ml_collections.ConfigDict()
  c.calibration.steps = 1000  # optimisation steps (each on one trajectory step, cycling through them)
  c.calibration.batch_size = ml_collections.config_dict.placeholder(int)  # samples per step; None: whole batch
  c.calibration.optimizer = "rmsprop"  # 'rmsprop' (public code), 'adam' or 'sgd'
  c.calibration.codebook_lr = 1e-4  # public code: RMSprop lr for codebooks
  c.calibration.logits_lr = 5e-2  # public code: RMSprop lr for the ratio logits
  c.calibration.rmsprop_decay = 0.9  # public code: RMSprop alpha = 0.9
  c.calibration.optimizer_eps = 1e-8  # torch RMSprop default eps (added outside the square root)
  c.calibration.lambda_r = 1.0  # weight of the ratio regulariser
  c.calibration.regularizer = "public"  # 'public': n * mean r(1-r); 'paper': sum(1-|2r-1|) / #sub-vectors
  c.calibration.freeze_threshold = 0.99  # freeze a sub-vector once its largest ratio exceeds this
  c.calibration.layer_hard_threshold = 0.99  # a layer with more frozen than this goes fully hard
  c.calibration.freeze_every = 1  # check freezing every this many steps
  c.calibration.seed = 0  # RNG of the per-step sample subsets
  c.calibration.log_every = 10  # absl log line (loss, frozen fraction per layer, ETA) every N steps
  c.calibration.checkpoint_every = 100  # orbax checkpoint of the whole state every N steps (0: never)
  c.calibration.checkpoints_to_keep = 2

  # The FP sampling trajectory that calibration runs on (calibrate/trajectory.py), built by
  # the experiment script: num_samples images, their inputs at every sampling step.
  # Activation quantization of the VQ layers' inputs (dynamic, per token); None = FP.
  c.act = ml_collections.ConfigDict()
  c.act.format = ml_collections.FieldReference(None, field_type=str)  # e.g. 'e2m1', 'e1m2', 'int4'
  c.act.clip_ratio = 1.0  # per-token scale = clip_ratio * absmax / format max

  c.calib = ml_collections.ConfigDict()
  c.calib.num_samples = 4  # public code: 4 random classes per trajectory
  c.calib.timestep_respacing = "50"  # public code: 50 DDPM sampling steps
  c.calib.sampler = "ddpm"
  c.calib.cfg_scale = 1.5  # CFG of the trajectory (batch doubled: cond + null class); public code default 4.0
  c.calib.seed = 0
  return c


def get_config(arg: str = "w2") -> ml_collections.ConfigDict:
  if arg not in SETTINGS:
    raise ValueError(f"unknown VQ4DiT setting {arg!r}; known: {SETTINGS}")
  c = _base()
  c.name = arg
  bits = arg.replace("kmeans_", "") if arg not in ("tiny", "w2a4") else "w2"
  if arg == "w2a4":
    c.act.format = "e2m1"
  c.codebook_size, c.subvector_dim = BIT_SETTINGS[bits]
  if arg.startswith("kmeans_"):
    c.calibration.steps = 0  # k-means only: nearest codeword, no calibration
  if arg == "tiny":
    c.kmeans.num_iters = 20
    c.calibration.steps = 20
    c.calibration.log_every = 5
    c.calibration.checkpoint_every = 10
    c.calib.num_samples = 2
    c.calib.timestep_respacing = "10"
  return c
