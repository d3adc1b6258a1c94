"""The main job: every method on the embedded default, one paper-style table.

For each row of ``config.rows`` (FP, baselines, VQ4DiT, HQ-DiT, W2A4): quantize the FP
checkpoint (reusing a quantized checkpoint already on disk), sample with the SAME noise and
labels as every other row, score (FD, IS analogue, class accuracy, precision, recall, paired
PSNR to FP) and write ``results/``: results.md (the table), results.json, one PNG grid per
method, all grids side by side, and a plot of quality against weight bits.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional

import numpy as np
from absl import logging

from dit_quant_jax import config_spec, pipeline
from dit_quant_jax.eval import writers

TABLE_COLUMNS = ("Method", "W/A", "Size (MB)", "FD ↓", "IS ↑", "Class acc ↑", "Precision ↑",
                 "Recall ↑", "PSNR vs FP ↑", "Quant. time (s)")


def selected_rows(config) -> list:
  """The rows of ``config.rows`` named by ``config.only`` (comma-separated keys; "" = all).

  An unknown key is an error listing the known ones."""
  only = [k.strip() for k in str(config.get("only") or "").split(",") if k.strip()]
  if not only:
    return list(config.rows)
  known = [row.key for row in config.rows]
  unknown = [k for k in only if k not in known]
  if unknown:
    raise ValueError(f"--config.only names unknown rows {unknown}; known rows: {','.join(known)}")
  return [row for row in config.rows if row.key in only]


def run(config, progress: Callable[[str], None] = logging.info) -> list[dict]:
  """Run every selected row; returns the list of row results (also written under config.results_dir).

  Every row's config is validated first (validation.check_reproduce_config), before the FP
  model is sampled.  Each row records ``timings_s``: seconds per phase (quantize, of which
  calib_set is the FP trajectory; load; sample; score; grid).
  """
  from dit_quant_jax import validation
  validation.check_reproduce_config(config)
  selected = selected_rows(config)
  pipeline.enable_compilation_cache(config.get("compilation_cache_dir", ""))
  os.makedirs(config.results_dir, exist_ok=True)
  grid_dir = os.path.join(config.results_dir, "grids")
  os.makedirs(grid_dir, exist_ok=True)
  fp_model, fp_params, _ = pipeline.load_dit(config.model)
  noise, labels = pipeline.noise_and_labels(fp_model, config.sampling.per_class, config.sampling.seed)
  sample_kwargs = dict(respacing=config.sampling.respacing, sampler=config.sampling.sampler,
                       eta=config.sampling.eta, cfg_scale=config.sampling.cfg_scale,
                       seed=config.sampling.seed, batch_size=config.sampling.batch_size)
  started = time.time()
  progress(f"FP samples: {noise.shape[0]} images, {config.sampling.respacing} {config.sampling.sampler}")
  fp_images, fp_outputs = pipeline.generate(fp_model, fp_params, noise, labels, return_outputs=True,
                                            progress=progress, **sample_kwargs)
  fp_sample_s = time.time() - started
  rows = []
  for index, row in enumerate(selected):
    progress(f"[{index + 1}/{len(selected)}] {row.name} ({time.time() - started:.0f} s elapsed)")
    timings = {}  # seconds per phase of this row (profile of the main job)
    clock = time.perf_counter()
    if row.spec == "fp":
      report = dict(method="fp", wall_time_s=0.0, size=_dense_size(fp_params))
      images, outputs = fp_images, fp_outputs
      timings["sample"] = fp_sample_s
    else:
      qconfig = row_quantization_config(config, row)
      out_dir = os.path.join(config.quant_dir, row.key)
      report = pipeline.quantize_checkpoint(config.model, qconfig, out_dir, reuse=config.reuse,
                                            fp_model_and_params=(fp_model, fp_params),
                                            override_flag="--config.reuse=False")
      timings["quantize"], clock = time.perf_counter() - clock, time.perf_counter()
      model, qparams, _ = pipeline.load_dit(os.path.join(out_dir, "params"))
      timings["load"], clock = time.perf_counter() - clock, time.perf_counter()
      images, outputs = pipeline.generate(model, qparams, noise, labels, return_outputs=True,
                                          progress=progress, **sample_kwargs)
      timings["sample"], clock = time.perf_counter() - clock, time.perf_counter()
    scores = pipeline.score(images, labels, fp_images, outputs, fp_outputs,
                            bootstrap_resamples=int(config.get("bootstrap_resamples", 0)))
    timings["score"], clock = time.perf_counter() - clock, time.perf_counter()
    writers.write_sample_grid(os.path.join(grid_dir, f"{row.key}.png"), images, labels,
                              num_classes=fp_model.num_classes,
                              per_class=min(config.sampling.per_class, config.grid_per_class),
                              scale=config.grid_scale)
    timings["grid"] = time.perf_counter() - clock
    if "calib_set_time_s" in report:
      timings["calib_set"] = report["calib_set_time_s"]
    result = dict(key=row.key, name=row.name, w_bits=row.w_bits, a_bits=row.a_bits,
                  size_mb=report["size"]["total_mb"], quant_time_s=report.get("wall_time_s", 0.0),
                  config_hash=report.get("provenance", {}).get("config_hash"),
                  **{k: v for k, v in scores.items()}, timings_s=timings)
    rows.append(result)
    progress(f"  {row.name}: FD {_fmt_ci(result, 'fd')} acc {_fmt_ci(result, 'class_acc', 3)} "
             f"PSNR {result.get('paired_psnr', float('nan')):.2f}")
    _write_tables(config, rows, labels)  # after every row: a killed run keeps what it did
  figures_start = time.perf_counter()
  _write_figures(config, rows)
  progress(f"figures in {time.perf_counter() - figures_start:.1f} s")
  progress(f"done in {time.time() - started:.0f} s; table in {config.results_dir}/results.md")
  return rows


def row_quantization_config(config, row):
  """The quantization config of a (non-FP) row: its spec, its overrides, the shared ones."""
  qconfig = config_spec.load(row.spec, dict(row.get("overrides", ())))
  apply_shared_overrides(qconfig, config.get("calibration_overrides", ()))
  return qconfig


def apply_shared_overrides(qconfig, overrides) -> None:
  """Set each (dotted, value) the config has; a row without calibration (k-means only,
  ``calibration.steps == 0``) keeps it off."""
  for dotted, value in overrides:
    if not _has_dotted(qconfig, dotted):
      continue
    if dotted == "calibration.steps" and int(qconfig.calibration.steps) == 0:
      continue
    config_spec.set_dotted(qconfig, dotted, value)


def _has_dotted(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def _dense_size(params) -> dict:
  from dit_quant_jax.api import model_size
  return model_size(params)


def _fmt(value, digits=2) -> str:
  if value is None:
    return "—"
  if isinstance(value, float) and math.isinf(value):
    return "∞"
  if isinstance(value, float) and math.isnan(value):
    return "—"
  return f"{value:.{digits}f}"


def _fmt_ci(row: dict, key: str, digits: int = 2) -> str:
  """``value [low, high]`` when the row has a ``<key>_ci`` interval, else the value."""
  text = _fmt(row.get(key), digits)
  interval = row.get(f"{key}_ci")
  if interval:
    text += f" [{_fmt(interval[0], digits)}, {_fmt(interval[1], digits)}]"
  return text


def markdown_table(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
  for r in rows:
    cells = [r["name"], f"{r['w_bits']}/{r['a_bits']}", _fmt(r["size_mb"], 3), _fmt_ci(r, "fd"),
             _fmt(r["is"]), _fmt_ci(r, "class_acc", 3), _fmt(r["precision"], 3),
             _fmt(r["recall"], 3), _fmt(r.get("paired_psnr")), _fmt(r["quant_time_s"], 1)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _header(config, num_samples: int) -> str:
  s = config.sampling
  resamples = int(config.get("bootstrap_resamples", 0))
  intervals = (f" Brackets: {100 * float(config.get('bootstrap_confidence', 0.95)):.0f}% bootstrap "
               f"intervals over the {num_samples} generated samples ({resamples} resamples, the real "
               f"test-set statistics held fixed; FD's shifted by the resampling bias, "
               f"eval/metrics.py); rank two methods only where their intervals do not overlap."
               if resamples else "")
  return (f"# Results on the embedded default (Fashion-MNIST DiT)\n\n"
          f"Model `{config.model}`; {num_samples} samples ({s.per_class} per class), "
          f"{s.sampler} {s.respacing}, cfg {s.cfg_scale}, seed {s.seed}; identical noise and labels "
          f"for every row. FD, IS, class accuracy, precision/recall use the shipped Fashion-MNIST "
          f"classifier's features against the 10k test set; PSNR is paired against the FP model's "
          f"samples from the same noise.{intervals}\n\nGenerated by `{config.command}`.\n\n")


def _write_tables(config, rows, labels) -> None:
  """results.md, results.json (with the config that made them) and the README block."""
  from dit_quant_jax.utils import atomic, provenance
  header = _header(config, len(labels))
  atomic.write_text(os.path.join(config.results_dir, "results.md"), header + markdown_table(rows) + "\n")
  if config.get("readme"):
    update_readme(config.readme, header.split("\n", 2)[2] + markdown_table(rows) + "\n")
  pipeline.write_json(os.path.join(config.results_dir, "results.json"),
                      dict(rows=rows, sampling=config.sampling.to_dict(), model=config.model,
                           provenance=provenance.make_stamp(config)))


def _write_figures(config, rows) -> None:
  from dit_quant_jax.eval import figures
  grid_dir = os.path.join(config.results_dir, "grids")
  figures.grid_of_grids(os.path.join(config.results_dir, "grids_side_by_side.png"),
                        [(r["name"], os.path.join(grid_dir, f"{r['key']}.png")) for r in rows],
                        columns=int(config.get("sheet_columns", figures.SHEET_COLUMNS)))
  figures.pareto_plots(os.path.join(config.results_dir, "size_vs_quality.png"), rows)


README_BEGIN = "<!-- RESULTS:BEGIN -->"
README_END = "<!-- RESULTS:END -->"


def update_readme(path: str, body: str) -> None:
  """Replace the text between the RESULTS markers of ``path`` (the README shows the table
  as generated, never typed by hand)."""
  from dit_quant_jax.utils import atomic
  if not os.path.exists(path):
    return
  text = open(path).read()
  if README_BEGIN not in text or README_END not in text:
    raise ValueError(f"{path} lacks the {README_BEGIN} / {README_END} markers")
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  atomic.write_text(path, head + README_BEGIN + "\n" + body.strip() + "\n" + README_END + tail)
