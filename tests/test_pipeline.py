"""End to end: quantize.py / sample.py, the reproduce pipeline, sweeps, ADM shards (multi-device
and multi-process equivalence: tests/test_multiprocess.py).

Runs on a tiny random DiT (tests/tiny_model.py) and a few samples, with the shipped classifier.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dit_quant_jax import config_spec, reproduce, sweep
from tiny_model import save_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "dit"))


def _run(args, env=None, timeout=600):
  result = subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  return result


def test_reproduce_tiny_end_to_end(tiny_ckpt, tmp_path):
  config = config_spec.load("configs/reproduce.py:tiny")
  config.model = tiny_ckpt
  config.results_dir = str(tmp_path / "results")
  config.quant_dir = str(tmp_path / "quant")
  # RTN: tests/test_rtn.py; the k-means-only row: test_shared_overrides_leave_kmeans_rows_uncalibrated
  keep = {"fp", "vq4dit_w2", "hqdit_w4a4", "vq_w2a4"}
  config.rows = [r for r in config.rows if r.key in keep]
  messages = []
  rows = reproduce.run(config, progress=messages.append)
  assert [r["key"] for r in rows] == [r.key for r in config.rows]
  by_key = {r["key"]: r for r in rows}
  assert np.isinf(by_key["fp"]["paired_psnr"])  # FP against itself
  for key in keep - {"fp"}:
    assert np.isfinite(by_key[key]["paired_psnr"]), key
    assert by_key[key]["size_mb"] < by_key["fp"]["size_mb"], key
  for name in ("results.md", "results.json", "grids_side_by_side.png", "size_vs_quality.png"):
    assert os.path.getsize(os.path.join(config.results_dir, name)) > 0, name
  table = open(os.path.join(config.results_dir, "results.md")).read()
  assert "VQ4DiT W2" in table and "HQ-DiT W4A4" in table
  assert any("ETA" in m or "elapsed" in m for m in messages)  # progress is reported
  report = json.load(open(os.path.join(config.quant_dir, "vq4dit_w2", "report.json")))
  assert report["calibration"]["steps"] == 2  # the shared override reached the row
  # A second run reuses the quantized checkpoints on disk (no re-quantization).
  mtime = os.path.getmtime(os.path.join(config.quant_dir, "vq4dit_w2", "report.json"))
  config.rows = [r for r in config.rows if r.key == "vq4dit_w2"]
  reproduce.run(config, progress=lambda m: None)
  assert os.path.getmtime(os.path.join(config.quant_dir, "vq4dit_w2", "report.json")) == mtime


def test_shared_overrides_leave_kmeans_rows_uncalibrated():
  config = config_spec.load("configs/reproduce.py:tiny")
  rows = {r.key: r for r in config.rows}
  kmeans = reproduce.row_quantization_config(config, rows["kmeans_w2"])
  calibrated = reproduce.row_quantization_config(config, rows["vq4dit_w2"])
  assert int(kmeans.calibration.steps) == 0  # k-means only stays k-means only
  assert int(calibrated.calibration.steps) == 2 and int(calibrated.calib.num_samples) == 2
  assert int(kmeans.kmeans.num_iters) == int(calibrated.kmeans.num_iters) == 3
  hq = reproduce.row_quantization_config(config, rows["hqdit_w4a4"])
  assert not hq.gptq.enabled  # the tiny job turns GPTQ off for every row that has it


def test_sweep_launcher_and_aggregator(tiny_ckpt, tmp_path):
  definition = config_spec.load("configs/sweeps.py:tiny")
  definition.model = tiny_ckpt
  runs = sweep.expand(definition)
  assert [r["name"] for r in runs] == ["int8_cal", "kmeans_w3_cal"]
  assert runs[0]["overrides"] == {"calib.num_samples": 2, "calib.timestep_respacing": "ddim3"}
  paths = sweep.run_sweep(definition, str(tmp_path), progress=lambda m: None)
  for path in paths:
    result = json.load(open(path))
    assert result["metrics"]["num_samples"] == 10
  table = sweep.aggregate(str(tmp_path))
  assert "int8_cal" in table and "kmeans_w3_cal" in table
  assert open(tmp_path / "table.md").read() == table


def test_config_spec_errors():
  with pytest.raises(FileNotFoundError, match="no_such.py"):
    config_spec.load("configs/no_such.py:x")
  with pytest.raises(KeyError, match="calibration.nope"):
    config_spec.load("configs/vq4dit.py:w2", {"calibration.nope": 1})
  with pytest.raises(ValueError, match="unknown"):
    config_spec.load("configs/hqdit.py:w5a5")


def test_quantize_and_sample_scripts(tiny_ckpt, tmp_path):
  out = tmp_path / "q"
  _run(["experiments/quantize.py", f"--model={tiny_ckpt}", "--config=configs/hqdit.py:int8",
        "--config.calib.num_samples=2", "--config.calib.timestep_respacing=ddim3", f"--output={out}"])
  report = json.load(open(out / "report.json"))
  assert report["method"] == "hqdit" and report["setting"] == "int8"
  samples = tmp_path / "s"
  _run(["experiments/sample.py", f"--model={out}/params", f"--fp_model={tiny_ckpt}",
        "--per_class=1", "--steps=3", f"--output={samples}"])
  metrics = json.load(open(samples / "metrics.json"))
  assert len(metrics["per_step_output_mse"]) == 3 and np.isfinite(metrics["paired_psnr"])
  npz = np.load(samples / "samples.npz")
  assert npz["arr_0"].shape == (10, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
  assert os.path.getsize(samples / "grid.png") > 0


def test_adm_shards_resume_and_config(tmp_path):
  from tiny_model import tiny_model_and_params
  from dit_quant_jax import pipeline
  model, params = tiny_model_and_params()
  noise, labels = pipeline.noise_and_labels(model, 1, seed=0)
  kwargs = dict(shard_size=4, respacing="ddim2", sampler="ddim", cfg_scale=2.0, batch_size=4,
                progress=lambda m: None)
  merged = pipeline.sample_adm_shards(model, params, (noise, labels), str(tmp_path), **kwargs)
  first = np.load(merged)["arr_0"]
  assert first.shape == (10, 32, 32, 3) and first.dtype == np.uint8
  shards = sorted(os.listdir(tmp_path / "shards"))
  assert len(shards) == 3
  os.remove(tmp_path / "shards" / shards[1])  # as if killed before shard 1 was written
  merged = pipeline.sample_adm_shards(model, params, (noise, labels), str(tmp_path), **kwargs)
  np.testing.assert_array_equal(np.load(merged)["arr_0"], first)
  np.testing.assert_array_equal(np.load(merged)["arr_1"], labels)
  c = config_spec.load("configs/dit_xl2.py:512-100-4.0-10k")
  assert (c.expected_input_size, c.respacing, c.cfg_scale, c.num_samples) == (64, "100", 4.0, 10_000)
  with pytest.raises(ValueError, match="bad DiT-XL/2 setting"):
    config_spec.load("configs/dit_xl2.py:256-30-1.5-50k")


def test_readme_results_block_is_regenerated(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- RESULTS:BEGIN -->\nold table\n<!-- RESULTS:END -->\noutro\n")
  reproduce.update_readme(str(readme), "| new | table |\n")
  assert readme.read_text() == ("intro\n<!-- RESULTS:BEGIN -->\n| new | table |\n"
                                "<!-- RESULTS:END -->\noutro\n")
  readme.write_text("no markers")
  with pytest.raises(ValueError, match="RESULTS"):
    reproduce.update_readme(str(readme), "x")


def test_row_selection_only():
  config = config_spec.load("configs/reproduce.py:tiny")
  assert [r.key for r in reproduce.selected_rows(config)] == [r.key for r in config.rows]
  config.only = "kmeans_w2, fp"
  assert [r.key for r in reproduce.selected_rows(config)] == ["fp", "kmeans_w2"]
  config.only = "fp,nope"
  with pytest.raises(ValueError, match="unknown rows.*nope"):
    reproduce.selected_rows(config)
