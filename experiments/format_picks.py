"""Per-layer FP4 format picks of both selection rules, from HQ-DiT quantization reports.

  python experiments/format_picks.py --reports=runs/reproduce/quant/hqdit_w4a4/report.json \
      --output=results/hqdit_formats.md

Each report.json is written by pipeline.quantize_checkpoint (experiments/quantize.py,
reproduce.py); the table is quant.hqdit.format_picks_markdown of its ``format_picks``.
"""

import json

from absl import app, flags

from dit_quant_jax.quant import hqdit

_REPORTS = flags.DEFINE_list("reports", None, "report.json files of HQ-DiT quantizations")
_OUTPUT = flags.DEFINE_string("output", "", "markdown file to write ('' prints only)")
_COMMAND = flags.DEFINE_string("command", "", "the command that made the reports (recorded)")
flags.mark_flag_as_required("reports")


def main(argv):
  del argv
  parts = ["# HQ-DiT: the FP4 format each rule picks, per layer\n",
           "'ratio' is this project's reading of the paper's max/min-ratio rule (quant/hqdit.py; "
           "the paper gives no formula), 'mse' the smallest quantization error on the weight / "
           "calibration rows. The ratio rule is evaluated for every layer, the MSE rule whenever "
           "it is the configured one (— where it was not run); 'used' is the configured one.\n"]
  if _COMMAND.value:
    parts.append(f"Reports made by:\n\n    {_COMMAND.value}\n")
  parts.append("Table made by:\n\n    python experiments/format_picks.py --reports="
               + ",".join(_REPORTS.value) + (f" --output={_OUTPUT.value}" if _OUTPUT.value else "") + "\n")
  for path in _REPORTS.value:
    with open(path) as f:
      report = json.load(f)
    if "format_picks" not in report:
      raise ValueError(f"{path} has no 'format_picks' (not an HQ-DiT report, or made before "
                       "both rules were recorded): quantize again")
    parts.append(f"## {report.get('setting', path)} ({path})\n\n" + hqdit.format_picks_markdown(report) + "\n")
  text = "\n".join(parts)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
