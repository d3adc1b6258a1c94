"""Fashion-MNIST evaluation classifier (dit_quant_jax/eval/classifier.py).

Train: nice -n 10 .venv/bin/python experiments/train_classifier.py --config=configs/fmnist_classifier.py
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data_dir = ""  # "" = $FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist
  config.train_limit = 0  # 0 = all 60000 training images; a small number for smoke runs
  config.test_limit = 0  # 0 = all 10000 test images (the reported accuracy uses all of them)
  config.output_dir = "checkpoints/fmnist_classifier"  # relative to the working directory

  config.model = ml_collections.ConfigDict()
  config.model.stage_channels = (16, 32, 64)  # one 3x3 conv + 2x2 max-pool per stage: 32 -> 16 -> 8 -> 4
  config.model.feature_dim = 128  # penultimate layer: the features of Fréchet distance, precision/recall
  config.model.dropout_rate = 0.2  # on the features, training only

  config.augment = ml_collections.ConfigDict()
  config.augment.max_shift = 2  # random translation in pixels (background-padded)
  config.augment.horizontal_flip = True  # garments, shoes and bags stay in their class when mirrored

  config.batch_size = 128
  config.num_epochs = 8
  config.learning_rate = 2e-3  # adamw peak, cosine decay to 0 over the run
  config.weight_decay = 1e-4
  config.eval_batch_size = 1000
  return config
