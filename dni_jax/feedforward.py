"""Decoupled feed-forward networks: one protocol for Bprop, No-Bprop, DNI, cDNI.

Sec. 2.1, 3.1 and A.1 of Jaderberg et al. An N-layer network has N-1 hidden
layers (`HiddenDense`) and a classifier; DNI puts a synthetic-gradient model
M_{i+1} on every interface i = 1..N-1 ("a 4-layer FCN = 3 hidden layers + the
classifier, with 3 DNIs").

Every method goes through the same pure step, `layer_update`: a module runs its
forward pass under `jax.vjp`, asks a *gradient source* for the gradient of its
output, and pulls that gradient back through the same vjp to get both its
parameter update and the gradient of its input. The methods differ only in the
gradient source at each interface:

  bprop     the true gradient, pulled back from the layer above (update locked);
  no_bprop  zero: only the classifier learns from the loss;
  dni       delta_hat_i = M_{i+1}(h_i);
  cdni      delta_hat_i = M_{i+1}(h_i, one_hot(y)).

The input gradient a layer returns is the target for the synthetic-gradient
model below it: bootstrapped from the synthetic gradient above, or the true
loss gradient at the classifier (Fig. 2). Gradients crossing interfaces are
per-example gradients (see `dni_jax.interface`).

`make_feedforward` returns the per-layer updates each jitted on its own (the
decoupled API a researcher schedules one layer at a time), and a fused
whole-network `train_step` (one jit, the same functions composed).
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
from dni_jax import synthetic

Array = jax.Array
METHODS = ('bprop', 'no_bprop', 'dni', 'cdni')
DECOUPLED_METHODS = ('dni', 'cdni')


@dataclasses.dataclass(frozen=True)
class FeedForwardConfig:
  """Network, synthetic-gradient model and optimiser settings (defaults: A.1 MNIST FCN)."""
  input_shape: tuple[int, ...] = (28, 28, 1)
  num_classes: int = 10
  num_layers: int = 4          # Hidden layers + the classifier.
  hidden_size: int = 256
  method: str = 'dni'
  sg_hidden_layers: int = 2    # A.1: 2 for DNI, 0 for cDNI on MNIST FCNs.
  sg_hidden_size: int = 1024
  learning_rate: float = 3e-5
  lr_boundaries: tuple[int, ...] = (300_000, 400_000)
  lr_decay: float = 0.1

  def __post_init__(self):
    def bad(msg):
      raise ValueError(f'FeedForwardConfig: {msg}')
    if self.method not in METHODS:
      bad(f'method={self.method!r} is not one of {METHODS}')
    if self.num_layers < 2:
      bad(f'num_layers={self.num_layers} must be >= 2 (at least one hidden '
          'layer and the classifier, so there is an interface)')
    for name in ('hidden_size', 'sg_hidden_size', 'num_classes'):
      if getattr(self, name) < 1:
        bad(f'{name}={getattr(self, name)} must be >= 1')
    if self.num_classes < 2:
      bad(f'num_classes={self.num_classes} must be >= 2')
    if not 0 <= self.sg_hidden_layers <= 2:
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

  @property
  def num_interfaces(self) -> int:
    return self.num_layers - 1

  @property
  def uses_synthetic_gradients(self) -> bool:
    return self.method in DECOUPLED_METHODS


class ModuleState(NamedTuple):
  """Everything one independently updated module owns."""
  params: Any        # Flax params.
  batch_stats: Any   # Flax batch statistics ({} for modules without BatchNorm).
  opt_state: Any     # Its own optax state: modules never share an optimiser.


class FeedForwardState(NamedTuple):
  """State of an N-layer decoupled network."""
  layers: tuple[ModuleState, ...]     # Hidden layers 1..N-1.
  head: ModuleState                   # Layer N, the classifier.
  synthetic: tuple[ModuleState, ...]  # synthetic[i] predicts the gradient of
                                      # layers[i]'s output; () without DNI.
  step: Array                         # int32 scalar, training steps taken.


class Modules(NamedTuple):
  """The (stateless) module definitions and optimiser of a configuration."""
  hidden: layers.HiddenDense
  head: layers.Classifier
  synthetic: synthetic.SyntheticGradientMLP
  tx: optax.GradientTransformation
  conditioned: bool   # cDNI: synthetic gradients see the one-hot label.
  num_classes: int


def learning_rate_schedule(config: FeedForwardConfig) -> optax.Schedule:
  """A.1: constant, multiplied by `lr_decay` at each boundary (paper: 300k, 400k)."""
  return optax.piecewise_constant_schedule(
      config.learning_rate, {b: config.lr_decay for b in config.lr_boundaries})


def build_modules(config: FeedForwardConfig) -> Modules:
  return Modules(
      hidden=layers.HiddenDense(config.hidden_size),
      head=layers.Classifier(config.num_classes),
      synthetic=synthetic.SyntheticGradientMLP(
          config.sg_hidden_layers, config.sg_hidden_size, config.hidden_size),
      tx=optax.adam(learning_rate_schedule(config)),
      conditioned=config.method == 'cdni',
      num_classes=config.num_classes)


# ---------------------------------------------------------------------------
# Pure per-module functions.
# ---------------------------------------------------------------------------

def _apply(model, params, batch_stats, *inputs, train: bool):
  """Applies a Flax module; returns (output, batch stats after the call)."""
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
    if train:
      out, updates = model.apply(variables, *inputs, train=True,
                                 mutable=['batch_stats'])
      return out, updates['batch_stats']
  return model.apply(variables, *inputs, train=train), batch_stats


def module_vjp(model, state: ModuleState, x: Array, *extra):
  """Training-mode forward of a module under `jax.vjp`.

  Returns `(h, vjp_fn, batch_stats)`: `vjp_fn(cotangent_of_h)` gives
  `(param_grads, grad_x)`; `batch_stats` are the statistics after this batch.
  """
  def forward(params, x):
    return _apply(model, params, state.batch_stats, x, *extra, train=True)
  h, vjp_fn, batch_stats = jax.vjp(forward, state.params, x, has_aux=True)
  return h, vjp_fn, batch_stats


def apply_gradients(tx: optax.GradientTransformation, state: ModuleState,
                    grads: Any, batch_stats: Any) -> ModuleState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return ModuleState(optax.apply_updates(state.params, updates), batch_stats,
                     opt_state)


GradientSource = Callable[[Array], Array]


def layer_update(model, tx, state: ModuleState, x: Array,
                 gradient_source: GradientSource):
  """The one update every method uses (Eq. 1, 2 and Fig. 2).

  Args:
    model, tx: the layer's Flax module and optimiser.
    state: the layer's state.
    x: its input (the output of the layer below, or the data).
    gradient_source: maps the layer's output h to the per-example gradient the
      interface above provides for it: synthetic (DNI), zero (No-Bprop), true
      (Bprop) or an oracle.

  Returns:
    (new_state, h, grad_x, grad_h): `grad_x` is the per-example gradient of the
    input, obtained from the same vjp -- the target for the synthetic-gradient
    model below; `grad_h` is what the gradient source gave.
  """
  h, vjp_fn, batch_stats = module_vjp(model, state, x)
  grad_h = gradient_source(h)
  param_grads, grad_x = interface.pull_back(vjp_fn, grad_h)
  return apply_gradients(tx, state, param_grads, batch_stats), h, grad_x, grad_h


def synthetic_gradient(modules: Modules, sg_state: ModuleState, h: Array,
                       context: Array | None) -> Array:
  """delta_hat = M(h, c) in training mode (its batch statistics are not kept:
  `synthetic_update` recomputes the same forward and keeps them)."""
  out, _ = _apply(modules.synthetic, sg_state.params, sg_state.batch_stats, h,
                  context, train=True)
  return out


def synthetic_update(modules: Modules, sg_state: ModuleState, h: Array,
                     context: Array | None, target: Array):
  """Regresses M(h, c) to its target with the L2 loss, weight 1 (A.1).

  Returns (new_sg_state, sg_loss). The target is a constant; nothing flows
  into h.
  """
  def loss_fn(params):
    pred, batch_stats = _apply(modules.synthetic, params, sg_state.batch_stats,
                               h, context, train=True)
    return interface.synthetic_gradient_loss(pred, target), batch_stats
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      sg_state.params)
  return apply_gradients(modules.tx, sg_state, grads, batch_stats), loss


def zero_gradient(h: Array) -> Array:
  """No-Bprop's gradient source."""
  return jnp.zeros_like(h)


def context_for(modules: Modules, labels: Array) -> Array | None:
  """cDNI's context, the one-hot label (A.1); None for unconditioned DNI."""
  if not modules.conditioned:
    return None
  return jax.nn.one_hot(labels, modules.num_classes, dtype=jnp.float32)


def hidden_update(modules: Modules, layer_state: ModuleState,
                  sg_state: ModuleState | None, x: Array,
                  context: Array | None):
  """Decoupled update of one hidden layer: no waiting for any layer above.

  Uses the synthetic gradient of the model on the interface above
  (`sg_state`), or zero when `sg_state` is None (No-Bprop).
  Returns (new_layer_state, h, grad_x, grad_h).
  """
  if sg_state is None:
    source = zero_gradient
  else:
    source = lambda h: synthetic_gradient(modules, sg_state, h, context)
  return layer_update(modules.hidden, modules.tx, layer_state, x, source)


def backprop_update(modules: Modules, layer_state: ModuleState, x: Array,
                    grad_h: Array):
  """Update of one hidden layer from a given per-example gradient of its output
  (Bprop's backward pass, or any externally supplied gradient).
  Returns (new_layer_state, h, grad_x, grad_h)."""
  return layer_update(modules.hidden, modules.tx, layer_state, x,
                      lambda h: grad_h)


def head_update(modules: Modules, head_state: ModuleState, x: Array,
                labels: Array):
  """Update of the classifier from the true loss gradient.

  Returns (new_head_state, grad_x, loss, logits); `grad_x` is the true
  per-example gradient of the classifier's input, the target for the top
  synthetic-gradient model.
  """
  loss_and_grad = {}
  def source(logits):
    loss_and_grad['loss'], grad = interface.softmax_cross_entropy_grad(
        logits, labels)
    return grad
  new_state, logits, grad_x, _ = layer_update(
      modules.head, modules.tx, head_state, x, source)
  return new_state, grad_x, loss_and_grad['loss'], logits


def hidden_forward(modules: Modules, layer_state: ModuleState, x: Array,
                   train: bool = True) -> Array:
  """Forward of one hidden layer without updating anything."""
  h, _ = _apply(modules.hidden, layer_state.params, layer_state.batch_stats, x,
                train=train)
  return h


def _all_finite(tree) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(l))
                            for l in jax.tree.leaves(tree)]))


def _train_metrics(loss, logits, labels, sg_losses, new_modules,
                   activations, synthetic_gradients):
  """Scalars and per-module health flags (checked by the training loop)."""
  vector = lambda xs, dtype: (jnp.stack(xs) if xs else jnp.zeros((0,), dtype))
  return {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
      'sg_loss': vector(sg_losses, jnp.float32),
      # Layers 1..N (N = the classifier): parameters finite after the update.
      'layer_finite': vector([_all_finite(m.params) for m in new_modules],
                             jnp.bool_),
      # Hidden layers 1..N-1: their outputs h_i.
      'activation_finite': vector(
          [jnp.all(jnp.isfinite(h)) for h in activations], jnp.bool_),
      # Interfaces 1..N-1: the synthetic gradient each layer received.
      'synthetic_gradient_finite': vector(
          [jnp.all(jnp.isfinite(g)) for g in synthetic_gradients], jnp.bool_),
  }


def train_step(modules: Modules, method: str, state: FeedForwardState,
               images: Array, labels: Array):
  """One training step of the whole network (fuse it with one `jax.jit`).

  For the decoupled methods this is exactly the per-layer schedule of Fig. 2
  composed in one function: every hidden layer updates from the interface
  above, the classifier from the loss, then every synthetic-gradient model
  regresses to the input gradient of the layer above it. For Bprop the same
  pieces (`module_vjp`, `pull_back`, `apply_gradients`) run with the true
  gradient, which forces the backward order. Returns (new_state, metrics).
  """
  if method == 'bprop':
    x = layers.flatten(images)
    num_hidden = len(state.layers)
    # Update locked: forward everything, then pull the true gradient back
    # layer by layer through the same vjps.
    vjps, stats, activations = [], [], []
    for layer_state in state.layers:
      x, vjp_fn, batch_stats = module_vjp(modules.hidden, layer_state, x)
      activations.append(x)
      vjps.append(vjp_fn)
      stats.append(batch_stats)
    head, grad, loss, logits = head_update(modules, state.head, x, labels)
    new_layers = [None] * num_hidden
    for i in reversed(range(num_hidden)):
      param_grads, grad = interface.pull_back(vjps[i], grad)
      new_layers[i] = apply_gradients(modules.tx, state.layers[i], param_grads,
                                      stats[i])
    new_state = FeedForwardState(tuple(new_layers), head, (), state.step + 1)
    return new_state, _train_metrics(loss, logits, labels, [],
                                     new_layers + [head], activations, [])

  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; expected one of {METHODS}')
  return decoupled_schedule(_bind_layer_functions(modules),
                            method in DECOUPLED_METHODS, state, images, labels)


class LayerFunctions(NamedTuple):
  """The per-module functions a decoupled schedule calls (jitted or not)."""
  hidden_update: Callable
  head_update: Callable
  synthetic_update: Callable
  context: Callable


def _bind_layer_functions(modules: Modules) -> LayerFunctions:
  bind = lambda f: functools.partial(f, modules)
  return LayerFunctions(bind(hidden_update), bind(head_update),
                        bind(synthetic_update), bind(context_for))


def decoupled_schedule(fns: LayerFunctions, use_synthetic: bool,
                       state: FeedForwardState, images: Array, labels: Array):
  """Fig. 2: every hidden layer updates as soon as its interface answers.

  Layer i updates from the gradient source on interface i (synthetic, or zero
  when `use_synthetic` is False: No-Bprop), the classifier from the loss, then
  each synthetic-gradient model regresses to the input gradient that the layer
  above it returned (bootstrapped, or true at the top). No layer's update
  depends on any later layer's, so the order of the calls is free. Returns
  (new_state, metrics).
  """
  x = layers.flatten(images)
  context = fns.context(labels)
  new_layers, interface_inputs, targets, grads_h = [], [], [], []
  for i, layer_state in enumerate(state.layers):
    sg_state = state.synthetic[i] if use_synthetic else None
    layer_state, x, grad_x, grad_h = fns.hidden_update(layer_state, sg_state,
                                                       x, context)
    new_layers.append(layer_state)
    if use_synthetic:
      grads_h.append(grad_h)
    interface_inputs.append(x)
    if i > 0:
      targets.append(grad_x)  # Bootstrapped target for synthetic[i - 1].
  head, grad_x, loss, logits = fns.head_update(state.head, x, labels)
  targets.append(grad_x)      # True gradient: target for the top model.

  new_synthetic, sg_losses = [], []
  if use_synthetic:
    for sg_state, h, target in zip(state.synthetic, interface_inputs, targets):
      sg_state, sg_loss = fns.synthetic_update(sg_state, h, context, target)
      new_synthetic.append(sg_state)
      sg_losses.append(sg_loss)
  new_state = FeedForwardState(tuple(new_layers), head, tuple(new_synthetic),
                               state.step + 1)
  return new_state, _train_metrics(loss, logits, labels, sg_losses,
                                   new_layers + [head], interface_inputs,
                                   grads_h)


def predict(modules: Modules, state: FeedForwardState, images: Array) -> Array:
  """Test-time logits: all layers connected, batch norm in inference mode."""
  x = layers.flatten(images)
  for layer_state in state.layers:
    x = hidden_forward(modules, layer_state, x, train=False)
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


def _init_module(model, tx, rng, *inputs) -> ModuleState:
  variables = model.init(rng, *inputs, train=False)
  params = variables['params']
  return ModuleState(params, variables.get('batch_stats', {}), tx.init(params))


def init(modules: Modules, config: FeedForwardConfig,
         rng: Array) -> FeedForwardState:
  """Initial state. Each module's key depends only on its position, so every
  method starts from the same layer weights for the same seed."""
  x = jnp.zeros((1, math.prod(config.input_shape)), jnp.float32)
  layer_states = []
  for i in range(config.num_layers - 1):
    layer_states.append(_init_module(modules.hidden, modules.tx,
                                     jax.random.fold_in(rng, i), x))
    x = jnp.zeros((1, config.hidden_size), jnp.float32)
  head = _init_module(modules.head, modules.tx,
                      jax.random.fold_in(rng, config.num_layers - 1), x)
  synthetic_states = ()
  if config.uses_synthetic_gradients:
    context = context_for(modules, jnp.zeros((1,), jnp.int32))
    synthetic_states = tuple(
        _init_module(modules.synthetic, modules.tx,
                     jax.random.fold_in(rng, 1000 + i), x, context)
        for i in range(config.num_interfaces))
  return FeedForwardState(tuple(layer_states), head, synthetic_states,
                          jnp.zeros((), jnp.int32))


class FeedForward(NamedTuple):
  """What `make_feedforward` returns: functions closed over one configuration.

  Decoupled per-layer API (each its own jit):
    hidden_update(layer_state, sg_state | None, x, context)
        -> (layer_state, h, grad_x, grad_h)
    backprop_update(layer_state, x, grad_h) -> (layer_state, h, grad_x, grad_h)
    head_update(head_state, x, labels) -> (head_state, grad_x, loss, logits)
    synthetic_update(sg_state, h, context, target) -> (sg_state, sg_loss)
    synthetic_gradient(sg_state, h, context) -> delta_hat
    hidden_forward(layer_state, x) -> h
  Whole network:
    init(rng) -> state
    train_step(state, images, labels) -> (state, metrics)   (fused, one jit)
    eval_batch(state, images, labels) -> sums of loss / correct / count
    predict(state, images) -> logits
  """
  config: FeedForwardConfig
  modules: Modules
  init: Callable
  train_step: Callable
  eval_batch: Callable
  predict: Callable
  hidden_update: Callable
  backprop_update: Callable
  head_update: Callable
  synthetic_update: Callable
  synthetic_gradient: Callable
  hidden_forward: Callable
  context: Callable


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
  return FeedForward(
      config=config,
      modules=modules,
      init=wrap(functools.partial(init, modules, config)),
      train_step=wrap(functools.partial(train_step, modules, config.method),
                      donate_argnums=(0,) if donate else ()),
      eval_batch=wrap(bind(eval_batch)),
      predict=wrap(bind(predict)),
      hidden_update=wrap(bind(hidden_update)),
      backprop_update=wrap(bind(backprop_update)),
      head_update=wrap(bind(head_update)),
      synthetic_update=wrap(bind(synthetic_update)),
      synthetic_gradient=wrap(bind(synthetic_gradient)),
      hidden_forward=wrap(bind(hidden_forward)),
      context=wrap(bind(context_for)),
  )


def per_layer_train_step(ff: FeedForward, state: FeedForwardState,
                         images: Array, labels: Array):
  """The decoupled schedule of Fig. 2 driven one layer at a time from Python.

  Each call is a separate jitted function, so any layer could instead run on
  its own schedule, device or process. For dni/cdni/no_bprop this computes the
  same as the fused `ff.train_step`; Bprop is update locked and has no
  per-layer decoupled form (use `backprop_update` in reverse order).
  """
  if ff.config.method == 'bprop':
    raise ValueError('per_layer_train_step: bprop is update locked; use '
                     'train_step, or backprop_update in reverse layer order')
  fns = LayerFunctions(ff.hidden_update, ff.head_update, ff.synthetic_update,
                       ff.context)
  return decoupled_schedule(fns, ff.config.uses_synthetic_gradients, state,
                            images, labels)
