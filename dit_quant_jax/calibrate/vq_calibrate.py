"""Zero-data block-wise calibration of VQ4DiT codebooks and candidate ratios (paper Sec. 3.3).

Data: the FP model's own sampling trajectory (``calibrate.trajectory.fp_trajectory``): at
each sampling step the exact inputs (x_t, t, y) the FP model received; the quantized model is
evaluated on the FP model's x_t.  Optimisation step i uses trajectory step ``i mod S`` (the
public code also walks the sampling chain) and, with ``batch_size`` set, a random subset of
that step's batch drawn from ``fold_in(rng, i)``.

Loss = mean over calibrated DiT blocks of MSE(FP block output, quantized block output), each
block fed its FP input (see ``calibrate/blocks.py``), plus ``lambda_r`` times the ratio
regulariser averaged over layers (``quant.vq4dit.ratio_regularizer``: "public" or "paper").
Only codebooks and ratio logits are differentiated: they are the sole argument of the loss;
biases, unquantized weights, candidates and frozen masks are constants.  Optimiser: optax
``multi_transform`` with separate learning rates for codebooks and logits (public code:
RMSprop, alpha 0.9, 1e-4 and 5e-2).

After every ``freeze_every`` updates, sub-vectors whose largest ratio passes
``freeze_threshold`` are frozen, and a layer with more than ``layer_hard_threshold`` frozen
switches to hard assignments (``quant.vq4dit.update_freezing``).

The whole state (trainable values, optimiser state, candidates and frozen masks, step, RNG,
loss history) is checkpointed with orbax (``utils/checkpoint.py`` save_state) to
``workdir/vq_calibration`` every ``checkpoint_every`` steps and restored from there on start, so a killed and restarted run ends exactly where an uninterrupted one
does (every step is a deterministic function of the state).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_quant_jax.calibrate import blocks as blocks_lib
from dit_quant_jax.quant import vq4dit
from dit_quant_jax.utils import checkpoint as checkpoint_lib

OPTIMIZERS = ("rmsprop", "adam", "sgd")
TRAINABLE_FIELDS = ("codebook", "ratio_logits")
ASSIGNMENT_FIELDS = ("candidates", "frozen", "frozen_index")
BATCH_AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
  """Hashable (static) description of one calibration: layers and hyperparameters."""

  layers: tuple  # ((path, (K, N)), ...)
  block_indices: tuple  # blocks holding at least one calibrated layer
  optimizer: str
  codebook_lr: float
  logits_lr: float
  rmsprop_decay: float
  optimizer_eps: float
  lambda_r: float
  regularizer: str
  freeze_threshold: float
  layer_hard_threshold: float
  freeze_every: int

  @property
  def paths(self) -> tuple:
    return tuple(p for p, _ in self.layers)


def state_key(path: str) -> str:
  """Layer path -> checkpoint-safe key ('/' is a path separator for orbax)."""
  return path.replace("/", ".")


def _block_index(path: str) -> Optional[int]:
  head = path.split("/")[0]
  if head.startswith("blocks_") and head[len("blocks_"):].isdigit():
    return int(head[len("blocks_"):])
  return None


def make_spec(config, soft: Mapping[str, vq4dit.SoftVQWeight]) -> CalibrationSpec:
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; known: {OPTIMIZERS}")
  if config.regularizer not in vq4dit.REGULARIZERS:
    raise ValueError(f"unknown ratio regulariser {config.regularizer!r}; known: {vq4dit.REGULARIZERS}")
  outside = [p for p in soft if _block_index(p) is None]
  if outside:
    logging.warning("layers outside the DiT blocks get no block-wise calibration signal: %s", outside)
  block_indices = tuple(sorted({_block_index(p) for p in soft if _block_index(p) is not None}))
  if not block_indices:
    raise ValueError("block-wise calibration needs at least one quantized layer inside blocks_i")
  return CalibrationSpec(
      layers=tuple((p, tuple(int(s) for s in w.shape)) for p, w in soft.items()),
      block_indices=block_indices, optimizer=str(config.optimizer),
      codebook_lr=float(config.codebook_lr), logits_lr=float(config.logits_lr),
      rmsprop_decay=float(config.rmsprop_decay), optimizer_eps=float(config.optimizer_eps),
      lambda_r=float(config.lambda_r), regularizer=str(config.regularizer),
      freeze_threshold=float(config.freeze_threshold),
      layer_hard_threshold=float(config.layer_hard_threshold), freeze_every=int(config.freeze_every))


def make_optimizer(spec: CalibrationSpec) -> optax.GradientTransformation:
  """multi_transform: one optimiser per trainable kind, with its own learning rate."""

  def one(lr):
    if spec.optimizer == "rmsprop":
      # torch.optim.RMSprop semantics (eps outside the square root), as the public code.
      return optax.rmsprop(lr, decay=spec.rmsprop_decay, eps=spec.optimizer_eps, eps_in_sqrt=False)
    if spec.optimizer == "adam":
      return optax.adam(lr, eps=spec.optimizer_eps)
    return optax.sgd(lr)

  def labels(trainable):
    return {name: {field: field for field in layer} for name, layer in trainable.items()}

  return optax.multi_transform({"codebook": one(spec.codebook_lr), "ratio_logits": one(spec.logits_lr)},
                               labels)


# --------------------------------------------------------------------------- state
def init_state(soft: Mapping[str, vq4dit.SoftVQWeight], spec: CalibrationSpec, seed: int,
               steps: int) -> dict:
  # Copies: train_step donates the state, which must not delete the caller's arrays.
  trainable = {state_key(p): {f: jnp.array(getattr(w, f)) for f in TRAINABLE_FIELDS} for p, w in soft.items()}
  assignment = {state_key(p): {f: jnp.array(getattr(w, f)) for f in ASSIGNMENT_FIELDS}
                for p, w in soft.items()}
  return dict(trainable=trainable, assignment=assignment, opt_state=make_optimizer(spec).init(trainable),
              step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed),
              loss_history=jnp.full((steps,), jnp.nan, jnp.float32))


def soft_weights(trainable, assignment, spec: CalibrationSpec) -> dict:
  """{path: SoftVQWeight} from the state's trainable and assignment parts."""
  out = {}
  for path, shape in spec.layers:
    key = state_key(path)
    out[path] = vq4dit.SoftVQWeight(shape=shape, **trainable[key], **assignment[key])
  return out


def _loss(trainable, assignment, fp_params, c, inputs, *, model, spec):
  softs = soft_weights(trainable, assignment, spec)
  quant_params = vq4dit.replace_kernels(fp_params, softs)
  errors = []
  for i in spec.block_indices:
    name = blocks_lib.block_name(i)
    out = blocks_lib.apply_block(model, quant_params[name], inputs[i], c)
    errors.append(jnp.mean(jnp.square(out.astype(jnp.float32) - inputs[i + 1].astype(jnp.float32))))
  block_mse = jnp.mean(jnp.stack(errors))
  reg = jnp.mean(jnp.stack([vq4dit.ratio_regularizer(s, spec.regularizer) for s in softs.values()]))
  return block_mse + spec.lambda_r * reg, (block_mse, reg)


def loss_and_grads(state, fp_params, batch, *, model, spec):
  """(loss, (block_mse, reg)), grads w.r.t. state['trainable'] for one batch (x, t, y)."""
  x, t, y = batch
  c, inputs = blocks_lib.fp_block_inputs(model, fp_params, x, t, y, max(spec.block_indices) + 1)
  c = jax.lax.stop_gradient(c)
  inputs = [jax.lax.stop_gradient(h) for h in inputs]
  return jax.value_and_grad(_loss, has_aux=True)(state["trainable"], state["assignment"], fp_params, c,
                                                 inputs, model=model, spec=spec)


@functools.partial(jax.jit, static_argnames=("model", "spec"), donate_argnames=("state",))
def train_step(state, fp_params, batch, *, model, spec: CalibrationSpec):
  """One optimisation step + freezing.  batch: (x (B,H,W,C), t (B,), y (B,)).  -> (state, metrics).

  state: the calibration state without ``loss_history`` (the host loop keeps that, so that
  runs of different lengths share one compilation).
  """
  (loss, (block_mse, reg)), grads = loss_and_grads(state, fp_params, batch, model=model, spec=spec)
  tx = make_optimizer(spec)
  updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
  trainable = optax.apply_updates(state["trainable"], updates)
  step = state["step"] + 1
  softs = soft_weights(trainable, state["assignment"], spec)
  do_freeze = (step % spec.freeze_every) == 0
  assignment = {}
  for path, soft in softs.items():
    frozen = vq4dit.update_freezing(soft, spec.freeze_threshold, spec.layer_hard_threshold)
    assignment[state_key(path)] = {
        f: jnp.where(do_freeze, getattr(frozen, f), getattr(soft, f)) for f in ASSIGNMENT_FIELDS}
  frozen_fraction = jnp.stack([jnp.mean(assignment[state_key(p)]["frozen"].astype(jnp.float32))
                               for p in spec.paths])
  new_state = dict(trainable=trainable, assignment=assignment, opt_state=opt_state, step=step,
                   rng=state["rng"])
  metrics = dict(loss=loss, block_mse=block_mse, regularizer=reg, frozen_fraction=frozen_fraction)
  return new_state, metrics


# ---------------------------------------------------------------------------- data
def _check_calib_inputs(calib_inputs) -> dict:
  missing = {"x", "t", "y"} - set(calib_inputs)
  if missing:
    raise ValueError(f"calibration inputs miss {sorted(missing)}; expected fp_trajectory's dict(x, t, y)")
  data = {k: np.asarray(calib_inputs[k]) for k in ("x", "t", "y")}
  steps, batch = data["x"].shape[:2]
  if data["x"].ndim != 5 or data["t"].shape != (steps, batch) or data["y"].shape != (steps, batch):
    raise ValueError(f"calibration inputs must be x (S, B, H, W, C), t (S, B), y (S, B); got "
                     f"{data['x'].shape}, {data['t'].shape}, {data['y'].shape}")
  return data


def select_batch(data: Mapping[str, np.ndarray], step: int, rng, batch_size: Optional[int]):
  """The batch of optimisation step ``step``: trajectory step step mod S, samples from fold_in(rng, step)."""
  num_steps, batch = data["x"].shape[:2]
  s = step % num_steps
  if batch_size is None or batch_size >= batch:
    rows = np.arange(batch)
  else:
    rows = np.asarray(jax.random.permutation(jax.random.fold_in(rng, step), batch))[:batch_size]
  return (data["x"][s, rows].astype(np.float32), data["t"][s, rows].astype(np.int32),
          data["y"][s, rows].astype(np.int32))


def _shardings(batch_size: int):
  """(batch sharding, replicated sharding) over local devices; batch sharded when it divides."""
  devices = np.asarray(jax.local_devices())
  mesh = Mesh(devices, (BATCH_AXIS,))
  batch_spec = PartitionSpec(BATCH_AXIS) if batch_size % len(devices) == 0 else PartitionSpec()
  return NamedSharding(mesh, batch_spec), NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------- checkpoints
CHECKPOINT_SUBDIR = "vq_calibration"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


def has_checkpoint(workdir: Optional[str]) -> bool:
  return workdir is not None and checkpoint_lib.latest_step(checkpoint_dir(workdir)) is not None


def _restore(workdir: str, state):
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                    state)
  restored = checkpoint_lib.restore_state(checkpoint_dir(workdir), abstract)
  # Keep the exact pytree structure of `state` (optax NamedTuples, dicts).
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state),
                                      jax.tree_util.tree_leaves(restored))


# ---------------------------------------------------------------------------- driver
def calibrate(model, fp_params, soft: Mapping[str, vq4dit.SoftVQWeight], calib_inputs, config,
              workdir: Optional[str] = None,
              callback: Optional[Callable[[int, dict], None]] = None):
  """Calibrate codebooks and ratios.  -> ({path: SoftVQWeight}, report).

  soft: the k-means initialisation ({path: SoftVQWeight}; with a checkpoint in ``workdir``
  only its shapes matter).  config: the ``calibration`` part of configs/vq4dit.py.
  callback(step, metrics): called after each step (host metrics), e.g. for tests.
  """
  spec = make_spec(config, soft)
  data = _check_calib_inputs(calib_inputs)
  batch_size = None if config.batch_size in (None, 0) else int(config.batch_size)
  num_steps = int(config.steps)
  state = init_state(soft, spec, int(config.seed), num_steps)
  keep = int(config.get("checkpoints_to_keep", 2))
  if has_checkpoint(workdir):
    state = _restore(workdir, state)
    logging.info("VQ calibration: resumed from %s at step %d", workdir, int(state["step"]))

  effective_batch = batch_size or data["x"].shape[1]
  batch_sharding, replicated = _shardings(effective_batch)
  if len(jax.local_devices()) > 1:
    state = jax.device_put(state, replicated)
    fp_params = jax.device_put(fp_params, replicated)

  start_step = int(state["step"])
  rng = np.asarray(state["rng"])  # a host copy: train_step donates the state's buffers
  log_every = max(1, int(config.log_every))
  checkpoint_every = int(config.checkpoint_every)
  start_time = time.perf_counter()
  loss_history = np.asarray(state["loss_history"]).copy()
  for step in range(start_step, num_steps):
    batch = jax.device_put(select_batch(data, step, rng, batch_size), batch_sharding)
    step_state = {key: value for key, value in state.items() if key != "loss_history"}
    state, metrics = train_step(step_state, fp_params, batch, model=model, spec=spec)
    loss_history[step] = float(metrics["loss"])
    state["loss_history"] = loss_history.copy()  # host numpy; saved with the checkpoints
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      host = jax.device_get(metrics)
      elapsed = time.perf_counter() - start_time
      eta = elapsed / (done - start_step) * (num_steps - done)
      fractions = " ".join(f"{f:.3f}" for f in host["frozen_fraction"])
      logging.info("VQ calibration step %d/%d loss %.4e block_mse %.4e reg %.4e frozen[mean %.3f] "
                   "ETA %.0fs | frozen per layer: %s", done, num_steps, host["loss"], host["block_mse"],
                   host["regularizer"], float(np.mean(host["frozen_fraction"])), eta, fractions)
    if workdir is not None and checkpoint_every > 0 and (done % checkpoint_every == 0 or done == num_steps):
      checkpoint_lib.save_state(checkpoint_dir(workdir), done, state, keep=keep)
    if callback is not None:
      callback(done, jax.device_get(metrics))

  seconds = time.perf_counter() - start_time
  softs = soft_weights(state["trainable"], state["assignment"], spec)
  report = dict(
      steps=num_steps, resumed_from_step=start_step, seconds=seconds,
      loss_curve=np.asarray(state["loss_history"]).tolist(),
      frozen_fraction={p: float(s.frozen_fraction()) for p, s in softs.items()})
  return softs, report
