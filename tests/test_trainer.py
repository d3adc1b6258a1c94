"""DiT training (dit_quant_jax/trainer.py, experiments/train.py): the optimizer recipe, the
loss falls, a resumed run equals an uninterrupted one, a sharded step equals a one-device
step, and the CLI exports a checkpoint that restores.

Two subprocesses start in the background when this module begins (they overlap with the
in-process work): experiments/train.py with the tiny config on a synthetic Fashion-MNIST
set written as IDX files (the "one go" run, NUM_STEPS steps), and
tests/multidevice_train_check.py on 4 forced host devices.
"""

import importlib.util
import json
import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax import trainer
from dit_quant_jax.data import fashion_mnist
from dit_quant_jax.diffusion import create_diffusion
from dit_quant_jax.utils import checkpoint as ckpt_lib
from fast_compile import xla_flags_with

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO_ROOT / "configs" / "fmnist_dit.py"
NUM_STEPS, HALF_STEPS = 40, 20  # tiny model: the loss falls from ~1.0 to ~0.8 in 40 steps
NUM_IMAGES = 96
SUBPROCESS_TIMEOUT_S = 900  # generous: the test machine is shared


def tiny_config(num_steps=NUM_STEPS):
  spec = importlib.util.spec_from_file_location("fmnist_dit_config", CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.num_steps = num_steps
  config.log_every = 1
  config.checkpoint_every = HALF_STEPS
  return config


# ------------------------------------------------------------------ synthetic data
def synthetic_fashion_mnist(num_images, seed):
  """(N, 28, 28) uint8 images of 10 class-specific stripe patterns plus noise; (N,) labels."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, num_images).astype(np.uint8)
  rows, cols = np.mgrid[0:28, 0:28] / 28.0
  templates = np.stack([np.sign(np.sin(2 * np.pi * (k % 5 + 1) * (cols if k < 5 else rows)))
                        for k in range(10)])
  images = np.clip(templates[labels] + 0.2 * rng.standard_normal((num_images, 28, 28)), -1, 1)
  return np.round((images + 1) * 127.5).astype(np.uint8), labels


def write_idx(path, array):
  """MNIST IDX: two zero bytes, type 0x08 (uint8), rank, big-endian dims, then the bytes."""
  with open(path, "wb") as f:
    f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape))
    f.write(np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fmnist_synthetic")
  images, labels = synthetic_fashion_mnist(NUM_IMAGES, seed=0)
  write_idx(directory / "train-images-idx3-ubyte", images)
  write_idx(directory / "train-labels-idx1-ubyte", labels)
  return directory


class Background:
  """A subprocess whose output goes to files; ``result()`` waits and returns (rc, out, err)."""

  def __init__(self, args, env, log_dir, name):
    self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=err)

  def result(self):
    self.process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    return self.process.returncode, self.out_path.read_text(), self.err_path.read_text()

  def stop(self):
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory, data_dir):
  """Starts the CLI run and the 4-device check at once; both run while other tests do."""
  work = tmp_path_factory.mktemp("cli_run")
  # The CLI run inherits this process's environment (platform, XLA flags): it is compared
  # with an in-process run, so both must compile the same program for the same devices.
  env = dict(os.environ)
  cli = Background(
      [sys.executable, "experiments/train.py", "--config=configs/fmnist_dit.py:tiny",
       f"--config.num_steps={NUM_STEPS}", "--config.log_every=1",
       f"--config.checkpoint_every={HALF_STEPS}", f"--config.data.data_dir={data_dir}",
       f"--workdir={work / 'workdir'}", f"--export={work / 'export'}"],
      env, work, "train_cli")
  multi_env = dict(env, XLA_FLAGS=xla_flags_with("--xla_force_host_platform_device_count=4"), JAX_PLATFORMS="cpu")
  multi = Background([sys.executable, "tests/multidevice_train_check.py"], multi_env, work,
                     "multidevice")
  runs = dict(cli=cli, multi=multi, workdir=work / "workdir", export=work / "export")
  yield runs
  cli.stop()
  multi.stop()


@pytest.fixture(scope="module")
def cli_run(background):
  rc, out, err = background["cli"].result()
  assert rc == 0, f"experiments/train.py failed (rc {rc}):\n{err[-4000:]}"
  curve_path = background["workdir"] / "training_curve.jsonl"
  curve = [json.loads(line) for line in curve_path.read_text().splitlines()]
  return dict(curve=curve, workdir=background["workdir"], export=background["export"], log=err)


@pytest.fixture(scope="module")
def resumed(data_dir, tmp_path_factory):
  """trainer.train to HALF_STEPS, then a new call that resumes to NUM_STEPS (in-process)."""
  images, labels = fashion_mnist.load_split("train", str(data_dir))
  workdir = str(tmp_path_factory.mktemp("resumed"))
  trainer.train(tiny_config(HALF_STEPS), workdir, images, labels)
  first_curve_len = len(open(os.path.join(workdir, "training_curve.jsonl")).readlines())
  state = trainer.train(tiny_config(NUM_STEPS), workdir, images, labels)
  curve = [json.loads(line) for line in open(os.path.join(workdir, "training_curve.jsonl"))]
  return dict(state=jax.device_get(state), curve=curve, first_curve_len=first_curve_len,
              images=images, labels=labels, workdir=workdir)


# ------------------------------------------------------------------ cheap unit tests
def test_batch_indices_are_a_function_of_seed_and_step():
  a = trainer.batch_indices(0, 7, 16, 50)
  np.testing.assert_array_equal(a, trainer.batch_indices(0, 7, 16, 50))
  assert a.shape == (16,) and a.min() >= 0 and a.max() < 50
  assert not np.array_equal(a, trainer.batch_indices(0, 8, 16, 50))
  assert not np.array_equal(a, trainer.batch_indices(1, 7, 16, 50))


def test_ema_decay_schedule():
  config = tiny_config()
  config.ema_decay = 0.9
  for step in (0, 5, 80, 200):
    expected = min(0.9, (1 + step) / (10 + step))  # ramp, capped at the configured decay
    assert float(trainer.ema_decay_at(jnp.int32(step), config)) == pytest.approx(expected, rel=1e-6)
  config.ema_warmup = False
  assert float(trainer.ema_decay_at(jnp.int32(3), config)) == pytest.approx(0.9)


def test_optimizer_is_clipped_adamw_with_warmup_and_frozen_pos_embed():
  """Three steps against a float64 reference: clip by global norm, Adam with bias correction,
  decoupled weight decay, learning rate ramping linearly from 0; pos_embed never moves."""
  config = tiny_config()
  opt_cfg = config.optimizer
  opt_cfg.warmup_steps, opt_cfg.weight_decay, opt_cfg.grad_clip_norm = 2, 0.05, 1.0
  rng = np.random.default_rng(3)
  params = {"pos_embed": rng.standard_normal((1, 4, 3)),
            "blocks_0": {"qkv": {"kernel": rng.standard_normal((3, 9)), "bias": rng.standard_normal(9)}}}
  grads = [jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape) * 0.6, params) for _ in range(3)]
  optimizer = trainer.make_optimizer(config)
  to32 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), tree)  # noqa: E731
  p32, state = to32(params), jax.jit(optimizer.init)(to32(params))
  update = jax.jit(optimizer.update)
  ref = {k: np.asarray(v, np.float64) for k, v in
         [("kernel", params["blocks_0"]["qkv"]["kernel"]), ("bias", params["blocks_0"]["qkv"]["bias"])]}
  moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in ref.items()}
  eps = 1e-8  # optax.adamw default
  for step, g in enumerate(grads):
    updates, state = update(to32(g), state, p32)
    p32 = jax.tree_util.tree_map(lambda p, u: p + u, p32, updates)
    global_norm = np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree_util.tree_leaves(g)))
    clip = min(1.0, opt_cfg.grad_clip_norm / global_norm)
    lr = opt_cfg.learning_rate * min(step / opt_cfg.warmup_steps, 1.0)
    for name in ref:
      gk = g["blocks_0"]["qkv"][name] * clip
      m, v = moments[name]
      m, v = opt_cfg.beta1 * m + (1 - opt_cfg.beta1) * gk, opt_cfg.beta2 * v + (1 - opt_cfg.beta2) * gk**2
      moments[name] = (m, v)
      m_hat, v_hat = m / (1 - opt_cfg.beta1 ** (step + 1)), v / (1 - opt_cfg.beta2 ** (step + 1))
      ref[name] = ref[name] - lr * (m_hat / (np.sqrt(v_hat) + eps) + opt_cfg.weight_decay * ref[name])
    for name in ref:
      np.testing.assert_allclose(np.asarray(p32["blocks_0"]["qkv"][name], np.float64), ref[name],
                                 rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(p32["pos_embed"]), params["pos_embed"].astype(np.float32))
  assert not np.allclose(np.asarray(p32["blocks_0"]["qkv"]["bias"]), params["blocks_0"]["qkv"]["bias"])


def test_synthetic_idx_files_load(data_dir):
  images, labels = fashion_mnist.load_split("train", str(data_dir))
  assert images.shape == (NUM_IMAGES, 32, 32, 1) and labels.shape == (NUM_IMAGES,)
  assert images.min() == -1.0 and images.max() == 1.0 and len(np.unique(labels)) == 10


# ------------------------------------------------------------------ training runs
def test_training_loss_falls(cli_run, resumed):
  """Training curve (per step, fixed seeds) and a fixed evaluation batch both improve."""
  losses = [row["loss"] for row in cli_run["curve"]]
  assert [row["step"] for row in cli_run["curve"]] == list(range(1, NUM_STEPS + 1))
  assert all(np.isfinite(losses))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < 0.9 * first, (first, last)

  # Same timesteps and noise for the initial and trained params (no sampling noise).
  config = tiny_config()
  model = trainer.build_model(config)
  diffusion = create_diffusion("", learn_sigma=True)
  images = jnp.asarray(resumed["images"][:32])
  labels = jnp.asarray(resumed["labels"][:32])
  t = jnp.asarray(np.linspace(0, 999, 32).astype(np.int32))
  noise = jnp.asarray(np.random.default_rng(9).standard_normal(images.shape), jnp.float32)

  @jax.jit
  def eval_loss(params):
    model_fn = lambda x, tm: model.apply({"params": params}, x, tm, labels)  # noqa: E731
    return jnp.mean(diffusion.training_losses(model_fn, images, t, noise)["loss"])

  initial = trainer.init_state(config, model, jax.random.PRNGKey(config.seed)).params
  before, after = float(eval_loss(initial)), float(eval_loss(resumed["state"].params))
  assert after < 0.9 * before, (before, after)


def test_resumed_run_equals_uninterrupted_run(cli_run, resumed):
  """HALF_STEPS, then a fresh call resuming to NUM_STEPS == NUM_STEPS in one go (the CLI)."""
  # The second call resumed: it logged only steps HALF_STEPS+1..NUM_STEPS.
  assert resumed["first_curve_len"] == HALF_STEPS
  assert [row["step"] for row in resumed["curve"]] == list(range(1, NUM_STEPS + 1))
  state = resumed["state"]
  assert int(state.step) == NUM_STEPS
  one_go = ckpt_lib.restore_state(str(cli_run["workdir"] / "state"), state, step=NUM_STEPS)
  leaves_resumed, tree_resumed = jax.tree_util.tree_flatten(state)
  leaves_one_go, tree_one_go = jax.tree_util.tree_flatten(jax.device_get(one_go))
  assert tree_resumed == tree_one_go
  losses_resumed = [row["loss"] for row in resumed["curve"]]
  losses_one_go = [row["loss"] for row in cli_run["curve"]]
  if jax.default_backend() == "cpu":  # XLA:CPU is deterministic: bit-identical runs
    assert losses_resumed == losses_one_go
    for a, b in zip(leaves_resumed, leaves_one_go):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  else:  # GPU scatter-adds (embedding gradients) may reorder sums between runs
    np.testing.assert_allclose(losses_resumed, losses_one_go, rtol=1e-4)
    for a, b in zip(leaves_resumed, leaves_one_go):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
  # Both runs kept their last two snapshots.
  assert sorted(os.listdir(cli_run["workdir"] / "state")) == [str(HALF_STEPS), str(NUM_STEPS)]


def test_cli_export_restores(cli_run, resumed):
  config = tiny_config()
  model = trainer.build_model(config)
  params, model_config, metadata = ckpt_lib.restore_checkpoint(
      str(cli_run["export"]), expected_config=model.config_dict())
  assert model_config == model.config_dict()
  assert metadata["step"] == NUM_STEPS
  assert metadata["training_config"]["num_steps"] == NUM_STEPS
  assert metadata["training_config"]["model"]["overrides"]["patch_size"] == 8
  # The export is the EMA of the CLI run's final state.
  state = resumed["state"]
  final = jax.device_get(ckpt_lib.restore_state(str(cli_run["workdir"] / "state"), state,
                                                step=NUM_STEPS))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(final.ema_params)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(final.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The EMA is not the raw params (it lags them) and both moved away from the init.
  initial = trainer.init_state(config, model, jax.random.PRNGKey(config.seed)).params
  kernel = lambda tree: np.asarray(tree["final_layer"]["linear"]["kernel"])  # noqa: E731
  assert np.abs(kernel(params)).max() > 0  # adaLN-Zero init: zero before training
  assert np.abs(kernel(params) - kernel(final.params)).max() > 0
  assert np.abs(kernel(initial)).max() == 0
  assert "resumed" not in cli_run["log"]  # a fresh workdir: trained from step 0


def test_sharded_step_equals_single_device_step(background):
  rc, out, err = background["multi"].result()
  assert rc == 0, f"multidevice_train_check.py failed (rc {rc}):\n{err[-4000:]}"
  result = json.loads(out.strip().splitlines()[-1])
  assert result["device_count"] == 4 and result["mesh_sizes"] == [4, 1]
  batch = tiny_config().batch_size
  assert result["shard_shapes"][0] == [[batch // 4, 32, 32, 1]] * 4  # the batch really split
  assert result["shard_shapes"][1] == [[batch, 32, 32, 1]]
  assert result["param_devices"] == [4, 1]  # params replicated on all 4
  assert result["steps"] == [3, 3]
  assert result["max_param_change"] > 1e-4  # the steps moved the params: the check can fail
  assert result["max_param_diff"] < 1e-5
  assert result["max_ema_diff"] < 1e-5
  assert result["max_opt_state_diff"] < 1e-5
  assert result["rng_equal"]
  np.testing.assert_allclose(result["loss"][0], result["loss"][1], rtol=1e-5)
  assert "not divisible by the 4 devices" in result["indivisible_batch_error"]
