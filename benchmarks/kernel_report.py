"""Writes benchmarks/static_report.md: every kernel the dispatcher picks at the DiT-XL/2 shapes,
lowered for an abstract H100 / A100 and compiled with triton for sm_90a and sm_80 (no GPU).

  .venv312/bin/python benchmarks/kernel_report.py            # needs jax >= 0.10 and triton
  .venv312/bin/python benchmarks/kernel_report.py --out=/tmp/static.md --tokens=16,4096

Logic: dit_quant_jax/bench/static_report.py.
"""

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import triton  # noqa: E402

from dit_quant_jax.bench import static_report  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "static_report.md"))
  parser.add_argument("--tokens", default=",".join(map(str, static_report.DIT_XL2_TOKENS)))
  parser.add_argument("--cc", default="90,80")
  args = parser.parse_args()
  tokens = tuple(int(t) for t in args.tokens.split(","))
  ccs = tuple(int(c) for c in args.cc.split(","))
  result = static_report.build(tokens=tokens, ccs=ccs)
  header = [
      "# Static report: what the kernels compile to (no GPU)", "",
      f"Written by `benchmarks/kernel_report.py` on "
      f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with jax "
      f"{jax.__version__}, triton {triton.__version__} (ptxas from triton's package).", "",
      "Per case: the dispatcher's path and config (kernels/dispatch.py) at that shape on that "
      "device, the tensor-core instruction and operand types in the PTX (static count), "
      "registers and spills (ptxas -v), shared memory, the cp.async, ld.global and tensor-core "
      "instructions in one iteration of the K loop (the PTX's longest backward-branch region), "
      "static counts in the whole kernel (K loop plus its software-pipelining prologue; v4 / v2 "
      "= 16 / 8-byte vector loads, 8-bit = byte loads), atomics (the split-K fix-up), and "
      "the roofline floors (datasheet peaks: max(FLOPs / peak, bytes / bandwidth); "
      "vq_dequant_dot adds its decode pass to the bf16 dot's floor; quantize_rows counts x read "
      "once, its 8-bit image written and the transform's bf16x3 tensor-core FLOPs) with their "
      "ratio, the speedup a perfect kernel would reach. Floors are not measurements. First, per "
      "device, the targets of issue 11 against the floors of the paths the dispatcher picks.",
  ]
  with open(args.out, "w") as f:
    f.write(static_report.markdown(result, header))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
