"""Orbax checkpoints with model config, metadata and quantized nodes; resumable state."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from dit_quant_jax.models import dit
from dit_quant_jax.quant import qtensor
from dit_quant_jax.utils import checkpoint


@qtensor.register_quantized_type
@struct.dataclass
class DummyCodebookWeight(qtensor.QuantizedWeight):
  """A registered quantized kernel: codebook lookup, static shape / bits / group tuple."""

  codebook: jax.Array            # (num_codes,) float32
  assignments: jax.Array         # (in_features, out_features) uint8
  scale: jax.Array | None        # optional, left None here
  shape: tuple = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  groups: tuple = struct.field(pytree_node=False, default=(1, (2, 3)))
  label: str = struct.field(pytree_node=False, default="vq")

  def dequantize(self, dtype=jnp.float32):
    return self.codebook[self.assignments.astype(jnp.int32)].astype(dtype)


@struct.dataclass
class UnregisteredWeight(qtensor.QuantizedWeight):
  values: jax.Array
  shape: tuple = struct.field(pytree_node=False)


# A tiny DiT; its params are built from random arrays (no init compile needed).
TINY = dict(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
            num_classes=3, learn_sigma=False)


@pytest.fixture(scope="module")
def tiny():
  model = dit.create_model(None, **TINY)
  shapes = jax.eval_shape(lambda: dit.init_params(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
  qkv = params["blocks_0"]["attn"]["qkv"]
  qkv["kernel"] = DummyCodebookWeight(
      codebook=jnp.asarray(rng.standard_normal(4), jnp.float32),
      assignments=jnp.asarray(rng.integers(0, 4, size=(16, 48)), jnp.uint8),
      scale=None, shape=(16, 48), bits=2)
  return model, params


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_quantized_node(tiny, tmp_path):
  model, params = tiny
  metadata = {"method": "vq4dit", "bits": 2, "layers": ["blocks_0/attn/qkv"], "groups": (2, 4),
              "dtype": jnp.bfloat16}
  path = str(tmp_path / "ckpt")
  checkpoint.save_checkpoint(path, params, model.config_dict(), metadata)
  restored, config, meta = checkpoint.restore_checkpoint(path, expected_config=model.config_dict())

  assert config == model.config_dict()
  assert meta == {"method": "vq4dit", "bits": 2, "layers": ["blocks_0/attn/qkv"], "groups": (2, 4),
                  "dtype": jnp.dtype(jnp.bfloat16)}
  assert isinstance(meta["groups"], tuple) and isinstance(meta["layers"], list)
  node = restored["blocks_0"]["attn"]["qkv"]["kernel"]
  assert type(node) is DummyCodebookWeight
  assert node.shape == (16, 48) and isinstance(node.shape, tuple)
  assert node.groups == (1, (2, 3)) and isinstance(node.groups[1], tuple)
  assert node.bits == 2 and node.label == "vq" and node.scale is None
  _assert_trees_equal(restored, params)  # same treedef: static fields compared too

  # The restored params run the model exactly as the originals.
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 1)), jnp.float32)
  t, y = jnp.array([10.0, 900.0]), jnp.array([0, 3])
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply({"params": restored}, x, t, y),
                                apply({"params": params}, x, t, y))


def test_architecture_mismatch_names_fields(tiny, tmp_path):
  model, params = tiny
  path = str(tmp_path / "ckpt")
  checkpoint.save_checkpoint(path, params, model.config_dict())
  other = dit.create_model(None, **dict(TINY, depth=2, hidden_size=32)).config_dict()
  with pytest.raises(checkpoint.ConfigMismatchError) as info:
    checkpoint.restore_checkpoint(path, expected_config=other)
  message = str(info.value)
  assert "depth: checkpoint 1, expected 2" in message
  assert "hidden_size: checkpoint 16, expected 32" in message
  assert "num_heads" not in message and path in message


def test_missing_checkpoint_names_path(tmp_path):
  path = str(tmp_path / "does_not_exist")
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    checkpoint.restore_checkpoint(path)


def test_existing_directory_is_not_overwritten(tiny, tmp_path):
  model, params = tiny
  path = str(tmp_path / "ckpt")
  checkpoint.save_checkpoint(path, {"w": jnp.ones(3)}, {"depth": 1})
  with pytest.raises(FileExistsError, match="ckpt"):
    checkpoint.save_checkpoint(path, {"w": jnp.zeros(3)}, {"depth": 1})
  checkpoint.save_checkpoint(path, {"w": jnp.zeros(3)}, {"depth": 2}, overwrite=True)
  restored, config, _ = checkpoint.restore_checkpoint(path)
  np.testing.assert_array_equal(restored["w"], np.zeros(3))
  assert config == {"depth": 2}


def test_unregistered_quantized_type_is_refused(tmp_path):
  params = {"layer": {"kernel": UnregisteredWeight(jnp.ones(3), (3, 1))}}
  with pytest.raises(TypeError, match="layer/kernel.*UnregisteredWeight.*register_quantized_type"):
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), params, {})


def test_non_json_metadata_is_refused(tmp_path):
  with pytest.raises(TypeError, match=r"metadata\.rng"):
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), {"w": jnp.ones(2)}, {},
                               {"rng": object()})


# ---------------------------------------------------------------------- resumable state
def _state(params, step_value):
  optimizer = optax.adam(1e-3)
  trainable = {"w": jnp.full((3,), float(step_value))}
  return {"params": params, "opt_state": optimizer.init(trainable), "trainable": trainable,
          "step": jnp.asarray(step_value, jnp.int32)}


def test_save_state_resume_and_keep(tiny, tmp_path):
  _, params = tiny
  directory = str(tmp_path / "state")
  assert checkpoint.latest_step(directory) is None
  for step in (10, 20, 30):
    assert checkpoint.save_state(directory, step, _state(params, step), keep=2)
  assert not checkpoint.save_state(directory, 30, _state(params, 99))  # already saved
  assert checkpoint.latest_step(directory) == 30
  assert sorted(os.listdir(directory)) == ["20", "30"]  # keep=2

  target = _state(params, 0)
  restored = checkpoint.restore_state(directory, target)
  _assert_trees_equal(restored, _state(params, 30))
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  older = checkpoint.restore_state(directory, target, step=20)
  np.testing.assert_array_equal(older["trainable"]["w"], np.full(3, 20.0))
  with pytest.raises(FileNotFoundError, match=r"step 10 .*saved steps: \[20, 30\]"):
    checkpoint.restore_state(directory, target, step=10)


def test_killed_save_leaves_last_step_resumable(tmp_path):
  """A kill mid-save leaves only orbax's temporary directory: it is not a step."""
  directory = str(tmp_path / "state")
  state = {"w": jnp.arange(4.0), "step": jnp.asarray(5)}
  checkpoint.save_state(directory, 5, state)
  partial = os.path.join(directory, "6.orbax-checkpoint-tmp-1700000000")
  os.makedirs(os.path.join(partial, "default"))
  with open(os.path.join(partial, "default", "partial_chunk"), "wb") as f:
    f.write(os.urandom(64))
  assert checkpoint.latest_step(directory) == 5
  _assert_trees_equal(checkpoint.restore_state(directory, state), state)
  # The job resumes and saves step 6 for real.
  checkpoint.save_state(directory, 6, {"w": jnp.arange(4.0) + 1, "step": jnp.asarray(6)})
  assert checkpoint.latest_step(directory) == 6
  np.testing.assert_array_equal(checkpoint.restore_state(directory, state)["w"], np.arange(4.0) + 1)


def test_restore_state_without_any_step(tmp_path):
  with pytest.raises(FileNotFoundError, match="no saved state directory"):
    checkpoint.restore_state(str(tmp_path / "nothing"), {"w": jnp.ones(1)})
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no completed step"):
    checkpoint.restore_state(str(tmp_path / "empty"), {"w": jnp.ones(1)})
