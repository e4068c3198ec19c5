"""Datasets for dni_jax: MNIST, Fashion-MNIST and CIFAR-10 from official files or TFDS."""

from dni_jax.data.errors import DataError
from dni_jax.data.datasets import DATASETS
from dni_jax.data.datasets import Dataset
from dni_jax.data.datasets import FASHION_MNIST_DEBIAN_DIR
from dni_jax.data.datasets import load_dataset
