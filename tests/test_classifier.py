"""The shipped Fashion-MNIST classifier and the evaluation glue (dit_quant_jax/eval/classifier.py,
dit_quant_jax/eval/evaluate.py)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dit_quant_jax.data import fashion_mnist
from dit_quant_jax.eval import classifier as classifier_lib
from dit_quant_jax.eval import evaluate, metrics

pytestmark = pytest.mark.skipif(not os.path.isdir(fashion_mnist.data_dir()),
                                reason="Fashion-MNIST not installed (make dataset)")

NUM_TEST = 1000
MIN_TEST_ACCURACY = 0.90  # the task's bar for the shipped classifier


@pytest.fixture(scope="module")
def shipped():
  return classifier_lib.load_classifier()


@pytest.fixture(scope="module")
def test_subset():
  return fashion_mnist.load_split("test", limit=NUM_TEST)


@pytest.fixture(scope="module")
def real_cache():
  return evaluate.RealFeatureCache(limit=NUM_TEST)


def test_shipped_checkpoint_is_small_and_described():
  directory = classifier_lib.DEFAULT_CLASSIFIER_DIR
  assert os.path.getsize(os.path.join(directory, classifier_lib.PARAMS_FILE)) < 2 * 2**20
  with open(os.path.join(directory, classifier_lib.METADATA_FILE)) as f:
    metadata = json.load(f)
  assert metadata["training"]["test_accuracy"] >= MIN_TEST_ACCURACY
  assert metadata["training"]["test_images"] == 10000


def test_shipped_classifier_accuracy(shipped, test_subset):
  images, labels = test_subset
  accuracy = classifier_lib.evaluate_accuracy(shipped, images, labels)
  assert accuracy >= MIN_TEST_ACCURACY


def test_features_are_the_penultimate_layer(shipped, test_subset):
  images = test_subset[0][:37]
  features, logits = shipped.features_and_logits(images, batch_size=16)  # padded last batch
  assert features.shape == (37, shipped.module.feature_dim) and logits.shape == (37, 10)
  assert np.all(features >= 0)  # ReLU features
  dense = shipped.params["logits"]
  expected_logits = (features.astype(np.float64) @ np.asarray(dense["kernel"], np.float64)
                     + np.asarray(dense["bias"], np.float64))
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
  whole_features, whole_logits = shipped.features_and_logits(images, batch_size=500)
  np.testing.assert_allclose(whole_features, features, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(whole_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(shipped.predict(images), np.argmax(logits, axis=1))
  with pytest.raises(ValueError, match=r"expected shape \(N, 32, 32, 1\)"):
    shipped.features(images[..., 0])


def test_save_load_round_trip_and_errors(tmp_path):
  module = classifier_lib.FashionMNISTClassifier(stage_channels=(4, 8), feature_dim=16)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 1)))["params"]
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  saved = classifier_lib.Classifier(module, params, {"note": "tiny"})
  classifier_lib.save_classifier(str(tmp_path / "tiny"), saved)
  loaded = classifier_lib.load_classifier(str(tmp_path / "tiny"))
  assert loaded.module == module and loaded.metadata["note"] == "tiny"
  for expected, got in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  assert loaded.fingerprint() == saved.fingerprint()

  with pytest.raises(FileNotFoundError, match="train_classifier.py"):
    classifier_lib.load_classifier(str(tmp_path / "nowhere"))
  # Metadata that disagrees with the stored params.
  metadata_path = tmp_path / "tiny" / classifier_lib.METADATA_FILE
  metadata = json.loads(metadata_path.read_text())
  metadata["model"]["feature_dim"] = 24
  metadata_path.write_text(json.dumps(metadata))
  with pytest.raises(ValueError, match="shape"):
    classifier_lib.load_classifier(str(tmp_path / "tiny"))


def test_augment_shifts_and_flips_within_bounds():
  rng = np.random.default_rng(5)
  images = rng.uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32)
  max_shift = 2
  augment = jax.jit(classifier_lib.augment, static_argnums=(2, 3))
  augmented = np.asarray(augment(jnp.asarray(images), jax.random.PRNGKey(6), max_shift, True))
  padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
  for image, padded_image in zip(augmented, padded):
    candidates = [crop[:, ::-1] if flip else crop
                  for dy in range(2 * max_shift + 1) for dx in range(2 * max_shift + 1)
                  for crop in [padded_image[dy:dy + 8, dx:dx + 8]] for flip in (False, True)]
    assert any(np.array_equal(image, candidate) for candidate in candidates)
  identity = augment(jnp.asarray(images), jax.random.PRNGKey(7), 0, False)
  np.testing.assert_array_equal(np.asarray(identity), images)


def test_train_classifier_smoke():
  config = ml_collections.ConfigDict({
      "seed": 1, "data_dir": "", "train_limit": 512, "test_limit": 256, "output_dir": "",
      "model": {"stage_channels": (8, 16), "feature_dim": 32, "dropout_rate": 0.0},
      "augment": {"max_shift": 1, "horizontal_flip": False},
      "batch_size": 64, "num_epochs": 3, "learning_rate": 3e-3, "weight_decay": 0.0,
      "eval_batch_size": 256})
  trained, summary = classifier_lib.train_classifier(config, log=lambda message: None)
  assert summary["steps"] == 3 * 512 // 64 and summary["test_images"] == 256
  assert summary["test_accuracy"] > 0.4  # chance is 0.1
  assert trained.module.feature_dim == 32


def test_evaluate_samples_real_versus_noise(shipped, real_cache, tmp_path):
  train_images, train_labels = fashion_mnist.load_split("train", limit=600)
  real_scores = evaluate.evaluate_samples(train_images, train_labels, shipped, real_cache)
  assert set(real_scores) == {"fd", "is", "class_acc", "precision", "recall", "num_samples"}
  assert real_scores["class_acc"] >= 0.85
  assert real_scores["precision"] > 0.6 and real_scores["recall"] > 0.6
  assert real_scores["is"] > 5.0

  noise = np.random.default_rng(8).uniform(-1, 1, train_images.shape).astype(np.float32)
  noise_scores = evaluate.evaluate_samples(noise, train_labels, shipped, real_cache)
  assert noise_scores["fd"] > 10 * real_scores["fd"]
  assert noise_scores["class_acc"] < 0.3 and noise_scores["is"] < 1.5
  # The classifier maps all noise to one tight feature cluster (mostly "Bag"): no real image is
  # near the fake manifold (recall ~0), while some noise lands in the large k-NN balls of real
  # outliers, so precision drops well below the real samples' but not to 0.
  assert noise_scores["recall"] < 0.05
  assert noise_scores["precision"] < real_scores["precision"] - 0.2

  # The glue agrees with the metrics applied by hand.
  real = real_cache.get(shipped)
  features, logits = shipped.features_and_logits(train_images)
  assert real_scores["fd"] == pytest.approx(metrics.frechet_distance(features, real.features), rel=1e-9)
  assert real_scores["is"] == pytest.approx(metrics.inception_score(metrics.softmax(logits)), rel=1e-9)
  assert real_scores["precision"] == metrics.precision_recall(real.features, features)["precision"]

  # Disk cache: a new cache on the same folder reads the stored features and radii back.
  disk_cache = evaluate.RealFeatureCache(cache_dir=str(tmp_path), limit=NUM_TEST)
  disk_cache._entries[shipped.fingerprint()] = real  # reuse the computed entry
  path = disk_cache.save(shipped)
  reread = evaluate.RealFeatureCache(cache_dir=str(tmp_path), limit=NUM_TEST).get(shipped)
  np.testing.assert_array_equal(reread.features, real.features)
  np.testing.assert_array_equal(reread.knn_radii(3), real.knn_radii(3))
  assert os.path.basename(path).startswith("real_test_1000_")

  with pytest.raises(ValueError, match="more than k"):
    evaluate.evaluate_samples(train_images[:3], train_labels[:3], shipped, real_cache)
