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
  """Run every selected row; returns the list of row results (also written under config.results_dir)."""
  selected = selected_rows(config)
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
  rows = []
  for index, row in enumerate(selected):
    progress(f"[{index + 1}/{len(selected)}] {row.name} ({time.time() - started:.0f} s elapsed)")
    if row.spec == "fp":
      report = dict(method="fp", wall_time_s=0.0, size=_dense_size(fp_params))
      images, outputs = fp_images, fp_outputs
    else:
      qconfig = config_spec.load(row.spec, dict(row.get("overrides", ())))
      _apply_shared_overrides(qconfig, config.get("calibration_overrides", ()))
      out_dir = os.path.join(config.quant_dir, row.key)
      report = pipeline.quantize_checkpoint(config.model, qconfig, out_dir, reuse=config.reuse)
      model, qparams, _ = pipeline.load_dit(os.path.join(out_dir, "params"))
      images, outputs = pipeline.generate(model, qparams, noise, labels, return_outputs=True,
                                          progress=progress, **sample_kwargs)
    scores = pipeline.score(images, labels, fp_images, outputs, fp_outputs)
    writers.write_sample_grid(os.path.join(grid_dir, f"{row.key}.png"), images, labels,
                              num_classes=fp_model.num_classes,
                              per_class=min(config.sampling.per_class, config.grid_per_class),
                              scale=config.grid_scale)
    result = dict(key=row.key, name=row.name, w_bits=row.w_bits, a_bits=row.a_bits,
                  size_mb=report["size"]["total_mb"], quant_time_s=report.get("wall_time_s", 0.0),
                  **{k: v for k, v in scores.items()})
    rows.append(result)
    progress(f"  {row.name}: FD {result['fd']:.2f} acc {result['class_acc']:.3f} "
             f"PSNR {result.get('paired_psnr', float('nan')):.2f}")
    _write_outputs(config, rows, fp_model, labels)
  progress(f"done in {time.time() - started:.0f} s; table in {config.results_dir}/results.md")
  return rows


def _apply_shared_overrides(qconfig, overrides) -> None:
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


def markdown_table(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
  for r in rows:
    cells = [r["name"], f"{r['w_bits']}/{r['a_bits']}", _fmt(r["size_mb"], 3), _fmt(r["fd"]),
             _fmt(r["is"]), _fmt(r["class_acc"], 3), _fmt(r["precision"], 3), _fmt(r["recall"], 3),
             _fmt(r.get("paired_psnr")), _fmt(r["quant_time_s"], 1)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _write_outputs(config, rows, model, labels) -> None:
  results_dir = config.results_dir
  s = config.sampling
  header = (f"# Results on the embedded default (Fashion-MNIST DiT)\n\n"
            f"Model `{config.model}`; {len(labels)} samples ({s.per_class} per class), "
            f"{s.sampler} {s.respacing}, cfg {s.cfg_scale}, seed {s.seed}; identical noise and labels "
            f"for every row. FD, IS, class accuracy, precision/recall use the shipped Fashion-MNIST "
            f"classifier's features against the 10k test set; PSNR is paired against the FP model's "
            f"samples from the same noise.\n\nGenerated by `{config.command}`.\n\n")
  with open(os.path.join(results_dir, "results.md"), "w") as f:
    f.write(header + markdown_table(rows) + "\n")
  if config.get("readme"):
    update_readme(config.readme, header.split("\n", 2)[2] + markdown_table(rows) + "\n")
  pipeline.write_json(os.path.join(results_dir, "results.json"),
                      dict(rows=rows, sampling=s.to_dict(), model=config.model))
  _side_by_side(config, rows)
  _plot(config, rows)


README_BEGIN = "<!-- RESULTS:BEGIN -->"
README_END = "<!-- RESULTS:END -->"


def update_readme(path: str, body: str) -> None:
  """Replace the text between the RESULTS markers of ``path`` (the README shows the table
  as generated, never typed by hand)."""
  if not os.path.exists(path):
    return
  text = open(path).read()
  if README_BEGIN not in text or README_END not in text:
    raise ValueError(f"{path} lacks the {README_BEGIN} / {README_END} markers")
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  with open(path, "w") as f:
    f.write(head + README_BEGIN + "\n" + body.strip() + "\n" + README_END + tail)


def _side_by_side(config, rows) -> None:
  from PIL import Image, ImageDraw
  grid_dir = os.path.join(config.results_dir, "grids")
  tiles = [(r["name"], Image.open(os.path.join(grid_dir, f"{r['key']}.png")).convert("L")) for r in rows]
  label_h = 14
  width = sum(t.width for _, t in tiles) + 4 * (len(tiles) + 1)
  height = max(t.height for _, t in tiles) + label_h + 8
  canvas = Image.new("L", (width, height), 255)
  draw = ImageDraw.Draw(canvas)
  x = 4
  for name, tile in tiles:
    draw.text((x, 2), name[: max(4, tile.width // 6)], fill=0)
    canvas.paste(tile, (x, label_h + 4))
    x += tile.width + 4
  canvas.save(os.path.join(config.results_dir, "grids_side_by_side.png"))


def _plot(config, rows) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for r in rows:
    w = float(r["w_bits"]) if str(r["w_bits"]).replace(".", "").isdigit() else 32.0
    marker = "o" if str(r["a_bits"]) in ("16", "32") else "s"
    axes[0].scatter(w, r["fd"], marker=marker)
    axes[0].annotate(r["name"], (w, r["fd"]), fontsize=6)
    axes[1].scatter(w, r["class_acc"], marker=marker)
    axes[1].annotate(r["name"], (w, r["class_acc"]), fontsize=6)
  for ax, title in zip(axes, ("FD (lower is better)", "class accuracy")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("weight bits")
    ax.set_title(title)
  axes[0].set_yscale("log")
  fig.tight_layout()
  fig.savefig(os.path.join(config.results_dir, "quality_vs_bits.png"), dpi=120)
  plt.close(fig)
