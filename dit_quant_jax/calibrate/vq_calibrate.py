"""Zero-data calibration of VQ4DiT ratio logits, codebooks and biases on FP trajectories.

Defaults follow the public VQ4DiT code (github.com/dengjuncan/VQ4DiT); each difference from
our earlier procedure is a named option of ``configs/vq4dit.py`` (``calibration.*`` and
``calib.*``):

data (``calib.fresh_trajectories``)
    The FP model samples a trajectory on the fly; every optimisation step takes one sampling
    step of it: the FP model's x_t and t, its block outputs as targets, and its own next x_t
    (sampler noise shared).  A trajectory of ``calib.timestep_respacing`` steps (public code:
    50 DDPM steps, CFG 4.0, batch of 4 random classes + their null-class copies) is followed
    by a fresh one: new noise, new labels (stratified over classes here: the public code
    draws ``random.sample(range(1000), 4)``).  sample_quant.py, gaussian_diffusion.py
    ``p_sample_loop_progressive_quant``.  False: every trajectory repeats trajectory 0 (one
    fixed calibration set cycled in order: our earlier procedure, with CFG 1.5).
loss (``calibration.loss``)
    "end_to_end": the quantized model runs as a whole on the FP model's x_t; loss = mean over
    blocks of MSE(quantized block output, FP block output); gradients flow through the
    earlier quantized blocks (public code: forward hooks on every DiTBlock, ``loss_kd_feat``).
    "fp_input": each block is fed its FP input with stop-gradient (ours).
codebooks (``calibration.codebook_schedule``)
    "after_hard": a layer's codebook receives no update while its assignments are soft and
    trains once the layer has gone hard (public code: ``requires_grad=False`` in
    CompressedLinear.py, set True after ``freeze_sim`` in gaussian_diffusion.py).  "always":
    codebooks train from step 0 (ours).
biases (``calibration.train_biases``)
    True: the biases of quantized layers train from step 0 at ``bias_lr`` (public code:
    CompressedLinear.py ``bias requires_grad=True``; RMSprop group lr 1e-4 in sample_quant.py).
    False: FP biases held fixed (ours).
regulariser (``calibration.regularizer_gate``, ``calibration.regularizer_average``)
    "above_running_min": the ratio regulariser enters the loss only at steps where it is
    above its running minimum within the current trajectory (the minimum restarts with each
    trajectory; gaussian_diffusion.py ``loss_softmax_old``).  "always": lambda_r * R at every
    step (ours).  Averaged over the layers still soft ("soft_layers", public code) or over
    all layers with hardened ones counting 0 ("all_layers", ours).
label dropout (``calibration.label_dropout``)
    True: the quantized model embeds its labels in training mode, so a fraction
    class_dropout_prob of them drop to the null class while the FP targets keep them (the
    public code calls ``model.train()`` on the student).  Off by default: the targets are
    computed with the true labels, so a dropped label asks the quantized model to produce
    the conditional output from the null-class embedding, a mismatch that adds noise to the
    loss and is not part of the method as described.

Optimiser: optax ``multi_transform``, one RMSprop (torch semantics, alpha 0.9) per kind with
its own learning rate (public code: codebooks 1e-4, biases 1e-4, ratio logits 5e-2).

After every ``freeze_every`` updates, sub-vectors whose largest ratio passes
``freeze_threshold`` are frozen and a layer with more than ``layer_hard_threshold`` frozen goes
hard (``quant.vq4dit.update_freezing``; public code ``progressive_freeze``/``freeze_sim``).
``harden_at`` (not in the public code, None there): at that fraction of the budget every
layer is forced hard (argmax candidate), so that the rest of the budget fine-tunes codebooks
and biases on the end-to-end loss; 0: the k-means assignments (nearest codeword) from the
start, codebooks and biases fine-tuned for the whole budget.

The whole state (trainable values, optimiser state, candidates and frozen masks, step, RNG
keys, the current trajectory's x_t, labels and regulariser minimum, loss history) is
checkpointed with orbax every ``checkpoint_every`` steps and restored on start: every step is
a deterministic function of the state, so a killed and restarted run ends bit-identically.
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

from dit_quant_jax.utils import distributed
from dit_quant_jax.calibrate import blocks as blocks_lib
from dit_quant_jax.calibrate import trajectory as trajectory_lib
from dit_quant_jax.diffusion import create_diffusion, sampling
from dit_quant_jax.quant import rules, vq4dit
from dit_quant_jax.utils import checkpoint as checkpoint_lib

OPTIMIZERS = ("rmsprop", "adam", "sgd")
CODEBOOK_SCHEDULES = ("after_hard", "always")
REGULARIZER_GATES = ("above_running_min", "always")
REGULARIZER_AVERAGES = ("soft_layers", "all_layers")
SOFT_FIELDS = ("codebook", "ratio_logits")
ASSIGNMENT_FIELDS = ("candidates", "frozen", "frozen_index")
BATCH_AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
  """Hashable (static) description of one calibration: layers, data and hyperparameters."""

  layers: tuple  # ((path, (K, N)), ...)
  block_indices: tuple  # blocks holding at least one calibrated layer
  optimizer: str
  codebook_lr: float
  logits_lr: float
  bias_lr: float
  rmsprop_decay: float
  optimizer_eps: float
  lambda_r: float
  regularizer: str
  regularizer_gate: str
  regularizer_average: str
  freeze_threshold: float
  layer_hard_threshold: float
  freeze_every: int
  harden_step: int  # -1: never force
  codebook_schedule: str
  loss: str
  train_biases: bool
  label_dropout: bool
  # Data: the on-the-fly FP trajectories.
  num_samples: int
  sample_shape: tuple  # (H, W, C)
  num_classes: int
  cfg_scale: Optional[float]
  sampler: str
  fresh_trajectories: bool

  @property
  def paths(self) -> tuple:
    return tuple(p for p, _ in self.layers)

  @property
  def trainable_kinds(self) -> tuple:
    return SOFT_FIELDS + (("bias",) if self.train_biases else ())


def state_key(path: str) -> str:
  """Layer path -> checkpoint-safe key ('/' is a path separator for orbax)."""
  return path.replace("/", ".")


def _block_index(path: str) -> Optional[int]:
  head = path.split("/")[0]
  if head.startswith("blocks_") and head[len("blocks_"):].isdigit():
    return int(head[len("blocks_"):])
  return None


def _choice(config, name: str, known: tuple) -> str:
  value = str(config[name])
  if value not in known:
    raise ValueError(f"unknown calibration.{name} {value!r}; known: {known}")
  return value


def make_spec(qconfig, soft: Mapping[str, vq4dit.SoftVQWeight], model) -> CalibrationSpec:
  """Checks and freezes ``qconfig.calibration`` / ``qconfig.calib`` for one model's layers."""
  config, calib = qconfig.calibration, qconfig.calib
  _choice(config, "optimizer", OPTIMIZERS)
  _choice(config, "regularizer", vq4dit.REGULARIZERS)
  outside = [p for p in soft if _block_index(p) is None]
  if outside:
    raise ValueError(f"VQ4DiT calibration compares DiT block outputs; layers outside blocks_i get no "
                     f"signal: {outside}.  Restrict layer_patterns to the blocks.")
  block_indices = tuple(sorted({_block_index(p) for p in soft}))
  if not block_indices:
    raise ValueError("calibration needs at least one quantized layer inside blocks_i")
  num_samples = int(calib.num_samples)
  if num_samples < 1:
    raise ValueError(f"calib.num_samples must be >= 1, got {num_samples}")
  steps = int(config.steps)
  harden_at = config.get("harden_at")
  if harden_at is not None and not 0.0 <= float(harden_at) <= 1.0:
    raise ValueError(f"calibration.harden_at must be a fraction in [0, 1] or None, got {harden_at}")
  cfg_scale = calib.get("cfg_scale")
  return CalibrationSpec(
      layers=tuple((p, tuple(int(s) for s in w.shape)) for p, w in soft.items()),
      block_indices=block_indices, optimizer=str(config.optimizer),
      codebook_lr=float(config.codebook_lr), logits_lr=float(config.logits_lr),
      bias_lr=float(config.bias_lr),
      rmsprop_decay=float(config.rmsprop_decay), optimizer_eps=float(config.optimizer_eps),
      lambda_r=float(config.lambda_r), regularizer=str(config.regularizer),
      regularizer_gate=_choice(config, "regularizer_gate", REGULARIZER_GATES),
      regularizer_average=_choice(config, "regularizer_average", REGULARIZER_AVERAGES),
      freeze_threshold=float(config.freeze_threshold),
      layer_hard_threshold=float(config.layer_hard_threshold), freeze_every=int(config.freeze_every),
      harden_step=-1 if harden_at is None else int(round(float(harden_at) * steps)),
      codebook_schedule=_choice(config, "codebook_schedule", CODEBOOK_SCHEDULES),
      loss=_choice(config, "loss", blocks_lib.BLOCK_LOSSES), train_biases=bool(config.train_biases),
      label_dropout=bool(config.label_dropout), num_samples=num_samples,
      sample_shape=(int(model.input_size), int(model.input_size), int(model.in_channels)),
      num_classes=int(model.num_classes), cfg_scale=None if cfg_scale is None else float(cfg_scale),
      sampler=_choice(calib, "sampler", ("ddpm", "ddim")),
      fresh_trajectories=bool(calib.fresh_trajectories))


def make_optimizer(spec: CalibrationSpec) -> optax.GradientTransformation:
  """multi_transform: one optimiser per trainable kind, with its own learning rate."""

  def one(lr):
    if spec.optimizer == "rmsprop":
      # torch.optim.RMSprop semantics (eps outside the square root), as the public code.
      return optax.rmsprop(lr, decay=spec.rmsprop_decay, eps=spec.optimizer_eps, eps_in_sqrt=False)
    if spec.optimizer == "adam":
      return optax.adam(lr, eps=spec.optimizer_eps)
    return optax.sgd(lr)

  rates = {"codebook": spec.codebook_lr, "ratio_logits": spec.logits_lr, "bias": spec.bias_lr}

  def labels(trainable):
    return {name: {field: field for field in layer} for name, layer in trainable.items()}

  return optax.multi_transform({kind: one(rates[kind]) for kind in spec.trainable_kinds}, labels)


# --------------------------------------------------------------------------- state
def layer_biases(fp_params, spec: CalibrationSpec) -> dict:
  """{path: (N,) FP bias} of the calibrated layers (zeros for a layer without one)."""
  out = {}
  for path, shape in spec.layers:
    layer = rules.get_path(fp_params, path)
    out[path] = jnp.asarray(layer["bias"], jnp.float32) if "bias" in layer else jnp.zeros((shape[1],))
  return out


def init_state(soft: Mapping[str, vq4dit.SoftVQWeight], fp_params, spec: CalibrationSpec,
               calibration_seed: int, data_seed: int, steps: int) -> dict:
  # Copies: train_step donates the state, which must not delete the caller's arrays.
  biases = layer_biases(fp_params, spec) if spec.train_biases else {}
  trainable = {}
  for path, weight in soft.items():
    fields = {f: jnp.array(getattr(weight, f)) for f in SOFT_FIELDS}
    if spec.train_biases:
      fields["bias"] = jnp.array(biases[path])
    trainable[state_key(path)] = fields
  assignment = {state_key(p): {f: jnp.array(getattr(w, f)) for f in ASSIGNMENT_FIELDS}
                for p, w in soft.items()}
  n = spec.num_samples
  trajectory = dict(x=jnp.zeros((n,) + spec.sample_shape, jnp.float32), labels=jnp.zeros((n,), jnp.int32),
                    regularizer_min=jnp.full((), jnp.inf, jnp.float32))
  return dict(trainable=trainable, assignment=assignment, opt_state=make_optimizer(spec).init(trainable),
              step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(calibration_seed),
              data_rng=jax.random.PRNGKey(data_seed), trajectory=trajectory,
              loss_history=jnp.full((steps,), jnp.nan, jnp.float32))


def soft_weights(trainable, assignment, spec: CalibrationSpec) -> dict:
  """{path: SoftVQWeight} from the state's trainable and assignment parts."""
  out = {}
  for path, shape in spec.layers:
    key = state_key(path)
    fields = {f: trainable[key][f] for f in SOFT_FIELDS}
    out[path] = vq4dit.SoftVQWeight(shape=shape, **fields, **assignment[key])
  return out


def student_params(fp_params, trainable, assignment, spec: CalibrationSpec):
  """FP params with the soft VQ kernels (and, when trained, the biases) in place."""
  params = vq4dit.replace_kernels(fp_params, soft_weights(trainable, assignment, spec))
  if spec.train_biases:
    for path in spec.paths:
      params = rules.set_path(params, path + "/bias", trainable[state_key(path)]["bias"])
  return params


# ---------------------------------------------------------------------------- data
def trajectory_batch(state, spec: CalibrationSpec, diffusion):
  """This step's FP-trajectory position.  -> (x_t (n, H, W, C), t (n,) respaced, labels (n,),
  regulariser running minimum, trajectory index, position in the trajectory)."""
  length = diffusion.num_timesteps
  step = state["step"]
  position = step % length
  index = step // length if spec.fresh_trajectories else jnp.zeros((), jnp.int32)
  n, shape = spec.num_samples, (spec.num_samples,) + spec.sample_shape
  order = trajectory_lib.class_order(state["data_rng"], spec.num_classes)
  starts = position == 0
  traj = state["trajectory"]
  x = jnp.where(starts, trajectory_lib.initial_noise(state["data_rng"], index, shape), traj["x"])
  labels = jnp.where(starts, trajectory_lib.stratified_labels(order, index, n), traj["labels"])
  regularizer_min = jnp.where(starts, jnp.inf, traj["regularizer_min"])
  t = jnp.full((n,), length - 1 - position, jnp.int32)
  return x, t, labels, regularizer_min, index, position


def model_batch(model, x, t, labels, spec: CalibrationSpec, diffusion):
  """The (x, t, y) the sampler passes to the model: doubled with null labels under CFG."""
  return sampling.model_inputs(model, x, diffusion.model_timesteps(t), labels, spec.cfg_scale)


# ---------------------------------------------------------------------------- loss
def regularizer(softs: Mapping[str, vq4dit.SoftVQWeight], spec: CalibrationSpec) -> jax.Array:
  """Ratio regulariser averaged over layers ("soft_layers": only those not yet hard)."""
  per_layer = jnp.stack([vq4dit.ratio_regularizer(s, spec.regularizer) for s in softs.values()])
  if spec.regularizer_average == "all_layers":
    return jnp.mean(per_layer)
  soft_layer = jnp.stack([~jnp.all(s.frozen) for s in softs.values()]).astype(jnp.float32)
  return jnp.sum(per_layer * soft_layer) / jnp.maximum(jnp.sum(soft_layer), 1.0)


def _loss(trainable, assignment, fp_params, batch, targets, regularizer_min, dropout_rng, *, model, spec):
  params = student_params(fp_params, trainable, assignment, spec)
  depth = max(spec.block_indices) + 1
  outputs = blocks_lib.student_block_outputs(model, params, *batch, targets, depth, spec.loss,
                                             dropout_rng if spec.label_dropout else None)
  errors = [jnp.mean(jnp.square(outputs[i].astype(jnp.float32) - targets[i].astype(jnp.float32)))
            for i in spec.block_indices]
  block_mse = jnp.mean(jnp.stack(errors))
  reg = regularizer(soft_weights(trainable, assignment, spec), spec)
  added = (reg > regularizer_min) if spec.regularizer_gate == "above_running_min" else jnp.array(True)
  loss = block_mse + spec.lambda_r * jnp.where(added, reg, 0.0)
  return loss, (block_mse, reg, added)


def loss_and_grads(state, fp_params, *, model, spec, diffusion):
  """FP targets at this step's trajectory position, then loss and grads w.r.t. state['trainable'].

  -> ((loss, (block_mse, regulariser, regulariser added)), grads, teacher (x_next, labels)).
  """
  x, t, labels, regularizer_min, index, position = trajectory_batch(state, spec, diffusion)
  batch = model_batch(model, x, t, labels, spec, diffusion)
  fp_out, targets = blocks_lib.fp_outputs_and_block_outputs(model, fp_params, *batch, spec.cfg_scale)
  noise = trajectory_lib.step_noise(state["data_rng"], index, position, x.shape)
  x_next = trajectory_lib.sampler_step(diffusion, fp_out[: x.shape[0]], x, t, noise, spec.sampler)
  dropout_rng = jax.random.fold_in(state["rng"], state["step"])
  value, grads = jax.value_and_grad(_loss, has_aux=True)(
      state["trainable"], state["assignment"], fp_params, batch, targets, regularizer_min, dropout_rng,
      model=model, spec=spec)
  return value, grads, (x_next, labels, regularizer_min)


def _mask_soft_codebooks(grads, assignment, spec: CalibrationSpec):
  """codebook_schedule "after_hard": zero the codebook gradient of layers still soft.

  With zero gradients RMSprop's second moment stays 0 and the update is exactly 0, as for a
  torch parameter with ``requires_grad=False``.
  """
  if spec.codebook_schedule == "always":
    return grads
  out = {}
  for key, layer in grads.items():
    hard = jnp.all(assignment[key]["frozen"])
    out[key] = dict(layer, codebook=jnp.where(hard, layer["codebook"], 0.0))
  return out


def _update_assignments(trainable, assignment, step, spec: CalibrationSpec, force_hard=False):
  """Progressive freezing after ``step`` updates; force_hard: every layer goes hard (argmax)."""
  softs = soft_weights(trainable, assignment, spec)
  do_freeze = (step % spec.freeze_every) == 0
  layer_threshold = jnp.where(force_hard, -1.0, spec.layer_hard_threshold)  # -1: every layer goes hard
  out = {}
  for path, soft in softs.items():
    frozen = vq4dit.update_freezing(soft, spec.freeze_threshold, layer_threshold)
    out[state_key(path)] = {f: jnp.where(do_freeze | force_hard, getattr(frozen, f), getattr(soft, f))
                            for f in ASSIGNMENT_FIELDS}
  return out


@functools.partial(jax.jit, static_argnames=("model", "spec", "diffusion"), donate_argnames=("state",))
def train_step(state, fp_params, *, model, spec: CalibrationSpec, diffusion):
  """One optimisation step on one FP sampling step, then freezing.  -> (state, metrics).

  state: the calibration state without ``loss_history`` (the host loop keeps that, so that
  runs of different lengths share one compilation).
  """
  if spec.harden_step >= 0:  # harden_at: every layer goes hard before update number harden_step
    state = dict(state, assignment=_update_assignments(state["trainable"], state["assignment"], state["step"],
                                                       spec, force_hard=state["step"] == spec.harden_step))
  (loss, (block_mse, reg, added)), grads, (x_next, labels, regularizer_min) = loss_and_grads(
      state, fp_params, model=model, spec=spec, diffusion=diffusion)
  grads = _mask_soft_codebooks(grads, state["assignment"], spec)
  tx = make_optimizer(spec)
  updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
  trainable = optax.apply_updates(state["trainable"], updates)
  step = state["step"] + 1
  assignment = _update_assignments(trainable, state["assignment"], step, spec)
  if spec.regularizer_gate == "above_running_min":  # public code: loss_softmax_old
    regularizer_min = jnp.where(added, regularizer_min, reg)
  trajectory = dict(x=x_next, labels=labels, regularizer_min=regularizer_min)
  frozen_fraction = jnp.stack([jnp.mean(assignment[state_key(p)]["frozen"].astype(jnp.float32))
                               for p in spec.paths])
  new_state = dict(trainable=trainable, assignment=assignment, opt_state=opt_state, step=step,
                   rng=state["rng"], data_rng=state["data_rng"], trajectory=trajectory)
  metrics = dict(loss=loss, block_mse=block_mse, regularizer=reg, regularizer_added=added,
                 frozen_fraction=frozen_fraction)
  return new_state, metrics


def _shardings(num_samples: int):
  """(batch sharding, replicated sharding) over every device of every process
  (``distributed.data_mesh``); batch sharded when it divides."""
  mesh = distributed.data_mesh()
  batch_spec = PartitionSpec(mesh.axis_names[0]) if num_samples % mesh.size == 0 else PartitionSpec()
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


def calibration_diffusion(model, calib):
  """The sampler schedule of the calibration trajectories (``calib.timestep_respacing``).

  One object per schedule: it is a static argument of :func:`train_step`, hashed by identity.
  """
  return _diffusion(str(calib.timestep_respacing), bool(model.learn_sigma))


@functools.lru_cache(maxsize=None)
def _diffusion(respacing: str, learn_sigma: bool):
  return create_diffusion(respacing, learn_sigma=learn_sigma)


# ---------------------------------------------------------------------------- driver
def _log(done, num_steps, host, elapsed, start_step) -> None:
  eta = elapsed / max(done - start_step, 1) * (num_steps - done)
  fractions = " ".join(f"{f:.3f}" for f in host["frozen_fraction"])
  logging.info("VQ calibration step %d/%d loss %.4e block_mse %.4e reg %.4e (added %s) frozen[mean %.3f] "
               "ETA %.0fs | frozen per layer: %s", done, num_steps, host["loss"], host["block_mse"],
               host["regularizer"], bool(host["regularizer_added"]), float(np.mean(host["frozen_fraction"])),
               eta, fractions)


def calibrate(model, fp_params, soft: Mapping[str, vq4dit.SoftVQWeight], qconfig,
              workdir: Optional[str] = None,
              callback: Optional[Callable[[int, dict], None]] = None):
  """Calibrate ratios, codebooks (and biases).  -> ({path: SoftVQWeight}, {path: bias} or None, report).

  soft: the k-means initialisation ({path: SoftVQWeight}; with a checkpoint in ``workdir``
  only its shapes matter).  qconfig: a configs/vq4dit.py config (``calibration`` and
  ``calib`` are read).  callback(step, metrics): called after each step (host metrics).
  """
  spec = make_spec(qconfig, soft, model)
  config = qconfig.calibration
  diffusion = calibration_diffusion(model, qconfig.calib)
  num_steps = int(config.steps)
  state = init_state(soft, fp_params, spec, int(config.seed), int(qconfig.calib.seed), num_steps)
  keep = int(config.get("checkpoints_to_keep", 2))
  if jax.device_count() > 1:  # placed before a restore, which keeps these shardings
    batch_sharding, replicated = _shardings(spec.num_samples)
    state = distributed.replicate(state, replicated.mesh)
    state["trajectory"] = jax.device_put(state["trajectory"], dict(
        x=batch_sharding, labels=batch_sharding, regularizer_min=replicated))
    fp_params = distributed.replicate(fp_params, replicated.mesh)
  else:
    # Committed like train_step's outputs: uncommitted inputs on the first call would make
    # the second call compile the step again (a jit key includes the input shardings).
    state = jax.device_put(state, jax.devices()[0])
  if has_checkpoint(workdir):
    state = _restore(workdir, state)
    logging.info("VQ calibration: resumed from %s at step %d", workdir, int(state["step"]))

  start_step = int(state["step"])
  log_every = max(1, int(config.log_every))
  checkpoint_every = int(config.checkpoint_every)
  start_time = time.perf_counter()
  loss_history = np.asarray(state["loss_history"]).copy()
  for step in range(start_step, num_steps):
    step_state = {key: value for key, value in state.items() if key != "loss_history"}
    state, metrics = train_step(step_state, fp_params, model=model, spec=spec, diffusion=diffusion)
    loss_history[step] = float(metrics["loss"])
    state["loss_history"] = loss_history.copy()  # host numpy; saved with the checkpoints
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      _log(done, num_steps, jax.device_get(metrics), time.perf_counter() - start_time, start_step)
    if workdir is not None and checkpoint_every > 0 and (done % checkpoint_every == 0 or done == num_steps):
      checkpoint_lib.save_state(checkpoint_dir(workdir), done, state, keep=keep)
    if callback is not None:
      callback(done, jax.device_get(metrics))

  seconds = time.perf_counter() - start_time
  softs = soft_weights(state["trainable"], state["assignment"], spec)
  biases = ({p: state["trainable"][state_key(p)]["bias"] for p in spec.paths} if spec.train_biases
            else None)
  report = dict(
      steps=num_steps, resumed_from_step=start_step, seconds=seconds,
      steps_per_second_incl_compile=(num_steps - start_step) / seconds if num_steps > start_step else None,
      trajectories=-(-num_steps // diffusion.num_timesteps) if spec.fresh_trajectories else 1,
      loss_curve=np.asarray(state["loss_history"]).tolist(),
      frozen_fraction={p: float(s.frozen_fraction()) for p, s in softs.items()})
  return softs, biases, report


def quantize_from_config(model, params, qconfig, workdir: Optional[str] = None) -> tuple[dict, dict]:
  """VQ4DiT end to end: k-means, candidates, calibration, hard assignments.  -> (qparams, report).

  ``qconfig.calibration.steps == 0`` gives the k-means-only result.  workdir: where the
  calibration checkpoints go (resumes from the latest one there); None disables them.
  """
  if int(qconfig.calibration.steps) == 0:
    return vq4dit.kmeans_only(params, qconfig)
  start = time.perf_counter()
  soft, reports = vq4dit.init_soft_layers(params, qconfig, skip_kmeans=has_checkpoint(workdir))
  soft, biases, calib_report = calibrate(model, params, soft, qconfig, workdir=workdir)
  qparams, report = vq4dit.harden(params, soft, reports, biases)
  report.update(calibration=calib_report, seconds=time.perf_counter() - start)
  return qparams, report
