"""Sweep definitions: method x bits x one hyperparameter, run by experiments/sweep.py.

  python experiments/sweep.py --sweep=configs/sweeps.py:vq_bits_lambda --output=runs/sweeps/vq
  python experiments/aggregate.py --sweep_dir=runs/sweeps/vq

Each axis is a list of (label, choice) pairs; a choice may set ``spec`` (the quantization
config, file:arg) and any dotted overrides of it.  The runs are the product of the axes.
"""

import ml_collections


def _base(arg):
  c = ml_collections.ConfigDict()
  c.name = arg
  c.model = "checkpoints/fmnist_dit"
  c.sampling = ml_collections.ConfigDict(dict(per_class=25, respacing="ddim25", sampler="ddim",
                                              cfg_scale=3.0, seed=0, batch_size=250))
  return c


# VQ4DiT ablation (configs/vq4dit.py, calibrate/vq_calibrate.py): the public code's procedure
# (the config default) and each of the six differences from our earlier procedure switched
# back, one at a time; "ours_all" switches all six.
VQ_BITS = [("w2", {"spec": "configs/vq4dit.py:w2"}), ("w3", {"spec": "configs/vq4dit.py:w3"})]
VQ_VARIANTS = [
    ("public", {}),
    ("d1_codebook_always", {"calibration.codebook_schedule": "always"}),
    ("d2_fp_input_loss", {"calibration.loss": "fp_input"}),
    ("d3_fixed_biases", {"calibration.train_biases": False}),
    ("d4_reg_always", {"calibration.regularizer_gate": "always", "calibration.regularizer_average": "all_layers"}),
    ("d5_fixed_set_cfg1.5", {"calib.fresh_trajectories": False, "calib.cfg_scale": 1.5}),
    ("d6_label_dropout", {"calibration.label_dropout": True}),
    ("ours_all", {"calibration.codebook_schedule": "always", "calibration.loss": "fp_input",
                  "calibration.train_biases": False, "calibration.regularizer_gate": "always",
                  "calibration.regularizer_average": "all_layers", "calib.fresh_trajectories": False,
                  "calib.cfg_scale": 1.5}),
]
# Difference 5 has two halves; each switched back alone (the d5 row above switches both).
VQ_D5_SPLIT = [
    ("d5a_fixed_set", {"calib.fresh_trajectories": False}),
    ("d5b_cfg1.5", {"calib.cfg_scale": 1.5}),
]
# Beyond the public code: every layer hard from the start (the k-means assignments), and the
# whole budget fine-tunes codebooks (and biases) on the end-to-end loss, at a higher codebook lr;
# harden_at0.5: half the budget soft (public procedure), then forced hard and fine-tuned.
VQ_BEYOND = [
    ("finetune_cb1e-3", {"calibration.harden_at": 0.0, "calibration.codebook_lr": 1e-3}),
    ("finetune_cb1e-3_bias1e-3", {"calibration.harden_at": 0.0, "calibration.codebook_lr": 1e-3,
                                  "calibration.bias_lr": 1e-3}),
    ("harden_at0.5", {"calibration.harden_at": 0.5}),
]
# The main job's calibration budget (configs/reproduce.py calibration_overrides) and longer ones.
VQ_BUDGETS = [(f"steps{n}", {"calibration.steps": n, "calib.num_samples": 8}) for n in (150, 600, 1000)]


def _vq_sweep(c, bits, variants, budgets):
  c.axes = [list(bits), list(variants), list(budgets)]
  return c


def get_config(arg: str = "vq_bits_lambda"):
  c = _base(arg)
  if arg == "vq_ablation":  # the whole grid: bits x (public, 6 differences, ours, beyond) x budgets
    return _vq_sweep(c, VQ_BITS, VQ_VARIANTS + VQ_D5_SPLIT + VQ_BEYOND, VQ_BUDGETS)
  if arg == "vq_d5_split_150":  # the two halves of difference 5, at W2 and W3, main job's budget
    return _vq_sweep(c, VQ_BITS, VQ_D5_SPLIT, VQ_BUDGETS[:1])
  if arg == "vq_w3_ablation_150":  # W3 one-at-a-time ablations at the main job's budget
    return _vq_sweep(c, VQ_BITS[1:], VQ_VARIANTS[1:], VQ_BUDGETS[:1])
  if arg == "vq_public_budget":  # the public procedure at the longer budgets, W2 and W3
    return _vq_sweep(c, VQ_BITS, VQ_VARIANTS[:1], VQ_BUDGETS[1:])
  if arg in ("vq_seed_150", "vq_seed_1000"):  # run-to-run spread of the public procedure:
    # other trajectory noise / labels and dropout RNG, the same k-means start
    budgets = VQ_BUDGETS[:1] if arg.endswith("150") else VQ_BUDGETS[2:]
    return _vq_sweep(c, VQ_BITS, [(f"public_seed{i}", {"calib.seed": i, "calibration.seed": i})
                                  for i in (1, 2)], budgets)
  if arg == "vq_ablation_600":  # the same rows at the middle budget
    return _vq_sweep(c, VQ_BITS, VQ_VARIANTS[1:] + VQ_BEYOND[:2], VQ_BUDGETS[1:2])
  if arg == "vq_ablation_1000":  # one-at-a-time and beyond-the-code rows at the longest budget
    return _vq_sweep(c, VQ_BITS, VQ_VARIANTS[1:] + VQ_BEYOND[:2], VQ_BUDGETS[2:])
  if arg == "vq_ablation_150":  # what results/vq4dit_ablation.md ran: one-at-a-time at the main job's budget
    return _vq_sweep(c, VQ_BITS, VQ_VARIANTS + VQ_BEYOND, VQ_BUDGETS[:1])
  if arg == "vq_headline":  # the public procedure and the fine-tune variants at the main job's budget
    return _vq_sweep(c, VQ_BITS, VQ_VARIANTS[:1] + VQ_BEYOND, VQ_BUDGETS[:1])
  if arg == "vq_w2_beyond":
    return _vq_sweep(c, VQ_BITS[:1], VQ_BEYOND[:2], VQ_BUDGETS[:1])
  if arg == "vq_w3_beyond":
    return _vq_sweep(c, VQ_BITS[1:], VQ_BEYOND[:2], VQ_BUDGETS[:1])
  if arg == "vq_w3_finetune_bias":
    return _vq_sweep(c, VQ_BITS[1:], VQ_BEYOND[1:2], VQ_BUDGETS[:1])
  if arg in ("vq_w2_ablation_150_part1", "vq_w2_ablation_150_part2"):  # the W2 ablation in two processes
    part = [4, 2, 1, 6] if arg.endswith("part1") else [5, 3, 7]
    return _vq_sweep(c, VQ_BITS[:1], [VQ_VARIANTS[i] for i in part], VQ_BUDGETS[:1])
  if arg == "vq_w2_ablation_150":  # W2 one-at-a-time ablations at the main job's budget
    return _vq_sweep(c, VQ_BITS[:1], VQ_VARIANTS, VQ_BUDGETS[:1])
  if arg == "vq_w2_finetune_1000":
    return _vq_sweep(c, VQ_BITS[:1], VQ_BEYOND[1:2], VQ_BUDGETS[2:])
  if arg == "vq_w2_1000":
    return _vq_sweep(c, VQ_BITS[:1], VQ_VARIANTS[:1], VQ_BUDGETS[2:])
  if arg == "vq_budget":  # longer budgets for the public procedure and the fine-tune variants
    return _vq_sweep(c, VQ_BITS, VQ_VARIANTS[:1] + VQ_BEYOND, VQ_BUDGETS[1:])
  if arg == "vq_bits_lambda":  # VQ4DiT: bits x ratio-regulariser weight
    c.axes = [
        [("w2", {"spec": "configs/vq4dit.py:w2"}), ("w3", {"spec": "configs/vq4dit.py:w3"})],
        [("lam0.01", {"calibration.lambda_r": 0.01}), ("lam0.1", {"calibration.lambda_r": 0.1}),
         ("lam1", {"calibration.lambda_r": 1.0})],
        [("steps150", {"calibration.steps": 150, "calib.num_samples": 8})],
    ]
  elif arg == "vq_w2_investigation":  # why W2 calibration trails k-means on FD (closing notes)
    c.axes = [
        [("w2", {"spec": "configs/vq4dit.py:w2", "calib.num_samples": 8})],
        [("lam0.1_steps150", {"calibration.lambda_r": 0.1, "calibration.steps": 150}),
         ("lam1_steps600", {"calibration.lambda_r": 1.0, "calibration.steps": 600}),
         ("lam0.1_steps600", {"calibration.lambda_r": 0.1, "calibration.steps": 600})],
    ]
  elif arg == "vq_candidates":  # VQ4DiT W2: number of candidate codewords
    c.axes = [
        [("w2", {"spec": "configs/vq4dit.py:w2", "calibration.steps": 150, "calib.num_samples": 8})],
        [(f"n{n}", {"num_candidates": n}) for n in (1, 2, 3)],
    ]
  elif arg == "hqdit_ablation":  # HQ-DiT W4A4 with each component switched off in turn,
    # plus the W4A8 integer baseline (INT4 weights, INT8 per-token activations).
    w4a4 = "configs/hqdit.py:w4a4"
    c.axes = [
        [("w4a4_full", {"spec": w4a4}),
         ("w4a4_mse_format", {"spec": w4a4, "weight.select": "mse", "act.select": "mse"}),
         ("w4a4_no_format_selection", {"spec": w4a4, "weight.format": "e2m1", "act.format": "e2m1"}),
         ("w4a4_no_clipping", {"spec": w4a4, "weight.clip_search": False, "act.clip_search": False}),
         ("w4a4_no_hadamard", {"spec": w4a4, "hadamard.enabled": False}),
         ("w4a4_no_gptq", {"spec": w4a4, "gptq.enabled": False}),
         ("int_w4a8", {"spec": "configs/hqdit.py:int8", "weight.format": "int4"})],
        [("cal8", {"calib.num_samples": 8})],
    ]
  elif arg == "hqdit_calibration":  # HQ-DiT W4A4: calibration inputs FP vs quantized predecessors
    w4a4 = {"spec": "configs/hqdit.py:w4a4", "calib.num_samples": 8}
    c.axes = [
        [("w4a4", w4a4)],
        [("fp_inputs", {"calib.inputs": "fp"}),
         ("seq_block", {"calib.inputs": "quantized", "calib.sequential_unit": "block"}),
         ("seq_layer", {"calib.inputs": "quantized", "calib.sequential_unit": "layer"})],
    ]
  elif arg == "hqdit_lowrank":  # SVDQuant-style W4A4: rank of the bf16 branch (size, FD, PSNR)
    svdq = {"spec": "configs/hqdit.py:svdq_w4a4", "calib.num_samples": 8}
    c.axes = [
        [("svdq_w4a4", svdq)],
        [(f"r{r}", {"lowrank.rank": r}) for r in (8, 16, 32, 64)]
        + [("r32_no_smooth", {"lowrank.rank": 32, "smooth.enabled": False})],
    ]
  elif arg == "hqdit_smoothquant":  # SmoothQuant: alpha searched per layer vs the paper's 0.5
    c.axes = [
        [("sq_w8a8", {"spec": "configs/hqdit.py:sq_w8a8"}),
         ("sq_w4a8", {"spec": "configs/hqdit.py:sq_w4a8"})],
        [("alpha_search", {}), ("alpha0.5", {"smooth.alphas": (0.5,)})],
        [("cal8", {"calib.num_samples": 8})],
    ]
  elif arg == "hqdit_bits":  # formats x activation bits
    c.axes = [
        [("w4a4", {"spec": "configs/hqdit.py:w4a4"}), ("w4a8", {"spec": "configs/hqdit.py:w4a8"}),
         ("int4", {"spec": "configs/hqdit.py:int4"}), ("int8", {"spec": "configs/hqdit.py:int8"})],
        [("cal8", {"calib.num_samples": 8})],
    ]
  elif arg == "tiny":  # tests: two tiny runs
    c.sampling = ml_collections.ConfigDict(dict(per_class=1, respacing="ddim3", sampler="ddim",
                                                cfg_scale=3.0, seed=0, batch_size=10))
    c.axes = [
        [("int8", {"spec": "configs/hqdit.py:int8"}), ("kmeans_w3", {"spec": "configs/vq4dit.py:kmeans_w3"})],
        [("cal", {"calib.num_samples": 2, "calib.timestep_respacing": "ddim3"})],
    ]
  else:
    raise ValueError(f"unknown sweep {arg!r}; expected vq_ablation, vq_ablation_150, vq_headline, vq_budget, "
                     "vq_bits_lambda, vq_w2_investigation, "
                     "vq_candidates, hqdit_ablation, hqdit_calibration, hqdit_lowrank, "
                     "hqdit_smoothquant, hqdit_bits or tiny")
  return c
