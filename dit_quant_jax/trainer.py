"""Class-conditional DiT training with the official recipe, data-parallel, resumable.

Official recipe (Peebles & Xie, train.py): AdamW (no weight decay), EMA of the weights,
class dropout 0.1 (in the model), learned sigma, loss = MSE(eps) + VB.  Data parallel over
all devices through ``jax.sharding``: a 1-D ``Mesh`` named ``data``; the batch is
``NamedSharding(mesh, P('data'))``, params and optimizer state are replicated, so the same
command trains on 1 CPU, 8 GPUs or several hosts (``utils/distributed.py``: each process
gathers only the rows of the global batch that its own devices hold, and only process 0
writes the training curve; every process takes part in the orbax checkpoints).  The whole
state (params, EMA, optimizer, step) is checkpointed with orbax every ``checkpoint_every``
steps and restored from the latest on start; the data order is a function of (seed, step),
so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_quant_jax.diffusion import create_diffusion
from dit_quant_jax.models import dit
from dit_quant_jax.utils import checkpoint as ckpt_lib
from dit_quant_jax.utils import distributed


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key (saveable)


def build_model(config) -> dit.DiT:
  return dit.create_model(config.model.get("name"), **dict(config.model.overrides))


def make_optimizer(config) -> optax.GradientTransformation:
  opt = config.optimizer
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, opt.learning_rate, max(opt.warmup_steps, 1)),
       optax.constant_schedule(opt.learning_rate)], [max(opt.warmup_steps, 1)])
  chain = []
  if opt.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  # pos_embed is a fixed table (requires_grad=False officially): never updated.
  mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, _: not any(getattr(k, "key", None) == "pos_embed" for k in path), params)
  chain.append(optax.masked(optax.adamw(schedule, b1=opt.beta1, b2=opt.beta2,
                                        weight_decay=opt.weight_decay), mask))
  chain.append(optax.masked(optax.set_to_zero(), lambda p: jax.tree_util.tree_map(lambda m: not m, mask(p))))
  return optax.chain(*chain)


def ema_decay_at(step, config):
  """EMA decay; with ``ema_warmup`` the decay ramps as (1 + step) / (10 + step) up to the
  configured value (official DiT uses a fixed 0.9999 over 400k steps; short runs need the
  ramp or the EMA stays near the random init)."""
  decay = config.ema_decay
  if config.ema_warmup:
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jnp.asarray(decay, jnp.float32)


def make_mesh() -> Mesh:
  """The 1-D 'data' mesh over every device of every process."""
  return distributed.data_mesh()


def init_state(config, model, rng) -> TrainState:
  init_key, state_key = jax.random.split(rng)
  params = dit.init_params(model, init_key)
  opt_state = make_optimizer(config).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=opt_state,
                    rng=state_key)


def make_train_step(config, model, mesh: Mesh):
  diffusion = create_diffusion("", learn_sigma=model.learn_sigma,
                               diffusion_steps=config.diffusion_steps)
  optimizer = make_optimizer(config)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  def loss_fn(params, images, labels, rng):
    t_key, noise_key, drop_key = jax.random.split(rng, 3)
    t = jax.random.randint(t_key, (images.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_key, images.shape, images.dtype)
    model_fn = lambda x, tm: model.apply({"params": params}, x, tm, labels, train=True,  # noqa: E731
                                         rngs={"dropout": drop_key})
    terms = diffusion.training_losses(model_fn, images, t, noise)
    return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}

  def train_step(state: TrainState, images, labels):
    rng, step_key = jax.random.split(state.rng)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, images, labels, step_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                      rng=rng), metrics

  return jax.jit(train_step, in_shardings=(replicated, batch_sharding, batch_sharding),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
  """Deterministic batch for (seed, step): resumed runs see exactly the same data."""
  return np.random.default_rng([seed, step]).integers(0, num_examples, batch_size)


def train(config, workdir: str, images: Optional[np.ndarray] = None,
          labels: Optional[np.ndarray] = None) -> TrainState:
  """Train (or resume) into ``workdir``; returns the final state.

  images: (N, H, W, C) in [-1, 1]; labels: (N,).  Loaded from config.data when omitted.
  The config and the data are validated first; state in ``workdir`` from another config is
  refused (StaleOutputError); a non-finite loss or params stops training with
  TrainingDivergedError before anything is checkpointed.
  """
  from dit_quant_jax import validation
  from dit_quant_jax.utils import provenance
  validation.check_train_config(config)
  model = build_model(config)
  if images is None:
    from dit_quant_jax.data import fashion_mnist
    images, labels = fashion_mnist.load_split("train", config.data.get("data_dir") or None)
  validation.check_training_data(images, labels, model.num_classes,
                                 (model.input_size, model.input_size, model.in_channels))
  mesh = make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices")
  os.makedirs(workdir, exist_ok=True)
  state_dir = os.path.join(workdir, "state")
  # Before any compile: state from another config is refused at once.
  provenance.guard_state_dir(state_dir, config, f"another --workdir (or delete {state_dir})",
                             ignore=RESUME_IGNORED_FIELDS)
  state = jax.jit(lambda key: init_state(config, model, key))(jax.random.PRNGKey(config.seed))
  curve_path = os.path.join(workdir, "training_curve.jsonl")
  state = distributed.replicate(state, mesh)
  start = ckpt_lib.latest_step(state_dir)
  if start is not None:
    state = ckpt_lib.restore_state(state_dir, state, step=start)
    if distributed.is_primary():
      _truncate_curve(curve_path, start)
    logging.info("resumed from step %d", start)
  train_step = make_train_step(config, model, mesh)
  batch_sharding = NamedSharding(mesh, P("data"))
  image_shape, label_shape = (config.batch_size,) + images.shape[1:], (config.batch_size,)
  step = int(state.step)
  t_start, step_start = time.time(), step
  while step < config.num_steps:
    idx = batch_indices(config.seed, step, config.batch_size, images.shape[0])
    # Each process reads only the rows of the global batch on its own devices.
    batch_x = distributed.global_batch(lambda rows: images[idx[rows]], image_shape, batch_sharding)
    batch_y = distributed.global_batch(lambda rows: labels[idx[rows]], label_shape, batch_sharding)
    state, metrics = train_step(state, batch_x, batch_y)
    step += 1
    if step % config.log_every == 0 or step == config.num_steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      rate = (step - step_start) / max(time.time() - t_start, 1e-9)
      eta = (config.num_steps - step) / max(rate, 1e-9)
      logging.info("step %d/%d loss %.4f (mse %.4f vb %.4f) %.2f steps/s ETA %.0f s", step,
                   config.num_steps, metrics["loss"], metrics["mse"], metrics["vb"], rate, eta)
      if distributed.is_primary():
        with open(curve_path, "a") as f:
          f.write(json.dumps(dict(step=step, steps_per_s=rate, wall_s=time.time() - t_start,
                                  **metrics)) + "\n")
    if step % config.log_every == 0 or step % config.checkpoint_every == 0 or step == config.num_steps:
      check_finite(state, metrics, step, state_dir)
    if step % config.checkpoint_every == 0 or step == config.num_steps:
      ckpt_lib.save_state(state_dir, step, state, keep=config.get("keep_checkpoints", 2))
  return state


# Fields that change only the run's length or cadence: resuming across them is safe.
RESUME_IGNORED_FIELDS = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints")


@jax.jit
def _all_finite(tree) -> jax.Array:
  """One compiled reduction over every leaf (leaf by leaf outside jit, each shape compiled
  and dispatched apart)."""
  return jax.tree_util.tree_reduce(lambda ok, leaf: jnp.logical_and(ok, jnp.all(jnp.isfinite(leaf))),
                                   tree, jnp.asarray(True))


def check_finite(state: TrainState, metrics, step: int, state_dir: str) -> None:
  """TrainingDivergedError if the loss or any param is NaN/Inf (checked before every log
  line and checkpoint, so a diverged state is never saved)."""
  from dit_quant_jax.errors import TrainingDivergedError
  loss = float(metrics["loss"])
  params_finite = bool(_all_finite(state.params))
  if math.isfinite(loss) and params_finite:
    return
  last = ckpt_lib.latest_step(state_dir)
  kept = f"the last checkpoint (step {last}) in {state_dir} is kept" if last is not None else \
      "no checkpoint was written"
  what = f"loss {loss}" if not math.isfinite(loss) else "non-finite params"
  raise TrainingDivergedError(f"training diverged at step {step} ({what}); {kept}. Lower "
                              f"--config.optimizer.learning_rate, or check the data")


def _truncate_curve(path: str, last_step: int) -> None:
  """Drop curve rows logged after the checkpoint being resumed (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(rows)


def export_ema(config, state: TrainState, path: str, extra: Optional[dict] = None) -> None:
  """Write the EMA params with the model config (the shippable model)."""
  model = build_model(config)
  metadata = dict(training_config=json.loads(config.to_json_best_effort()),
                  step=int(state.step), **(extra or {}))
  ckpt_lib.save_checkpoint(path, distributed.to_host(state.ema_params), model.config_dict(), metadata,
                           overwrite=True)
