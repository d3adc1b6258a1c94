"""Static report of the kernels at the DiT-XL/2 shapes, built without a GPU.

For every op, shape (K x N) and token count M, the dispatcher's choice on an H100 (sm_90a) and
an A100 (sm_80) is lowered with its own config (bench/triton_ptx.py), compiled with triton, and
read: tensor-core instruction and operand types, registers, spills, shared memory, async copies
and global loads; beside it the roofline floors of the path and of the bf16 dot
(bench/roofline.py, datasheet peaks).  XLA paths (decode + bf16 dot) are not Triton kernels:
their floor is listed, their code is XLA's.

Ops come from ``lowering_cases`` functions: :func:`vq_lowering_cases` here, and the FP4
kernels' ``kernels.fp4_matmul.lowering_cases`` when that module defines it (a list of
``(name, jitted_fn, arg ShapeDtypeStructs, config)``; config holds num_warps / num_stages).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp

from dit_quant_jax.bench import roofline
from dit_quant_jax.bench import triton_ptx
from dit_quant_jax.kernels import dispatch
from dit_quant_jax.kernels import fp4_matmul
from dit_quant_jax.kernels import vq_matmul as vq

DIT_XL2_SHAPES = ((1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152), (1152, 6912))
DIT_XL2_TOKENS = (16, 256, 1024, 4096, 16384)
CLASS_OF_CC = {90: "hopper", 80: "ampere"}


def vq_avals(m_rows: int, k_features: int, n_features: int, codewords: int = 256,
             sub_dim: int = 4):
  bits = max(1, (codewords - 1).bit_length())
  packed_rows = -(-(k_features // sub_dim) * bits // 8)
  shape = jax.ShapeDtypeStruct
  return (shape((m_rows, k_features), jnp.bfloat16), shape((codewords, sub_dim), jnp.float32),
          shape((packed_rows, n_features), jnp.uint8), shape((n_features,), jnp.float32))


def vq_lowering_cases(shapes=DIT_XL2_SHAPES, tokens=DIT_XL2_TOKENS, cc: int = 90):
  """[(name, path, jitted fn or None, avals, config, (m, k, n))] of VQ W2 at each shape, with
  the dispatcher's path and config for the device of capability cc (fn None: an XLA path)."""
  cases = []
  for k_features, n_features in shapes:
    for m_rows in tokens:
      choice = dispatch.choose("vq", m_rows, k_features, n_features,
                               device_kind=triton_ptx.DEVICE_KIND[cc])
      fn = None
      if choice.path != "vq_dequant_dot":
        fn = jax.jit(functools.partial(vq.vq_matmul, **choice.config))
      cases.append((f"vq_w2 {k_features}x{n_features} M={m_rows}", choice.path, fn,
                    vq_avals(m_rows, k_features, n_features), choice.config,
                    (m_rows, k_features, n_features)))
  return cases


def fp4_lowering_cases(shapes=DIT_XL2_SHAPES, tokens=DIT_XL2_TOKENS, cc: int = 90):
  """The FP4 kernels' cases in the same form, if kernels/fp4_matmul.py provides them."""
  from dit_quant_jax.kernels import fp4_matmul
  provider = getattr(fp4_matmul, "lowering_cases", None)
  if provider is None:
    return []
  mkn = [(m_rows, k_features, n_features) for k_features, n_features in shapes
         for m_rows in tokens]
  cases = []
  for name, fn, avals, config in provider(shapes=mkn, device=CLASS_OF_CC[cc]):
    numbers = dict(part.split("=") for part in name.split() if "=" in part)
    shape = tuple(int(numbers[key]) for key in ("M", "K", "N")) if all(
        key in numbers for key in ("M", "K", "N")) else None
    cases.append((name, name.split()[0], fn, avals, config, shape))
  return cases


def _aval_bytes(avals) -> int:
  leaves = jax.tree_util.tree_leaves(avals)
  return sum(int(math.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves
             if hasattr(leaf, "shape"))


def main_loop_trips(name: str, config: dict, avals) -> int:
  """Iterations of a kernel's main loop per program: K tiles (fp4_mma: 128 codes; VQ:
  block_k) over the K split, or quantize_rows' tokens per program."""
  if name.startswith("quantize_rows"):  # (x, (signs, block), ...): token groups per program
    k_features = avals[0].shape[1]
    a_order = avals[1][1].shape[0] if len(avals) > 1 and avals[1] is not None else None
    from dit_quant_jax.kernels import act_quant
    return act_quant.main_loop_trips(k_features, a_order, int(config.get("tokens_per_program", 8)),
                                     config.get("num_warps"))
  leaves = jax.tree_util.tree_leaves(avals)
  m_rows, k_features = leaves[0].shape
  block_k = config.get("block_k", 64 if name.startswith("vq") else 128)  # fp4_mma: TILE_K
  k_tiles = -(-k_features // block_k)
  schedule = stream_k_schedule(config, m_rows, k_features, _n_of_case(name, leaves))
  if schedule is not None:  # whole-wave tiles and the stream-K share per program
    return schedule.whole_tiles // schedule.programs * k_tiles + schedule.per_program
  return -(-k_tiles // int(config.get("split_k", 1)))  # common.k_tile_range per split


def _n_of_case(name: str, leaves) -> int:
  """N of a GEMM case: from its name ('vq_w2 KxN M=..' or '.. N=..'), else the weight's."""
  words = name.split()
  numbers = dict(w.split("=") for w in words if "=" in w)
  if "N" in numbers:
    return int(numbers["N"])
  if len(words) > 1 and "x" in words[1]:
    return int(words[1].split("x")[1])
  return int(leaves[2].shape[-1])


def stream_k_schedule(config: dict, m_rows: int, k_features: int, n_features: int):
  """The kernel's common.StreamKSchedule where its config runs stream-K, else None."""
  if not config.get("stream_k"):
    return None
  block_k = config.get("block_k", fp4_matmul.fp4_mma.TILE_K)
  return dispatch.stream_k_schedule(m_rows, k_features, n_features, config["block_m"],
                                    config["block_n"], block_k, int(config["stream_k"]),
                                    bool(config.get("whole_waves")))


def case_stats(fn, avals, config: dict, cc: int, name: str = "") -> list[dict]:
  """Stats of every Triton kernel ``fn(*avals)`` lowers to on sm_<cc>, with the issue floor of
  its SASS main loop (triton_ptx.issue_floor_seconds) when the SASS could be read."""
  modules = triton_ptx.lower_for_gpu(fn, *avals, cc=cc)
  out = []
  for module in modules:
    num_warps = config.get("num_warps", 4)
    stats = triton_ptx.kernel_stats(module["ttir"], num_warps=num_warps,
                                    num_stages=config.get("num_stages", 3), cc=cc)
    stats.update(grid=module["grid"], kernel=module["name"])
    if "sass_issue" in stats:
      loop = {key[5:]: value for key, value in stats.items() if key.startswith("sass_")}
      trips = main_loop_trips(name, config, avals)
      if loop.get("unrolled"):  # ptxas unrolled the K loop: the whole kernel over its trips
        loop = {key: value / trips for key, value in loop.items()}
        stats.update({f"sass_{key}": round(value, 1) for key, value in loop.items()},
                     sass_unrolled=1)
      stats.update(triton_ptx.issue_floor_seconds(
          loop, num_warps=num_warps, programs=math.prod(module["grid"]), trips=trips, cc=cc,
          mma=stats))
    out.append(stats)
  return out


def _tensor_core_text(stats: dict) -> str:
  if stats.get("wgmma"):
    overlap = "waits every step" if stats.get("loop_wgmma_waits_all") else "async across steps"
    return (f"wgmma x{stats['wgmma']} ({', '.join(stats['wgmma_types'])}; {overlap}, "
            f"{stats.get('ctas_per_sm', 1)} CTA/SM)")
  if stats.get("mma"):
    return f"mma.sync x{stats['mma']} ({', '.join(stats['mma_types'])})"
  return "none (CUDA cores)"


def _sass_text(stats: dict) -> str:
  """'instr (alu / imad / fp32 / fp16x2 / convert / memory) | issue floor (pipe)' cells, or
  empty ones."""
  if "sass_issue" not in stats:
    return " | "
  loop = (f"{stats['sass_issue']} ({stats['sass_int']} / {stats.get('sass_imad', 0)} / "
          f"{stats['sass_fp32']} / {stats.get('sass_fp16x2', 0)} / {stats['sass_convert']} / "
          f"{stats['sass_memory']})")
  if stats.get("sass_unrolled"):
    loop += " (unrolled: the whole kernel over its K steps)"
  if "issue_floor_s" not in stats:
    return loop + " | "
  return f"{loop} | {stats['issue_floor_s'] * 1e6:.2f} ({stats['issue_bound']})"


def _floor_text(path: str, mkn, peaks: roofline.Peaks, avals=None) -> tuple[str, str, str]:
  """(kernel floor, bf16 dot floor, ratio) in microseconds.  VQ paths: bench/roofline.py;
  other kernels: their operand bytes (avals) + a bf16 output, int8 / fp8 dots at 2x rate."""
  if mkn is None:
    if avals is None:
      return ("", "", "")
    m_rows, k_features = avals[0].shape
    a_order = None
    if len(avals) > 1 and avals[1] is not None:  # (x, (signs, block)[, mul, add])
      a_order = avals[1][1].shape[0]
    floor = roofline.act_quant_floor(m_rows, k_features, a_order, peaks,
                                     norm_fused=len(avals) > 2)
    return (f"{floor['floor_s'] * 1e6:.2f} ({floor['bound']})", "", "")
  m_rows, k_features, n_features = mkn
  bf16 = roofline.bf16_dot_floor(m_rows, k_features, n_features, peaks)
  if path.startswith("vq"):
    kernel = roofline.vq_path_floor(path, m_rows, k_features, n_features, peaks)
  else:
    moved = _aval_bytes(avals) + m_rows * n_features * roofline.BF16_BYTES
    rate = 2.0 if ("int8" in path or "fp8" in path) else 1.0
    kernel = roofline.floor_seconds(2 * m_rows * k_features * n_features, moved, peaks, rate)
  return (f"{kernel['floor_s'] * 1e6:.2f} ({kernel['bound']})",
          f"{bf16['floor_s'] * 1e6:.2f} ({bf16['bound']})",
          f"{bf16['floor_s'] / kernel['floor_s']:.2f}")


def build(shapes=DIT_XL2_SHAPES, tokens=DIT_XL2_TOKENS, ccs=(90, 80), log=print) -> dict:
  """{cc: [row dict]} for every case; rows carry the case, stats (or why none) and floors."""
  result = {}
  for cc in ccs:
    peaks = roofline.DATASHEET[CLASS_OF_CC[cc]]
    rows = []
    for name, path, fn, avals, config, mkn in (vq_lowering_cases(shapes, tokens, cc)
                                               + fp4_lowering_cases(shapes, tokens, cc)):
      start = time.time()
      try:
        stats = case_stats(fn, avals, config, cc, name) if fn is not None else []
      except Exception as error:  # a case that does not lower: reported, not fatal
        stats = [dict(compile_error=f"(lowering) {type(error).__name__}: {error}")]
      floors = _floor_text(path, mkn, peaks, avals)
      rows.append(dict(name=name, path=path, config=config, stats=stats, floors=floors))
      log(f"sm_{cc} {name}: {path} ({time.time() - start:.1f} s)")
    result[cc] = rows
  return result


# Issue-11 targets: (op, M predicate text, M values, minimum speedup over the bf16 dot).
TARGETS = (
    ("w4a4", "M >= 4096", (4096, 16384), 1.6),
    ("w4a8", "M >= 4096", (4096, 16384), 1.6),
    ("w4a16", "M >= 1024", (1024, 4096, 16384), 0.95),
    ("w4a16", "M <= 32", (16,), 2.5),
    ("vq", "M >= 1024", (1024, 4096, 16384), 0.9),
    ("vq", "M <= 32", (16,), 3.0),
)
ACT_QUANT_SHARE_TARGET = 0.15  # act-quant <= 15 % of the W4A4 GEMM it feeds, at M = 4096
HADAMARD_ORDER = {384: 12, 768: 12, 1152: 36, 4608: 36}  # quant/hadamard.py's blocks
# DiT-XL/2 linears whose input is a block's modulated LayerNorm (qkv, fc1): there a W4A4 /
# W4A8 path whose act-quant is the Triton kernel (fp4_matmul.fuses_row_norm) takes the
# LayerNorm + modulate as its prologue (act_quant.RowNorm), replacing the bf16 model's
# separate LayerNorm pass.  proj (attention output), fc2 (GELU) and
# the adaLN linear (SiLU(c)) keep a separate act-quant pass.
LN_FED_SHAPES = roofline.LN_FED_SHAPES


# Triton kernel (lowering case name prefix) of each FP4 path's GEMM; the XLA dots have none.
_GEMM_KERNEL = {"triton_int8": "fp4_mma_int8", "unpacked_triton_int8": "fp4_mma_unpacked_int8",
                "triton_bf16": "fp4_mma_bf16", "unpacked_triton_bf16": "fp4_mma_unpacked_bf16",
                "triton_fp8": "fp4_mma_fp8", "unpacked_triton_fp8": "fp4_mma_unpacked_fp8"}


def issue_floors(rows) -> dict:
  """{(kernel, M, K, N or None): issue floor s} from build()'s rows (cases whose SASS was read):
  kernel 'vq' for the VQ cases, else the case name's first word (fp4_mma_*, quantize_rows_*)."""
  out = {}
  for row in rows:
    floors = [st["issue_floor_s"] for st in row["stats"] if "issue_floor_s" in st]
    if not floors:
      continue
    words = row["name"].split()
    numbers = dict(w.split("=") for w in words if "=" in w)
    m_rows = int(numbers["M"])
    if words[0].startswith("vq"):
      k_features, n_features = (int(v) for v in words[1].split("x"))
      key = ("vq", m_rows, k_features, n_features)
    else:
      key = (words[0], m_rows, int(numbers["K"]), int(numbers["N"]) if "N" in numbers else None)
    out[key] = max(floors)
  return out


_PREDECODED_W_BYTES = {"int8": 1.0, "fp8": 1.0, "bf16": 2.0}
# L2 bandwidths relative to dispatch.L2_BANDWIDTH (an estimate) for the report's sensitivity
# line; 0: the L2 term left out.
L2_SENSITIVITY = (0.7, 1.3, 2.0, 0.0)


def gemm_l2_seconds(op: str, path: str, m_rows: int, k_features: int, n_features: int,
                    cc: int, l2_scale: float = 1.0) -> Optional[float]:
  """L2 time of a path's Pallas GEMM kernel at its dispatched tiles (dispatch.tile_l2_bytes
  over dispatch.L2_BANDWIDTH times l2_scale: each program loads its x rows and weight columns
  from L2), or None for XLA GEMMs (and for l2_scale 0: the L2 term left out)."""
  if not l2_scale:
    return None
  cls = CLASS_OF_CC[cc]
  config = path_config(op, path, m_rows, k_features, n_features, cc)
  if config is None:
    return None
  if op == "vq":
    x_bytes, w_bytes = 2.0, dispatch.VQ_W2_INDEX_BYTES
  else:
    predecode = path.startswith("unpacked_")
    kind = _DOT_KIND[path[len("unpacked_"):] if predecode else path]
    x_bytes = 2.0 if kind == "bf16" else 1.0
    w_bytes = _PREDECODED_W_BYTES[kind] if predecode else 0.5
  schedule = stream_k_schedule(config, m_rows, k_features, n_features)
  moved = dispatch.tile_l2_bytes(
      m_rows, k_features, n_features, config["block_m"], config["block_n"], x_bytes, w_bytes,
      split_k=int(config.get("split_k", 1)),
      partial_tiles=(schedule.partial_pieces(bool(config.get("staged_epilogue")))
                     if schedule is not None else 0))
  return moved / (dispatch.L2_BANDWIDTH[cls] * l2_scale)


def path_config(op: str, path: str, m_rows: int, k_features: int, n_features: int,
                cc: int) -> Optional[dict]:
  """The dispatched config of a path's Pallas GEMM kernel at that shape (None: an XLA GEMM)."""
  cls = CLASS_OF_CC[cc]
  if op == "vq":
    if path not in ("vq_tiled", "vq_splitk"):
      return None
    return dispatch.default_config(op, path, m_rows, k_features, n_features, cls)
  predecode = path.startswith("unpacked_")
  kind = _DOT_KIND.get(path[len("unpacked_"):] if predecode else path)
  if kind is None:
    return None
  return fp4_matmul.default_mma_config(m_rows, n_features, k_features, cls, kind,
                                       predecode=predecode)


def with_issue_floors(floor: dict, op: str, path: str, m_rows: int, k_features: int,
                      n_features: int, fused: bool, issue: Optional[dict],
                      cc: Optional[int] = None, l2_scale: float = 1.0) -> dict:
  """A path's floor with each Triton kernel's part raised to its SASS issue floor (what its
  main loop must issue; issue_floors), where the report lowered that kernel: the VQ kernels,
  the act-quant (quantize_rows, its int8-image case standing in for the fp8 image) and the FP4
  GEMM kernels; and (cc given) the Pallas GEMM's part to its L2 time (gemm_l2_seconds:
  ``l2_raised``).  XLA parts keep their roofline floors."""
  out = dict(floor)
  l2_s = (gemm_l2_seconds(op, path, m_rows, k_features, n_features, cc, l2_scale) if cc
          else None)
  issue = issue or {}
  if op == "vq":
    value = issue.get(("vq", m_rows, k_features, n_features))
    if value is not None and value > out["floor_s"]:
      out.update(floor_s=value, issue_raised=True)
    if l2_s is not None and l2_s > out["floor_s"]:
      out.update(floor_s=l2_s, l2_raised=True)
    return out
  act_s = out["act_quant_s"]
  # The report lowers the act-quant for both images: int8 (W4A4's E2M1 codes) and fp8 (W4A8's
  # E4M3 image, the Hopper device class only).
  if op in ("w4a4", "w4a8") and fp4_matmul.fuses_row_norm(op, path):
    image = "int8" if op == "w4a4" else "fp8"
    kernel = f"quantize_rows_norm_{image}" if fused else f"quantize_rows_{image}"
    value = issue.get((kernel, m_rows, k_features, None))
    if value is not None and value > act_s:
      act_s = value
      out["issue_raised"] = True
  gemm_s = out["gemm_s"]
  value = issue.get((_GEMM_KERNEL.get(path, ""), m_rows, k_features, n_features))
  dot_s = gemm_s - out["decode_s"] - out["epilogue_s"]
  if value is not None and value > dot_s:
    gemm_s += value - dot_s
    dot_s = value
    out["issue_raised"] = True
  if l2_s is not None and l2_s > dot_s:
    gemm_s += l2_s - dot_s
    out["l2_raised"] = True
  out.update(act_quant_s=act_s, gemm_s=gemm_s, floor_s=act_s + gemm_s)
  return out


_DOT_KIND = {"triton_int8": "int8", "triton_fp8": "fp8", "triton_bf16": "bf16"}
# Stream-K launch keys of a config, left out of the report's config cells where off.
_STREAM_K_KEYS = ("stream_k", "whole_waves", "staged_epilogue")


def path_partial_bytes(op: str, path: str, m_rows: int, k_features: int, n_features: int,
                       cc: int) -> float:
  """DRAM bytes of the float32 partials the dispatched Pallas kernel of a path writes at that
  shape: a K split's (roofline.split_partial_bytes) or a stream-K launch's pieces (block_m x
  block_n each); 0 for XLA paths and launches without either."""
  config = path_config(op, path, m_rows, k_features, n_features, cc)
  if config is None:
    return 0.0
  schedule = stream_k_schedule(config, m_rows, k_features, n_features)
  if schedule is not None:
    return float(4 * config["block_m"] * config["block_n"]
                 * schedule.partial_pieces(bool(config.get("staged_epilogue"))))
  return roofline.split_partial_bytes(m_rows, n_features, int(config.get("split_k", 1)))


def path_floor(op: str, path: str, m_rows: int, k_features: int, n_features: int, cc: int,
               fused: bool, issue: Optional[dict], l2_scale: float = 1.0) -> dict:
  """Floor of one dispatched path at one shape on sm_<cc> (roofline.vq_path_floor /
  fp4_path_floor with the launch tail and the kernel's K-split partials), each Triton part
  raised to its issue floor where the report lowered it and the Pallas GEMM to its L2 time
  at l2_scale x the assumed L2 bandwidth (with_issue_floors)."""
  peaks = roofline.DATASHEET[CLASS_OF_CC[cc]]
  sms = triton_ptx.SM_COUNT[cc]
  partials = path_partial_bytes(op, path, m_rows, k_features, n_features, cc)
  if op == "vq":
    floor = roofline.vq_path_floor(path, m_rows, k_features, n_features, peaks, sms=sms,
                                   partial_bytes=partials)
    floor.setdefault("act_quant_s", 0.0)
  else:
    floor = roofline.fp4_path_floor(op, path, m_rows, k_features, n_features, peaks,
                                    HADAMARD_ORDER.get(k_features), norm_fused=fused, sms=sms,
                                    partial_bytes=partials)
  return with_issue_floors(floor, op, path, m_rows, k_features, n_features, fused, issue, cc,
                           l2_scale)


def target_rows(cc: int, shapes=DIT_XL2_SHAPES, issue: Optional[dict] = None,
                l2_scale: float = 1.0) -> list[dict]:
  """Roofline estimate of every target: the dispatcher's path at each (K, N, M), its floor
  (act-quant + decode + dot) against the bf16 dot's, and the act-quant share of W4A4.

  W4A4 / W4A8 at the LN-fed shapes (LN_FED_SHAPES) fuse the LayerNorm + modulate into the
  act-quant: both sides then count that producer (bf16: the LayerNorm pass + the dot;
  quantized: the fused act-quant + the GEMM), and the act-quant share is what the fused step
  costs beyond the LayerNorm pass it replaces (negative: cheaper than that pass).

  issue: issue_floors() of the lowered cases; each Triton kernel's part of a path is then at
  least its SASS issue floor (with_issue_floors)."""
  cls = CLASS_OF_CC[cc]
  peaks = roofline.DATASHEET[cls]
  kind = triton_ptx.DEVICE_KIND[cc]
  rows = []
  for op, where, tokens, target in TARGETS:
    for k_features, n_features in shapes:
      for m_rows in tokens:
        choice = dispatch.choose(op, m_rows, k_features, n_features, device_kind=kind)
        bf16 = roofline.bf16_dot_floor(m_rows, k_features, n_features, peaks,
                                       sms=triton_ptx.SM_COUNT[cc])["floor_s"]
        fused = ((k_features, n_features) in LN_FED_SHAPES
                 and fp4_matmul.fuses_row_norm(op, choice.path))
        producer_s = 0.0
        floor = path_floor(op, choice.path, m_rows, k_features, n_features, cc, fused, issue,
                           l2_scale)
        if fused:
          producer_s = roofline.layer_norm_pass_floor(m_rows, k_features, peaks)["floor_s"]
        bound = roofline.two_pass_bound(op, m_rows, k_features, n_features, peaks,
                                        HADAMARD_ORDER.get(k_features), norm_fused=fused,
                                        sms=triton_ptx.SM_COUNT[cc])
        rows.append(dict(op=op, where=where, k=k_features, n=n_features, m=m_rows,
                         path=choice.path, floor_s=floor["floor_s"], bf16_s=bf16 + producer_s,
                         act_quant_s=floor["act_quant_s"], producer_s=producer_s,
                         gemm_s=floor["floor_s"] - floor["act_quant_s"],
                         speedup=(bf16 + producer_s) / floor["floor_s"], target=target,
                         bound_s=bound["floor_s"],
                         bound_speedup=(bf16 + producer_s) / bound["floor_s"],
                         issue_raised=floor.get("issue_raised", False),
                         l2_raised=floor.get("l2_raised", False)))
  return rows


def targets_markdown(cc: int, shapes=DIT_XL2_SHAPES, issue: Optional[dict] = None) -> list[str]:
  rows = target_rows(cc, shapes, issue)
  peaks = roofline.DATASHEET[CLASS_OF_CC[cc]]
  lines = ["", f"## Roofline estimates against the targets, sm_{cc} ({peaks.name})", "",
           "Floor of the dispatcher's path (act-quant with the Hadamard at the DiT widths, the "
           "decode pass of the decode-once paths, the dot, and the scale pass of the XLA 8-bit "
           "dots, each at its own floor, in sequence; bench/roofline.fp4_path_floor) vs the bf16 "
           "dot's floor. "
           "A floor speedup below the target means no implementation of that path can meet it; "
           "above it, a real kernel still has to get close to its floor (GPU issue).  Rows "
           "marked 'LN fused' (qkv 1152x3456, fc1 1152x4608: the input is the block's "
           "modulated LayerNorm) run the LayerNorm + modulate as the act-quant kernel's "
           "prologue: their bf16 floor adds the bf16 model's LayerNorm pass (4 B per element) "
           "and their act-quant share is the fused step's cost beyond that pass.  Floors "
           "marked * are raised to a Triton kernel's SASS issue floor (its main loop's "
           "instructions over the SMs' issue and pipe rates, bench/triton_ptx."
           "issue_floor_seconds): there the kernel's instructions, not its bytes or FLOPs, "
           "bound it.  The issue floor counts the launch's tail: each program runs whole on "
           "one SM, so the busiest SM runs ceil(programs / SMs) of them (864 tiles of qkv at "
           "M = 4096 on 132 SMs: 7 where the even share is 6.5, +7%); the bf16 dot's floor "
           "in the target tables and the step pays the same kind of tail at the best of "
           "64x128, 128x128, 128x256 and 256x128 tiles (roofline.launch_tail: cuBLAS "
           "picks its tiles), as do the paths' XLA dots and the design bound's GEMM.  "
           "A stream-K launch (config stream_k = programs, kernels/common.run_stream_k) "
           "shares the K tiles evenly: its busiest SM runs ceil(programs / SMs) programs' "
           "whole-wave tiles and shares, and each piece of a tile cut between programs "
           "writes a float32 partial that counts in DRAM and L2; the path floor keeps the "
           "library's tail in its compute term, so a stream-K row can read no better than "
           "the bf16 dot's floor.  "
           "Where a kernel's K loop waits for all its wgmma every step (Triton "
           "makes no dot with an int32 accumulator asynchronous) and one CTA fills an SM, its "
           "issue floor is the tensor-core time plus the rest of the loop's issue time "
           "(nothing overlaps them), not the larger of the two.  Floors marked + are raised "
           "to the Pallas GEMM's L2 time: every program loads its x rows and weight columns "
           "over its K range from L2 (thin tiles re-read x), plus the output and a K split's "
           "or stream-K launch's partials, at an L2 bandwidth that is an estimate, not a "
           "datasheet figure (kernels/dispatch.L2_BANDWIDTH: A100's 5120 B per clock from its whitepaper, "
           "scaled per SM and clock for H100; static_report.gemm_l2_seconds).  Kernels are "
           "compiled "
           "through triton's TTIR passes as XLA compiles them (bench/triton_ptx.ttir_stage).  "
           "'Design bound' is the floor of the best kernels of this structure "
           "(bench/roofline.two_pass_bound: 4-bit / VQ weights read once inside the GEMM, no "
           "decode pass, the GEMM at its tensor-core or memory floor, and for W4A4 / W4A8 the "
           "act-quant as its own pass at its floor): a miss whose bound is below the target "
           "is the structure's (no kernel of it can meet the target), the others the kernels'.",
           "",
           "| op | target | K x N | M | path | producer | floor us | bf16 floor us (LN fused: "
           "+ the LayerNorm pass) | floor speedup | act-quant share of the rest (LN fused: "
           "raw / beyond the LayerNorm pass) | design bound speedup | meets? |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    share = ""
    if row["act_quant_s"]:
      share = f"{row['act_quant_s'] / row['gemm_s']:.0%}"
      if row["producer_s"]:
        share += f" / {(row['act_quant_s'] - row['producer_s']) / row['gemm_s']:.0%}"
    meets = "yes" if row["speedup"] >= row["target"] else (
        "no: structure" if row["bound_speedup"] < row["target"] else "no: kernels")
    producer = "LN fused" if row["producer_s"] else ""
    mark = ("*" if row["issue_raised"] else "") + ("+" if row["l2_raised"] else "")
    lines.append(f"| {row['op']} | >= {row['target']}x at {row['where']} | {row['k']}x{row['n']} "
                 f"| {row['m']} | {row['path']} | {producer} | {row['floor_s'] * 1e6:.2f}{mark} | "
                 f"{row['bf16_s'] * 1e6:.2f} | {row['speedup']:.2f} | {share} | "
                 f"{row['bound_speedup']:.2f} | {meets} |")
  w4a4 = [r for r in rows if r["op"] == "w4a4" and r["m"] == 4096]
  shares = {(r["k"], r["n"]): (r["act_quant_s"] - r["producer_s"]) / r["gemm_s"] for r in w4a4}
  unfused = [v for key, v in shares.items() if key not in LN_FED_SHAPES]
  fused = [v for key, v in shares.items() if key in LN_FED_SHAPES]
  met = sum(row["speedup"] >= row["target"] for row in rows)
  parts = []
  if fused:
    raw = [r["act_quant_s"] / r["gemm_s"] for r in w4a4 if r["producer_s"]]
    parts.append(f"{min(fused):.0%} to {max(fused):.0%} beyond the LayerNorm pass where the "
                 f"LayerNorm is fused into it ({min(raw):.0%} to {max(raw):.0%} of the GEMM "
                 "counted alone: the fused pass writes 1 B per element where the LayerNorm "
                 "pass it replaces wrote 2 B, so the quantized block pays less than the bf16 "
                 "block for its input)")
  if unfused:
    parts.append(f"{min(unfused):.0%} to {max(unfused):.0%} where it is a pass of its own "
                 "(proj after attention, fc2 after GELU, the adaLN linear): that pass reads x "
                 "(2 B) and writes its image (1 B) per element, while the int8 GEMM at N = K "
                 "moves far fewer bytes per FLOP, so only a producer that emits the quantized "
                 "image (an attention or fc1 epilogue holding whole rows) could meet it there")
  missed = [row for row in rows if row["speedup"] < row["target"]]
  structural = [row for row in missed if row["bound_speedup"] < row["target"]]
  # How much the count hangs on the L2 estimate: the same dispatched tiles, their L2 time at
  # other bandwidths (the tile choice itself also weighs it; not redone here).
  sensitivity = {scale: sum(r["speedup"] >= r["target"]
                            for r in target_rows(cc, shapes, issue, l2_scale=scale))
                 for scale in L2_SENSITIVITY}
  lines += ["", f"{met} of {len(rows)} (op, shape, M) estimates reach their target; of the "
            f"{len(missed)} misses, {len(structural)} are below the target even at the design "
            f"bound ({_miss_list(structural)}) and {len(missed) - len(structural)} are the "
            f"kernels' ({_miss_list([r for r in missed if r not in structural])}).  "
            "With the tiles as dispatched and the L2 bandwidth at "
            + ", ".join(f"{scale:g}x" for scale in L2_SENSITIVITY if scale)
            + " the estimate (or the L2 term left out): "
            + ", ".join(str(sensitivity[scale]) for scale in L2_SENSITIVITY if scale)
            + f" ({sensitivity[0.0]}) of {len(rows)} reach their target.  W4A4 "
            f"act-quant share at M = 4096 (target <= {ACT_QUANT_SHARE_TARGET:.0%}): "
            + "; ".join(parts) + "."]
  return lines


def _miss_list(rows) -> str:
  """'w4a4 1152x1152 M = 4096, 16384; ...' (grouped by op and shape, in table order)."""
  groups = {}
  for row in rows:
    groups.setdefault((row["op"], row["k"], row["n"]), []).append(str(row["m"]))
  return "; ".join(f"{op} {k}x{n} M = {', '.join(ms)}" for (op, k, n), ms in groups.items()) or "none"


# DiT-XL/2 at 256 px, batch 8 with CFG: 16 images x 256 tokens per block; 28 blocks.
DIT_XL2_BLOCK = dict(tokens=16 * 256, images=16, seq=256, hidden=1152, heads=16, depth=28)
DIT_XL2_BLOCK_LINEARS = (("qkv", 1152, 3456), ("proj", 1152, 1152), ("fc1", 1152, 4608),
                         ("fc2", 4608, 1152))
STEP_VARIANTS = (("bf16", None), ("VQ W2", "vq"), ("HQ-DiT W4A4", "w4a4"),
                 ("HQ-DiT W4A8", "w4a8"))


GELU_EPILOGUE_MUFU = 1  # SASS of fp4_mma's epilogue with 'gelu_tanh': one MUFU.TANH per element
MUFU_LANES_PER_SM = 16  # special-function results per SM per clock (sm_80 / sm_90)


def gelu_epilogue_floor(m_rows: int, n_features: int, cc: int) -> float:
  """Seconds of fc1's fused GELU on the special-function units (1 MUFU.TANH per output element;
  its 5 other instructions per element issue on the FMA pipe, below this), with no overlap."""
  rate = MUFU_LANES_PER_SM * triton_ptx.SM_COUNT[cc] * triton_ptx.CLOCK_HZ[cc]
  return GELU_EPILOGUE_MUFU * m_rows * n_features / rate


def dit_step_estimate(cc: int, issue: Optional[dict] = None) -> list[dict]:
  """Floors of one DiT-XL/2 sampling step's matmuls per variant: the 4 token linears (M =
  4096) and the adaLN linear (M = 16 images, 1152 -> 6912) of each block through the
  dispatcher's path, plus the attention matmuls (bf16, QK^T and PV, unchanged by quantization)
  and the two LayerNorm + modulate passes per block, which the W4A4 / W4A8 variants fuse into
  the qkv / fc1 act-quant (counted there), and the GELU pass over fc1's output, which every
  FP4 path fuses into fc1's epilogue (bf16 and VQ pay it as a pass; the FP4 variants its
  epilogue's special-function floor, :func:`gelu_epilogue_floor`).  Residual / gate passes are
  left out (the same in every variant)."""
  cls = CLASS_OF_CC[cc]
  peaks = roofline.DATASHEET[cls]
  kind = triton_ptx.DEVICE_KIND[cc]
  b = DIT_XL2_BLOCK
  attn_flops = 2 * 2 * b["images"] * b["seq"] * b["seq"] * b["hidden"]
  attn_bytes = 4 * b["tokens"] * b["hidden"] * roofline.BF16_BYTES  # q, k, v read, out written
  attention_s = roofline.floor_seconds(attn_flops, attn_bytes, peaks)["floor_s"]
  norm_pass_s = roofline.layer_norm_pass_floor(b["tokens"], b["hidden"], peaks)["floor_s"]
  gelu_pass_s = roofline.gelu_pass_floor(b["tokens"], 4 * b["hidden"], peaks)["floor_s"]
  gelu_epilogue_s = gelu_epilogue_floor(b["tokens"], 4 * b["hidden"], cc)
  rows = []
  for name, op in STEP_VARIANTS:
    linears_s = 0.0
    norms_s = 2 * norm_pass_s  # one per LN-fed linear (qkv, fc1) unless its act-quant fuses it
    for m_rows, k_features, n_features in (
        [(b["tokens"], k, n) for _, k, n in DIT_XL2_BLOCK_LINEARS] + [(b["images"], 1152, 6912)]):
      if op is None:
        floor = roofline.bf16_dot_floor(m_rows, k_features, n_features, peaks,
                                        sms=triton_ptx.SM_COUNT[cc])
      else:
        path = dispatch.choose(op, m_rows, k_features, n_features, device_kind=kind).path
        fused = (op != "vq" and m_rows == b["tokens"]
                 and (k_features, n_features) in LN_FED_SHAPES
                 and fp4_matmul.fuses_row_norm(op, path))
        norms_s -= norm_pass_s if fused else 0.0
        floor = path_floor(op, path, m_rows, k_features, n_features, cc, fused, issue)
      linears_s += floor["floor_s"]
    # FP4 paths: in fc1's epilogue, at its special-function floor (counted as if it did not
    # overlap the GEMM's tensor-core time)
    gelu_s = gelu_pass_s if op in (None, "vq") else gelu_epilogue_s
    step_s = b["depth"] * (linears_s + attention_s + norms_s + gelu_s)
    rows.append(dict(variant=name, linears_s=b["depth"] * linears_s,
                     attention_s=b["depth"] * attention_s, norms_s=b["depth"] * norms_s,
                     gelu_s=b["depth"] * gelu_s, step_s=step_s))
  base = rows[0]["step_s"]
  for row in rows:
    row["speedup"] = base / row["step_s"]
  return rows


def dit_step_markdown(cc: int, issue: Optional[dict] = None) -> list[str]:
  peaks = roofline.DATASHEET[CLASS_OF_CC[cc]]
  lines = ["", f"### DiT-XL/2 sampling step (256 px, batch 8 with CFG), sm_{cc} ({peaks.name})",
           "", "Sum of floors over the 28 blocks: the five linears through the dispatcher's "
           "paths, the bf16 attention matmuls, the two LayerNorm + modulate passes per block "
           "(fused into the qkv / fc1 act-quant where the dispatched path's act-quant is the "
           "Triton kernel, then counted in the linears: W4A4 on both, W4A8 on sm_80) and the "
           "GELU over fc1's output (a pass for bf16 and VQ; fused into fc1's epilogue by every FP4 "
           "path, counted there at its special-function floor, 1 MUFU per element, without "
           "overlap); the other elementwise passes (gates, residuals; the same in every "
           "variant) are not counted, so real speedups are lower.  Triton kernels' parts are at "
           "least their SASS issue floors (as in the table above).",
           "", "| variant | linears us | attention us | LayerNorm passes us | GELU us | "
           "step floor us | floor speedup |", "|---|---|---|---|---|---|---|"]
  for row in dit_step_estimate(cc, issue):
    lines.append(f"| {row['variant']} | {row['linears_s'] * 1e6:.0f} | "
                 f"{row['attention_s'] * 1e6:.0f} | {row['norms_s'] * 1e6:.0f} | "
                 f"{row['gelu_s'] * 1e6:.0f} | "
                 f"{row['step_s'] * 1e6:.0f} | {row['speedup']:.2f} |")
  return lines


def markdown(result: dict, header_lines) -> str:
  lines = list(header_lines)
  for cc in result:
    issue = issue_floors(result[cc])
    lines += targets_markdown(cc, issue=issue) + dit_step_markdown(cc, issue)
  for cc, rows in result.items():
    peaks = roofline.DATASHEET[CLASS_OF_CC[cc]]
    lines += ["", f"## sm_{cc}{'a' if cc >= 90 else ''} ({peaks.name}: "
              f"{peaks.matmul_flops / 1e12:.0f} TFLOP/s bf16, {peaks.bandwidth / 1e12:.2f} TB/s)",
              "",
              "| case | path | config | tensor cores | regs | spills (B) | smem (KB) | per K step: "
              "cp.async / ld.global / MMA instr | whole kernel: cp.async, ld.global (v4 / v2 / "
              "8-bit) | atom | SASS main loop per warp: instr (alu / imad / fp32 / fp16x2 / "
              "convert / memory) | issue floor us (pipe) | floor us | bf16 floor us | floor "
              "speedup |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
      config = " ".join(f"{k}={v}" for k, v in row["config"].items()
                        if k != "path" and not (k in _STREAM_K_KEYS and not v))
      floor, bf16_floor, speedup = row["floors"]
      if not row["stats"]:
        lines.append(f"| {row['name']} | {row['path']} | XLA | cuBLAS bf16 GEMM (not a Triton "
                     f"kernel) | | | | | | | | | {floor} | {bf16_floor} | {speedup} |")
        continue
      for stats in row["stats"]:
        if "compile_error" in stats:
          lines.append(f"| {row['name']} | {row['path']} | {config} | compile failed: "
                       f"{stats['compile_error'][:100]} | | | | | | | | | {floor} | "
                       f"{bf16_floor} | {speedup} |")
          continue
        spills = (stats.get("spill_store_bytes") or 0) + (stats.get("spill_load_bytes") or 0)
        lines.append(
            f"| {row['name']} | {row['path']} | {config} | {_tensor_core_text(stats)} | "
            f"{stats.get('registers')} | {spills} | {stats['shared_bytes'] / 1024:.0f} | "
            f"{stats['step_cp_async']} / {stats['step_ld_global']} / {stats['step_mma']} | "
            f"{stats['cp_async']}, {stats['ld_global']} ({stats['ld_global_v4']} / "
            f"{stats['ld_global_v2']} / {stats['ld_global_8bit']}) | {stats['atom']} | "
            f"{_sass_text(stats)} | {floor} | {bf16_floor} | {speedup} |")
  return "\n".join(lines) + "\n"
