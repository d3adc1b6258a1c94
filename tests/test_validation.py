"""Validation at the entry (dit_quant_jax/validation.py): one family of configs per test group,
each bad value refused with a ConfigError naming the field, before any expensive work."""

import os
import subprocess
import sys

import pytest

from dit_quant_jax import api, config_spec, pipeline, reproduce, validation
from dit_quant_jax.errors import ConfigError
from tiny_model import TINY_MODEL, save_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "dit"))


@pytest.fixture
def no_expensive_work(monkeypatch):
  """Any trajectory collection, FP load or sampling fails the test: validation must come first."""
  def forbidden(*args, **kwargs):
    raise AssertionError("expensive work started before validation")
  monkeypatch.setattr(api, "calibration_inputs", forbidden)
  monkeypatch.setattr(pipeline, "load_dit", forbidden)
  monkeypatch.setattr(pipeline, "generate", forbidden)
  # Scoring data is checked at the entry too; these tests do not need it installed.
  monkeypatch.setattr(validation, "check_dataset_available", lambda *args, **kwargs: None)


# ---------------------------------------------------------------- quantization configs
@pytest.mark.parametrize("bits", [0, 1])
def test_int_bit_width_0_or_1_refused_before_trajectory(tiny_ckpt, tmp_path, no_expensive_work, bits):
  qconfig = config_spec.load("configs/hqdit.py:int8", {"weight.format": f"int{bits}"})
  with pytest.raises(ConfigError, match=r"--config.weight.format: unsupported bit width"):
    pipeline.quantize_checkpoint(tiny_ckpt, qconfig, str(tmp_path / "q"))
  assert not os.path.exists(tmp_path / "q")


def test_negative_calibration_steps_refused(tiny_ckpt, tmp_path, no_expensive_work):
  qconfig = config_spec.load("configs/vq4dit.py:w2", {"calibration.steps": -5})
  with pytest.raises(ConfigError, match=r"--config.calibration.steps: must be an integer >= 0, got -5"):
    pipeline.quantize_checkpoint(tiny_ckpt, qconfig, str(tmp_path / "q"))


def test_every_problem_listed_in_one_message():
  qconfig = config_spec.load("configs/hqdit.py:w4a4", {"gptq.damp": -1.0, "act.format": "e9m9",
                                                        "calib.num_samples": 0})
  with pytest.raises(ConfigError) as info:
    validation.check_quantization_config(qconfig)
  message = str(info.value)
  for field in ("gptq.damp", "act.format", "calib.num_samples"):
    assert f"--config.{field}" in message


def test_codebook_too_large_for_the_layers_warns_with_the_bit_rate():
  # The tiny model's 32-wide layers hold 32/4 x 32 = 256 sub-vectors: k <= 64 fits, 256 does not.
  qconfig = config_spec.load("configs/vq4dit.py:w2")
  model_config = dict(TINY_MODEL)
  warnings = validation.check_quantization_config(qconfig, model_config)
  assert len(warnings) == 1
  assert "codebook_size 256 (2 bits/weight asked)" in warnings[0]
  assert "bit rate is lower than asked" in warnings[0]
  qconfig.codebook_size = 16
  assert validation.check_quantization_config(qconfig, model_config) == []


def test_subvector_dim_must_divide_every_layer():
  qconfig = config_spec.load("configs/vq4dit.py:w2", {"subvector_dim": 3})
  with pytest.raises(ConfigError, match=r"--config.subvector_dim: 3 does not divide the input dimension 32"):
    validation.check_quantization_config(qconfig, dict(TINY_MODEL))


def test_codebook_beyond_packing_and_candidates_refused():
  with pytest.raises(ConfigError, match="num_candidates: must be at most"):
    validation.check_quantization_config(config_spec.load("configs/vq4dit.py:w2", {"num_candidates": 5}))
  with pytest.raises(ConfigError, match="codebook_size"):
    validation.check_quantization_config(config_spec.load("configs/vq4dit.py:w2", {"codebook_size": 1}))


def _config_module(name):
  import importlib.util
  module_spec = importlib.util.spec_from_file_location(f"{name}_config",
                                                       os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("family", ["vq4dit", "hqdit"])
def test_shipped_quantization_configs_are_valid(family):
  for setting in _config_module(family).SETTINGS:
    validation.check_quantization_config(config_spec.load(f"configs/{family}.py:{setting}"))


def test_reproduce_rows_are_valid(no_expensive_work):
  config = config_spec.load("configs/reproduce.py")
  if not os.path.isdir(config.model):
    pytest.skip("the shipped FP checkpoint is absent")
  validation.check_reproduce_config(config)


# --------------------------------------------------------------------------- reproduce
@pytest.mark.parametrize("field,value,pattern", [
    ("sampling.per_class", 0, r"per_class: must be an integer >= 1, got 0"),
    ("sampling.per_class", -1, r"per_class: must be an integer >= 1, got -1"),
    ("sampling.batch_size", 0, r"batch_size: must be an integer >= 1, got 0"),
    ("sampling.respacing", "ddim0", r"respacing"),
    ("sampling.sampler", "euler", r"sampler: must be one of"),
    ("only", "fp,nope", r"unknown rows \['nope'\]"),
])
def test_reproduce_bad_values_refused_before_the_model_loads(tiny_ckpt, no_expensive_work, field,
                                                              value, pattern):
  config = config_spec.load("configs/reproduce.py:tiny")
  config.model = tiny_ckpt
  config_spec.set_dotted(config, field, value)
  with pytest.raises(ConfigError, match=pattern):
    reproduce.run(config)


def test_reproduce_missing_row_config_and_bad_row_named(tiny_ckpt, no_expensive_work):
  config = config_spec.load("configs/reproduce.py:tiny")
  config.model = tiny_ckpt
  config.rows = list(config.rows[:2]) + [
      reproduce_row("gone", "configs/no_such_method.py:x"),
      reproduce_row("int1", "configs/hqdit.py:int8", (("weight.format", "int1"),))]
  with pytest.raises(ConfigError) as info:
    reproduce.run(config)
  assert "row gone" in str(info.value) and "no_such_method.py" in str(info.value)
  assert "row int1" in str(info.value) and "unsupported bit width 1" in str(info.value)


def reproduce_row(key, spec, overrides=()):
  return _config_module("reproduce")._row(key, key, spec, 8, 8, overrides)


def test_reproduce_missing_model_named(tmp_path, no_expensive_work):
  config = config_spec.load("configs/reproduce.py:tiny")
  config.model = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=r"--config.model: FP model checkpoint .*nowhere.* does not exist"):
    reproduce.run(config)


# ------------------------------------------------------------------ sample / train / sweep
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(per_class=0), "--per_class: must be an integer >= 1, got 0"),
    (dict(per_class=-1), "--per_class: must be an integer >= 1, got -1"),
    (dict(batch_size=0), "--batch_size: must be an integer >= 1, got 0"),
    (dict(respacing_name="ddimx"), "--steps"),
    (dict(sampler="ddpm", eta=0.5, respacing_name="25"), "--eta: applies to the ddim sampler only"),
])
def test_sample_flags(kwargs, pattern):
  flags = dict(per_class=2, batch_size=8, respacing_name="ddim25", sampler="ddim", eta=0.0,
               cfg=3.0, seed=0, score=True)
  flags.update(kwargs)
  with pytest.raises(ConfigError, match=pattern):
    validation.check_sample_flags(**flags)
  flags.update(per_class=1, score=False, batch_size=8, respacing_name="ddim25", sampler="ddim",
               eta=0.0)
  validation.check_sample_flags(**flags)  # a valid set passes


def test_train_config_checks():
  config = config_spec.load("configs/fmnist_dit.py:tiny")
  validation.check_train_config(config)
  config.batch_size = 0
  config.optimizer.learning_rate = -1.0
  config.model.overrides.num_heads = 3
  with pytest.raises(ConfigError) as info:
    validation.check_train_config(config)
  assert "--config.batch_size" in str(info.value) and "learning_rate" in str(info.value)


def test_sweep_bad_run_named(tiny_ckpt, no_expensive_work, tmp_path):
  from dit_quant_jax import sweep
  definition = config_spec.load("configs/sweeps.py:tiny")
  definition.model = tiny_ckpt
  definition.axes = [[("int1", {"spec": "configs/hqdit.py:int8", "weight.format": "int1"})]]
  with pytest.raises(ConfigError, match="run int1.*unsupported bit width 1"):
    sweep.run_sweep(definition, str(tmp_path))


def test_dit_xl2_missing_vae_and_model(tmp_path):
  config = config_spec.load("configs/dit_xl2.py:256-50-1.5-10k")
  config.vae = str(tmp_path / "no_vae")
  with pytest.raises(ConfigError, match="--config.vae"):
    validation.check_dit_xl2_config(config)


def test_missing_config_file_is_one_line_at_entry(tmp_path):
  result = subprocess.run([sys.executable, "experiments/quantize.py", "--config=configs/nope.py:w2",
                           f"--output={tmp_path / 'q'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: --config: config file 'configs/nope.py' does not exist (a path such as "
                    "configs/vq4dit.py:w2, relative to the current directory)"]
  assert "Traceback" not in result.stderr


def test_quantized_checkpoint_refused_as_quantization_input():
  validation.check_not_quantized({"metadata": {}, "quantized_nodes": {}}, "fp", "--model")
  with pytest.raises(ConfigError, match="--model: q is already quantized \\(kmeans_w2\\)"):
    validation.check_not_quantized({"metadata": {"quantization": {"name": "kmeans_w2"}}}, "q", "--model")


def test_results_dir_that_is_a_file_refused(tiny_ckpt, tmp_path, no_expensive_work):
  config = config_spec.load("configs/reproduce.py:tiny")
  config.model = tiny_ckpt
  config.results_dir = str(tmp_path / "file")
  open(config.results_dir, "w").close()
  with pytest.raises(ConfigError, match="--config.results_dir: .* is a file"):
    reproduce.run(config)
