"""What a Pallas-Triton kernel compiles to, read without a GPU.

``lower_for_gpu`` exports a jitted function for the "cuda" platform under an abstract GPU
(``jax.sharding.AbstractDevice`` + ``use_abstract_mesh``, what jax >= 0.11 needs when no GPU is
attached; jax 0.10 falls back to sm_90 on its own) and records the Triton IR (TTIR) of every
Pallas call it lowers.  ``compile_ttir`` compiles one module with the ``triton`` package for a
compute capability (90 -> sm_90a, 80 -> sm_80) and ``ptx_counts`` / ``ptxas_resources`` read the
PTX and the assembler's resource report: tensor-core instructions and operand types,
registers, spills, shared memory, async copies and the kinds of global loads.

The capture hooks jax's private Pallas-Triton lowering entry point
(``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module``); it exists unchanged in
jax 0.10.2 ... 0.12.0.  ``lowering_available()`` says whether this jax + triton can do it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile

import jax

# jax device_kind strings of the abstract devices, per compute capability.
DEVICE_KIND = {90: "NVIDIA H100 80GB HBM3", 80: "NVIDIA A100-SXM4-80GB"}
SM_COUNT = {90: 132, 80: 108}  # the abstract device's cores (Mosaic GPU sizes its grid by them)
# The custom-call target of a Pallas-Triton call differs between jax releases.
TRITON_CALL_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call")


def abstract_gpu_mesh(cc: int = 90):
  """An empty AbstractMesh on an abstract NVIDIA GPU of compute capability ``cc``."""
  device = jax.sharding.AbstractDevice(device_kind=DEVICE_KIND[cc], num_cores=SM_COUNT[cc],
                                       platform="gpu")
  return jax.sharding.AbstractMesh((), (), abstract_device=device)


@contextlib.contextmanager
def abstract_gpu(cc: int = 90):
  """Within the block, Pallas-Triton lowering targets an abstract GPU of capability cc."""
  with jax.sharding.use_abstract_mesh(abstract_gpu_mesh(cc)):
    yield


def export_for_gpu(jitted, *avals, cc: int = 90):
  """jax.export of ``jitted(*avals)`` for "cuda" with Pallas custom calls allowed."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in TRITON_CALL_TARGETS]
  with abstract_gpu(cc):
    return jax.export.export(jitted, platforms=["cuda"], disabled_checks=checks)(*avals)


def lower_for_gpu(jitted, *avals, cc: int = 90) -> list[dict]:
  """TTIR of every Pallas call in ``jitted(*avals)``: [{ttir, grid, name}]."""
  from jax._src.pallas.triton import lowering as triton_lowering
  captured = []
  original = triton_lowering.lower_jaxpr_to_triton_module

  def recording(*args, **kwargs):
    result = original(*args, **kwargs)
    text = result.module.operation.get_asm(enable_debug_info=False)
    name = re.search(r"tt\.func (?:public )?@(\w+)", text)
    captured.append(dict(ttir=text, grid=tuple(result.grid),
                         name=name.group(1) if name else "?"))
    return result

  triton_lowering.lower_jaxpr_to_triton_module = recording
  try:
    export_for_gpu(jitted, *avals, cc=cc)
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original
  return captured


def pallas_call_names(jitted, *args) -> list[str]:
  """Names of the Pallas calls ``jitted(*args)`` makes, one per call site in execution order,
  through nested jits, loops and conditionals (a kernel called twice is listed twice; the
  StableHLO text outlines a jitted wrapper once, so counting custom calls there undercounts)."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        info = eqn.params.get("name_and_src_info") or eqn.params.get("name")
        names.append(getattr(info, "name", None) or str(info).split(" ")[0])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)

  walk(jax.make_jaxpr(jitted)(*args).jaxpr)
  return names


def lowering_available() -> tuple[bool, str]:
  """(ok, why not): triton importable and jax new enough to lower for an abstract GPU."""
  try:
    import triton  # noqa: F401
  except ImportError:
    return False, "the triton package is not installed"
  if not hasattr(jax.sharding, "AbstractDevice"):
    return False, f"jax {jax.__version__} has no AbstractDevice"
  return True, ""


def ttir_stage(ttir: str, *, num_warps: int, num_stages: int, cc: int) -> str:
  """Run triton's TTIR-level passes (``make_ttir``: inliner, canonicalize, combine, ...) over
  the TTIR that Pallas emits, as XLA's Triton pipeline does before it converts to TTGIR
  (xla/backends/gpu/codegen/triton/compilation_pipeline_cuda.cc).  ``triton.compile`` on a
  ``.ttir`` file starts after that stage, so without this the combine pass never folds Pallas's
  ``acc + dot(a, b)`` into ``dot(a, b, acc)``: the PTX then waits for every wgmma in the K loop
  (``wgmma.wait_group 0``) and adds the accumulator on the FP32 pipe, which is not what a GPU
  runs."""
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia.compiler import CUDABackend
  backend = CUDABackend(GPUTarget("cuda", cc, 32))
  options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    module = ir.parse_mlir_module(path, context)
  module.context = context
  return str(CUDABackend.make_ttir(module, {}, options, cc))


def compile_ttir(ttir: str, *, num_warps: int, num_stages: int, cc: int,
                 run_ttir_stage: bool = True):
  """Compile TTIR text with triton for sm_<cc> (sm_90a for 90); returns the compiled kernel.
  run_ttir_stage: first run :func:`ttir_stage` (what XLA does; False: the raw Pallas TTIR)."""
  import triton
  from triton.backends.compiler import GPUTarget
  if run_ttir_stage:
    ttir = ttir_stage(ttir, num_warps=num_warps, num_stages=num_stages, cc=cc)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    return triton.compile(path, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _count(pattern: str, text: str) -> int:
  return len(re.findall(pattern, text))


def _types(pattern: str, text: str) -> list[str]:
  return sorted(set(re.findall(pattern, text)))


def ptx_counts(ptx: str) -> dict:
  """Instruction counts that decide a matrix kernel's speed (static counts in the PTX text)."""
  return dict(
      wgmma=_count(r"wgmma\.mma_async", ptx),
      wgmma_types=_types(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.(\S+?)[ ;]", ptx),
      mma=_count(r"\bmma\.sync\.aligned", ptx),
      mma_types=_types(r"mma\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.\w+\.(\S+?)[ ;]", ptx),
      cp_async=_count(r"cp\.async\.(?:ca|cg)\.shared", ptx),
      tma=_count(r"cp\.async\.bulk", ptx),
      ld_global=_count(r"\bld\.global", ptx),
      ld_global_v4=_count(r"\bld\.global[.\w]*\.v4", ptx),
      ld_global_v2=_count(r"\bld\.global[.\w]*\.v2", ptx),
      ld_global_8bit=_count(r"\bld\.global[.\w]*\.[ubs]8\b", ptx),
      ld_shared=_count(r"\bld\.shared", ptx),
      ldmatrix=_count(r"\bldmatrix", ptx),
      st_shared=_count(r"\bst\.shared", ptx),
      atom=_count(r"\batom\.", ptx),
      prmt=_count(r"\bprmt\.b32", ptx),
      local=_count(r"\b(?:ld|st)\.local", ptx),
      ptx_lines=ptx.count("\n"))


def main_loop_span(lines, label_pattern: str, branch_pattern: str, mma_pattern: str):
  """(first, last) line of a kernel's main loop, of the regions from a label to a backward
  branch to it: the longest one holding a tensor-core instruction (``mma_pattern``) that holds
  no other such region; without tensor-core loops, the longest region.  A plain tiled
  kernel's is its K loop; a stream-K kernel's loop over tiles holds its K loop, which is the
  main loop (the blocks of its fix-up are longer regions without tensor-core instructions).
  (0, 0): no loop."""
  labels, loops = {}, []
  for number, line in enumerate(lines):
    label = re.match(label_pattern, line)
    if label:
      labels[label.group(1)] = number
      continue
    branch = re.search(branch_pattern, line)
    if branch and branch.group(1) in labels:
      loops.append((labels[branch.group(1)], number))
  mma_loops = [(a, b) for a, b in loops
               if any(re.search(mma_pattern, line) for line in lines[a:b + 1])]
  candidates = [(a, b) for a, b in mma_loops
                if not any((c, d) != (a, b) and a <= c and d <= b for c, d in mma_loops)]
  best = (0, 0)
  for a, b in candidates or loops:
    if b - a > best[1] - best[0]:
      best = (a, b)
  return best


_PTX_MMA = r"\bmma\.sync\.aligned|wgmma\.mma_async"


def unrolled_loop(lines, best, mma_pattern: str) -> bool:
  """Whether a kernel's K loop was unrolled: it has tensor-core instructions but the main loop
  span ``best`` (main_loop_span) holds none (a static trip count: split 1 of 9 K tiles, or one
  K tile per part).  Then the whole kernel is every iteration at once."""
  return (not any(re.search(mma_pattern, line) for line in lines[best[0]:best[1] + 1])
          and any(re.search(mma_pattern, line) for line in lines))


def k_loop_body(ptx: str) -> str:
  """PTX text of the kernel's main loop (main_loop_span).  In a software-pipelined Triton
  matmul that is one K step (its loads fetch a later step)."""
  lines = ptx.splitlines()
  best = main_loop_span(lines, r"^\s*(\$L\w+):", r"\bbra(?:\.uni)?\s+(\$L\w+);", _PTX_MMA)
  if unrolled_loop(lines, best, _PTX_MMA):  # every iteration: the whole kernel
    return ptx
  return "\n".join(lines[best[0]:best[1] + 1])


def per_k_step_counts(ptx: str) -> dict:
  """The loads, async copies and tensor-core instructions in one iteration of the K loop."""
  body = k_loop_body(ptx)
  return dict(step_ld_global=_count(r"\bld\.global", body),
              step_ld_global_v4=_count(r"\bld\.global[.\w]*\.v4", body),
              step_ld_global_v2=_count(r"\bld\.global[.\w]*\.v2", body),
              step_cp_async=_count(r"cp\.async\.(?:ca|cg)\.shared", body),
              step_mma=_count(r"\bmma\.sync\.aligned", body) + _count(r"wgmma\.mma_async", body),
              step_lines=body.count("\n") + 1 if body else 0)


# Dense tensor-core peaks per SM and clock (datasheet peak / SMs / CLOCK_HZ): FLOP per cycle.
# H100 SXM: 989 TFLOP/s bf16, twice that for 8-bit; A100 SXM: 312 / 624.
MMA_FLOPS_PER_SM_CYCLE = {90: {"16bit": 989e12 / 132 / 1.83e9, "8bit": 2 * 989e12 / 132 / 1.83e9},
                          80: {"16bit": 312e12 / 108 / 1.41e9, "8bit": 2 * 312e12 / 108 / 1.41e9}}
SHARED_BYTES_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
REGISTERS_PER_SM = 65536


def _operand_class(types: str) -> str:
  return "8bit" if re.search(r"\b(?:s8|u8|e4m3|e5m2)\b", types.replace(".", " ")) else "16bit"


def loop_mma_work(ptx: str, num_warps: int) -> dict:
  """Tensor-core work of one CTA in one iteration of the main loop (k_loop_body), in FLOPs by
  operand width: a wgmma mMnNkK is issued by each warpgroup (num_warps / 4 of them) and does
  2 M N K; an mma.sync mMnNkK by each warp.  Also whether the loop waits for all its wgmma
  before the next iteration (``wgmma.wait_group 0`` inside it: in that CTA no tensor-core work
  overlaps the rest of the iteration; a properly asynchronous Triton dot waits with
  ``wait_group 1`` and overlaps the next iteration's loads and decode)."""
  body = k_loop_body(ptx)
  flops = {"16bit": 0.0, "8bit": 0.0}
  pattern = r"m(\d+)n(\d+)k(\d+)\.(\S+?)[ ;]"
  for m, n, k, types in re.findall(r"wgmma\.mma_async\.sync\.aligned\." + pattern, body):
    flops[_operand_class(types)] += 2.0 * int(m) * int(n) * int(k) * max(num_warps // 4, 1)
  for m, n, k, types in re.findall(r"\bmma\.sync\.aligned\." + pattern, body):
    flops[_operand_class(types)] += 2.0 * int(m) * int(n) * int(k) * num_warps
  waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", body)
  return dict(loop_mma_flops_16bit=flops["16bit"], loop_mma_flops_8bit=flops["8bit"],
              loop_wgmma_waits_all=any(int(w) == 0 for w in waits))


def ctas_per_sm(registers: int | None, num_warps: int, shared_bytes: int, cc: int) -> int:
  """CTAs of one kernel resident per SM, bounded by registers (allocated per warp in units of
  256) and shared memory; at least 1."""
  limits = []
  if registers:
    per_warp = -(-registers * 32 // 256) * 256
    limits.append(REGISTERS_PER_SM // (per_warp * num_warps))
  if shared_bytes:
    limits.append(SHARED_BYTES_PER_SM.get(cc, 164 * 1024) // int(shared_bytes))
  return max(1, min(limits)) if limits else 1


def find_ptxas() -> list[str]:
  """ptxas binaries, newest first: triton ships ``ptxas-blackwell`` (CUDA 13.x, knows the PTX
  ISA 9.x that triton 3.9 writes) and ``ptxas`` (CUDA 12.x); then one on PATH."""
  try:
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  except ImportError:
    bin_dir = ""
  candidates = (os.path.join(bin_dir, "ptxas-blackwell"), os.path.join(bin_dir, "ptxas"),
                shutil.which("ptxas"))
  return [c for c in candidates if c and os.path.exists(c)]


def _run_ptxas(ptxas: str, ptx: str, arch: str) -> subprocess.CompletedProcess:
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "kernel.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    return subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                          capture_output=True, text=True, timeout=600)


def ptxas_resources(ptx: str, cc: int) -> dict:
  """Registers, spill bytes, stack frame from ``ptxas -v`` on the PTX (empty if no ptxas).

  The first ptxas that knows the PTX's ISA version is used; if none does, the version line is
  lowered to the newest known one (resource counts stay meaningful as long as the kernel uses
  no newer instruction; ``ptx_version_lowered_to`` records it).
  """
  arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
  lowered = None
  run = None
  for ptxas in find_ptxas():
    run = _run_ptxas(ptxas, ptx, arch)
    known = re.search(r"Unsupported \.version [0-9.]+; current version is '([0-9.]+)'",
                      run.stdout + run.stderr)
    if not known:
      break
    lowered = known.group(1)
    run = _run_ptxas(ptxas, re.sub(r"\.version \d+\.\d+", f".version {lowered}", ptx, count=1),
                     arch)
    if run.returncode == 0:
      break
  if run is None:
    return {}
  report = run.stdout + run.stderr

  def number(pattern):
    match = re.search(pattern, report)
    return int(match.group(1)) if match else None

  return dict(registers=number(r"Used (\d+) registers"),
              spill_store_bytes=number(r"(\d+) bytes spill stores"),
              spill_load_bytes=number(r"(\d+) bytes spill loads"),
              stack_bytes=number(r"(\d+) bytes stack frame"),
              ptxas_ok=run.returncode == 0, ptx_version_lowered_to=lowered,
              ptxas_error=None if run.returncode == 0 else report.strip()[-300:])


# ----------------------------------------------------------------------------------------
# SASS of the main loop: what the SM's schedulers must issue per iteration.
# ----------------------------------------------------------------------------------------

# Per-SM throughput of each instruction class in warp-instructions per clock (sm_80 / sm_90,
# CUDA programming guide's arithmetic-instruction throughput table): every instruction takes
# an issue slot (4 schedulers); the "int" class is the ALU pipe at 64 lanes per clock: 32-bit
# integer / logic / shift / permute ops (LOP3, SHF, PRMT, IADD3, ...) and also FP32 compare,
# select, min / max and the bf16 pack (F2FP).  IMAD (also IMAD.MOV / IMAD.SHL, which ptxas
# uses as moves and shifts to offload the ALU pipe) and IDP run on the FMA pipe instead, its
# "heavy" half on sm_90 (NVIDIA: GH100's FMAheavy pipe takes IMAD, IDP and FP32, FMAlite FP32
# only, and FP16x2 ops issue to both halves; GA100 has one FMA pipe for IMAD, IDP and FP32,
# its FP16x2 ops go to the pipe it shares with the tensor cores and FP64).  So: "imad" at 64
# lanes per clock; FP32 add / multiply / FMA at 128 on sm_90 (64 on sm_80); on sm_90 the two
# FMA halves bound IMAD + FP32 + 2 x FP16x2 together at 128 lanes ("fma"); FP16x2 at 64 on
# sm_80.  Conversions (I2F, F2F, F2I, ...) and MUFU at 16; warp shuffles at 32 and shared /
# global memory instructions through the MIO queue at about 1 (the "memory" class).
# Tensor-core instructions are timed from their FLOPs (loop_mma_work), not here.
SASS_RATES = {"issue": 4.0, "int": 2.0, "imad": 2.0, "fp32": 4.0, "convert": 0.5, "memory": 1.0,
              "fma": 4.0}
SASS_RATES_SM80 = {"issue": 4.0, "int": 2.0, "imad": 2.0, "fp32": 2.0, "convert": 0.5,
                   "memory": 1.0, "fma": 2.0, "fp16x2": 2.0}
CLOCK_HZ = {90: 1.83e9, 80: 1.41e9}  # the clocks at which the datasheet tensor peaks hold
_TENSOR_OPS = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "WARPGROUP", "WARPSYNC")
_CONVERT_OPS = ("I2F", "F2I", "F2F", "I2I", "I2FP", "MUFU", "FRND", "POPC", "FLO", "BREV")
_FP32_OPS = ("FADD", "FMUL", "FFMA", "FCHK", "FSWZADD")
_IMAD_OPS = ("IMAD", "IMUL", "IDP", "IMADSP")
_FP16X2_OPS = ("HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSET2", "HSETP2")
_MEMORY_OPS = ("LDS", "STS", "LDG", "STG", "LDGSTS", "LDSM", "STSM", "ATOM", "ATOMS", "RED",
               "LDL", "STL", "UTMALDG", "UBLKCP", "LD", "ST", "SHFL")


def _class_counts(loop: dict, cc: int) -> dict:
  """Warp-instructions per iteration charged to each rate of SASS_RATES(_SM80): the classes
  themselves plus the combined FMA-pipe count ("fma": IMAD + FP32, and on sm_90 FP16x2 twice)."""
  counts = {name: loop.get(name, 0) for name in ("issue", "int", "imad", "fp32", "convert",
                                                 "memory", "fp16x2")}
  if cc >= 90:
    counts["fma"] = counts["imad"] + counts["fp32"] + 2 * counts["fp16x2"]
  else:
    counts["fma"] = counts["imad"] + counts["fp32"]
  return counts


def sass_text(kernel, cc: int) -> str:
  """SASS of a compiled triton kernel (nvdisasm from triton's package), '' if unavailable."""
  import triton
  cubin = kernel.asm.get("cubin")
  tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
  if not cubin or not os.path.exists(tool):
    return ""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.cubin")
    with open(path, "wb") as f:
      f.write(cubin)
    run = subprocess.run([tool, "-c", path], capture_output=True, text=True, timeout=120)
  del cc
  return run.stdout if run.returncode == 0 else ""


def _sass_opcode(line: str):
  match = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)", line)
  return match.group(1) if match else None


def sass_loop_classes(sass: str) -> dict:
  """Instruction classes in the SASS main loop (main_loop_span: a label to a backward BRA to
  it): one K step of a Pallas matmul, or one token of quantize_rows."""
  lines = sass.splitlines()
  mma = r"\b(?:HMMA|IMMA|HGMMA|IGMMA|QGMMA)\b"
  best = main_loop_span(lines, r"^(\.L_x_\d+):", r"\bBRA\b[^(]*\((\.L_x_\d+)\)", mma)
  counts = dict(issue=0, int=0, imad=0, fp32=0, fp16x2=0, convert=0, memory=0, tensor=0,
                uniform=0)
  if unrolled_loop(lines, best, mma):  # the whole kernel, counted once (unrolled = 1)
    best, counts["unrolled"] = (0, len(lines) - 1), 1
  elif best == (0, 0):  # no loop and no tensor cores: no per-iteration count
    return {}
  for line in lines[best[0]:best[1] + 1]:
    opcode = _sass_opcode(line)
    if opcode is None or opcode in ("NOP",):
      continue
    counts["issue"] += 1
    if opcode.startswith(_TENSOR_OPS):
      counts["tensor"] += 1
    elif opcode in _CONVERT_OPS:
      counts["convert"] += 1
    elif opcode in _FP32_OPS:
      counts["fp32"] += 1
    elif opcode in _IMAD_OPS:
      counts["imad"] += 1
    elif opcode in _FP16X2_OPS:
      counts["fp16x2"] += 1
    elif opcode in _MEMORY_OPS:
      counts["memory"] += 1
    elif opcode.startswith("U") or opcode in ("BAR", "BRA", "DEPBAR", "MEMBAR", "FENCE",
                                              "LDGDEPBAR", "ARRIVES", "SYNCS", "EXIT"):
      counts["uniform"] += 1  # uniform datapath / control: an issue slot only
    else:
      counts["int"] += 1
  return counts


def issue_floor_seconds(loop: dict, *, num_warps: int, programs: int, trips: int, cc: int,
                        sm_count: int | None = None, mma: dict | None = None) -> dict:
  """Lower bound on a kernel's time from what its main loop must issue and compute: over all
  programs and iterations, each instruction class's warp-instructions / (SMs x its per-SM rate
  x clock), and the loop's tensor-core FLOPs at the per-SM peak (``mma``: kernel_stats'
  ``loop_mma_*`` and ``ctas_per_sm``).  Overlap: where the loop waits for all its wgmma in
  every iteration and one CTA fills an SM, nothing else runs while the tensor cores work, so
  the floor is the tensor time plus the slowest class's time ("serial"); otherwise the slowest
  of all (perfect overlap).  Tail: programs are whole units of work on one SM each, so the
  busiest SM runs ceil(programs / SMs) of them and the floor is that SM's time (``tail``: that
  over the even share, 1.07 for 864 tiles on 132 SMs).  No latency."""
  rates = SASS_RATES if cc >= 90 else SASS_RATES_SM80
  sms = sm_count or SM_COUNT.get(cc, 108)
  clock = CLOCK_HZ.get(cc, 1.4e9)
  busiest = -(-int(programs) // sms)  # programs on the busiest SM
  tail = busiest * sms / max(int(programs), 1)
  warp_iterations = busiest * sms * trips * num_warps  # every SM as busy as the busiest
  counts = _class_counts(loop, cc)
  times = {name: warp_iterations * counts[name] / (sms * rate * clock)
           for name, rate in rates.items()}
  bound = max(times, key=times.get)
  floor = times[bound]
  out = {}
  if mma:
    peaks = MMA_FLOPS_PER_SM_CYCLE.get(cc, MMA_FLOPS_PER_SM_CYCLE[80])
    cycles = sum(mma.get(f"loop_mma_flops_{width}", 0.0) / peaks[width] for width in peaks)
    tensor_s = busiest * trips * cycles / clock
    serial = bool(mma.get("loop_wgmma_waits_all")) and int(mma.get("ctas_per_sm", 1)) <= 1
    out.update(tensor_s=tensor_s, mma_serial=serial)
    if serial:
      floor, bound = tensor_s + floor, f"serial mma+{bound}"
    elif tensor_s > floor:
      floor, bound = tensor_s, "tensor"
  return dict(issue_floor_s=floor, issue_bound=bound, tail=tail, **out,
              **{f"{k}_s": v for k, v in times.items()})


def kernel_stats(ttir: str, *, num_warps: int, num_stages: int, cc: int) -> dict:
  """compile_ttir + ptx_counts + ptxas_resources + shared memory + the SASS main loop's
  instruction classes (``sass_*``), one dict."""
  try:
    kernel = compile_ttir(ttir, num_warps=num_warps, num_stages=num_stages, cc=cc)
  except Exception as error:  # a config that triton rejects (shared memory, layout)
    return dict(cc=cc, compile_error=f"{type(error).__name__}: {str(error)[:300]}")
  ptx = kernel.asm["ptx"]
  stats = dict(cc=cc, num_warps=num_warps, num_stages=num_stages,
               shared_bytes=kernel.metadata.shared)
  stats.update(ptx_counts(ptx))
  stats.update(per_k_step_counts(ptx))
  stats.update(ptxas_resources(ptx, cc))
  stats.update(loop_mma_work(ptx, num_warps))
  stats["ctas_per_sm"] = ctas_per_sm(stats.get("registers"), num_warps, stats["shared_bytes"], cc)
  sass = sass_text(kernel, cc)
  loop = sass_loop_classes(sass) if sass else {}
  stats.update({f"sass_{k}": v for k, v in loop.items()})
  return stats
