"""A small Fashion-MNIST CNN: the feature extractor and label oracle of our evaluation.

ImageNet metrics use Inception-v3; for the embedded Fashion-MNIST default we train our own
classifier (``experiments/train_classifier.py``) and ship its params under
``checkpoints/fmnist_classifier/``.  Its penultimate layer (``feature_dim`` ReLU units) plays
the role of Inception's pool features (Fréchet distance, precision/recall) and its softmax
the role of Inception's class posterior (Inception-Score analogue, class accuracy).

Checkpoint layout (one folder, ~1 MB):
  ``params.msgpack``    the params pytree, ``flax.serialization.to_bytes``;
  ``classifier.json``   the architecture (``model`` field: the module's constructor arguments)
                        and a summary of the training run that produced it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from dit_quant_jax.data import fashion_mnist

DEFAULT_CLASSIFIER_DIR = str(Path(__file__).resolve().parents[2] / "checkpoints" / "fmnist_classifier")
PARAMS_FILE = "params.msgpack"
METADATA_FILE = "classifier.json"
INPUT_SHAPE = (fashion_mnist.IMAGE_SIZE, fashion_mnist.IMAGE_SIZE, 1)  # NHWC without N
TRAIN_COMMAND = "nice -n 10 .venv/bin/python experiments/train_classifier.py --config=configs/fmnist_classifier.py"


class FashionMNISTClassifier(nn.Module):
  """Conv stages (3x3 conv, ReLU, 2x2 max-pool) -> dense feature layer (ReLU) -> logits.

  Input (N, 32, 32, 1) in [-1, 1]; returns ``(features (N, feature_dim), logits (N, num_classes))``.
  """

  stage_channels: Sequence[int] = (16, 32, 64)
  feature_dim: int = 128
  num_classes: int = fashion_mnist.NUM_CLASSES
  dropout_rate: float = 0.0  # applied to the features during training only

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    x = images
    for channels in self.stage_channels:
      x = nn.Conv(channels, kernel_size=(3, 3), padding="SAME")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
    hidden = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, name="logits")(hidden)
    return features, logits


def check_images(images, what: str = "images") -> np.ndarray:
  """Validate (N, 32, 32, 1) images; returns them as a float32 numpy array."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != INPUT_SHAPE:
    raise ValueError(f"{what}: expected shape (N, {', '.join(map(str, INPUT_SHAPE))}) in [-1, 1], "
                     f"got {images.shape}")
  return images.astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _inference(module: FashionMNISTClassifier, params, images: jax.Array):
  """Compiled once per architecture and batch shape (modules with equal fields hash equal)."""
  return module.apply({"params": params}, images, train=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
  """A module with its params, and batched numpy inference."""

  module: FashionMNISTClassifier
  params: Any
  metadata: dict = dataclasses.field(default_factory=dict)

  def features_and_logits(self, images, batch_size: int = 500):
    """images: (N, 32, 32, 1) in [-1, 1] -> (features (N, feature_dim), logits (N, classes)) float32.

    Every batch is padded to ``batch_size`` so that one compilation serves all of them.
    """
    images = check_images(images)
    num_images = images.shape[0]
    batch_size = max(1, min(batch_size, num_images))
    features, logits = [], []
    for start in range(0, num_images, batch_size):
      batch = images[start:start + batch_size]
      valid = batch.shape[0]
      if valid < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - valid,) + INPUT_SHAPE, np.float32)])
      batch_features, batch_logits = _inference(self.module, self.params, batch)
      features.append(np.asarray(batch_features)[:valid])
      logits.append(np.asarray(batch_logits)[:valid])
    if not features:
      return (np.zeros((0, self.module.feature_dim), np.float32),
              np.zeros((0, self.module.num_classes), np.float32))
    return np.concatenate(features), np.concatenate(logits)

  def features(self, images, batch_size: int = 500) -> np.ndarray:
    """(N, 32, 32, 1) -> penultimate features (N, feature_dim) float32."""
    return self.features_and_logits(images, batch_size)[0]

  def logits(self, images, batch_size: int = 500) -> np.ndarray:
    """(N, 32, 32, 1) -> logits (N, num_classes) float32."""
    return self.features_and_logits(images, batch_size)[1]

  def predict(self, images, batch_size: int = 500) -> np.ndarray:
    """(N, 32, 32, 1) -> predicted labels (N,) int32."""
    return np.argmax(self.logits(images, batch_size), axis=-1).astype(np.int32)

  def fingerprint(self) -> str:
    """A hex digest of the architecture and params (keys disk caches of derived features)."""
    digest = hashlib.sha256(repr(_module_kwargs(self.module)).encode())
    for leaf in jax.tree_util.tree_leaves(self.params):
      digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def _module_kwargs(module: FashionMNISTClassifier) -> dict:
  return {"stage_channels": [int(c) for c in module.stage_channels],
          "feature_dim": int(module.feature_dim),
          "num_classes": int(module.num_classes),
          "dropout_rate": float(module.dropout_rate)}


def save_classifier(directory: str, classifier: Classifier) -> None:
  """Write ``params.msgpack`` and ``classifier.json`` into ``directory`` (created if needed)."""
  os.makedirs(directory, exist_ok=True)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), classifier.params)
  with open(os.path.join(directory, PARAMS_FILE), "wb") as f:
    f.write(serialization.to_bytes(params))
  metadata = dict(classifier.metadata)
  metadata["model"] = _module_kwargs(classifier.module)
  with open(os.path.join(directory, METADATA_FILE), "w") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
    f.write("\n")


def load_classifier(path: Optional[str] = None) -> Classifier:
  """Load a classifier folder written by :func:`save_classifier` (default: the shipped one)."""
  directory = path or DEFAULT_CLASSIFIER_DIR
  params_path = os.path.join(directory, PARAMS_FILE)
  metadata_path = os.path.join(directory, METADATA_FILE)
  missing = [p for p in (params_path, metadata_path) if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST classifier checkpoint missing: {missing} not found. The repository ships "
        f"it under checkpoints/fmnist_classifier/; to recreate it run `{TRAIN_COMMAND}` from the "
        "repository root (a few CPU minutes).")
  with open(metadata_path) as f:
    metadata = json.load(f)
  if "model" not in metadata:
    raise ValueError(f"{metadata_path}: no 'model' field describing the architecture")
  model_kwargs = dict(metadata["model"])
  model_kwargs["stage_channels"] = tuple(model_kwargs["stage_channels"])
  module = FashionMNISTClassifier(**model_kwargs)
  # Shapes only (no compute): from_bytes fills this structure with the stored arrays.
  template = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1,) + INPUT_SHAPE, jnp.float32))["params"]
  with open(params_path, "rb") as f:
    params = serialization.from_bytes(template, f.read())
  params = jax.tree_util.tree_map(jnp.asarray, params)
  for (path_, expected), actual in zip(jax.tree_util.tree_leaves_with_path(template),
                                       jax.tree_util.tree_leaves(params)):
    if expected.shape != actual.shape:
      raise ValueError(f"{params_path}: param {jax.tree_util.keystr(path_)} has shape {actual.shape}, "
                       f"the architecture in {METADATA_FILE} needs {expected.shape}")
  return Classifier(module=module, params=params, metadata=metadata)


# ----------------------------------------------------------------------------- training


def augment(images: jax.Array, rng: jax.Array, max_shift: int, horizontal_flip: bool) -> jax.Array:
  """Random translation by up to ``max_shift`` pixels (background-padded) and left-right flip.

  images: (N, H, W, C) in [-1, 1]; the padding value is -1, the Fashion-MNIST background.
  """
  num_images, height, width, _ = images.shape
  shift_rng, flip_rng = jax.random.split(rng)
  if max_shift > 0:
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     constant_values=-1.0)
    offsets = jax.random.randint(shift_rng, (num_images, 2), 0, 2 * max_shift + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if horizontal_flip:
    flip = jax.random.bernoulli(flip_rng, 0.5, (num_images, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1, :], images)
  return images


def evaluate_accuracy(classifier: Classifier, images, labels, batch_size: int = 500) -> float:
  """Top-1 accuracy of ``classifier`` on (images (N, 32, 32, 1), labels (N,))."""
  predictions = classifier.predict(images, batch_size)
  return float(np.mean(predictions == np.asarray(labels)))


def train_classifier(config, log: Callable[[str], None] = print) -> tuple[Classifier, dict]:
  """Train on the Fashion-MNIST train split as ``config`` says (configs/fmnist_classifier.py).

  Returns the trained classifier and a summary (test accuracy, wall time, steps).
  """
  start_time = time.time()
  train_images, train_labels = fashion_mnist.load_split(
      "train", config.data_dir or None, config.train_limit or None)
  test_images, test_labels = fashion_mnist.load_split(
      "test", config.data_dir or None, config.test_limit or None)
  module = FashionMNISTClassifier(stage_channels=tuple(config.model.stage_channels),
                                  feature_dim=config.model.feature_dim,
                                  num_classes=fashion_mnist.NUM_CLASSES,
                                  dropout_rate=config.model.dropout_rate)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, rng = jax.random.split(rng)
  params = jax.jit(module.init)(init_rng, jnp.zeros((1,) + INPUT_SHAPE, jnp.float32))["params"]

  steps_per_epoch = train_images.shape[0] // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {config.batch_size} exceeds the {train_images.shape[0]} training images")
  total_steps = steps_per_epoch * config.num_epochs
  schedule = optax.cosine_decay_schedule(config.learning_rate, total_steps)
  optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
  opt_state = jax.jit(optimizer.init)(params)

  def loss_fn(params, images, labels, dropout_rng):
    _, logits = module.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(params, opt_state, images, labels, step_rng):
    augment_rng, dropout_rng = jax.random.split(step_rng)
    images = augment(images, augment_rng, config.augment.max_shift, config.augment.horizontal_flip)
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, dropout_rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  shuffle_rng = np.random.default_rng(config.seed)
  for epoch in range(config.num_epochs):
    order = shuffle_rng.permutation(train_images.shape[0])
    losses = []
    for step in range(steps_per_epoch):
      batch = order[step * config.batch_size:(step + 1) * config.batch_size]
      rng, step_rng = jax.random.split(rng)
      params, opt_state, loss = train_step(params, opt_state, train_images[batch], train_labels[batch],
                                           step_rng)
      losses.append(loss)
    classifier = Classifier(module=module, params=params)
    accuracy = evaluate_accuracy(classifier, test_images, test_labels, config.eval_batch_size)
    log(f"epoch {epoch + 1}/{config.num_epochs}: train loss {float(np.mean(losses)):.4f}, "
        f"test accuracy {accuracy:.4f}, {time.time() - start_time:.0f} s")

  summary = {
      "test_accuracy": accuracy,
      "test_images": int(test_images.shape[0]),
      "train_images": int(train_images.shape[0]),
      "steps": int(total_steps),
      "wall_time_s": round(time.time() - start_time, 1),
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
  }
  return Classifier(module=module, params=params, metadata={"training": summary}), summary
