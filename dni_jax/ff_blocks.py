"""The modules of a feed-forward configuration (`build_modules`), its state,
and the pure per-module and per-block updates every method composes
(`dni_jax.feedforward.schedule`). Re-exported by `dni_jax.feedforward`."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dni_jax import interface
from dni_jax import layers
from dni_jax import sources
from dni_jax import synthetic
from dni_jax.ff_config import FeedForwardConfig
from dni_jax.ff_config import learning_rate_schedule

Array = jax.Array


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

