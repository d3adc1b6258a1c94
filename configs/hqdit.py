"""HQ-DiT and integer baselines: ``get_config(arg)`` for ``hqdit.quantize_from_config``.

arg (``--config=configs/hqdit.py:w4a4``):
  w4a4      HQ-DiT: FP4 weights and activations, hybrid format selection, clip search,
            Hadamard, GPTQ (every component switchable below).
  w4a8      FP4 weights (as w4a4), FP8 E4M3 per-token activations.
  w8a8      FP8 E4M3 weights (per-channel, clip search) and activations (per-token).
  w4a16     FP4 weights only (HQ-DiT weight pipeline), FP activations.
  int8      RTN baseline: INT8 per-channel max-scaled weights, INT8 per-token activations.
  int4      RTN baseline: INT4 weights and activations, same scheme.
  fp4_noh   FP4 E2M1 weights and activations, max scaling, no Hadamard, no GPTQ, no search.
  int4_had  QuaRot-style INT4: Hadamard + GPTQ + clip search on the INT4 grid (isolates
            the effect of the FP formats against w4a4).
  int2w / int3w / int4w   RTN weight-only per-channel INT-b (VQ4DiT report baselines).
  sq_w8a8 / sq_w4a8   SmoothQuant (quant/smoothquant.py): INT8 or INT4 per-channel RTN
            weights, INT8 per-token activations, per-layer smoothing with alpha searched.
  svdq_w4a4 SVDQuant-style: smoothing, a rank-``lowrank.rank`` bf16 branch W = L1 L2 + R
            (quant/lowrank.py), the residual R through the full HQ-DiT W4A4 path.
"""

from __future__ import annotations

import ml_collections

from dit_quant_jax.quant import rules

SETTINGS = ("w4a4", "w4a8", "w8a8", "w4a16", "int8", "int4", "fp4_noh", "int4_had",
            "int2w", "int3w", "int4w", "sq_w8a8", "sq_w4a8", "svdq_w4a4")
FP4_CANDIDATES = ("e1m2", "e2m1", "e3m0")


def _hqdit_base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "hqdit"  # dispatch key of dit_quant_jax/api.py
  c.name = "w4a4"
  # Regexes on linear-layer paths (quant/rules.py); default: every linear inside the DiT
  # blocks (qkv, proj, fc1, fc2, adaLN); embedders and final layer stay FP.
  c.layer_patterns = list(rules.DIT_BLOCK_LINEARS)

  c.weight = ml_collections.ConfigDict()
  c.weight.format = "auto"  # 'auto' (select below) or a fixed name: e2m1, int4, fp8_e4m3, ...
  c.weight.candidates = FP4_CANDIDATES  # formats 'auto' chooses among, per layer
  # 'ratio': this project's reading of the paper's max/min-ratio rule (quant/hqdit.py doc; the
  # paper gives no formula), or 'mse' (smallest quantization error).  Both picks are reported.
  c.weight.select = "ratio"
  c.weight.ratio_thresholds = None  # None: the candidates' dynamic ranges (E1M2 7, E2M1 12)
  c.weight.clip_search = True  # per-output-channel clip ratio by smallest weight MSE
  c.weight.clip_min = 0.5  # smallest clip ratio of the max tried
  c.weight.clip_count = 11  # candidates evenly spaced in [clip_min, 1] (0.05 steps)

  c.act = ml_collections.ConfigDict()
  c.act.format = "auto"  # 'auto', a fixed name, or None (weight-only quantization)
  c.act.candidates = FP4_CANDIDATES
  c.act.select = "ratio"  # 'ratio' or 'mse' (on calibration rows)
  c.act.ratio_thresholds = None
  c.act.default_format = "e2m1"  # 'auto' without calibration data falls back to this
  c.act.granularity = "per_token"  # 'per_token' dynamic scales, or 'per_tensor' static (calibrated
  #                                  over all timesteps; drift across t is reported)
  c.act.clip_search = True  # one clip ratio per layer by smallest MSE on calibration rows
  c.act.clip_min = 0.5
  c.act.clip_count = 11

  c.hadamard = ml_collections.ConfigDict()
  c.hadamard.enabled = True  # online randomized Hadamard on every quantized layer's input
  c.hadamard.seed = 0  # layer i uses seed * 100003 + i (recorded in the weight's metadata)
  # 'hadamard': a real Hadamard block (Paley/Sylvester) for widths like 1152 = 36 * 32;
  # 'random': a Haar-random orthogonal block for the odd factor (quant/hadamard.py).
  c.hadamard.block = "hadamard"

  c.smooth = ml_collections.ConfigDict()
  c.smooth.enabled = False  # SmoothQuant per-input-channel migration x/s, diag(s) W
  c.smooth.alphas = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # searched per layer by output error

  c.lowrank = ml_collections.ConfigDict()
  c.lowrank.rank = 0  # > 0: SVDQuant-style bf16 branch of this rank, residual quantized

  c.gptq = ml_collections.ConfigDict()
  c.gptq.enabled = True  # GPTQ on the chosen grid (needs calibration Hessians)
  c.gptq.damp = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ paper: 1%)
  c.gptq.block_size = 128  # lazy-batch block (GPTQ paper: 128)
  c.gptq.act_order = False  # process inputs by descending diag(H)

  c.attn_quant = ml_collections.ConfigDict()
  c.attn_quant.enabled = False  # also fake-quantize Q, K, V and softmax probs (per row)
  c.attn_quant.format = "e2m1"
  c.attn_quant.clip_ratio = 1.0

  c.calib = ml_collections.ConfigDict()
  c.calib.num_samples = 32  # images whose FP sampling trajectory is recorded
  c.calib.timestep_respacing = "ddim25"  # sampling steps of the calibration trajectory
  c.calib.sampler = "ddim"
  c.calib.cfg_scale = 1.5  # classifier-free guidance (batch doubled: cond + null class)
  c.calib.samples_per_step = 64  # input rows kept per layer and step (MSE searches)
  c.calib.max_samples = 1024  # rows kept per layer in total
  c.calib.batch_size = ml_collections.config_dict.placeholder(int)  # split steps' batches
  c.calib.seed = 0
  # 'quantized': each unit is calibrated (clip search, GPTQ Hessian, activation ranges) on
  # the inputs produced with every earlier unit already quantized (GPTQ-style sequential
  # calibration); 'fp': every layer on the FP model's inputs.
  c.calib.inputs = "quantized"
  c.calib.sequential_unit = "block"  # 'block' (one DiT block at a time) or 'layer'
  return c


def get_config(arg: str = "w4a4") -> ml_collections.ConfigDict:
  if arg not in SETTINGS:
    raise ValueError(f"unknown HQ-DiT setting {arg!r}; known: {SETTINGS}")
  c = _hqdit_base()
  c.name = arg
  if arg == "w4a4":
    pass
  elif arg == "w4a8":
    c.act.format = "fp8_e4m3"
  elif arg == "w8a8":
    c.weight.format = "fp8_e4m3"
    c.act.format = "fp8_e4m3"
    c.hadamard.enabled = False  # 8-bit needs no outlier spreading
    c.gptq.enabled = False
  elif arg == "w4a16":
    c.act.format = None
  elif arg in ("int8", "int4"):
    bits = arg[-1]
    c.weight.format = f"int{bits}"
    c.act.format = f"int{bits}"
    c.weight.clip_search = False
    c.act.clip_search = False
    c.hadamard.enabled = False
    c.gptq.enabled = False
  elif arg == "fp4_noh":
    c.weight.format = "e2m1"
    c.act.format = "e2m1"
    c.weight.clip_search = False
    c.act.clip_search = False
    c.hadamard.enabled = False
    c.gptq.enabled = False
  elif arg == "int4_had":
    c.weight.format = "int4"
    c.act.format = "int4"
  elif arg in ("sq_w8a8", "sq_w4a8"):
    c.weight.format = "int8" if arg == "sq_w8a8" else "int4"
    c.act.format = "int8"
    c.weight.clip_search = False  # SmoothQuant: max-scaled RTN weights
    c.act.clip_search = False
    c.hadamard.enabled = False
    c.gptq.enabled = False
    c.smooth.enabled = True
  elif arg == "svdq_w4a4":
    c.smooth.enabled = True
    c.lowrank.rank = 16
  elif arg in ("int2w", "int3w", "int4w"):
    c.weight.format = f"int{arg[3]}"
    c.act.format = None
    c.weight.clip_search = False
    c.hadamard.enabled = False
    c.gptq.enabled = False
  return c
