"""The feed-forward settings (`FeedForwardConfig`, defaults: A.1 MNIST FCN),
validated in one place, the method and model names, and the learning-rate
schedule. Re-exported by `dni_jax.feedforward`."""

import dataclasses
import math

import optax

METHODS = ('bprop', 'no_bprop', 'dni', 'cdni', 'stale')
MODELS = ('fcn', 'cnn')
DECOUPLED_METHODS = ('dni', 'cdni')
# Methods with a learned gradient source on each interface: synthetic-gradient
# models, or the stale-gradient memory of Sec. 3.1.
GRADIENT_MODEL_METHODS = DECOUPLED_METHODS + ('stale',)


@dataclasses.dataclass(frozen=True)
class FeedForwardConfig:
  """Network, synthetic-gradient model and optimiser settings (defaults: A.1 MNIST FCN)."""
  input_shape: tuple[int, ...] = (28, 28, 1)
  num_classes: int = 10
  model: str = 'fcn'           # 'fcn' or 'cnn' (A.1).
  num_layers: int = 4          # Hidden layers + the classifier.
  hidden_size: int = 256       # Units (FCN) or filters (CNN) per hidden layer.
  method: str = 'dni'
  # Hidden layers of each synthetic-gradient model; None: the paper's choice
  # for the method (`resolved_sg_hidden_layers`, A.1).
  sg_hidden_layers: int | None = None
  sg_hidden_size: int = 1024   # Units (FCN) or filters (CNN) of SG hidden layers.
  learning_rate: float = 3e-5
  lr_boundaries: tuple[int, ...] = (300_000, 400_000)
  lr_decay: float = 0.1
  # Layers (1-based) followed by an interface (a DNI for dni/cdni, a zero
  # gradient for no_bprop); None: after every hidden layer. Elsewhere
  # gradients are backpropagated (Fig. 9). Bprop has no interfaces.
  dni_layers: tuple[int, ...] | None = None
  # Sparse updates (Fig. 5 left): after each forward pass every block does
  # its backward pass and update with this probability (masks drawn from
  # `seed` and the step).
  p_update: float = 1.0
  seed: int = 0
  # Complete unlock (Fig. 5 right, Fig. 6, A.1): every block above the first
  # reads a synthetic input I(data) instead of the output of the block below,
  # so no block waits for another's forward pass either.
  synthetic_inputs: bool = False
  # method='stale' (Sec. 3.1): the decay of the moving average of past
  # gradients, and the training batch size (it keeps one per batch slot).
  stale_decay: float = 0.9
  batch_size: int | None = None
  # Data parallelism inside `jax.pmap` / `jax.shard_map` (dni_jax.parallel):
  # the mapped batch axis over which BatchNorm statistics and every module's
  # gradients are averaged. None: one device, or jit with shardings.
  axis_name: str | None = None
  # Compute dtype of the hidden layers and the classifier (`layers`):
  # 'float32' or 'bfloat16'; parameters, synthetic-gradient models and the
  # activations between modules stay float32.
  dtype: str = 'float32'

  def __post_init__(self):
    def bad(msg):
      raise ValueError(f'FeedForwardConfig: {msg}')
    if self.dtype not in ('float32', 'bfloat16'):
      bad(f"dtype={self.dtype!r} is not one of ('float32', 'bfloat16')")
    if self.method not in METHODS:
      bad(f'method={self.method!r} is not one of {METHODS}')
    if self.model not in MODELS:
      bad(f'model={self.model!r} is not one of {MODELS}')
    if self.model == 'cnn' and len(self.input_shape) != 3:
      bad(f'model=cnn needs images [H, W, C]; input_shape={self.input_shape}')
    if self.num_layers < 2:
      bad(f'num_layers={self.num_layers} must be >= 2 (at least one hidden '
          'layer and the classifier, so there is an interface)')
    for name in ('hidden_size', 'sg_hidden_size', 'num_classes'):
      if getattr(self, name) < 1:
        bad(f'{name}={getattr(self, name)} must be >= 1')
    if self.num_classes < 2:
      bad(f'num_classes={self.num_classes} must be >= 2')
    if (self.sg_hidden_layers is not None
        and not 0 <= self.sg_hidden_layers <= 2):
      bad(f'sg_hidden_layers={self.sg_hidden_layers} must be 0, 1 or 2 (A.1)')
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      bad(f'learning_rate={self.learning_rate} must be a positive finite number')
    if not 0 < self.lr_decay <= 1:
      bad(f'lr_decay={self.lr_decay} must be in (0, 1]')
    if any(b <= 0 for b in self.lr_boundaries) or list(
        self.lr_boundaries) != sorted(set(self.lr_boundaries)):
      bad(f'lr_boundaries={self.lr_boundaries} must be positive and strictly '
          'increasing')
    if not self.input_shape or any(d < 1 for d in self.input_shape):
      bad(f'input_shape={self.input_shape} must be non-empty and positive')
    if not 0 < self.p_update <= 1:
      bad(f'p_update={self.p_update} must be in (0, 1]')
    if self.p_update < 1 and self.method == 'bprop':
      bad('p_update < 1 needs interfaces to decouple the layers; use dni, '
          'cdni or no_bprop')
    if self.synthetic_inputs and self.method not in DECOUPLED_METHODS:
      bad(f'synthetic_inputs needs method dni or cdni, not {self.method}')
    if not 0 <= self.stale_decay < 1:
      bad(f'stale_decay={self.stale_decay} must be in [0, 1)')
    if self.method == 'stale' and (self.batch_size is None
                                   or self.batch_size < 1):
      bad('method=stale keeps a gradient per batch slot and needs the '
          f'training batch_size (got {self.batch_size})')
    if self.synthetic_inputs and self.model != 'fcn':
      bad('synthetic_inputs is implemented for model=fcn only')
    if self.dni_layers is not None:
      if self.method == 'bprop':
        bad('dni_layers is set but method=bprop has no interfaces; use dni, '
            'cdni or no_bprop')
      if (list(self.dni_layers) != sorted(set(self.dni_layers))
          or any(not 1 <= k < self.num_layers for k in self.dni_layers)):
        bad(f'dni_layers={self.dni_layers} must be strictly increasing layer '
            f'numbers in 1..{self.num_layers - 1} (a DNI after layer k sits '
            'between layers k and k+1)')

  @property
  def interfaces(self) -> tuple[int, ...]:
    """Layers (1-based) whose output crosses an interface."""
    if self.method == 'bprop':
      return ()
    if self.dni_layers is None:
      return tuple(range(1, self.num_layers))
    return tuple(self.dni_layers)

  @property
  def blocks(self) -> tuple[tuple[int, ...], ...]:
    """Hidden-layer indices (0-based) of each independently updated block.

    The last block also holds the classifier (it may hold no hidden layer).
    Bprop: one block; every-layer DNI: one hidden layer per block.
    """
    cuts = (0,) + self.interfaces + (self.num_layers - 1,)
    return tuple(tuple(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:]))

  @property
  def resolved_sg_hidden_layers(self) -> int:
    """`sg_hidden_layers`, or A.1's choice: one hidden layer with synthetic
    inputs (complete unlock, both models); a linear model (0) for cDNI FCNs
    (MNIST FCN); two hidden layers otherwise (DNI FCNs, and the CNNs'
    convolutional models)."""
    if self.sg_hidden_layers is not None:
      return self.sg_hidden_layers
    if self.synthetic_inputs:
      return 1
    return 0 if (self.method == 'cdni' and self.model == 'fcn') else 2

  @property
  def uses_synthetic_gradients(self) -> bool:
    return self.method in GRADIENT_MODEL_METHODS



def learning_rate_schedule(config: FeedForwardConfig) -> optax.Schedule:
  """A.1: constant, multiplied by `lr_decay` at each boundary (paper: 300k, 400k)."""
  return optax.piecewise_constant_schedule(
      config.learning_rate, {b: config.lr_decay for b in config.lr_boundaries})
