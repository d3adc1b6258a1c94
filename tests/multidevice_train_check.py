"""One data-parallel DiT training step on a 4-device mesh vs the same step on 1 device.

Run by tests/test_trainer.py in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set before jax is
imported, hence a separate script).  From one initial state, runs ``NUM_STEPS`` train steps
of the tiny Fashion-MNIST DiT config (configs/fmnist_dit.py:tiny) on the same batches,
once with the batch sharded over the 4 host devices and once on a 1-device mesh, and prints
one JSON line with the device counts, the per-device batch shapes and the largest absolute
differences of params, EMA params, Adam moments and metrics.
"""

import importlib.util
import json
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402  (after the XLA flag, which the caller sets in the environment)
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from dit_quant_jax import trainer  # noqa: E402

NUM_DEVICES = 4
# Step 0 runs at learning rate 0 (linear warmup from 0), so a single step would leave the
# params untouched; 3 steps make the comparison bite.
NUM_STEPS = 3
PARAM_STD = 0.05


def tiny_config():
  spec = importlib.util.spec_from_file_location(
      "fmnist_dit_config", os.path.join(REPO_ROOT, "configs", "fmnist_dit.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def max_abs_diff(a, b) -> float:
  diffs = jax.tree_util.tree_map(lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def run_on(mesh, config, model, host_state, batches):
  """NUM_STEPS train steps with the state replicated and the batch split over ``mesh``."""
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = jax.device_put(host_state, replicated)
  train_step = trainer.make_train_step(config, model, mesh)
  shard_shapes, metrics = None, []
  for images, labels in batches:
    x = jax.device_put(images, batch_sharding)
    y = jax.device_put(labels, batch_sharding)
    shard_shapes = sorted(tuple(s.data.shape) for s in x.addressable_shards)
    state, step_metrics = train_step(state, x, y)
    metrics.append({k: float(v) for k, v in step_metrics.items()})
  param_devices = len(jax.tree_util.tree_leaves(state.params)[0].sharding.device_set)
  return jax.device_get(state), dict(shard_shapes=shard_shapes, param_devices=param_devices,
                                     metrics=metrics)


def main():
  config = tiny_config()
  model = trainer.build_model(config)
  devices = jax.devices()
  if len(devices) < NUM_DEVICES:
    raise SystemExit(f"need {NUM_DEVICES} devices (set XLA_FLAGS=--xla_force_host_platform_device_count="
                     f"{NUM_DEVICES} before importing jax), found {len(devices)}")
  # The state's structure from init_state (traced only: no eager init), filled with random
  # params (not the adaLN-Zero init, whose zero gates would leave most gradients at zero) and
  # the optimizer's initial zeros.
  shapes = jax.eval_shape(lambda key: trainer.init_state(config, model, key),
                          jax.random.PRNGKey(config.seed))
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map(
      lambda s: (PARAM_STD * rng.standard_normal(s.shape)).astype(s.dtype), shapes.params)
  host_state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes).replace(
      params=params, ema_params=params, rng=np.asarray(jax.random.PRNGKey(config.seed)))
  size = model.input_size
  batches = [(rng.uniform(-1, 1, (config.batch_size, size, size, model.in_channels)).astype(np.float32),
              rng.integers(0, model.num_classes, config.batch_size).astype(np.int32))
             for _ in range(NUM_STEPS)]

  mesh_many = Mesh(np.array(devices[:NUM_DEVICES]), ("data",))
  mesh_one = Mesh(np.array(devices[:1]), ("data",))
  state_many, info_many = run_on(mesh_many, config, model, host_state, batches)
  state_one, info_one = run_on(mesh_one, config, model, host_state, batches)

  # trainer.train must refuse a batch that does not split evenly over the devices.
  indivisible = tiny_config()
  indivisible.batch_size = NUM_DEVICES + 2
  with tempfile.TemporaryDirectory() as workdir:
    try:
      trainer.train(indivisible, workdir, batches[0][0], batches[0][1])
      indivisible_error = ""
    except ValueError as e:
      indivisible_error = str(e)

  result = dict(
      device_count=jax.device_count(),
      mesh_sizes=[mesh_many.size, mesh_one.size],
      shard_shapes=[info_many["shard_shapes"], info_one["shard_shapes"]],
      param_devices=[info_many["param_devices"], info_one["param_devices"]],
      steps=[int(state_many.step), int(state_one.step)],
      max_param_diff=max_abs_diff(state_many.params, state_one.params),
      max_ema_diff=max_abs_diff(state_many.ema_params, state_one.ema_params),
      max_opt_state_diff=max_abs_diff(state_many.opt_state, state_one.opt_state),
      max_param_change=max_abs_diff(state_one.params, host_state.params),
      rng_equal=bool(np.array_equal(np.asarray(state_many.rng), np.asarray(state_one.rng))),
      loss=[[m["loss"] for m in info_many["metrics"]], [m["loss"] for m in info_one["metrics"]]],
      indivisible_batch_error=indivisible_error,
  )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
