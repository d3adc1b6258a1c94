"""VQ4DiT: ``get_config(arg)`` for ``calibrate.vq_calibrate.quantize_from_config``.

arg (``--config=configs/vq4dit.py:w2``):
  w2          k = 256 codewords of d = 4 weights: log2(256)/4 = 2 bits/weight (public sample_quant.py w_bit=2).
  w3          k = 64, d = 2: log2(64)/2 = 3 bits per weight (public code sample_quant.py, w_bit=3).
  w4          k = 256, d = 2: 4 bits per weight.
  kmeans_w2   w2 codebooks and nearest-codeword assignments, no calibration (ablation row).
  kmeans_w3   likewise for w3.
  kmeans_w4   likewise for w4.
  finetune_w2 w2 with every layer hard from the start (the k-means assignments) and the whole
              budget fine-tuning codebooks and biases on the end-to-end loss, lr 1e-3 (not in
              the public code; results/vq4dit_ablation.md: best at the main job's budget).
  finetune_w3 likewise for w3.
  w2a4        w2 weights with dynamic per-token FP4 (E2M1) activations: the combination
              not in the public code (activations quantized on the fly in VQWeight.linear).
  tiny        w2 with a short calibration, for smoke tests on small models.
Any other (k, d) is a matter of setting ``codebook_size`` and ``subvector_dim``.
"""

from __future__ import annotations

import ml_collections

from dit_quant_jax.quant import rules

# (codebook_size k, subvector_dim d) of each bit width.
BIT_SETTINGS = {"w2": (256, 4), "w3": (64, 2), "w4": (256, 2)}
SETTINGS = ("w2", "w3", "w4", "kmeans_w2", "kmeans_w3", "kmeans_w4", "finetune_w2", "finetune_w3", "w2a4",
            "tiny")
# finetune_*: codebook and bias learning rates of the fine-tune (10x the public code's 1e-4;
# measured: configs/sweeps.py VQ_BEYOND, results/vq4dit_ablation.md).
FINETUNE_CODEBOOK_LR = 1e-3
FINETUNE_BIAS_LR = 1e-3


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "vq4dit"  # dispatch key of dit_quant_jax/api.py
  c.name = "w2"
  # Regexes on linear-layer paths (quant/rules.py); default: every linear inside the DiT
  # blocks (qkv, proj, fc1, fc2, adaLN); embedders and final layer stay FP.
  c.layer_patterns = list(rules.DIT_BLOCK_LINEARS)

  c.codebook_size = 256  # k codewords per layer (clamped per layer to a power of two <= #sub-vectors/4)
  c.subvector_dim = 4  # d consecutive input-channel weights per sub-vector; bits/weight = log2(k)/d
  c.num_candidates = 2  # n nearest codewords per sub-vector mixed by learnable ratios (public code: 2; 1..4)

  c.kmeans = ml_collections.ConfigDict()
  c.kmeans.num_iters = 100  # Lloyd iterations (public code: 100)
  c.kmeans.tol = 0.0  # stop when an iteration lowers the objective by <= tol * objective (0: fixed point)
  c.kmeans.seed = 0  # layer i seeds k-means++ with seed + i
  c.kmeans.chunk_elements = 1 << 24  # distance block bound (points x codewords) per step: memory knob

  # Calibration of ratio logits, codebooks and biases (calibrate/vq_calibrate.py).  Defaults:
  # the public VQ4DiT code (github.com/dengjuncan/VQ4DiT); the alternative values of the six
  # options marked [difference] are our earlier procedure (configs/sweeps.py:vq_ablation).
  c.calibration = ml_collections.ConfigDict()
  c.calibration.steps = 1000  # optimisation steps, one per FP sampling step (public: 50 per trajectory)
  # [difference 1] 'after_hard': a layer's codebook trains only once its assignments went hard
  # (CompressedLinear.py requires_grad=False until freeze_sim); 'always': from step 0 (ours).
  c.calibration.codebook_schedule = "after_hard"
  # [difference 2] 'end_to_end': the quantized model runs whole on the FP x_t, loss = mean over
  # blocks of block-output MSE, gradients through earlier quantized blocks (public hooks);
  # 'fp_input': each block fed its FP input with stop-gradient (ours).
  c.calibration.loss = "end_to_end"
  # [difference 3] train the biases of quantized layers (public: RMSprop lr 1e-4); False: fixed.
  c.calibration.train_biases = True
  # [difference 4] regulariser added only when above its running minimum within the current
  # trajectory, averaged over the layers still soft (gaussian_diffusion.py loss_softmax_old);
  # ours: 'always' + 'all_layers' (hardened layers count 0).
  c.calibration.regularizer_gate = "above_running_min"
  c.calibration.regularizer_average = "soft_layers"
  # [difference 6] the public code runs the student in train mode, so class_dropout_prob of
  # its labels drop to the null class while the FP targets keep them.  Off: the targets are
  # conditional outputs, and asking the quantized model to match them from the null-class
  # embedding is label noise in the loss, not part of the method as described.
  c.calibration.label_dropout = False
  c.calibration.optimizer = "rmsprop"  # 'rmsprop' (public code), 'adam' or 'sgd'
  c.calibration.codebook_lr = 1e-4  # public code: RMSprop lr for codebooks
  c.calibration.logits_lr = 5e-2  # public code: RMSprop lr for the ratio logits
  c.calibration.bias_lr = 1e-4  # public code: RMSprop lr for the biases
  c.calibration.rmsprop_decay = 0.9  # public code: RMSprop alpha = 0.9
  c.calibration.optimizer_eps = 1e-8  # torch RMSprop default eps (added outside the square root)
  c.calibration.lambda_r = 1.0  # weight of the ratio regulariser (public code: 1)
  c.calibration.regularizer = "public"  # 'public': n * mean r(1-r); 'paper': sum(1-|2r-1|) / #sub-vectors
  c.calibration.freeze_threshold = 0.99  # freeze a sub-vector once its largest ratio exceeds this
  c.calibration.layer_hard_threshold = 0.99  # a layer with more frozen than this goes fully hard
  c.calibration.freeze_every = 1  # check freezing every this many steps
  # Not in the public code (None there): force every layer hard at this fraction of the steps,
  # leaving the rest of the budget to fine-tune codebooks and biases end to end.
  c.calibration.harden_at = ml_collections.config_dict.placeholder(float)
  c.calibration.seed = 0  # RNG of label dropout
  c.calibration.log_every = 10  # absl log line (loss, frozen fraction per layer, ETA) every N steps
  c.calibration.checkpoint_every = 100  # orbax checkpoint of the whole state every N steps (0: never)
  c.calibration.checkpoints_to_keep = 2

  # The FP sampling trajectory that calibration runs on (calibrate/trajectory.py), built by
  # the experiment script: num_samples images, their inputs at every sampling step.
  # Activation quantization of the VQ layers' inputs (dynamic, per token); None = FP.
  c.act = ml_collections.ConfigDict()
  c.act.format = ml_collections.FieldReference(None, field_type=str)  # e.g. 'e2m1', 'e1m2', 'int4'
  c.act.clip_ratio = 1.0  # per-token scale = clip_ratio * absmax / format max

  # The FP trajectories calibration runs on, drawn on the fly (calibrate/trajectory.py).
  c.calib = ml_collections.ConfigDict()
  c.calib.num_samples = 4  # images per trajectory (public code: 4 random classes), + null copies under CFG
  c.calib.timestep_respacing = "50"  # public code: 50 DDPM sampling steps = optimisation steps per trajectory
  c.calib.sampler = "ddpm"
  c.calib.cfg_scale = 4.0  # public code's default; ours was 1.5 (batch doubled: cond + null class)
  # [difference 5] a fresh trajectory (new noise, labels stratified over classes) after every
  # trajectory (public sample_quant.py); False: trajectory 0 again and again (ours: one fixed set).
  c.calib.fresh_trajectories = True
  c.calib.seed = 0  # noise, labels and sampler noise of every trajectory
  return c


def get_config(arg: str = "w2") -> ml_collections.ConfigDict:
  if arg not in SETTINGS:
    raise ValueError(f"unknown VQ4DiT setting {arg!r}; known: {SETTINGS}")
  c = _base()
  c.name = arg
  bits = arg.replace("kmeans_", "").replace("finetune_", "") if arg not in ("tiny", "w2a4") else "w2"
  if arg == "w2a4":
    c.act.format = "e2m1"
  c.codebook_size, c.subvector_dim = BIT_SETTINGS[bits]
  if arg.startswith("finetune_"):
    c.calibration.harden_at = 0.0
    c.calibration.codebook_lr = FINETUNE_CODEBOOK_LR
    c.calibration.bias_lr = FINETUNE_BIAS_LR
  if arg.startswith("kmeans_"):
    c.calibration.steps = 0  # k-means only: nearest codeword, no calibration
  if arg == "tiny":
    c.kmeans.num_iters = 20
    c.calibration.steps = 20
    c.calibration.log_every = 5
    c.calibration.checkpoint_every = 10
    c.calib.num_samples = 2
    c.calib.timestep_respacing = "10"  # a new trajectory every 10 steps
  return c
