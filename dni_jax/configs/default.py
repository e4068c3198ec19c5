"""train_ff.py's defaults (A.1's MNIST FCN, DNI), the config when --config
is not given."""

from dni_jax import ff_experiment


def get_config():
  return ff_experiment.base_config()
