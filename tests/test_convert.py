"""Official DiT state dicts <-> Flax params: layout, round trip, every error path, .pt loading."""

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from dit_quant_jax.models import convert, dit
from dit_quant_jax.quant import qtensor
from dit_quant_jax.utils import checkpoint

# A small non-official architecture (hidden 48 is not in the official table: heads explicit).
SMALL = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=4,
             num_classes=5, learn_sigma=True)


def _random_state_dict(model, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(shape).astype(np.float32)
          for k, shape in convert.official_shapes(model).items()}


@pytest.fixture(scope="module")
def small():
  model = dit.create_model(None, **SMALL)
  return model, _random_state_dict(model)


def test_key_mapping_examples():
  examples = {
      "blocks.3.attn.qkv.weight": ("blocks_3", "attn", "qkv", "kernel"),
      "blocks.11.adaLN_modulation.1.bias": ("blocks_11", "adaLN_modulation_1", "bias"),
      "t_embedder.mlp.0.weight": ("t_embedder", "mlp_0", "kernel"),
      "y_embedder.embedding_table.weight": ("y_embedder", "embedding_table", "embedding"),
      "x_embedder.proj.weight": ("x_embedder", "proj", "kernel"),
      "final_layer.linear.bias": ("final_layer", "linear", "bias"),
      "pos_embed": ("pos_embed",),
  }
  for key, path in examples.items():
    assert convert.official_key_to_path(key) == path
    assert convert.path_to_official_key(path) == key


def test_expected_layout_is_the_official_one():
  """Keys and shapes we expect == the state_dict() of the independent PyTorch port."""
  pytest.importorskip("torch")
  import official_dit_torch

  for config in (SMALL, dict(SMALL, learn_sigma=False, patch_size=4, in_channels=1)):
    reference = official_dit_torch.OfficialDiT(**config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert convert.official_shapes(dit.create_model(None, **config)) == expected


def test_transposes(small):
  model, state_dict = small
  params = convert.params_from_official(state_dict, model)
  qkv = state_dict["blocks.1.attn.qkv.weight"]  # (out, in)
  np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"], qkv.T)
  conv = state_dict["x_embedder.proj.weight"]  # (out, in, kh, kw)
  kernel = np.asarray(params["x_embedder"]["proj"]["kernel"])  # (kh, kw, in, out)
  for out_ch, in_ch, kh, kw in [(0, 0, 0, 0), (47, 2, 1, 0), (5, 1, 0, 1)]:
    assert kernel[kh, kw, in_ch, out_ch] == conv[out_ch, in_ch, kh, kw]
  np.testing.assert_array_equal(params["y_embedder"]["embedding_table"]["embedding"],
                                state_dict["y_embedder.embedding_table.weight"])
  leaves = jax.tree_util.tree_leaves(params)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_round_trip(small):
  model, state_dict = small
  back = convert.params_to_official(convert.params_from_official(state_dict, model))
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_converted_params_run_and_match_init_structure(small):
  model, state_dict = small
  params = convert.params_from_official(state_dict)  # architecture inferred
  init_shapes = jax.eval_shape(lambda: dit.init_params(model, jax.random.PRNGKey(0)))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init_shapes)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, init_shapes)


def test_missing_key_is_named(small):
  model, state_dict = small
  broken = dict(state_dict)
  del broken["blocks.1.mlp.fc2.bias"]
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"missing key 'blocks\.1\.mlp\.fc2\.bias' \(expected shape \(48,\)\)"):
    convert.params_from_official(broken, model)


def test_unexpected_key_is_named(small):
  model, state_dict = small
  extra = dict(state_dict, **{"blocks.0.attn.q_norm.weight": np.ones((12,), np.float32)})
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"unexpected key 'blocks\.0\.attn\.q_norm\.weight' \(shape \(12,\)\)"):
    convert.params_from_official(extra, model)
  with pytest.raises(convert.CheckpointMismatchError, match=r"unexpected key"):
    convert.params_from_official(extra)  # inferred architecture checks too


def test_misshaped_key_names_both_shapes(small):
  model, state_dict = small
  broken = dict(state_dict, **{"blocks.1.attn.qkv.weight": np.ones((144, 40), np.float32)})
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"'blocks\.1\.attn\.qkv\.weight' has shape \(144, 40\), "
                           r"model expects \(144, 48\)"):
    convert.params_from_official(broken, model)


def test_missing_block_with_inferred_architecture(small):
  _, state_dict = small
  broken = dict(state_dict)
  del broken["blocks.1.attn.proj.weight"]
  with pytest.raises(convert.CheckpointMismatchError, match=r"blocks\.1\.attn\.proj\.weight"):
    convert.params_from_official(broken)


def test_wrong_architecture_is_rejected(small):
  _, state_dict = small
  deeper = dit.create_model(None, **dict(SMALL, depth=3))
  with pytest.raises(convert.CheckpointMismatchError, match=r"missing key 'blocks\.2\."):
    convert.params_from_official(state_dict, deeper)


def test_infer_config(small):
  model, state_dict = small
  config = convert.infer_config(state_dict, num_heads=4)
  assert dit.create_model(None, **config).config_dict() == model.config_dict()
  with pytest.raises(ValueError, match="num_heads"):
    convert.infer_config(state_dict)  # hidden 48 is not an official width
  unsigma = dit.create_model(None, **dict(SMALL, learn_sigma=False))
  assert convert.infer_config(_random_state_dict(unsigma), num_heads=4)["learn_sigma"] is False


@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-B/4", "DiT-S/8"])
def test_infer_official_config_from_shapes(name):
  model = dit.create_model(name)  # ImageNet-256 latents: 32x32x4, 1000 classes
  shapes = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in convert.official_shapes(model).items()}
  config = convert.infer_config(shapes)
  assert config == {k: v for k, v in model.config_dict().items() if k in config}
  assert convert.official_config_name(config) == name


def test_ddp_prefix_is_stripped(small):
  model, state_dict = small
  prefixed = {f"module.{k}": v for k, v in state_dict.items()}
  params = convert.params_from_official(prefixed, model)
  np.testing.assert_array_equal(params["pos_embed"], state_dict["pos_embed"])


def test_quantized_params_do_not_export():
  @struct.dataclass
  class FakeQuantized(qtensor.QuantizedWeight):
    values: jax.Array
    shape: tuple = struct.field(pytree_node=False)

  params = {"blocks_0": {"attn": {"qkv": {"kernel": FakeQuantized(jnp.ones(3), (2, 6))}}}}
  with pytest.raises(TypeError, match="blocks_0/attn/qkv/kernel.*quantized FakeQuantized"):
    convert.params_to_official(params)


# ------------------------------------------------------------------------- .pt files
@pytest.fixture(scope="module")
def torch_state_dicts(small):
  torch = pytest.importorskip("torch")
  model, state_dict = small
  ema = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  raw = {k: torch.from_numpy(v + 1.0) for k, v in state_dict.items()}
  return torch, model, ema, raw


def test_load_plain_state_dict(torch_state_dicts, tmp_path):
  torch, model, ema, _ = torch_state_dicts
  path = str(tmp_path / "released.pt")
  torch.save(ema, path)
  loaded_model, params = convert.load_official_params(path, num_heads=4)
  assert loaded_model.config_dict() == model.config_dict()
  np.testing.assert_array_equal(params["blocks_0"]["mlp"]["fc1"]["kernel"],
                                ema["blocks.0.mlp.fc1.weight"].numpy().T)


def test_training_checkpoint_takes_ema(torch_state_dicts, tmp_path):
  torch, _, ema, raw = torch_state_dicts
  path = str(tmp_path / "0400000.pt")
  # The layout train.py writes: model, ema, optimizer state and the argparse namespace.
  torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
              "args": argparse.Namespace(model="DiT-S/2", image_size=256)}, path)
  state_dict = convert.load_official_checkpoint(path)
  assert sorted(state_dict) == sorted(ema)
  for key in ema:
    assert torch.equal(state_dict[key], ema[key]), key


def test_bfloat16_tensors_convert(torch_state_dicts):
  torch, model, ema, _ = torch_state_dicts
  half = {k: v.to(torch.bfloat16) for k, v in ema.items()}
  params = convert.params_from_official(half, model)
  kernel = params["final_layer"]["linear"]["kernel"]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(kernel, half["final_layer.linear.weight"].float().numpy().T)


def test_missing_pt_file_is_named(tmp_path):
  pytest.importorskip("torch")
  path = str(tmp_path / "nope.pt")
  with pytest.raises(FileNotFoundError, match="nope.pt"):
    convert.load_official_checkpoint(path)


def test_convert_cli_writes_restorable_checkpoint(torch_state_dicts, tmp_path):
  torch, model, ema, _ = torch_state_dicts
  pt_path, out_dir = str(tmp_path / "small.pt"), str(tmp_path / "orbax")
  torch.save(ema, pt_path)
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = os.path.join(repo_root, "experiments", "convert_checkpoint.py")
  result = subprocess.run(
      [sys.executable, script, f"--input={pt_path}", f"--output={out_dir}", "--num_heads=4"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")])))
  assert result.returncode == 0, result.stderr[-2000:]
  params, config, metadata = checkpoint.restore_checkpoint(out_dir, model.config_dict())
  assert config == model.config_dict()
  assert metadata["source"] == "small.pt"
  back = convert.params_to_official(params)
  for key, value in ema.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
