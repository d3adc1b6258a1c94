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


def get_config(arg: str = "vq_bits_lambda"):
  c = _base(arg)
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
    raise ValueError(f"unknown sweep {arg!r}; expected vq_bits_lambda, vq_w2_investigation, "
                     "vq_candidates, hqdit_ablation, hqdit_bits or tiny")
  return c
