"""Statistics of linear-layer inputs along the full-precision sampling trajectory.

The model's single ``Linear`` module sows its input into the ``linear_inputs`` collection
(name ``'x'``) when that collection is mutable.  Running ``model.apply`` on the inputs the FP
model received at each sampling step (``calibrate.trajectory.fp_trajectory``: ``x (S, B, H,
W, C)``, ``t (S, B)``, ``y (S, B)``) gives every layer's inputs at every timestep, from which
one jitted reduction per step keeps only what the quantizers need:

* ``channel_absmax (K,)``: max |x| per input channel over all steps and tokens;
* ``step_absmax (S,)``: the tensor's max |x| at each step (activation-range drift over t);
* ``samples (R, K)``: randomly drawn input rows (tokens) from every step, for MSE searches;
* ``hessian (K, K)``: ``2 X^T X / n`` over every row (GPTQ), when asked for.

``params`` may be partially quantized: the sown input of a layer is then what the model with
those layers quantized feeds it.  ``quant.hqdit.quantize_from_config`` uses this to calibrate
each DiT block on the outputs of the already-quantized blocks before it (``calib.inputs``);
:func:`execution_order` gives the order in which the forward pass calls the linear layers.

The Hessian sum ``X^T X`` is accumulated on the device in float32 (``Precision.HIGHEST``);
it came out bit-identical with 1 and 2 XLA/BLAS threads (README, HQ-DiT determinism).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dit_quant_jax.models.layers import LINEAR_INPUTS
from dit_quant_jax.quant import rules


@dataclasses.dataclass
class LayerStats:
  """Calibration statistics of one linear layer's input (K input features)."""

  channel_absmax: np.ndarray  # (K,)
  step_absmax: np.ndarray  # (S,) per trajectory step
  step_timesteps: np.ndarray  # (S,) timestep of each step (first batch entry)
  samples: np.ndarray  # (R, K) input rows
  hessian: Optional[np.ndarray]  # (K, K) = 2 X^T X / num_rows, or None
  num_rows: int  # rows (tokens) seen in total

  @property
  def in_features(self) -> int:
    return int(self.channel_absmax.shape[0])

  @property
  def drift(self) -> float:
    """max_t absmax_t / min_t absmax_t: how much a static range would have to stretch."""
    low = max(float(np.min(self.step_absmax)), 1e-30)
    return float(np.max(self.step_absmax)) / low


def _check_inputs(calib_inputs) -> tuple[int, int]:
  for key in ("x", "t", "y"):
    if key not in calib_inputs:
      raise ValueError(f"calibration inputs need keys 'x', 't', 'y' (fp_trajectory); missing {key!r}")
  x, t, y = (np.shape(calib_inputs[k]) for k in ("x", "t", "y"))
  if len(x) != 5 or t != x[:2] or y != x[:2]:
    raise ValueError(f"calibration inputs must be x (S, B, H, W, C), t (S, B), y (S, B); got "
                     f"x {x}, t {t}, y {y}")
  return x[0], x[1]


def execution_order(model, params, calib_inputs: Mapping) -> list[str]:
  """Paths of the linear layers in the order the forward pass first calls them, recorded
  with ``flax.linen.intercept_methods`` during one traced (not executed) forward pass."""
  import flax.linen as nn

  from dit_quant_jax.models.layers import Linear

  _check_inputs(calib_inputs)
  x = jnp.asarray(calib_inputs["x"][0, :1])
  t = jnp.asarray(calib_inputs["t"][0, :1])
  y = jnp.asarray(calib_inputs["y"][0, :1])
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Linear) and context.method_name == "__call__":
      path = "/".join(str(p) for p in context.module.scope.path)
      if path not in order:
        order.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: model.apply({"params": p}, x, t, y), params)
  return order


def collect_layer_stats(model, params, calib_inputs: Mapping, paths: Optional[Sequence[str]] = None,
                        *, hessian: bool = True, samples_per_step: int = 64,
                        max_samples: int = 1024, batch_size: Optional[int] = None,
                        seed: int = 0) -> dict:
  """Per-layer :class:`LayerStats` for ``paths`` (default: rules.DIT_BLOCK_LINEARS layers).

  calib_inputs: dict(x=(S, B, H, W, C), t=(S, B), y=(S, B)).  ``samples_per_step`` rows are
  drawn per step and layer (per batch chunk), at most ``max_samples`` kept (uniformly).
  ``batch_size`` splits each step's batch to bound memory."""
  steps, batch = _check_inputs(calib_inputs)
  if paths is None:
    paths = rules.select_layers(params)
  paths = list(paths)
  batch_size = batch if batch_size is None else int(min(batch_size, batch))
  chunks = [(s, min(s + batch_size, batch)) for s in range(0, batch, batch_size)]

  def step_reduce(params, x, t, y, key):
    _, state = model.apply({"params": params}, x, t, y, mutable=[LINEAR_INPUTS])
    sown = state[LINEAR_INPUTS]
    out = {}
    for i, path in enumerate(paths):
      inputs = rules.get_path(sown, path)["x"][0]
      rows = inputs.reshape(-1, inputs.shape[-1]).astype(jnp.float32)
      take = min(samples_per_step, rows.shape[0])
      pick = jax.random.choice(jax.random.fold_in(key, i), rows.shape[0], (take,), replace=False)
      entry = dict(channel_absmax=jnp.max(jnp.abs(rows), axis=0), samples=rows[pick],
                   rows=jnp.asarray(rows.shape[0], jnp.int32), top=jnp.max(jnp.abs(rows)))
      if hessian:
        entry["xtx"] = jnp.dot(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
      out[path] = entry
    return out

  step_fn = jax.jit(step_reduce)

  @jax.jit
  def accumulate(running, out):
    # Running max / sum stay on the device; only the sampled rows travel each step.
    merged = {}
    for path in paths:
      entry = dict(channel_absmax=jnp.maximum(running[path]["channel_absmax"],
                                              out[path]["channel_absmax"]))
      if hessian:
        entry["xtx"] = running[path]["xtx"] + out[path]["xtx"]
      merged[path] = entry
    return merged

  key = jax.random.PRNGKey(seed)
  running = None
  acc = {p: dict(step=np.zeros((steps,), np.float64), samples=[], rows=0) for p in paths}
  for s in range(steps):
    for c0, c1 in chunks:
      key, sub = jax.random.split(key)
      out = step_fn(params, jnp.asarray(calib_inputs["x"][s, c0:c1]),
                    jnp.asarray(calib_inputs["t"][s, c0:c1]),
                    jnp.asarray(calib_inputs["y"][s, c0:c1]), sub)
      reduced = {p: {k: v for k, v in out[p].items() if k in ("channel_absmax", "xtx")} for p in paths}
      running = reduced if running is None else accumulate(running, reduced)
      small = jax.device_get({p: {k: out[p][k] for k in ("top", "samples", "rows")} for p in paths})
      for path in paths:
        entry, layer = small[path], acc[path]
        layer["step"][s] = max(layer["step"][s], float(entry["top"]))
        layer["samples"].append(np.asarray(entry["samples"]))
        layer["rows"] += int(entry["rows"])
  running = jax.device_get(running)
  rng = np.random.default_rng(seed)
  timesteps = np.asarray(calib_inputs["t"])[:, 0]
  stats = {}
  for path in paths:
    layer = acc[path]
    samples = np.concatenate(layer["samples"], axis=0)
    if samples.shape[0] > max_samples:
      samples = samples[np.sort(rng.choice(samples.shape[0], max_samples, replace=False))]
    num_rows = layer["rows"]
    hess = None
    if hessian:
      hess = (2.0 * np.asarray(running[path]["xtx"], np.float64) / max(num_rows, 1)).astype(np.float32)
    absmax = np.asarray(running[path]["channel_absmax"], np.float32)
    stats[path] = LayerStats(absmax, layer["step"].astype(np.float32),
                             timesteps, samples.astype(np.float32), hess, num_rows)
  return stats


def drift_report(stats: Mapping[str, LayerStats]) -> dict:
  """Activation-range drift over timesteps: per layer max_t/min_t of the tensor absmax."""
  per_layer = {path: s.drift for path, s in stats.items()}
  values = np.asarray(list(per_layer.values()))
  return dict(per_layer=per_layer, median=float(np.median(values)), max=float(values.max()),
              worst_layer=max(per_layer, key=per_layer.get))
