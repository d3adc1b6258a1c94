"""Sweeps: method x bits x hyperparameter grids run one after another, one json per run.

A sweep config (configs/sweeps.py) holds ``base`` (model, sampling), and ``axes``: a list of
axes, each a list of ``(label, {"spec": ..., dotted overrides...})`` choices; the sweep is
their Cartesian product (the last choice's spec wins; overrides merge).  Each run writes
``<sweep_dir>/<run>/result.json`` (config, quantization report, metrics); :func:`aggregate`
turns a sweep directory's jsons into one markdown table.  A run whose result.json exists is
skipped, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import time
from typing import Callable

from absl import logging

from dit_quant_jax import config_spec, pipeline
from dit_quant_jax.utils import atomic

RESULT_FILE = "result.json"
AGG_COLUMNS = ("run", "method", "fd", "is", "class_acc", "precision", "recall", "paired_psnr",
               "size_mb", "quant_time_s")


def expand(sweep) -> list[dict]:
  """The runs of a sweep: [{name, spec, overrides}] over the product of its axes."""
  runs = []
  axes = [list(axis) for axis in sweep.axes]
  for combo in itertools.product(*axes):
    name = "_".join(label for label, _ in combo)
    spec, overrides = None, {}
    for _, choice in combo:
      choice = dict(choice)
      spec = choice.pop("spec", spec)
      overrides.update(choice)
    if spec is None:
      raise ValueError(f"sweep run {name!r} has no 'spec' in any axis choice")
    runs.append(dict(name=name, spec=spec, overrides=overrides))
  return runs


def run_sweep(sweep, sweep_dir: str, progress: Callable[[str], None] = logging.info) -> list[str]:
  """Run (or resume) every run of ``sweep`` into ``sweep_dir``; returns the result paths.

  The sweep is validated first (every run's config).  A run whose result.json exists is
  skipped only when it records the same run config (spec, overrides, sampling, model);
  otherwise StaleOutputError names the difference.  A cut-off result.json is redone.
  """
  from dit_quant_jax import validation
  from dit_quant_jax.utils import provenance
  validation.check_sweep_config(sweep)
  runs = expand(sweep)
  os.makedirs(sweep_dir, exist_ok=True)
  fp_model, fp_params, _ = pipeline.load_dit(sweep.model)
  noise, labels = pipeline.noise_and_labels(fp_model, sweep.sampling.per_class, sweep.sampling.seed)
  kwargs = dict(respacing=sweep.sampling.respacing, sampler=sweep.sampling.sampler,
                cfg_scale=sweep.sampling.cfg_scale, seed=sweep.sampling.seed,
                batch_size=sweep.sampling.batch_size)
  fp_images = fp_outputs = None
  paths = []
  started = time.time()
  for index, run in enumerate(runs):
    run_dir = os.path.join(sweep_dir, run["name"])
    result_path = os.path.join(run_dir, RESULT_FILE)
    paths.append(result_path)
    run_config = dict(spec=run["spec"], overrides=run["overrides"],
                      sampling=sweep.sampling.to_dict(), model=sweep.model)
    previous = pipeline.read_report(result_path) if os.path.exists(result_path) else None
    if previous is not None:
      provenance.check_stamp(f"sweep result {result_path}", previous.get("provenance"), run_config,
                             f"a new --output, or delete {run_dir}")
      progress(f"[{index + 1}/{len(runs)}] {run['name']}: done already (same config)")
      continue
    progress(f"[{index + 1}/{len(runs)}] {run['name']} ({time.time() - started:.0f} s elapsed)")
    if fp_images is None:
      fp_images, fp_outputs = pipeline.generate(fp_model, fp_params, noise, labels,
                                                return_outputs=True, **kwargs)
    qconfig = config_spec.load(run["spec"], run["overrides"])
    report = pipeline.quantize_checkpoint(sweep.model, qconfig, os.path.join(run_dir, "quant"),
                                          reuse=True, fp_model_and_params=(fp_model, fp_params),
                                          override_flag=f"a new --output, or delete {run_dir}")
    model, qparams, _ = pipeline.load_dit(os.path.join(run_dir, "quant", "params"))
    images, outputs = pipeline.generate(model, qparams, noise, labels, return_outputs=True, **kwargs)
    metrics = pipeline.score(images, labels, fp_images, outputs, fp_outputs)
    pipeline.write_json(result_path, dict(run=run["name"], spec=run["spec"],
                                          overrides=run["overrides"], report=report, metrics=metrics,
                                          provenance=provenance.make_stamp(run_config)))
  return paths


def aggregate(sweep_dir: str) -> str:
  """Markdown table of every ``*/result.json`` under ``sweep_dir`` (also written to table.md)."""
  paths = sorted(glob.glob(os.path.join(sweep_dir, "*", RESULT_FILE)))
  if not paths:
    raise FileNotFoundError(f"no {RESULT_FILE} under {sweep_dir!r}: run the sweep first")
  lines = ["| " + " | ".join(AGG_COLUMNS) + " |", "|" + "---|" * len(AGG_COLUMNS)]
  for path in paths:
    with open(path) as f:
      result = json.load(f)
    metrics, report = result["metrics"], result["report"]
    values = dict(run=result["run"], method=report.get("setting", report.get("method")),
                  size_mb=report["size"]["total_mb"], quant_time_s=report.get("wall_time_s"),
                  **metrics)
    cells = []
    for column in AGG_COLUMNS:
      value = values.get(column)
      cells.append(f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "—"))
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines) + "\n"
  atomic.write_text(os.path.join(sweep_dir, "table.md"), table)
  return table
