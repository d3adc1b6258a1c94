"""Damaged, inconsistent and stale files: every case is one clear error, nothing is trusted.

Classes (issue 15): (1) silent acceptance of damaged or inconsistent state: flipped bytes,
record/params mismatch, labels out of range training to NaN; (2) stale outputs trusted: a
quantized output or resumable state from another config, a cut-off report.json; (3) errors
that do not name the problem: a damaged orbax checkpoint (one line: path, array, missing or
damaged); atomic writes leave no half-written file.
"""

import gc
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax import config_spec, pipeline, trainer
from dit_quant_jax.errors import CheckpointDamagedError, StaleOutputError, TrainingDivergedError
from dit_quant_jax.models import dit
from dit_quant_jax.utils import atomic, provenance
from dit_quant_jax.utils import checkpoint as ckpt_lib
from tiny_model import TINY_MODEL, save_tiny_checkpoint, tiny_model_and_params


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "dit"))


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return str(dst)


def _largest_data_file(path):
  files = glob.glob(os.path.join(path, "params", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


# --------------------------------------------------------------- damaged checkpoints
def test_flipped_bytes_name_the_checkpoint_and_array(tiny_ckpt, tmp_path):
  path = _copy(tiny_ckpt, tmp_path / "flipped")
  data_file = _largest_data_file(path)
  data = bytearray(open(data_file, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
  open(data_file, "wb").write(bytes(data))
  with pytest.raises(CheckpointDamagedError) as info:
    pipeline.load_dit(path)
  message = str(info.value)
  assert path in message and "damaged" in message
  assert "array " in message  # which array: by digest, or by the failed read


@pytest.mark.parametrize("damage,kind", [("delete", "missing"), ("truncate", "damaged")])
def test_damaged_orbax_file_is_one_line(tiny_ckpt, tmp_path, capfd, damage, kind):
  path = _copy(tiny_ckpt, tmp_path / damage)
  data_file = _largest_data_file(path)
  if damage == "delete":
    os.remove(data_file)
  else:
    data = open(data_file, "rb").read()
    open(data_file, "wb").write(data[: len(data) // 2])
  capfd.readouterr()
  with pytest.raises(CheckpointDamagedError) as info:
    ckpt_lib.restore_checkpoint(path)
  gc.collect()  # the dropped orbax reads are collected here: they must print nothing
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint {path}: array ") and f" {kind} (" in message
  assert os.path.basename(data_file) in message
  captured = capfd.readouterr()
  assert "Exception ignored" not in captured.err and "Event loop is closed" not in captured.err


def test_digests_are_recorded_and_checked(tmp_path):
  model, params = tiny_model_and_params()
  path = ckpt_lib.save_checkpoint(str(tmp_path / "c"), params, model.config_dict())
  record = ckpt_lib.read_checkpoint_record(path)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(record["digests"]) == len(leaves)
  some_key = "blocks_0/attn/qkv/kernel"
  expected = ckpt_lib.array_digest(np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"]))
  assert record["digests"][some_key] == expected
  # A different value (one ulp) has another digest.
  bumped = np.nextafter(np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"]), np.inf)
  assert ckpt_lib.array_digest(bumped) != expected


def test_record_depth_must_match_params(tmp_path):
  model, params = tiny_model_and_params()  # depth 2
  config = dict(model.config_dict(), depth=1)  # the record claims one block fewer
  path = ckpt_lib.save_checkpoint(str(tmp_path / "c"), params, config)
  with pytest.raises(CheckpointDamagedError, match=r"record \(\{'depth': 1.*does not match its params: "
                                                   r"\d+ arrays the record's model does not have \(first "
                                                   r"\['blocks_1'\]"):
    pipeline.load_dit(path)
  deeper = dit.create_model(None, **dict(TINY_MODEL, depth=3))
  path = ckpt_lib.save_checkpoint(str(tmp_path / "d"), params, deeper.config_dict())
  with pytest.raises(CheckpointDamagedError, match=r"arrays missing \(first \['blocks_2'\]"):
    pipeline.load_dit(path)


def test_nan_params_refused_on_load(tmp_path):
  model, params = tiny_model_and_params()
  params["blocks_1"]["mlp"]["fc2"]["bias"] = params["blocks_1"]["mlp"]["fc2"]["bias"].at[3].set(jnp.nan)
  path = ckpt_lib.save_checkpoint(str(tmp_path / "nan"), params, model.config_dict())
  with pytest.raises(CheckpointDamagedError, match=r"array \['blocks_1'\]\['mlp'\]\['fc2'\]\['bias'\] "
                                                   r"holds 1 NaN/Inf values"):
    pipeline.load_dit(path)


# --------------------------------------------------------------------- stale outputs
def _tiny_qconfig(spec):
  return config_spec.load(spec, {"kmeans.num_iters": 2, "codebook_size": 16})


def test_output_from_another_config_is_refused(tiny_ckpt, tmp_path):
  out = str(tmp_path / "kmeans_w2")
  w3 = _tiny_qconfig("configs/vq4dit.py:kmeans_w3")
  pipeline.quantize_checkpoint(tiny_ckpt, w3, out)  # kmeans_w3 in the kmeans_w2 directory
  w2 = _tiny_qconfig("configs/vq4dit.py:kmeans_w2")
  with pytest.raises(StaleOutputError) as info:
    pipeline.quantize_checkpoint(tiny_ckpt, w2, out, override_flag="--config.reuse=False")
  message = str(info.value)
  assert "quantization.name: on disk 'kmeans_w3', asked 'kmeans_w2'" in message
  assert "quantization.subvector_dim: on disk 2, asked 4" in message
  assert "--config.reuse=False" in message
  # Same config: reused as is.
  again = pipeline.quantize_checkpoint(tiny_ckpt, w3, out)
  assert again["setting"] == "kmeans_w3"
  # The override redoes it with the asked config.
  redone = pipeline.quantize_checkpoint(tiny_ckpt, w2, out, reuse=False)
  assert redone["setting"] == "kmeans_w2"
  _, _, metadata = pipeline.load_dit(os.path.join(out, "params"))
  assert metadata["quantization"]["name"] == "kmeans_w2"


def test_output_without_provenance_is_refused(tiny_ckpt, tmp_path):
  out = str(tmp_path / "old")
  qconfig = _tiny_qconfig("configs/vq4dit.py:kmeans_w2")
  pipeline.quantize_checkpoint(tiny_ckpt, qconfig, out)
  report = json.load(open(os.path.join(out, "report.json")))
  del report["provenance"]  # as written before outputs recorded their config
  atomic.write_json(os.path.join(out, "report.json"), report)
  with pytest.raises(StaleOutputError, match="records no config"):
    pipeline.quantize_checkpoint(tiny_ckpt, qconfig, out)


def test_cut_off_report_is_redone(tiny_ckpt, tmp_path):
  out = str(tmp_path / "cut")
  qconfig = _tiny_qconfig("configs/vq4dit.py:kmeans_w2")
  pipeline.quantize_checkpoint(tiny_ckpt, qconfig, out)
  report_path = os.path.join(out, "report.json")
  text = open(report_path).read()
  open(report_path, "w").write(text[: len(text) // 3])  # a kill mid-write (older code)
  report = pipeline.quantize_checkpoint(tiny_ckpt, qconfig, out)
  assert report["setting"] == "kmeans_w2"
  assert json.load(open(report_path))["provenance"]["config_hash"] == report["provenance"]["config_hash"]


def test_resumable_state_from_another_config_is_refused(tmp_path):
  state_dir = str(tmp_path / "calib_state")
  first = {"quantization": {"codebook_size": 256, "calibration": {"steps": 150, "log_every": 10}}}
  provenance.guard_state_dir(state_dir, first, "--reuse=False")
  os.makedirs(os.path.join(state_dir, "100"))  # a saved step
  # Same config up to an ignored field: resumes.
  cadence = {"quantization": {"codebook_size": 256, "calibration": {"steps": 150, "log_every": 5}}}
  provenance.guard_state_dir(state_dir, cadence, "--reuse=False",
                             ignore=["quantization.calibration.log_every"])
  other = {"quantization": {"codebook_size": 64, "calibration": {"steps": 150, "log_every": 5}}}
  with pytest.raises(StaleOutputError, match=r"resumable state in .*calib_state was made by another "
                                             r"config: quantization.codebook_size: on disk 256, asked "
                                             r"64\. Pass --reuse=False"):
    provenance.guard_state_dir(state_dir, other, "--reuse=False")
  assert os.path.isdir(os.path.join(state_dir, "100"))  # refused: nothing removed
  provenance.guard_state_dir(state_dir, other, "--reuse=False", discard_stale=True)
  assert not os.path.exists(state_dir)


def test_training_state_from_another_config_is_refused(tmp_path):
  config = config_spec.load("configs/fmnist_dit.py:tiny")
  config.num_steps = 1
  config.checkpoint_every = 1
  images = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
  labels = np.arange(16, dtype=np.int32) % 10
  workdir = str(tmp_path / "w")
  trainer.train(config, workdir, images, labels)
  config.num_steps = 2  # longer: allowed
  trainer.train(config, workdir, images, labels)
  config.model.overrides.hidden_size = 64  # another architecture: refused before orbax
  with pytest.raises(StaleOutputError, match=r"model.overrides.hidden_size: on disk 32, asked 64"):
    trainer.train(config, workdir, images, labels)


# -------------------------------------------------------------------------- training
def test_labels_out_of_range_refused_before_training(tmp_path):
  from dit_quant_jax.errors import DataError
  config = config_spec.load("configs/fmnist_dit.py:tiny")
  images = np.zeros((8, 32, 32, 1), np.float32)
  labels = np.array([0, 1, 2, 3, 4, 5, 6, 12], np.int32)
  with pytest.raises(DataError, match=r"training labels: 1 labels lie outside \[0, 10\)"):
    trainer.train(config, str(tmp_path / "w"), images, labels)
  assert not os.path.exists(tmp_path / "w" / "state")


def test_nan_in_training_stops_without_a_checkpoint(tmp_path):
  config = config_spec.load("configs/fmnist_dit.py:tiny")
  config.optimizer.learning_rate = 1e38  # the first updates overflow
  config.optimizer.grad_clip_norm = None
  config.optimizer.warmup_steps = 0
  config.log_every = 1
  images = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
  labels = np.arange(16, dtype=np.int32) % 10
  workdir = str(tmp_path / "w")
  with pytest.raises(TrainingDivergedError, match=r"training diverged at step \d+ .*no checkpoint was written"):
    trainer.train(config, workdir, images, labels)
  assert ckpt_lib.latest_step(os.path.join(workdir, "state")) is None


# ----------------------------------------------------------------------- atomic writes
def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
  path = str(tmp_path / "out.json")
  atomic.write_json(path, {"a": 1})

  def failing_writer(temporary):
    with open(temporary, "w") as f:
      f.write('{"a": 2, "b": ')  # half written, then the job dies
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    atomic.write_with(path, failing_writer)
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path) == ["out.json"]  # no temporary left behind
  atomic.savez(str(tmp_path / "x.npz"), arr_0=np.arange(3))
  np.testing.assert_array_equal(np.load(tmp_path / "x.npz")["arr_0"], np.arange(3))
