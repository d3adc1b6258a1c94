"""Block-wise VQ4DiT calibration (calibrate/vq_calibrate.py, calibrate/blocks.py) on a tiny DiT.

Until the trajectory module is wired in, the calibration inputs are random (x_t, t, y).
One calibration spec (hence one compiled train step) is shared by every test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.calibrate import blocks as blocks_lib
from dit_quant_jax.calibrate import vq_calibrate
from dit_quant_jax.quant import vq4dit
from test_vq4dit import load_config, tiny_model_and_params

STEPS = 8


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
  cal.batch_size = 3  # of 4: exercises the per-step random subset
  # Learning rates, optimizer and lambda_r: the config defaults (public code's RMSprop settings).
  cal.checkpoint_every = 2
  cal.log_every = 2
  rng = np.random.default_rng(0)
  calib = dict(x=rng.normal(size=(3, 4, 16, 16, 1)).astype(np.float32),
               t=rng.integers(0, 1000, size=(3, 4)), y=rng.integers(0, 11, size=(3, 4)))
  soft, _ = vq4dit.init_soft_layers(params, config)
  return model, params, config, calib, soft


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
  model, params, config, calib, soft = setup
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  return vq_calibrate.calibrate(model, params, soft, calib, config.calibration, workdir=workdir)


def _block_mse(model, params, calib, weights):
  qparams = vq4dit.replace_kernels(params, weights)
  fn = jax.jit(lambda q, x, t, y: blocks_lib.blockwise_mse(model, params, q, x, t, y))
  return float(np.mean([np.asarray(fn(qparams, calib["x"][s], calib["t"][s], calib["y"][s]))
                        for s in range(calib["x"].shape[0])]))


def test_gradients_reach_only_codebooks_and_logits(setup):
  model, params, config, calib, soft = setup
  spec = vq_calibrate.make_spec(config.calibration, soft)
  # Freeze the first half of one layer's sub-vectors.
  layer = "blocks_0/mlp/fc1"
  frozen = np.zeros(soft[layer].frozen.shape, bool)
  frozen[: frozen.shape[0] // 2] = True
  soft = dict(soft)
  soft[layer] = soft[layer].replace(frozen=jnp.asarray(frozen))
  state = vq_calibrate.init_state(soft, spec, 0, STEPS)
  batch = vq_calibrate.select_batch(calib, 0, state["rng"], 4)
  fn = jax.jit(lambda s, p, b: vq_calibrate.loss_and_grads(s, p, b, model=model, spec=spec))
  (loss, (block_mse, reg)), grads = fn(state, params, batch)
  assert np.isfinite(float(loss)) and float(block_mse) > 0 and float(reg) > 0
  # The gradient pytree is exactly {layer: {codebook, ratio_logits}}: nothing else is trainable.
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(state["trainable"])
  assert set(grads) == {vq_calibrate.state_key(p) for p in soft}
  for key, layer_grads in grads.items():
    assert set(layer_grads) == {"codebook", "ratio_logits"}
    assert np.any(np.asarray(layer_grads["codebook"]) != 0)
  logits_grad = np.asarray(grads[vq_calibrate.state_key(layer)]["ratio_logits"])
  assert np.all(logits_grad[frozen] == 0)
  assert np.mean(logits_grad[~frozen] != 0) > 0.9


def test_train_step_touches_only_trainables(setup):
  model, params, config, calib, soft = setup
  spec = vq_calibrate.make_spec(config.calibration, soft)
  state = vq_calibrate.init_state(soft, spec, 0, STEPS)
  before = jax.tree_util.tree_map(np.asarray, state)
  params_before = jax.tree_util.tree_map(np.asarray, params)
  state.pop("loss_history")
  batch = vq_calibrate.select_batch(calib, 0, np.asarray(state["rng"]), 3)
  new_state, metrics = vq_calibrate.train_step(state, params, batch, model=model, spec=spec)
  assert int(new_state["step"]) == 1
  for key in before["trainable"]:
    assert not np.array_equal(np.asarray(new_state["trainable"][key]["codebook"]),
                              before["trainable"][key]["codebook"])
    np.testing.assert_array_equal(np.asarray(new_state["assignment"][key]["candidates"]),
                                  before["assignment"][key]["candidates"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_before, jax.tree_util.tree_map(np.asarray, params))
  assert metrics["frozen_fraction"].shape == (4,)


def test_interrupted_and_resumed_equals_uninterrupted(setup, uninterrupted, tmp_path):
  model, params, config, calib, soft = setup
  workdir = str(tmp_path)

  def kill_at_3(step, metrics):
    if step == 3:
      raise Interrupted()

  with pytest.raises(Interrupted):
    vq_calibrate.calibrate(model, params, soft, calib, config.calibration, workdir=workdir, callback=kill_at_3)
  assert vq_calibrate.has_checkpoint(workdir)
  resumed, resumed_report = vq_calibrate.calibrate(model, params, soft, calib, config.calibration,
                                                   workdir=workdir)
  assert resumed_report["resumed_from_step"] == 2  # last checkpoint before the kill
  full, full_report = uninterrupted
  assert full_report["resumed_from_step"] == 0
  np.testing.assert_array_equal(resumed_report["loss_curve"], full_report["loss_curve"])
  assert np.all(np.isfinite(full_report["loss_curve"]))
  for path in full:
    for field in ("codebook", "ratio_logits", "candidates", "frozen", "frozen_index"):
      np.testing.assert_array_equal(np.asarray(getattr(resumed[path], field)),
                                    np.asarray(getattr(full[path], field)), err_msg=f"{path} {field}")
  # A finished run restarts as a no-op with the same result.
  again, again_report = vq_calibrate.calibrate(model, params, soft, calib, config.calibration, workdir=workdir)
  assert again_report["resumed_from_step"] == STEPS
  np.testing.assert_array_equal(np.asarray(again[path].codebook), np.asarray(full[path].codebook))


def test_calibration_lowers_block_mse(setup, uninterrupted):
  model, params, config, calib, soft = setup
  calibrated, report = uninterrupted
  kmeans_weights = {p: s.to_vqweight() for p, s in soft.items()}  # nearest codeword = k-means assignment
  calibrated_weights = {p: s.to_vqweight() for p, s in calibrated.items()}
  before = _block_mse(model, params, calib, kmeans_weights)
  after = _block_mse(model, params, calib, calibrated_weights)
  assert after < before, (before, after)
  assert report["loss_curve"][-1] < report["loss_curve"][0]


def test_bad_inputs(setup):
  model, params, config, calib, soft = setup
  with pytest.raises(ValueError, match="miss"):
    vq_calibrate.calibrate(model, params, soft, {"x": calib["x"]}, config.calibration)
  bad = config.calibration.copy_and_resolve_references()
  bad.optimizer = "lbfgs"
  with pytest.raises(ValueError, match="unknown optimizer"):
    vq_calibrate.make_spec(bad, soft)
