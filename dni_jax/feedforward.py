"""Decoupled feed-forward networks: one protocol for Bprop, No-Bprop, DNI, cDNI.

Sec. 2.1, 3.1 and A.1 of Jaderberg et al. Every method updates each block of
modules between interfaces with `sources.chain_update` from the gradient its
interface's source gives (`dni_jax.sources`: zero, a synthetic-gradient model,
the stale memory); the methods differ only in where the interfaces are and
which source they use. `make_feedforward` returns the per-block updates, each
jitted on its own, and the fused whole-network `train_step`, both composed by
the same `schedule`. Design notes: docs/architecture/feedforward.md.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dni_jax import interface
from dni_jax import layers
from dni_jax import sources
from dni_jax import synthetic

Array = jax.Array
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


ModuleState = sources.ModuleState


class FeedForwardState(NamedTuple):
  """State of an N-layer decoupled network."""
  layers: tuple[ModuleState, ...]     # Hidden layers 1..N-1.
  head: ModuleState                   # Layer N, the classifier.
  synthetic: tuple[Any, ...]          # One gradient-source state per
                                      # interface, bottom up: synthetic[j]
                                      # gives the gradient of the output of
                                      # layer interfaces[j] (a ModuleState;
                                      # StaleGradientState for 'stale'; ()
                                      # without learned sources).
  step: Array                         # int32 scalar, training steps taken.
  inputs: tuple[ModuleState, ...] = ()  # Complete unlock: one synthetic-input
                                        # model per interface; inputs[j] feeds
                                        # the block above interface j.


class Modules(NamedTuple):
  """The (stateless) module definitions and optimiser of a configuration."""
  hidden: tuple[Any, ...]     # One Flax definition per hidden layer.
  head: layers.Classifier
  synthetic: Any              # The synthetic-gradient model definition
                              # (None for 'stale').
  tx: optax.GradientTransformation
  conditioned: bool   # cDNI: synthetic gradients see the one-hot label.
  num_classes: int
  blocks: tuple[tuple[int, ...], ...]   # FeedForwardConfig.blocks
  interfaces: tuple[int, ...]           # FeedForwardConfig.interfaces
  use_synthetic: bool                   # dni/cdni/stale; False: zero gradients.
  p_update: float                       # FeedForwardConfig.p_update
  synthetic_input: Any                  # Input model definition, or None.
  seed: int                             # Seed of the sparse-update masks.
  source: sources.GradientSource        # Every interface's gradient source.


def learning_rate_schedule(config: FeedForwardConfig) -> optax.Schedule:
  """A.1: constant, multiplied by `lr_decay` at each boundary (paper: 300k, 400k)."""
  return optax.piecewise_constant_schedule(
      config.learning_rate, {b: config.lr_decay for b in config.lr_boundaries})


def mean_gradients_over(tx: optax.GradientTransformation,
                        axis_name: str | None) -> optax.GradientTransformation:
  """`tx` applied to the gradients averaged over the mapped axis `axis_name`
  (data parallelism under pmap / shard_map; the state is `tx`'s own). None:
  `tx` itself."""
  if axis_name is None:
    return tx
  def update(grads, state, params=None):
    return tx.update(jax.lax.pmean(grads, axis_name), state, params)
  return optax.GradientTransformation(tx.init, update)


def build_modules(config: FeedForwardConfig) -> Modules:
  num_hidden = config.num_layers - 1
  if config.model == 'fcn':
    hidden = (layers.HiddenDense(config.hidden_size, config.axis_name,
                                 config.dtype),) * num_hidden
    sg_model = synthetic.SyntheticGradientMLP(
        config.resolved_sg_hidden_layers, config.sg_hidden_size,
        config.hidden_size, config.axis_name)
  else:
    hidden = tuple(layers.HiddenConv(config.hidden_size,
                                     'max' if i == 0 else 'avg',
                                     config.axis_name, config.dtype)
                   for i in range(num_hidden))
    sg_model = synthetic.SyntheticGradientCNN(
        config.resolved_sg_hidden_layers, config.sg_hidden_size,
        config.hidden_size, config.axis_name)
  tx = mean_gradients_over(optax.adam(learning_rate_schedule(config)),
                           config.axis_name)
  if config.method == 'stale':
    sg_model = None
    source = sources.stale(config.stale_decay, config.batch_size)
  elif config.uses_synthetic_gradients:
    source = sources.synthetic_model(sg_model, tx)
  else:
    source = sources.zero()
  return Modules(
      hidden=hidden,
      head=layers.Classifier(config.num_classes, config.dtype),
      synthetic=sg_model,
      tx=tx,
      conditioned=config.method == 'cdni',
      num_classes=config.num_classes,
      blocks=config.blocks,
      interfaces=config.interfaces,
      use_synthetic=config.uses_synthetic_gradients,
      p_update=config.p_update,
      synthetic_input=(synthetic.SyntheticInputMLP(config.sg_hidden_size,
                                                   config.hidden_size,
                                                   config.axis_name)
                       if config.synthetic_inputs else None),
      seed=config.seed,
      source=source)


# ---------------------------------------------------------------------------
# Pure per-module functions: the core lives in `dni_jax.sources`; these names
# stay importable from here.
# ---------------------------------------------------------------------------

_apply = sources.apply_module
module_vjp = sources.module_vjp
apply_gradients = sources.apply_gradients
chain_vjp = sources.chain_vjp
chain_pull_back = sources.chain_pull_back
chain_update = sources.chain_update
GradientSource = Callable[[Array], Array]   # What `chain_update` calls.


def layer_update(model, tx, state: ModuleState, x: Array,
                 gradient_source: GradientSource):
  """`chain_update` of a single module: (new_state, h, grad_x, grad_h)."""
  (new_state,), (h,), grad_x, grad_h = chain_update(
      (model,), tx, (state,), x, gradient_source)
  return new_state, h, grad_x, grad_h


def synthetic_gradient(modules: Modules, sg_state: Any, h: Array,
                       context: Array | None) -> Array:
  """The gradient the configuration's source gives for h: delta_hat = M(h, c)
  in training mode, or the stale baseline's remembered gradient; zero when
  `sg_state` is None (No-Bprop)."""
  source = _ZERO if sg_state is None else modules.source
  return source.gradient(sg_state, h, context)


def synthetic_update(modules: Modules, sg_state: Any, h: Array,
                     context: Array | None, target: Array):
  """The source learns from its target: M(h, c) regresses onto it with the L2
  loss, weight 1 (A.1); the stale baseline folds it into its moving average.
  Returns (new_sg_state, sg_loss), the L2 error of the gradient given at h.
  The target is a constant; nothing flows into h."""
  sg_state, metrics = modules.source.update(sg_state, h, context, target)
  return sg_state, metrics['sg_loss']


def synthetic_input(modules: Modules, si_state: ModuleState,
                    images: Array) -> Array:
  """h_hat = I(data): a block's synthetic input (complete unlock, Fig. 6)."""
  out, _ = _apply(modules.synthetic_input, si_state.params,
                  si_state.batch_stats, images, train=True)
  return out


def synthetic_input_update(modules: Modules, si_state: ModuleState,
                           images: Array, target: Array):
  """Regresses I(data) to the real input (the output the block below
  produced), L2 loss. Returns (new_si_state, si_loss)."""
  return sources.regress(modules.synthetic_input, modules.tx, si_state,
                         (images,), target)


_ZERO = sources.zero()


def _source_state(modules: Modules, state: FeedForwardState, j: int):
  """Interface j's source state; None where the source is zero (No-Bprop)."""
  return state.synthetic[j] if modules.use_synthetic else None


def context_for(modules: Modules, labels: Array) -> Array | None:
  """cDNI's context, the one-hot label (A.1); None for unconditioned DNI."""
  if not modules.conditioned:
    return None
  return jax.nn.one_hot(labels, modules.num_classes, dtype=jnp.float32)


def block_update(modules: Modules, layer_ids: tuple[int, ...],
                 layer_states: tuple[ModuleState, ...],
                 sg_state: Any, x: Array, context: Array | None):
  """Decoupled update of a block of hidden layers ending at an interface: no
  waiting for anything above it. `layer_ids` (static, 0-based) say which
  hidden layers `layer_states` are. The gradient is the configuration's
  source's on that interface (state `sg_state`), or zero when `sg_state` is
  None (No-Bprop). Returns (new_layer_states, outputs, grad_x, grad_h)."""
  return chain_update(
      tuple(modules.hidden[i] for i in layer_ids), modules.tx, layer_states, x,
      lambda h: synthetic_gradient(modules, sg_state, h, context))


def block_and_source_update(modules: Modules, layer_ids: tuple[int, ...],
                            layer_states: tuple[ModuleState, ...],
                            sg_state: Any, x: Array, context: Array | None):
  """`block_update` from a learned source (`sg_state` not None), which also
  returns the source's pending update from the same forward pass of M:
  (new_layer_states, outputs, grad_x, grad_h, source_update_fn), for
  `finish_source_update` when the target arrives (M(h) computed once)."""
  pending = []
  def gradient_for(h):
    delta, update_fn = modules.source.gradient_and_update(sg_state, h, context)
    pending.append(update_fn)
    return delta
  new_states, outputs, grad_x, grad_h = chain_update(
      tuple(modules.hidden[i] for i in layer_ids), modules.tx, layer_states, x,
      gradient_for)
  return new_states, outputs, grad_x, grad_h, pending[0]


def finish_source_update(source_update_fn, target: Array):
  """The pending update of `block_and_source_update` from its target:
  (new_sg_state, sg_loss), as `synthetic_update` at the same h."""
  sg_state, metrics = source_update_fn(target)
  return sg_state, metrics['sg_loss']


def top_block_update(modules: Modules, layer_ids: tuple[int, ...],
                     layer_states: tuple[ModuleState, ...],
                     head_state: ModuleState, x: Array, labels: Array):
  """Update of the top block (hidden layers above the last interface, then the
  classifier) from the true loss gradient.

  Returns (new_layer_states, new_head_state, outputs, grad_x, loss, logits);
  `outputs` are the hidden layers' outputs and `grad_x` the true per-example
  gradient of the block's input, the target for the top synthetic-gradient
  model.
  """
  loss_box = []
  def loss_gradient(logits):
    loss, grad = interface.softmax_cross_entropy_grad(logits, labels)
    loss_box.append(loss)
    return grad
  models = tuple(modules.hidden[i] for i in layer_ids) + (modules.head,)
  new_states, outputs, grad_x, _ = chain_update(
      models, modules.tx, layer_states + (head_state,), x, loss_gradient)
  return (new_states[:-1], new_states[-1], outputs[:-1], grad_x, loss_box[0],
          outputs[-1])


def hidden_update(modules: Modules, layer: int, layer_state: ModuleState,
                  sg_state: ModuleState | None, x: Array,
                  context: Array | None):
  """`block_update` of hidden layer `layer` (static, 0-based) alone:
  (new_state, h, grad_x, grad_h)."""
  (new_state,), (h,), grad_x, grad_h = block_update(
      modules, (layer,), (layer_state,), sg_state, x, context)
  return new_state, h, grad_x, grad_h


def head_update(modules: Modules, head_state: ModuleState, x: Array,
                labels: Array):
  """`top_block_update` of the classifier alone:
  (new_head_state, grad_x, loss, logits)."""
  _, head, _, grad_x, loss, logits = top_block_update(modules, (), (),
                                                      head_state, x, labels)
  return head, grad_x, loss, logits


def backprop_update(modules: Modules, layer: int, layer_state: ModuleState,
                    x: Array, grad_h: Array):
  """Update of one hidden layer from a given per-example gradient of its output
  (an externally supplied or oracle gradient).
  Returns (new_layer_state, h, grad_x, grad_h)."""
  return layer_update(modules.hidden[layer], modules.tx, layer_state, x,
                      lambda h: grad_h)


def hidden_forward(modules: Modules, layer: int, layer_state: ModuleState,
                   x: Array, train: bool = True) -> Array:
  """Forward of hidden layer `layer` (0-based) without updating anything."""
  h, _ = _apply(modules.hidden[layer], layer_state.params,
                layer_state.batch_stats, x, train=train)
  return h


def _all_finite(tree) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(l))
                            for l in jax.tree.leaves(tree)]))


def _vector(xs, dtype):
  return jnp.stack(xs) if xs else jnp.zeros((0,), dtype)


class BlockFunctions(NamedTuple):
  """The per-module functions a schedule calls (jitted or not)."""
  block_update: Callable
  top_block_update: Callable
  synthetic_update: Callable
  context: Callable
  synthetic_input: Callable
  synthetic_input_update: Callable
  block_and_source_update: Callable
  finish_source_update: Callable


def _bind_block_functions(modules: Modules) -> BlockFunctions:
  bind = lambda f: functools.partial(f, modules)
  return BlockFunctions(bind(block_update), bind(top_block_update),
                        bind(synthetic_update), bind(context_for),
                        bind(synthetic_input), bind(synthetic_input_update),
                        bind(block_and_source_update), finish_source_update)


def schedule(fns: BlockFunctions, modules: Modules, state: FeedForwardState,
             images: Array, labels: Array):
  """One training step of every method (Fig. 2).

  Each block updates as soon as the interface above it answers; the top block
  from the loss; then each synthetic-gradient model regresses to the input
  gradient that the block above it returned (bootstrapped, or true at the
  top). No block's update depends on a later block's, so the order of the
  calls is free. With synthetic inputs (complete unlock) every block above
  the first reads I_j(data) instead of the output below, and each input model
  regresses onto that output. Returns (new_state, metrics); metrics hold
  `loss`, `accuracy`, `sg_loss` and `si_loss` per interface, which blocks
  updated, and per-module finiteness flags.
  """
  unlocked = modules.synthetic_input is not None
  x = images
  context = fns.context(labels)
  new_layers = list(state.layers)
  activations, block_inputs, block_outputs, targets, grads_h = [], [], [], [], []
  # Without synthetic inputs, interface j's source learns at the h it gave a
  # gradient for: its update reuses that forward pass (M(h) once).
  source_updates = []
  for j, block in enumerate(modules.blocks[:-1]):
    if unlocked and j > 0:
      x = fns.synthetic_input(state.inputs[j - 1], images)
    block_inputs.append(x)
    sg_state = _source_state(modules, state, j)
    layer_states = tuple(state.layers[i] for i in block)
    if sg_state is None or unlocked:
      new, outputs, grad_x, grad_h = fns.block_update(
          block, layer_states, sg_state, x, context)
    else:
      new, outputs, grad_x, grad_h, update_fn = fns.block_and_source_update(
          block, layer_states, sg_state, x, context)
      source_updates.append(update_fn)
    for i, layer_state in zip(block, new):
      new_layers[i] = layer_state
    activations += outputs
    x = outputs[-1]
    block_outputs.append(x)
    grads_h.append(grad_h)
    if j > 0:
      targets.append(grad_x)  # Bootstrapped target for interface j - 1.
  top = modules.blocks[-1]
  if unlocked and len(modules.blocks) > 1:
    x = fns.synthetic_input(state.inputs[-1], images)
  block_inputs.append(x)
  new_top, head, outputs, grad_x, loss, logits = fns.top_block_update(
      top, tuple(state.layers[i] for i in top), state.head, x, labels)
  for i, layer_state in zip(top, new_top):
    new_layers[i] = layer_state
  activations += outputs
  targets.append(grad_x)      # True gradient: target for the top interface.

  # Interface j's synthetic-gradient model is trained where block j + 1 took
  # its input (the real output of block j, or its synthetic input).
  new_synthetic, sg_losses = [], []
  if modules.use_synthetic:
    for j, (sg_state, h, target) in enumerate(zip(
        state.synthetic, block_inputs[1:], targets)):
      if source_updates:
        sg_state, sg_loss = fns.finish_source_update(source_updates[j], target)
      else:
        sg_state, sg_loss = fns.synthetic_update(sg_state, h, context, target)
      new_synthetic.append(sg_state)
      sg_losses.append(sg_loss)
  new_inputs, si_losses = [], []
  if unlocked:
    for si_state, real_input in zip(state.inputs, block_outputs):
      si_state, si_loss = fns.synthetic_input_update(si_state, images,
                                                     real_input)
      new_inputs.append(si_state)
      si_losses.append(si_loss)

  num_blocks = len(modules.blocks)
  if modules.p_update < 1:
    key = jax.random.fold_in(jax.random.PRNGKey(modules.seed), state.step)
    updated = jax.random.bernoulli(key, modules.p_update, (num_blocks,))
    keep = lambda flag, new, old: jax.tree.map(
        lambda n, o: jnp.where(flag, n, o), new, old)
    for j, block in enumerate(modules.blocks):
      for i in block:
        new_layers[i] = keep(updated[j], new_layers[i], state.layers[i])
    head = keep(updated[-1], head, state.head)
    # Interface j is trained from block j + 1's backward pass.
    new_synthetic = [keep(updated[j + 1], new, old) for j, (new, old)
                     in enumerate(zip(new_synthetic, state.synthetic))]
    # An input model learns only when the block below produced its target
    # and its own block is not busy.
    new_inputs = [keep(updated[j] & updated[j + 1], new, old) for j, (new, old)
                  in enumerate(zip(new_inputs, state.inputs))]
  else:
    updated = jnp.ones((num_blocks,), jnp.bool_)
  new_state = FeedForwardState(tuple(new_layers), head, tuple(new_synthetic),
                               state.step + 1, tuple(new_inputs))
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
      'sg_loss': _vector(sg_losses, jnp.float32),
      'si_loss': _vector(si_losses, jnp.float32),
      'block_updated': updated,
      # Health flags, checked by the training loop. Hidden layers 1..N-1:
      # their outputs; layers 1..N: parameters after the update; interfaces
      # bottom up: the gradient each received.
      'activation_finite': _vector(
          [jnp.all(jnp.isfinite(h)) for h in activations], jnp.bool_),
      'layer_finite': _vector(
          [_all_finite(m.params) for m in new_layers + [head]], jnp.bool_),
      'synthetic_gradient_finite': _vector(
          [jnp.all(jnp.isfinite(g)) for g in grads_h], jnp.bool_),
  }
  return new_state, metrics


def train_step(modules: Modules, state: FeedForwardState, images: Array,
               labels: Array):
  """`schedule` with the unjitted functions: fuse it with one `jax.jit`."""
  return schedule(_bind_block_functions(modules), modules, state, images,
                  labels)


def synthetic_gradient_diagnostics(modules: Modules, state: FeedForwardState,
                                   images: Array, labels: Array):
  """Fig. 10: each interface's synthetic gradient against the true one.

  The true gradient is the per-example backpropagated dL/dh of the whole
  network in training mode (what a Bprop step would use). Returns arrays with
  one value per interface: `sg_l2_error`, `sg_cosine`, `sg_sign_error`.
  """
  # Nothing is updated: only the gradients are read.
  outputs, vjps, _ = chain_vjp(modules.hidden + (modules.head,),
                               state.layers + (state.head,), images)
  loss_grad = interface.softmax_cross_entropy_grad(outputs[-1], labels)[1]
  _, true_grads = chain_pull_back(vjps, loss_grad)
  context = context_for(modules, labels)
  rows = []
  for j, layer in enumerate(modules.interfaces):
    # Interface after layer k (1-based): h_k is the input of module k.
    h, true = outputs[layer - 1], true_grads[layer]
    ghat = synthetic_gradient(modules, _source_state(modules, state, j), h,
                              context)
    rows.append(interface.gradient_diagnostics(ghat, true))
  return {f'sg_{k}': _vector([r[k] for r in rows], jnp.float32)
          for k in ('l2_error', 'cosine', 'sign_error')}


def predict(modules: Modules, state: FeedForwardState, images: Array) -> Array:
  """Test-time logits: all layers connected, batch norm in inference mode."""
  x = images
  for i, layer_state in enumerate(state.layers):
    x = hidden_forward(modules, i, layer_state, x, train=False)
  logits, _ = _apply(modules.head, state.head.params, state.head.batch_stats,
                     x, train=False)
  return logits


def eval_batch(modules: Modules, state: FeedForwardState, images: Array,
               labels: Array) -> dict[str, Array]:
  """Sums (not means) over the batch, so batches of any size can be added."""
  logits = predict(modules, state, images)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1])
  nll = -jnp.sum(one_hot * jax.nn.log_softmax(logits))
  return {'loss_sum': nll,
          'num_correct': jnp.sum(jnp.argmax(logits, -1) == labels),
          'count': jnp.asarray(labels.shape[0])}


def init(modules: Modules, config: FeedForwardConfig,
         rng: Array) -> FeedForwardState:
  """Initial state. Each module's key depends only on its position, so every
  method starts from the same layer weights for the same seed."""
  x = jnp.zeros((1,) + tuple(config.input_shape), jnp.float32)
  layer_states, outputs = [], []
  for i, model in enumerate(modules.hidden):
    layer_states.append(sources.init_module(model, modules.tx,
                                     jax.random.fold_in(rng, i), x))
    x = jnp.zeros_like(hidden_forward(modules, i, layer_states[-1], x,
                                      train=False))
    outputs.append(x)
  head = sources.init_module(modules.head, modules.tx,
                      jax.random.fold_in(rng, config.num_layers - 1), x)
  synthetic_states = ()
  if config.uses_synthetic_gradients:
    context = context_for(modules, jnp.zeros((1,), jnp.int32))
    synthetic_states = tuple(
        modules.source.init(jax.random.fold_in(rng, 1000 + layer),
                            outputs[layer - 1], context)
        for layer in config.interfaces)
  input_states = ()
  if config.synthetic_inputs:
    images = jnp.zeros((1,) + tuple(config.input_shape), jnp.float32)
    input_states = tuple(
        sources.init_module(modules.synthetic_input, modules.tx,
                     jax.random.fold_in(rng, 2000 + layer), images)
        for layer in config.interfaces)
  return FeedForwardState(tuple(layer_states), head, synthetic_states,
                          jnp.zeros((), jnp.int32), input_states)


class FeedForward(NamedTuple):
  """What `make_feedforward` returns: functions closed over one configuration.

  Decoupled per-module API (each its own jit; `layer` and `layer_ids` are
  static 0-based hidden-layer indices):
    hidden_update(layer, layer_state, sg_state | None, x, context)
        -> (layer_state, h, grad_x, grad_h)
    block_update(layer_ids, layer_states, sg_state | None, x, context)
        -> (layer_states, outputs, grad_x, grad_h)
    head_update(head_state, x, labels) -> (head_state, grad_x, loss, logits)
    top_block_update(layer_ids, layer_states, head_state, x, labels)
        -> (layer_states, head_state, outputs, grad_x, loss, logits)
    synthetic_update(sg_state, h, context, target) -> (sg_state, sg_loss)
    block_and_source_update(layer_ids, layer_states, sg_state, x, context)
        -> (layer_states, outputs, grad_x, grad_h, source_update_fn)
    finish_source_update(source_update_fn, target) -> (sg_state, sg_loss)
    synthetic_gradient(sg_state, h, context) -> delta_hat
    synthetic_input(si_state, images) -> h_hat          (complete unlock)
    synthetic_input_update(si_state, images, target) -> (si_state, si_loss)
    backprop_update(layer, layer_state, x, grad_h)
        -> (layer_state, h, grad_x, grad_h)
    hidden_forward(layer, layer_state, x) -> h
    context(labels) -> one-hot labels (cDNI) or None
  Whole network:
    init(rng) -> state
    train_step(state, images, labels) -> (state, metrics)   (fused, one jit)
    eval_batch(state, images, labels) -> sums of loss / correct / count
    predict(state, images) -> logits
    diagnostics(state, images, labels) -> Fig. 10 errors per interface
  """
  config: FeedForwardConfig
  modules: Modules
  init: Callable
  train_step: Callable
  eval_batch: Callable
  predict: Callable
  diagnostics: Callable
  hidden_update: Callable
  block_update: Callable
  head_update: Callable
  top_block_update: Callable
  synthetic_update: Callable
  synthetic_gradient: Callable
  synthetic_input: Callable
  synthetic_input_update: Callable
  backprop_update: Callable
  hidden_forward: Callable
  context: Callable
  block_and_source_update: Callable
  finish_source_update: Callable


def make_feedforward(config: FeedForwardConfig, jit: bool = True,
                     donate: bool | None = None) -> FeedForward:
  """Factory: the configuration's functions, jitted once each unless `jit=False`.

  `donate` (default: on for accelerators) donates the state buffers to the
  fused `train_step`, so a step updates the network in place.
  """
  modules = build_modules(config)
  if donate is None:
    donate = jax.default_backend() != 'cpu'
  wrap = jax.jit if jit else (lambda f, **_: f)
  bind = lambda f: functools.partial(f, modules)
  static_layers = {'static_argnums': (0,)}  # Layer indices pick definitions.
  return FeedForward(
      config=config,
      modules=modules,
      init=wrap(functools.partial(init, modules, config)),
      train_step=wrap(bind(train_step), donate_argnums=(0,) if donate else ()),
      eval_batch=wrap(bind(eval_batch)),
      predict=wrap(bind(predict)),
      diagnostics=wrap(bind(synthetic_gradient_diagnostics)),
      hidden_update=wrap(bind(hidden_update), **static_layers),
      block_update=wrap(bind(block_update), **static_layers),
      head_update=wrap(bind(head_update)),
      top_block_update=wrap(bind(top_block_update), **static_layers),
      synthetic_update=wrap(bind(synthetic_update)),
      synthetic_gradient=wrap(bind(synthetic_gradient)),
      synthetic_input=wrap(bind(synthetic_input)),
      synthetic_input_update=wrap(bind(synthetic_input_update)),
      backprop_update=wrap(bind(backprop_update), **static_layers),
      hidden_forward=wrap(bind(hidden_forward), static_argnums=(0, 3)),
      context=wrap(bind(context_for)),
      block_and_source_update=wrap(bind(block_and_source_update),
                                   **static_layers),
      finish_source_update=wrap(finish_source_update),
  )


def per_layer_train_step(ff: FeedForward, state: FeedForwardState,
                         images: Array, labels: Array):
  """`schedule` driven one block at a time from Python.

  Each call is a separate jitted function, so any block could instead run on
  its own schedule, device or process. Computes the same as the fused
  `ff.train_step` (Bprop is a single block, so there it is one call).
  """
  fns = BlockFunctions(ff.block_update, ff.top_block_update,
                       ff.synthetic_update, ff.context, ff.synthetic_input,
                       ff.synthetic_input_update, ff.block_and_source_update,
                       ff.finish_source_update)
  return schedule(fns, ff.modules, state, images, labels)
