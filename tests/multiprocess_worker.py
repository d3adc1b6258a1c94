"""One process of a multi-process run (or the single-process reference), launched by
tests/test_multiprocess.py.

  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
      python tests/multiprocess_worker.py OUT_DIR JOB[,JOB...]

(no JAX_* variables: one process, on however many devices XLA_FLAGS gives it).  Jobs on the
tiny DiT, each through the library's own entry points, every process taking part:

  sample     pipeline.generate (DDPM + CFG, a batch that needs padding) and the ADM npz shards
  train      trainer.train for a few steps (checkpoints), then resumed for one more, EMA export
  vq4dit     api.quantize with a short VQ4DiT calibration (its orbax state checkpointed)
  hqdit      api.quantize with HQ-DiT W4A4 (calibration trajectory, activation statistics)
  train_resume  a few training steps, a checkpoint after each (the test kills and relaunches)

Process 0 alone writes OUT_DIR/result.npz (arrays to compare across runs); every process
writes OUT_DIR/process_<i>.json: its topology and every file it opened for writing or moved
into place with os.replace (orbax's own tensorstore writes are not seen), so the test can
check who wrote what.
"""

import builtins
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

from absl import logging  # noqa: E402

from dit_quant_jax.utils import distributed  # noqa: E402

logging.set_verbosity(logging.INFO)

if os.environ.get("MULTIPROCESS_COMPILATION_CACHE"):  # shared by the runs of one test
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ["MULTIPROCESS_COMPILATION_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
TOPOLOGY = distributed.initialize(timeout_s=int(os.environ.get("MULTIPROCESS_INIT_TIMEOUT_S", "120")))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dit_quant_jax import api, config_spec, pipeline, trainer  # noqa: E402
from tiny_model import save_tiny_checkpoint  # noqa: E402

NUM_TRAIN_EXAMPLES = 64
WRITTEN = []  # files this process opened for writing or renamed into place


def _record_writes():
  """Record every file opened for writing and every os.replace target of this process."""
  real_open, real_replace = builtins.open, os.replace

  def recording_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
      WRITTEN.append(os.fspath(file))
    return real_open(file, mode, *args, **kwargs)

  def recording_replace(src, dst, *args, **kwargs):
    WRITTEN.append(os.fspath(dst))
    return real_replace(src, dst, *args, **kwargs)

  builtins.open, os.replace = recording_open, recording_replace


def job_sample(model, params, out_dir):
  # 1 per class = 10 samples in batches of 8: the last batch (2) is padded to the 4 devices of
  # the 2-process run (not on the single process's 2).
  noise, labels = pipeline.noise_and_labels(model, 1, seed=3)
  images, outputs = pipeline.generate(model, params, noise, labels, respacing="ddim3", sampler="ddpm",
                                      cfg_scale=2.0, seed=5, batch_size=8, return_outputs=True)
  shards_path = pipeline.sample_adm_shards(model, params, (noise[:6], labels[:6]),
                                           os.path.join(out_dir, "adm"), shard_size=4,
                                           respacing="ddim2", sampler="ddim", seed=1, batch_size=4,
                                           progress=lambda message: None)
  result = dict(sample_images=images, sample_outputs=outputs)
  if distributed.is_primary():
    with np.load(shards_path) as merged:
      result["adm_images"] = merged["arr_0"]
  return result


def tiny_train_config(num_steps):
  config = config_spec.load("configs/fmnist_dit.py:tiny")
  config.num_steps = num_steps
  config.checkpoint_every = 2
  config.log_every = 1
  return config


def train_data(seed):
  """A random (images (N, 32, 32, 1) in [-1, 1], labels (N,)) training set."""
  data_rng = np.random.default_rng(seed)
  images = data_rng.uniform(-1, 1, (NUM_TRAIN_EXAMPLES, 32, 32, 1)).astype(np.float32)
  return images, data_rng.integers(0, 10, NUM_TRAIN_EXAMPLES).astype(np.int32)


def job_train(model, params, out_dir):
  del model, params
  images, labels = train_data(11)
  workdir = os.path.join(out_dir, "train")
  trainer.train(tiny_train_config(2), workdir, images, labels)  # checkpoint at step 2
  state = trainer.train(tiny_train_config(3), workdir, images, labels)  # resumes from step 2
  export = os.path.join(out_dir, "ema")
  trainer.export_ema(tiny_train_config(3), state, export)
  distributed.sync("ema exported")
  ema = pipeline.load_dit(export)[1]
  host = distributed.to_host(dict(params=state.params, ema=state.ema_params, step=state.step))
  return dict(train_step=host["step"],
              train_kernel=host["params"]["blocks_0"]["mlp"]["fc1"]["kernel"],
              train_ema_kernel=host["ema"]["blocks_1"]["attn"]["qkv"]["kernel"],
              train_exported_ema_kernel=np.asarray(ema["blocks_1"]["attn"]["qkv"]["kernel"]))


RESUME_STEPS = 6


def job_train_resume(model, params, out_dir):
  """RESUME_STEPS training steps with a checkpoint after each: the test kills the processes
  mid-run and launches them again; they resume from the last complete checkpoint."""
  del model, params
  images, labels = train_data(12)
  config = tiny_train_config(RESUME_STEPS)
  config.checkpoint_every = 1
  state = trainer.train(config, os.path.join(out_dir, "train_resume"), images, labels)
  host = distributed.to_host(dict(params=state.params, step=state.step))
  return dict(resume_step=host["step"], resume_kernel=host["params"]["blocks_0"]["mlp"]["fc1"]["kernel"])


def job_vq4dit(model, params, out_dir):
  qconfig = config_spec.load("configs/vq4dit.py:tiny", {
      "calibration.steps": 2, "calibration.checkpoint_every": 2, "calibration.log_every": 2,
      "calib.num_samples": 2, "calib.timestep_respacing": "2", "kmeans.num_iters": 2,
      # the MLP's two layers only: the cross-process code (sharded trajectory, block-wise
      # calibration, orbax state) is the same for every layer type, the compiles are not
      "layer_patterns": [r"blocks_\d+/mlp/fc\d"]})
  qparams, report = api.quantize(model, params, qconfig, workdir=os.path.join(out_dir, "vq_state"))
  kernel = qparams["blocks_0"]["mlp"]["fc1"]["kernel"].dequantize()
  return dict(vq_kernel=distributed.to_host(kernel),
              vq_losses=np.asarray(report["calibration"]["loss_curve"]))


def job_hqdit(model, params, out_dir):
  del out_dir
  # W4A4: format selection, clip searches, Hadamard; GPTQ and the sequential (quantized-input)
  # calibration off to keep the test short (they add no cross-process code path).
  qconfig = config_spec.load("configs/hqdit.py:w4a4", {
      "calib.num_samples": 2, "calib.timestep_respacing": "ddim2", "gptq.enabled": False,
      "calib.inputs": "fp", "weight.clip_count": 3, "act.clip_count": 3,
      "layer_patterns": [r"blocks_\d+/attn/(qkv|proj)"]})  # as for VQ4DiT: two layer types
  qparams, _ = api.quantize(model, params, qconfig)
  noise, labels = pipeline.noise_and_labels(model, 1, seed=9)
  images = pipeline.generate(model, qparams, noise, labels, respacing="ddim2", sampler="ddim", seed=0,
                             batch_size=10)
  weight = qparams["blocks_1"]["attn"]["proj"]["kernel"]
  return dict(hq_kernel=distributed.to_host(weight.dequantize()), hq_images=images)


JOBS = dict(sample=job_sample, train=job_train, vq4dit=job_vq4dit, hqdit=job_hqdit,
            train_resume=job_train_resume)


def main(out_dir, jobs):
  os.makedirs(out_dir, exist_ok=True)
  _record_writes()
  unknown = [j for j in jobs if j not in JOBS]
  if unknown:
    raise SystemExit(f"unknown jobs {unknown}; known: {sorted(JOBS)}")
  # Every job starts from a checkpoint written and read by all processes (orbax), as the
  # experiment scripts do (pipeline.load_dit).
  checkpoint = os.path.join(out_dir, "tiny_dit")
  if not distributed.primary_value(os.path.isdir(checkpoint)):  # a relaunch finds it
    save_tiny_checkpoint(checkpoint)  # jax arrays on each process's own device
  model, params, _ = pipeline.load_dit(checkpoint)
  result = {}
  timings = {}
  for name in jobs:
    wall, cpu = time.perf_counter(), time.process_time()
    result.update(JOBS[name](model, params, out_dir))
    timings[name] = dict(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)
    print(f"job {name}: {timings[name]['wall_s']:.1f} s wall, {timings[name]['cpu_s']:.1f} s cpu", flush=True)
  if distributed.is_primary():
    np.savez(os.path.join(out_dir, "result.npz"), **result)
  with open(os.path.join(out_dir, f"process_{TOPOLOGY.process_index}.json"), "w") as f:
    json.dump(dict(process_index=TOPOLOGY.process_index, process_count=TOPOLOGY.process_count,
                   local_devices=TOPOLOGY.local_device_count, global_devices=TOPOLOGY.global_device_count,
                   jobs=jobs, timings=timings, written=sorted(set(WRITTEN))), f)
  distributed.sync("worker done")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2].split(","))
