"""Figures of the main job: a labelled sheet of sample grids, and size-vs-quality Pareto plots.

  grid_of_grids(path, [(name, grid_png_path), ...], columns=4)
  pareto_plots(path, rows)   # rows as in results.json: name, size_mb, fd (fd_ci), paired_psnr

Both are written atomically (dit_quant_jax/utils/atomic.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from dit_quant_jax.utils import atomic

SHEET_COLUMNS = 4  # methods per row of the sheet
SHEET_TILE_WIDTH = 342  # px: a 10 x 10 grid of 32 px cells with 2 px gaps at scale 1
SHEET_LABEL_HEIGHT = 28  # px above each tile for its method name
SHEET_LABEL_FONT_SIZE = 18
SHEET_MARGIN = 10  # px between tiles
SHEET_BACKGROUND = 255


def _font(size: int):
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable default font
  except TypeError:
    return ImageFont.load_default()


def _fit_text(draw, text: str, font, width: int) -> str:
  """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "…", font=font) > width:
    text = text[:-1]
  return text + "…"


def grid_of_grids(path: str, tiles: Sequence[tuple[str, str]], columns: int = SHEET_COLUMNS,
                  tile_width: int = SHEET_TILE_WIDTH) -> str:
  """One sheet of sample grids, ``columns`` methods per row, each under its name.

  tiles: [(method name, path of its grid PNG)].  Each grid is resized (nearest neighbour) to
  ``tile_width`` px wide.  Returns ``path``.
  """
  from PIL import Image, ImageDraw
  if not tiles:
    raise ValueError("grid_of_grids: no tiles")
  if columns < 1:
    raise ValueError(f"grid_of_grids: columns must be >= 1, got {columns}")
  images = []
  for name, tile_path in tiles:
    image = Image.open(tile_path).convert("L")
    height = max(1, round(image.height * tile_width / image.width))
    images.append((name, image.resize((tile_width, height), Image.NEAREST)))
  columns = min(columns, len(images))
  rows = math.ceil(len(images) / columns)
  tile_height = max(image.height for _, image in images)
  cell_w, cell_h = tile_width + SHEET_MARGIN, tile_height + SHEET_LABEL_HEIGHT + SHEET_MARGIN
  sheet = Image.new("L", (columns * cell_w + SHEET_MARGIN, rows * cell_h + SHEET_MARGIN),
                    SHEET_BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  font = _font(SHEET_LABEL_FONT_SIZE)
  for index, (name, image) in enumerate(images):
    left = SHEET_MARGIN + (index % columns) * cell_w
    top = SHEET_MARGIN + (index // columns) * cell_h
    draw.text((left, top + 2), _fit_text(draw, name, font, tile_width), fill=0, font=font)
    sheet.paste(image, (left, top + SHEET_LABEL_HEIGHT))
  return atomic.save_image(path, sheet)


def pareto_front(sizes: Sequence[float], losses: Sequence[float]) -> list[int]:
  """Indices of the points no other point beats on both (smaller size, smaller loss), by size."""
  order = sorted(range(len(sizes)), key=lambda i: (sizes[i], losses[i]))
  front, best = [], math.inf
  for i in order:
    if losses[i] < best:
      front.append(i)
      best = losses[i]
  return front


# Label offsets (points) tried around each marker, nearest first; then a wider ring.
_LABEL_OFFSETS = [(dx * r, dy * r) for r in (8, 20, 36, 56)
                  for dx, dy in ((1, 0), (-1, 0), (1, 0.7), (1, -0.7), (-1, 0.7), (-1, -0.7),
                                 (0.3, 1.0), (0.3, -1.0))]
_TICK_SUBS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)  # labelled ticks per decade on log axes


def _overlap(a, b) -> float:
  """Area of the intersection of two display-space boxes (x0, y0, x1, y1)."""
  width = min(a[2], b[2]) - max(a[0], b[0])
  height = min(a[3], b[3]) - max(a[1], b[1])
  return max(width, 0.0) * max(height, 0.0)


def place_labels(ax, points, names, fontsize: int = 8) -> list:
  """Annotate each (x, y) with its name where it collides least (greedy, in order): each
  candidate offset is scored by its overlap with the labels placed so far, with every
  marker, and with the outside of the axes; the first zero-overlap candidate wins.  A label
  away from its point gets a thin leader line."""
  fig = ax.figure
  renderer = fig.canvas.get_renderer()
  axes_box = ax.get_window_extent(renderer)
  to_display = ax.transData.transform
  marker_boxes = []
  for x, y in points:
    px, py = to_display((x, y))
    marker_boxes.append((px - 6, py - 6, px + 6, py + 6))
  placed, texts = [], []
  for (x, y), name in zip(points, names):
    best = None
    for dx, dy in _LABEL_OFFSETS:
      ha = "left" if dx > 2 else ("right" if dx < -2 else "center")
      va = "bottom" if dy > 0 else ("top" if dy < 0 else "center")
      text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                         fontsize=fontsize)
      box = text.get_window_extent(renderer)
      box = (box.x0 - 1, box.y0 - 1, box.x1 + 1, box.y1 + 1)
      inside = _overlap(box, (axes_box.x0, axes_box.y0, axes_box.x1, axes_box.y1))
      area = (box[2] - box[0]) * (box[3] - box[1])
      cost = (sum(_overlap(box, other) for other in placed + marker_boxes) + (area - inside) * 2)
      if best is None or cost < best[0]:
        if best is not None:
          best[1].remove()
        best = (cost, text, box, (dx, dy))
      else:
        text.remove()
      if cost == 0:
        break
    cost, text, box, (dx, dy) = best
    if abs(dx) > 8 or abs(dy) > 9:
      text.arrow_patch = None
      text.remove()
      ha, va = text.get_ha(), text.get_va()
      text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                         fontsize=fontsize, arrowprops=dict(arrowstyle="-", color="gray", lw=0.6,
                                                            shrinkA=0, shrinkB=4))
    placed.append(box)
    texts.append(text)
  return texts


def pareto_plots(path: str, rows: Sequence[dict]) -> str:
  """Two panels: model size (MB, log) against FD (log, with its interval when present) and
  against paired PSNR vs FP.  Each point carries its method's name, placed where it collides
  least with other labels and markers (:func:`place_labels`); the Pareto front is dashed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter, LogLocator

  fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
  panels = (("fd", "FD ↓ (log scale)", True), ("paired_psnr", "paired PSNR vs FP, dB ↑", False))
  for ax, (key, title, lower_better) in zip(axes, panels):
    points, names, losses = [], [], []
    for row in rows:
      value = row.get(key)
      if value is None or not np.isfinite(value):
        continue  # FP's PSNR against itself is +inf
      interval = row.get(f"{key}_ci")
      yerr = None
      if interval:
        yerr = [[max(value - interval[0], 0.0)], [max(interval[1] - value, 0.0)]]
      ax.errorbar([row["size_mb"]], [value], yerr=yerr, marker="o", markersize=5, capsize=3,
                  elinewidth=0.8, linestyle="none", color="tab:blue")
      points.append((row["size_mb"], value))
      names.append(row["name"])
      losses.append(value if lower_better else -value)
    front = pareto_front([p[0] for p in points], losses)
    if len(front) > 1:
      ax.plot([points[i][0] for i in front], [points[i][1] for i in front], linestyle="--",
              color="gray", linewidth=1, zorder=0)
    ax.set_xscale("log")
    if key == "fd":
      ax.set_yscale("log")
      ax.yaxis.set_major_locator(LogLocator(subs=_TICK_SUBS))
      ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
      ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.xaxis.set_major_locator(LogLocator(subs=_TICK_SUBS))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.margins(x=0.25, y=0.12)
    ax.set_xlabel("model size (MB, log scale)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    fig.canvas.draw()  # fixes the limits before labels are measured
    place_labels(ax, points, names)
  fig.text(0.01, 0.01, "dashed: Pareto front (no other method is both smaller and better); "
           "bars: bootstrap intervals where recorded", fontsize=8, color="dimgray")
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  atomic.savefig(path, fig, dpi=110)
  plt.close(fig)
  return path
