"""VQ4DiT calibration (calibrate/vq_calibrate.py, calibrate/blocks.py, calibrate/trajectory.py)
on a tiny DiT: on-the-fly FP trajectories, end-to-end loss, two-phase codebooks, biases,
gated regulariser, label dropout, kill/resume.

One calibration spec per mode (hence few compilations) is shared by the tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.calibrate import blocks as blocks_lib
from dit_quant_jax.calibrate import trajectory as trajectory_lib
from dit_quant_jax.calibrate import vq_calibrate
from dit_quant_jax.diffusion import create_diffusion, sampling
from dit_quant_jax.quant import vq4dit
from test_vq4dit import load_config, tiny_model_and_params

STEPS = 8
TRAJECTORY_STEPS = 4  # a fresh trajectory every 4 optimisation steps: 2 in a run


def _shape(model):
  return (model.input_size, model.input_size, model.in_channels)


class Interrupted(Exception):
  pass


@pytest.fixture(scope="module")
def setup():
  model, params = tiny_model_and_params()
  config = load_config("tiny")
  config.layer_patterns = [r"blocks_\d+/mlp/fc1", r"blocks_\d+/mlp/fc2"]  # 2 shapes, 4 layers, 2 blocks
  config.codebook_size = 16
  config.kmeans.num_iters = 15
  cal = config.calibration
  cal.steps = STEPS
  cal.checkpoint_every = 2
  cal.log_every = 2
  config.calib.num_samples = 3
  config.calib.timestep_respacing = str(TRAJECTORY_STEPS)
  soft, _ = vq4dit.init_soft_layers(params, config)
  return model, params, config, soft


def _spec(setup, **calibration):
  model, params, config, soft = setup
  config = config.copy_and_resolve_references()
  config.calibration.update(calibration)
  return vq_calibrate.make_spec(config, soft, model), config


def _state(setup, spec, soft=None):
  model, params, config, default_soft = setup
  return vq_calibrate.init_state(soft or default_soft, params, spec, 0, 0, STEPS)


def _step(setup, spec, state):
  model, params, config, _ = setup
  diffusion = vq_calibrate.calibration_diffusion(model, config.calib)
  state = {k: v for k, v in state.items() if k != "loss_history"}
  return vq_calibrate.train_step(state, params, model=model, spec=spec, diffusion=diffusion)


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
  model, params, config, soft = setup
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  return vq_calibrate.calibrate(model, params, soft, config, workdir=workdir)


def test_stratified_labels_cover_every_class():
  order = trajectory_lib.class_order(jax.random.PRNGKey(3), 10)
  assert sorted(np.asarray(order).tolist()) == list(range(10))
  labels = np.concatenate([np.asarray(trajectory_lib.stratified_labels(order, j, 4)) for j in range(5)])
  assert np.bincount(labels, minlength=10).tolist() == [2] * 10  # 20 labels, every class twice
  first = np.concatenate([np.asarray(trajectory_lib.stratified_labels(order, j, 4)) for j in range(3)])
  assert set(first[:10].tolist()) == set(range(10))  # all classes before any repeats
  again = trajectory_lib.class_order(jax.random.PRNGKey(3), 10)
  np.testing.assert_array_equal(order, again)


def test_block_outputs_match_the_model_forward(setup):
  """End-to-end student outputs == the whole model's own block outputs (captured by Flax)."""
  model, params, config, soft = setup
  qparams = vq4dit.replace_kernels(params, soft)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4,) + _shape(model)), jnp.float32)
  t = jnp.asarray([5, 100, 500, 900], jnp.int32)
  y = jnp.asarray([1, 7, 10, 10], jnp.int32)
  _, fp_blocks = blocks_lib.fp_outputs_and_block_outputs(model, params, x, t, y)
  _, q_blocks = blocks_lib.fp_outputs_and_block_outputs(model, qparams, x, t, y)
  e2e = blocks_lib.student_block_outputs(model, qparams, x, t, y, fp_blocks, model.depth, "end_to_end")
  for mine, ref in zip(e2e, q_blocks):
    np.testing.assert_allclose(np.asarray(mine), np.asarray(ref), rtol=1e-5, atol=1e-5)
  fp_in = blocks_lib.student_block_outputs(model, qparams, x, t, y, fp_blocks, model.depth, "fp_input")
  np.testing.assert_allclose(np.asarray(fp_in[0]), np.asarray(q_blocks[0]), rtol=1e-5, atol=1e-5)
  ref1 = blocks_lib.apply_block(model, qparams["blocks_1"], fp_blocks[0], blocks_lib.embed(model, params, x, t, y)[1])
  np.testing.assert_allclose(np.asarray(fp_in[1]), np.asarray(ref1), rtol=1e-5, atol=1e-5)
  # The CFG forward returns the sampler's guided output.
  out, _ = blocks_lib.fp_outputs_and_block_outputs(model, params, x, t, y, 4.0)
  ref = model.apply({"params": params}, x, t, y, 4.0, method=model.forward_with_cfg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_label_dropout_drops_some_labels(setup):
  model, params, config, soft = setup
  y = jnp.arange(400, dtype=jnp.int32) % 10
  x = jnp.zeros((400,) + _shape(model))
  t = jnp.full((400,), 10, jnp.int32)
  _, c_eval = blocks_lib.embed(model, params, x, t, y)
  _, c_null = blocks_lib.embed(model, params, x, t, jnp.full_like(y, model.num_classes))
  _, c_train = blocks_lib.embed(model, params, x, t, y, dropout_rng=jax.random.PRNGKey(0))
  dropped = np.all(np.isclose(np.asarray(c_train), np.asarray(c_null)), axis=-1)
  kept = np.all(np.isclose(np.asarray(c_train), np.asarray(c_eval)), axis=-1)
  assert np.all(dropped | kept)
  assert 0.03 < dropped.mean() < 0.2  # class_dropout_prob = 0.1


def test_teacher_walks_the_fp_sampler_trajectory(setup):
  """With a deterministic sampler the calibration's x_t sequence is the FP sampler's own."""
  model, params, config, soft = setup
  config = config.copy_and_resolve_references()
  config.calib.sampler = "ddim"
  spec = vq_calibrate.make_spec(config, soft, model)
  diffusion = vq_calibrate.calibration_diffusion(model, config.calib)
  state = vq_calibrate.init_state(soft, params, spec, 0, 0, STEPS)
  state.pop("loss_history")
  xs = []
  for _ in range(TRAJECTORY_STEPS):
    state, _ = vq_calibrate.train_step(state, params, model=model, spec=spec, diffusion=diffusion)
    xs.append(np.asarray(state["trajectory"]["x"]))
  key = jax.random.PRNGKey(int(config.calib.seed))
  noise = trajectory_lib.initial_noise(key, 0, (3,) + _shape(model))
  labels = trajectory_lib.stratified_labels(trajectory_lib.class_order(key, 10), 0, 3)
  np.testing.assert_array_equal(np.asarray(state["trajectory"]["labels"]), np.asarray(labels))
  fn = sampling.cfg_model_fn(model, float(config.calib.cfg_scale))
  x0, traj = sampling.sample(create_diffusion(str(TRAJECTORY_STEPS)), fn, noise, None, sampler="ddim",
                             model_args=(params, labels), return_trajectory=True)
  expected = list(np.asarray(traj["x"])[1:]) + [np.asarray(x0)]
  for mine, ref in zip(xs, expected):
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4)


def test_gradients_codebooks_biases_and_end_to_end(setup):
  model, params, config, soft = setup
  diffusion = vq_calibrate.calibration_diffusion(model, config.calib)
  grads = {}
  for loss in ("end_to_end", "fp_input"):
    spec, _ = _spec(setup, loss=loss)
    state = _state(setup, spec)
    fn = jax.jit(lambda s, p, spec=spec: vq_calibrate.loss_and_grads(s, p, model=model, spec=spec,
                                                                   diffusion=diffusion))
    (value, (block_mse, reg, added)), grads[loss], _ = fn(state, params)
    assert np.isfinite(float(value)) and float(block_mse) > 0
    assert not bool(added)  # first step of a trajectory: the running minimum starts there
    assert float(value) == pytest.approx(float(block_mse))
    for key, layer in grads[loss].items():
      assert set(layer) == {"codebook", "ratio_logits", "bias"}
      assert np.any(np.asarray(layer["bias"]) != 0) and np.any(np.asarray(layer["ratio_logits"]) != 0)
  # Block 1's layers see the same input and target in both modes at step 0 (block 0 output
  # differs only through block 0's quantization): block 0's gradients differ because the
  # end-to-end loss also back-propagates block 1's error through block 0.
  key0 = vq_calibrate.state_key("blocks_0/mlp/fc1")
  assert not np.allclose(np.asarray(grads["end_to_end"][key0]["ratio_logits"]),
                         np.asarray(grads["fp_input"][key0]["ratio_logits"]))


def test_codebooks_train_only_once_hard(setup):
  model, params, config, soft = setup
  spec, _ = _spec(setup)
  hard_layer = "blocks_1/mlp/fc2"
  soft = dict(soft)
  soft[hard_layer] = soft[hard_layer].replace(frozen=jnp.ones_like(soft[hard_layer].frozen))
  state = _state(setup, spec, soft)
  before = jax.tree_util.tree_map(np.asarray, state)
  params_before = jax.tree_util.tree_map(np.asarray, params)
  new_state, metrics = _step(setup, spec, state)
  assert int(new_state["step"]) == 1
  for path in soft:
    key = vq_calibrate.state_key(path)
    changed = not np.array_equal(np.asarray(new_state["trainable"][key]["codebook"]),
                                 before["trainable"][key]["codebook"])
    still_soft = not np.all(np.asarray(new_state["assignment"][key]["frozen"]))
    if path == hard_layer:
      assert changed
    elif still_soft:
      assert not changed, path
    assert not np.array_equal(np.asarray(new_state["trainable"][key]["bias"]), before["trainable"][key]["bias"])
    np.testing.assert_array_equal(np.asarray(new_state["assignment"][key]["candidates"]),
                                  before["assignment"][key]["candidates"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_before, jax.tree_util.tree_map(np.asarray, params))
  # Our alternative: every codebook moves from step 0.
  spec_always, _ = _spec(setup, codebook_schedule="always", train_biases=False)
  new_state, _ = _step(setup, spec_always, _state(setup, spec_always))
  for path in soft:
    key = vq_calibrate.state_key(path)
    assert "bias" not in new_state["trainable"][key]
    assert not np.array_equal(np.asarray(new_state["trainable"][key]["codebook"]),
                              before["trainable"][key]["codebook"])


def test_regularizer_gate_and_average(setup):
  model, params, config, soft = setup
  diffusion = vq_calibrate.calibration_diffusion(model, config.calib)
  spec, _ = _spec(setup)
  state = _state(setup, spec)
  state["step"] = jnp.ones((), jnp.int32)  # mid-trajectory: the stored running minimum counts
  fn = jax.jit(lambda s, p: vq_calibrate.loss_and_grads(s, p, model=model, spec=spec, diffusion=diffusion))
  for minimum, expect_added in ((-1.0, True), (1e9, False)):
    state["trajectory"]["regularizer_min"] = jnp.asarray(minimum, jnp.float32)
    (value, (block_mse, reg, added)), _, _ = fn(state, params)
    assert bool(added) == expect_added
    expected = float(block_mse) + (spec.lambda_r * float(reg) if expect_added else 0.0)
    assert float(value) == pytest.approx(expected, rel=1e-6)
  # Averages: soft layers only, or all layers with hard ones counting 0.
  softs = dict(soft)
  hard = "blocks_0/mlp/fc1"
  softs[hard] = softs[hard].replace(frozen=jnp.ones_like(softs[hard].frozen))
  per_layer = np.array([float(vq4dit.ratio_regularizer(s, "public")) for s in softs.values()])
  assert per_layer[list(softs).index(hard)] == 0.0
  np.testing.assert_allclose(float(vq_calibrate.regularizer(softs, spec)), per_layer.sum() / 3, rtol=1e-6)
  spec_all, _ = _spec(setup, regularizer_average="all_layers")
  np.testing.assert_allclose(float(vq_calibrate.regularizer(softs, spec_all)), per_layer.mean(), rtol=1e-6)


def test_harden_at_forces_every_layer_hard(setup):
  assert _spec(setup, harden_at=0.5)[0].harden_step == STEPS // 2
  spec, _ = _spec(setup, harden_at=0.0)  # hard from step 0: k-means assignments, codebooks train
  state = _state(setup, spec)
  before = jax.tree_util.tree_map(np.asarray, state)
  new_state, metrics = _step(setup, spec, state)
  assert np.all(np.asarray(metrics["frozen_fraction"]) == 1.0)
  model, params, config, soft = setup
  for path, weight in soft.items():
    layer = new_state["assignment"][vq_calibrate.state_key(path)]
    key = vq_calibrate.state_key(path)
    np.testing.assert_array_equal(np.asarray(layer["frozen_index"]), np.asarray(weight.hard_indices()))
    # = the nearest codeword (k-means assignment) except near-ties, where the +1e-5 of the
    # public logit initialisation can favour the second candidate.
    assert np.mean(np.asarray(layer["frozen_index"]) == before["assignment"][key]["candidates"][..., 0]) > 0.99
    assert not np.array_equal(np.asarray(new_state["trainable"][key]["codebook"]), before["trainable"][key]["codebook"])


def test_interrupted_and_resumed_equals_uninterrupted(setup, uninterrupted, tmp_path):
  model, params, config, soft = setup
  workdir = str(tmp_path)

  def kill_at_5(step, metrics):
    if step == 5:
      raise Interrupted()

  with pytest.raises(Interrupted):
    vq_calibrate.calibrate(model, params, soft, config, workdir=workdir, callback=kill_at_5)
  assert vq_calibrate.has_checkpoint(workdir)
  resumed, resumed_biases, resumed_report = vq_calibrate.calibrate(model, params, soft, config, workdir=workdir)
  assert resumed_report["resumed_from_step"] == 4  # last checkpoint before the kill, mid second trajectory
  full, full_biases, full_report = uninterrupted
  assert full_report["resumed_from_step"] == 0 and full_report["trajectories"] == 2
  np.testing.assert_array_equal(resumed_report["loss_curve"], full_report["loss_curve"])
  assert np.all(np.isfinite(full_report["loss_curve"]))
  for path in full:
    for field in ("codebook", "ratio_logits", "candidates", "frozen", "frozen_index"):
      np.testing.assert_array_equal(np.asarray(getattr(resumed[path], field)),
                                    np.asarray(getattr(full[path], field)), err_msg=f"{path} {field}")
    np.testing.assert_array_equal(np.asarray(resumed_biases[path]), np.asarray(full_biases[path]))
  # A finished run restarts as a no-op with the same result.
  again, _, again_report = vq_calibrate.calibrate(model, params, soft, config, workdir=workdir)
  assert again_report["resumed_from_step"] == STEPS
  np.testing.assert_array_equal(np.asarray(again[path].codebook), np.asarray(full[path].codebook))


def test_codebook_finetune_lowers_the_end_to_end_error(setup):
  """harden_at = 0 (k-means assignments, codebooks and biases fine-tuned end to end): the
  hard model's block-output MSE, end to end, on the inputs of the calibration's first FP
  trajectory step (CFG batch), falls below the k-means model's.  (The public procedure's
  soft phase does not promise that after a few steps: its argmax at the end can be worse.)"""
  model, params, config, soft = setup
  config = config.copy_and_resolve_references()
  config.calibration.update(dict(harden_at=0.0, codebook_lr=1e-3, bias_lr=1e-3))
  calibrated, biases, report = vq_calibrate.calibrate(model, params, soft, config)
  spec = vq_calibrate.make_spec(config, soft, model)
  diffusion = vq_calibrate.calibration_diffusion(model, config.calib)
  state = vq_calibrate.init_state(soft, params, spec, 0, 0, STEPS)
  x, t, labels, *_ = vq_calibrate.trajectory_batch(state, spec, diffusion)
  batch = vq_calibrate.model_batch(model, x, t, labels, spec, diffusion)
  _, targets = blocks_lib.fp_outputs_and_block_outputs(model, params, *batch, spec.cfg_scale)

  def mse(qparams):
    outs = blocks_lib.student_block_outputs(model, qparams, *batch, targets, model.depth)
    return float(np.mean([np.mean(np.square(np.asarray(o) - np.asarray(r))) for o, r in zip(outs, targets)]))

  kmeans_params = vq4dit.replace_kernels(params, {p: s.to_vqweight() for p, s in soft.items()})
  calibrated_params, _ = vq4dit.harden(params, calibrated, {p: {} for p in calibrated}, biases)
  assert mse(calibrated_params) < mse(kmeans_params)


def test_bad_options(setup):
  model, params, config, soft = setup
  for field, value, match in (("optimizer", "lbfgs", "unknown calibration.optimizer"),
                              ("loss", "kl", "unknown calibration.loss"),
                              ("codebook_schedule", "never", "unknown calibration.codebook_schedule"),
                              ("harden_at", 1.5, "harden_at")):
    bad = config.copy_and_resolve_references()
    bad.calibration[field] = value
    with pytest.raises(ValueError, match=match):
      vq_calibrate.make_spec(bad, soft, model)
  outside = dict(soft)
  outside["final_layer/linear"] = soft["blocks_0/mlp/fc1"]
  with pytest.raises(ValueError, match="outside blocks_i"):
    vq_calibrate.make_spec(config, outside, model)


def test_config_default_is_the_public_procedure():
  c = load_config("w2")
  cal = c.calibration
  assert (cal.codebook_schedule, cal.loss, cal.train_biases) == ("after_hard", "end_to_end", True)
  assert (cal.regularizer_gate, cal.regularizer_average, cal.label_dropout) == ("above_running_min",
                                                                              "soft_layers", False)
  assert (cal.codebook_lr, cal.bias_lr, cal.logits_lr, cal.rmsprop_decay) == (1e-4, 1e-4, 5e-2, 0.9)
  assert (c.calib.cfg_scale, c.calib.timestep_respacing, c.calib.sampler, c.calib.fresh_trajectories) == (
      4.0, "50", "ddpm", True)
  assert cal.harden_at is None
  finetune = load_config("finetune_w3")
  assert finetune.calibration.harden_at == 0.0 and (finetune.codebook_size, finetune.subvector_dim) == (64, 2)
