"""Validation at the entry: every config family is checked before any expensive work.

One function per family; each collects every problem it finds and raises one
:class:`ConfigError` listing them (``field: problem (fix)``):

  check_quantization_config(qconfig, model_config=None)   vq4dit / hqdit / fp (configs/vq4dit.py, hqdit.py)
  check_reproduce_config(config)                          the main job (configs/reproduce.py)
  check_train_config(config)                              training (configs/fmnist_dit.py)
  check_sample_flags(...)                                 experiments/sample.py flags
  check_sweep_config(sweep)                               sweeps (configs/sweeps.py)
  check_dit_xl2_config(config)                            DiT-XL/2 runs (configs/dit_xl2.py)
  check_checkpoint_path(path, what)                       a checkpoint that must exist

The quantization checks are a table per method (``_VQ4DIT_FIELDS``, ``_HQDIT_FIELDS``) of
(dotted field, rule): a new config field gets a validator by adding one row.  A field absent
from a config is not checked (configs grow; their own defaults apply).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Iterable, Optional

from absl import logging

from dit_quant_jax.errors import ConfigError

# ----------------------------------------------------------------------------- rules
# A rule maps a value to None (fine) or a problem string "must be ...".
Rule = Callable[[Any], Optional[str]]


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(low: int) -> Rule:
  return lambda v: None if _is_int(v) and v >= low else f"must be an integer >= {low}, got {v!r}"


def optional(rule: Rule) -> Rule:
  return lambda v: None if v is None else rule(v)


def number_in(low: float, high: float = math.inf, low_open: bool = False,
              high_open: bool = False) -> Rule:
  def rule(v):
    if not _is_number(v):
      return f"must be a finite number, got {v!r}"
    if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
      lo = "(" if low_open else "["
      hi = ")" if high_open else "]"
      return f"must lie in {lo}{low}, {high}{hi}, got {v!r}"
    return None
  return rule


def positive_number() -> Rule:
  return number_in(0.0, low_open=True)


def one_of(choices: Iterable) -> Rule:
  choices = tuple(choices)
  return lambda v: None if v in choices else f"must be one of {list(choices)}, got {v!r}"


def choice_of(module: str, name: str) -> Rule:
  """One of the tuple ``module.name`` (the list the implementation itself accepts), read when
  the rule runs (so validation imports no quantizer until it checks a config)."""
  def rule(v):
    import importlib
    choices = getattr(importlib.import_module(module), name, None)
    if choices is None:
      return None  # the implementation no longer names its choices there: nothing to check
    return one_of(choices)(v)
  return rule


def boolean() -> Rule:
  return lambda v: None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def number_format(allow: Iterable = ()) -> Rule:
  """A number-format name of quant/formats.py (e2m1, int4, fp8_e4m3, ...) or one of ``allow``."""
  allow = tuple(allow)

  def rule(v):
    if v in allow:
      return None
    from dit_quant_jax.quant import formats
    try:
      formats.get_format(v)
    except (ValueError, TypeError) as e:
      return str(e)
    return None
  return rule


def list_of(item: Rule, what: str) -> Rule:
  """A non-empty list whose every element passes ``item``; the first problem is reported."""
  def rule(v):
    if isinstance(v, str) or not hasattr(v, "__iter__") or not list(v):
      return f"must be a non-empty list of {what}, got {v!r}"
    problems = [p for p in (item(x) for x in v) if p]
    return problems[0] if problems else None
  return rule


def _regex(pattern) -> Optional[str]:
  try:
    re.compile(pattern)
  except (re.error, TypeError) as e:
    return f"pattern {pattern!r} is not a regex: {e}"
  return None


def number_list(low: float, high: float) -> Rule:
  return list_of(number_in(low, high), f"numbers in [{low}, {high}]")


def format_list() -> Rule:
  return list_of(number_format(), "format names")


def regex_list() -> Rule:
  return list_of(_regex, "regexes")


def respacing() -> Rule:
  """A timestep respacing the diffusion accepts: "25", "ddim25", "10,15,20"."""
  def rule(v):
    from dit_quant_jax.diffusion.gaussian import space_timesteps
    if not isinstance(v, str) or not v:
      return f"must be a respacing string such as '25', 'ddim25' or '10,15,20', got {v!r}"
    try:
      steps = space_timesteps(1000, v)
    except (ValueError, TypeError, ZeroDivisionError) as e:
      return f"{v!r} is not a valid respacing ({e})"
    return None if steps else f"{v!r} gives no sampling steps"
  return rule


def sampler_name() -> Rule:
  from dit_quant_jax.diffusion.sampling import SAMPLERS
  return one_of(SAMPLERS)


def cfg_scale() -> Rule:
  return optional(number_in(0.0))  # 1.0 (or None) = guidance off


# ------------------------------------------------------------------------- collecting
class Problems:
  """Collects ``field: problem`` lines; :meth:`raise_if_any` raises one ConfigError."""

  def __init__(self, what: str):
    self.what = what
    self.lines: list[str] = []

  def add(self, field: str, problem: str, fix: str = "") -> None:
    self.lines.append(f"{field}: {problem}" + (f" ({fix})" if fix else ""))

  def check(self, config, field: str, rule: Rule, flag_prefix: str = "--config.") -> None:
    """Check ``config``'s dotted ``field`` if present."""
    found, value = _get_dotted(config, field)
    if found:
      problem = rule(value)
      if problem:
        self.add(f"{flag_prefix}{field}", problem)

  def check_table(self, config, table, flag_prefix: str = "--config.") -> None:
    for field, rule in table:
      self.check(config, field, rule, flag_prefix)

  def raise_if_any(self) -> None:
    if self.lines:
      raise ConfigError(f"invalid {self.what}: " + "; ".join(self.lines))


def _get_dotted(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if node is None or not hasattr(node, "keys") or part not in node:
      return False, None
    node = node[part]
  return True, node


# ------------------------------------------------------------------- quantization
_CALIB_FIELDS = (
    ("calib.num_samples", int_at_least(1)),
    ("calib.timestep_respacing", respacing()),
    ("calib.sampler", sampler_name()),
    ("calib.cfg_scale", cfg_scale()),
    ("calib.seed", int_at_least(0)),
    ("calib.batch_size", optional(int_at_least(1))),
    ("calib.samples_per_step", int_at_least(1)),
    ("calib.max_samples", int_at_least(1)),
)

_VQ4DIT_FIELDS = (
    ("layer_patterns", regex_list()),
    ("codebook_size", int_at_least(2)),
    ("subvector_dim", int_at_least(1)),
    ("num_candidates", int_at_least(1)),
    ("kmeans.num_iters", int_at_least(1)),
    ("kmeans.tol", number_in(0.0)),
    ("kmeans.seed", int_at_least(0)),
    ("kmeans.chunk_elements", int_at_least(1)),
    ("calibration.steps", int_at_least(0)),
    ("calibration.batch_size", optional(int_at_least(1))),
    ("calibration.optimizer", choice_of("dit_quant_jax.calibrate.vq_calibrate", "OPTIMIZERS")),
    ("calibration.codebook_lr", number_in(0.0)),
    ("calibration.logits_lr", number_in(0.0)),
    ("calibration.bias_lr", number_in(0.0)),
    ("calibration.rmsprop_decay", number_in(0.0, 1.0, high_open=True)),
    ("calibration.optimizer_eps", number_in(0.0)),
    ("calibration.lambda_r", number_in(0.0)),
    ("calibration.regularizer", choice_of("dit_quant_jax.quant.vq4dit", "REGULARIZERS")),
    ("calibration.freeze_threshold", number_in(0.5, 1.0, low_open=True)),
    ("calibration.layer_hard_threshold", number_in(0.0, 1.0)),
    ("calibration.freeze_every", int_at_least(1)),
    ("calibration.seed", int_at_least(0)),
    ("calibration.log_every", int_at_least(1)),
    ("calibration.checkpoint_every", int_at_least(0)),
    ("calibration.checkpoints_to_keep", int_at_least(1)),
    ("calibration.codebook_schedule", choice_of("dit_quant_jax.calibrate.vq_calibrate", "CODEBOOK_SCHEDULES")),
    ("calibration.loss", choice_of("dit_quant_jax.calibrate.blocks", "BLOCK_LOSSES")),
    ("calibration.train_biases", boolean()),
    ("calibration.regularizer_gate", choice_of("dit_quant_jax.calibrate.vq_calibrate", "REGULARIZER_GATES")),
    ("calibration.regularizer_average", choice_of("dit_quant_jax.calibrate.vq_calibrate", "REGULARIZER_AVERAGES")),
    ("calibration.label_dropout", boolean()),
    ("calibration.harden_at", optional(number_in(0.0, 1.0))),
    ("calib.fresh_trajectories", boolean()),
    ("act.format", optional(number_format())),
    ("act.clip_ratio", number_in(0.0, 1.0, low_open=True)),
) + _CALIB_FIELDS

_HQDIT_FIELDS = (
    ("layer_patterns", regex_list()),
    ("weight.format", number_format(allow=("auto",))),
    ("weight.candidates", format_list()),
    ("weight.select", choice_of("dit_quant_jax.quant.hqdit", "SELECT_METHODS")),
    ("weight.ratio_thresholds", optional(list_of(positive_number(), "positive numbers"))),
    ("weight.clip_search", boolean()),
    ("weight.clip_min", number_in(0.0, 1.0, low_open=True)),
    ("weight.clip_count", int_at_least(1)),
    ("act.format", optional(number_format(allow=("auto",)))),
    ("act.candidates", format_list()),
    ("act.select", choice_of("dit_quant_jax.quant.hqdit", "SELECT_METHODS")),
    ("act.ratio_thresholds", optional(list_of(positive_number(), "positive numbers"))),
    ("act.default_format", number_format()),
    ("act.granularity", one_of(("per_token", "per_tensor"))),
    ("act.clip_search", boolean()),
    ("act.clip_min", number_in(0.0, 1.0, low_open=True)),
    ("act.clip_count", int_at_least(1)),
    ("hadamard.enabled", boolean()),
    ("hadamard.seed", int_at_least(0)),
    ("gptq.enabled", boolean()),
    ("gptq.damp", number_in(0.0, low_open=True)),
    ("gptq.block_size", int_at_least(1)),
    ("gptq.act_order", boolean()),
    ("attn_quant.enabled", boolean()),
    ("attn_quant.format", number_format()),
    ("attn_quant.clip_ratio", number_in(0.0, 1.0, low_open=True)),
    ("hadamard.block", choice_of("dit_quant_jax.quant.hadamard", "BLOCK_KINDS")),
    ("smooth.enabled", boolean()),
    ("smooth.alphas", number_list(0.0, 1.0)),
    ("lowrank.rank", int_at_least(0)),
    ("calib.inputs", choice_of("dit_quant_jax.quant.hqdit", "CALIB_INPUTS")),
    ("calib.sequential_unit", choice_of("dit_quant_jax.quant.hqdit", "SEQUENTIAL_UNITS")),
) + _CALIB_FIELDS


def check_quantization_config(qconfig, model_config: Optional[dict] = None,
                              where: str = "quantization config") -> list[str]:
  """Check a quantization config (vq4dit / hqdit / fp) before any trajectory or k-means work.

  model_config: the DiT's ``config_dict()`` (e.g. a checkpoint record's); with it, the layer
  shapes are checked too (VQ: sub-vector dim divides every input dim, and the codebook size
  asked fits every layer; a layer whose sub-vectors cannot hold k = codebook_size codewords
  gets a smaller k and a different bit rate, which is reported as a warning).
  Returns the warnings (also logged); raises ConfigError listing every problem.
  """
  from dit_quant_jax.api import METHODS
  problems = Problems(where)
  method = qconfig.get("method") if hasattr(qconfig, "get") else None
  if method not in METHODS:
    problems.add("--config.method", f"must be one of {list(METHODS)}, got {method!r}")
    problems.raise_if_any()
  warnings: list[str] = []
  if method == "vq4dit":
    problems.check_table(qconfig, _VQ4DIT_FIELDS)
    k = qconfig.get("codebook_size")
    n = qconfig.get("num_candidates")
    if _is_int(k) and _is_int(n) and n > min(4, k):
      problems.add("--config.num_candidates", f"must be at most min(4, codebook_size) = {min(4, k)}, got {n}")
    problems.raise_if_any()
    if model_config is not None:
      warnings = _check_vq_layers(qconfig, model_config, problems)
  elif method == "hqdit":
    problems.check_table(qconfig, _HQDIT_FIELDS)
  problems.raise_if_any()
  for warning in warnings:
    logging.warning("%s: %s", where, warning)
  return warnings


def _abstract_params(model_config: dict):
  import jax
  from dit_quant_jax.models import dit
  model = dit.create_model(None, **model_config)
  return jax.eval_shape(lambda: dit.init_params(model, jax.random.PRNGKey(0)))


def _check_vq_layers(qconfig, model_config: dict, problems: Problems) -> list[str]:
  """Per selected layer: d divides the input dim; k fits the layer (else a warning)."""
  from dit_quant_jax.quant import rules, vq4dit
  params = _abstract_params(model_config)
  k, d = int(qconfig.codebook_size), int(qconfig.subvector_dim)
  if k > vq4dit.MAX_CODEBOOK_SIZE:
    problems.add("--config.codebook_size", f"{k} exceeds the largest packable codebook "
                 f"({vq4dit.MAX_CODEBOOK_SIZE})")
    return []
  asked_bits = math.log2(k) / d
  paths = rules.select_layers(params, list(qconfig.layer_patterns))
  if not paths:
    problems.add("--config.layer_patterns", f"select no linear layer of this model "
                 f"(patterns {list(qconfig.layer_patterns)})")
  clamped = {}
  for path in paths:
    shape = tuple(rules.get_path(params, path + "/kernel").shape)
    if shape[0] % d:
      problems.add("--config.subvector_dim", f"{d} does not divide the input dimension {shape[0]} "
                   f"of {path} {shape}", "pick a divisor")
      continue
    num_subvectors = shape[0] // d * shape[1]
    try:
      k_eff = vq4dit.effective_codebook_size(num_subvectors, k)
    except ValueError as e:
      problems.add(path, str(e), "exclude the layer with --config.layer_patterns")
      continue
    if k_eff != k:
      clamped[path] = (k_eff, num_subvectors)
  if not clamped:
    return []
  first_path, (first_k, first_n) = next(iter(clamped.items()))
  return [f"codebook_size {k} ({asked_bits:g} bits/weight asked) does not fit {len(clamped)} of "
          f"{len(paths)} layers (k <= #sub-vectors / {vq4dit.SUBVECTORS_PER_CODEWORD_MIN}); "
          f"e.g. {first_path} has {first_n} sub-vectors and gets k={first_k}, "
          f"{math.log2(first_k) / d:g} bits/weight: its bit rate is lower than asked"]


# ------------------------------------------------------------------------- sampling
def _check_sampling(problems: Problems, sampling, prefix: str, num_classes: int = 10,
                    need_scores: bool = True) -> None:
  problems.check_table(sampling, (
      ("per_class", int_at_least(1)),
      ("batch_size", int_at_least(1)),
      ("respacing", respacing()),
      ("sampler", sampler_name()),
      ("eta", number_in(0.0)),
      ("cfg_scale", cfg_scale()),
      ("seed", int_at_least(0)),
  ), flag_prefix=prefix)
  per_class = sampling.get("per_class")
  if need_scores and _is_int(per_class) and per_class >= 1:
    from dit_quant_jax.eval.metrics import PRECISION_RECALL_K
    if per_class * num_classes <= PRECISION_RECALL_K:
      problems.add(f"{prefix}per_class", f"{per_class} x {num_classes} classes = "
                   f"{per_class * num_classes} samples, precision/recall need more than "
                   f"k = {PRECISION_RECALL_K}", f"use per_class >= {PRECISION_RECALL_K // num_classes + 1}")
  if sampling.get("sampler") == "ddpm" and _is_number(sampling.get("eta")) and sampling.get("eta"):
    problems.add(f"{prefix}eta", "applies to the ddim sampler only", "set it to 0 for ddpm")


def check_checkpoint_path(path: str, what: str = "model", flag: str = "--model") -> dict:
  """The record of the checkpoint at ``path`` (a quick read; its model_config decoded), or
  ConfigError naming the flag."""
  from dit_quant_jax.utils import checkpoint as ckpt_lib
  if not path or not os.path.isdir(path):
    raise ConfigError(f"{flag}: {what} checkpoint {path!r} does not exist "
                      f"(pass the directory written by train.py --export, quantize.py or "
                      f"convert_checkpoint.py)")
  try:
    record = dict(ckpt_lib.read_checkpoint_record(path))
  except FileNotFoundError as e:
    raise ConfigError(f"{flag}: {e}") from None
  record["model_config"] = ckpt_lib.record_model_config(record)  # decoded
  return record


def check_not_quantized(record: dict, path: str, flag: str) -> None:
  """A quantization's input must be a full-precision checkpoint."""
  quantized = (record.get("metadata") or {}).get("quantization")
  if quantized or record.get("quantized_nodes"):
    raise ConfigError(f"{flag}: {path} is already quantized ({(quantized or {}).get('name', 'quantized nodes')}); "
                      "pass the full-precision checkpoint")


def check_dataset_available(data_dir: Optional[str], split: str, flag: str) -> None:
  """The Fashion-MNIST files of ``split`` exist (scoring and training read them)."""
  from dit_quant_jax.data import fashion_mnist
  directory = fashion_mnist.data_dir(data_dir or None)
  image_stem, label_stem, _ = fashion_mnist.SPLITS[split]
  for stem in (image_stem, label_stem):
    if not any(os.path.isfile(os.path.join(directory, stem + ext)) for ext in (".gz", "")):
      raise ConfigError(f"{flag}: Fashion-MNIST file {stem}[.gz] not found in {directory!r}: "
                        f"{fashion_mnist.INSTALL_HINT}")


def check_sample_flags(*, per_class: int, batch_size: int, respacing_name: str, sampler: str,
                       eta: float, cfg: float, seed: int, score: bool, num_classes: int = 10) -> None:
  """experiments/sample.py's flags."""
  problems = Problems("sample.py flags")
  values = dict(per_class=per_class, batch_size=batch_size, respacing=respacing_name,
                sampler=sampler, eta=eta, cfg_scale=cfg, seed=seed)
  _check_sampling(problems, values, "--", num_classes, need_scores=score)
  problems.lines = [line.replace("--respacing", "--steps") for line in problems.lines]
  problems.raise_if_any()


# ------------------------------------------------------------------------ main job
def check_reproduce_config(config) -> None:
  """The main job's config, its rows' quantization configs included (each loaded and checked
  against the FP model's shapes), before the FP model is sampled."""
  problems = Problems("reproduce config")
  _check_sampling(problems, config.sampling, "--config.sampling.")
  problems.check_table(config, (("grid_per_class", int_at_least(1)), ("grid_scale", int_at_least(1)),
                                ("bootstrap_resamples", int_at_least(0)),
                                ("bootstrap_confidence", number_in(0.0, 1.0, True, True)),
                                ("reuse", boolean())))
  keys = [row.key for row in config.rows]
  duplicates = sorted({k for k in keys if keys.count(k) > 1})
  if duplicates:
    problems.add("--config.rows", f"row keys {duplicates} appear more than once")
  problems.raise_if_any()
  for field in ("results_dir", "quant_dir"):
    if os.path.isfile(str(config.get(field))):
      problems.add(f"--config.{field}", f"{config.get(field)!r} is a file, not a directory")
  problems.raise_if_any()
  record = check_checkpoint_path(config.model, "FP model", "--config.model")
  check_not_quantized(record, config.model, "--config.model")
  check_dataset_available(None, "test", "scoring")
  from dit_quant_jax.reproduce import row_quantization_config, selected_rows
  try:
    rows = selected_rows(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for row in rows:
    if row.spec == "fp":
      continue
    where = f"row {row.key} ({row.spec})"
    try:
      qconfig = row_quantization_config(config, row)
    except (FileNotFoundError, KeyError, ValueError) as e:
      problems.add(f"row {row.key}", str(e).strip("'\""))
      continue
    try:
      check_quantization_config(qconfig, record.get("model_config"), where)
    except ConfigError as e:
      problems.lines.append(str(e))
  problems.raise_if_any()


# ------------------------------------------------------------------------- training
def check_train_config(config) -> None:
  """Training config (configs/fmnist_dit.py) and the model it builds."""
  problems = Problems("training config")
  problems.check_table(config, (
      ("seed", int_at_least(0)),
      ("batch_size", int_at_least(1)),
      ("num_steps", int_at_least(1)),
      ("log_every", int_at_least(1)),
      ("checkpoint_every", int_at_least(1)),
      ("keep_checkpoints", int_at_least(1)),
      ("diffusion_steps", int_at_least(1)),
      ("ema_decay", number_in(0.0, 1.0, high_open=True)),
      ("ema_warmup", boolean()),
      ("optimizer.learning_rate", positive_number()),
      ("optimizer.warmup_steps", int_at_least(0)),
      ("optimizer.beta1", number_in(0.0, 1.0, high_open=True)),
      ("optimizer.beta2", number_in(0.0, 1.0, high_open=True)),
      ("optimizer.weight_decay", number_in(0.0)),
      ("optimizer.grad_clip_norm", optional(number_in(0.0))),
  ))
  overrides = dict(config.model.get("overrides", {}))
  for field in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                "num_classes"):
    if field in overrides and int_at_least(1)(overrides[field]):
      problems.add(f"--config.model.overrides.{field}", int_at_least(1)(overrides[field]))
  problems.raise_if_any()
  if overrides.get("input_size", 1) % overrides.get("patch_size", 1):
    problems.add("--config.model.overrides.patch_size",
                 f"{overrides['patch_size']} does not divide input_size {overrides['input_size']}")
  if overrides.get("hidden_size", 1) % overrides.get("num_heads", 1):
    problems.add("--config.model.overrides.num_heads",
                 f"{overrides['num_heads']} does not divide hidden_size {overrides['hidden_size']}")
  problems.raise_if_any()


def check_training_data(images, labels, num_classes: int, input_shape: tuple) -> None:
  """Images (N, H, W, C) finite in [-1, 1] matching the model; labels (N,) ints in range."""
  import numpy as np
  from dit_quant_jax.errors import DataError
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(input_shape):
    raise DataError(f"training images have shape {images.shape}, the model needs (N, {input_shape})")
  if labels.shape != (images.shape[0],):
    raise DataError(f"{images.shape[0]} training images but labels of shape {labels.shape}")
  from dit_quant_jax.data import fashion_mnist
  fashion_mnist.check_labels(labels, "training labels", num_classes,
                             "fix the labels, or the model's num_classes")
  if not np.all(np.isfinite(images)):
    raise DataError("training images contain NaN or Inf")


# --------------------------------------------------------------------------- sweeps
def check_sweep_config(sweep) -> None:
  """A sweep (configs/sweeps.py): sampling, and every run's quantization config."""
  from dit_quant_jax import config_spec, sweep as sweep_lib
  problems = Problems(f"sweep {sweep.get('name', '')}".strip())
  _check_sampling(problems, sweep.sampling, "--sweep.sampling.")
  problems.raise_if_any()
  record = check_checkpoint_path(sweep.model, "FP model", "--sweep.model")
  check_dataset_available(None, "test", "scoring")
  try:
    runs = sweep_lib.expand(sweep)
  except ValueError as e:
    raise ConfigError(f"invalid sweep: {e}") from None
  if not runs:
    problems.add("--sweep.axes", "define no run")
  for run in runs:
    try:
      qconfig = config_spec.load(run["spec"], run["overrides"])
      check_quantization_config(qconfig, record.get("model_config"), f"sweep run {run['name']}")
    except (FileNotFoundError, KeyError, ValueError) as e:
      problems.add(f"run {run['name']}", str(e).strip("'\""))
  problems.raise_if_any()


# ----------------------------------------------------------------------- DiT-XL/2
def check_dit_xl2_config(config) -> None:
  """configs/dit_xl2.py after overrides: numbers, the quantization spec, the checkpoints."""
  from dit_quant_jax import config_spec
  problems = Problems("DiT-XL/2 config")
  problems.check_table(config, (
      ("num_samples", int_at_least(1)),
      ("respacing", respacing()),
      ("sampler", sampler_name()),
      ("cfg_scale", cfg_scale()),
      ("seed", int_at_least(0)),
      ("batch_size", int_at_least(1)),
      ("vae_batch_size", int_at_least(1)),
      ("shard_size", int_at_least(1)),
      ("compute_dtype", one_of(("float32", "bfloat16", "float16"))),
  ))
  if not config.get("vae") or not os.path.exists(config.vae):
    problems.add("--config.vae", f"SD VAE weights {config.get('vae')!r} not found",
                 "a diffusers folder, .safetensors or .bin of stabilityai/sd-vae-ft-ema")
  problems.raise_if_any()
  record = check_checkpoint_path(config.model, "DiT-XL/2", "--config.model")
  if config.quant_spec:
    try:
      qconfig = config_spec.load(config.quant_spec)
    except (FileNotFoundError, KeyError, ValueError) as e:
      raise ConfigError(f"--config.quant_spec: {str(e).strip(chr(39))}") from None
    check_quantization_config(qconfig, record.get("model_config"), f"--config.quant_spec {config.quant_spec}")


# ---------------------------------------------------------------------- config flags
_MISSING_FILE = re.compile(r"No such file or directory: '([^']+)'")


def config_from_flag(holder, flag: str = "--config"):
  """``holder.value`` of a ``config_flags.DEFINE_config_file`` flag.  A config file that does
  not exist or fails to load is reported as one ConfigError naming the flag and the file, at
  the entry of the script (ml_collections defers the failure to the first ``.value``)."""
  try:
    value = holder.value
    value.keys()  # a config that failed to load is a placeholder raising on first use
    return value
  except (IOError, OSError) as e:
    text = str(e)
    missing = _MISSING_FILE.search(text)
    if missing:
      raise ConfigError(f"{flag}: config file {missing.group(1)!r} does not exist (a path such "
                        f"as configs/vq4dit.py:w2, relative to the current directory)") from None
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    raise ConfigError(f"{flag}: the config file failed to load: {last}") from None
