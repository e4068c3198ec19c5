"""The pipelines against references written out here from the paper's
equations, not from dni_jax's chain functions.

Fake CPU devices (conftest: 4) stand in for the stage devices. Every
reference is a loss defined in this file (an FCN of A.1 written out: x W,
BatchNorm in training mode, ReLU; a linear classifier; softmax
cross-entropy), differentiated with `jax.grad`, and Adam (Kingma & Ba) written
out too.

GPipe and BatchNorm (what `make_backprop_pipeline` does, found by reading
it and pinned here): each micro-batch is normalised with its own batch
statistics, so with M micro-batches the gradient is that of the mean over
micro-batches of each micro-batch's mean loss -- not the loss of the whole
batch normalised as one; the running statistics move once per micro-batch,
in micro-batch order (M momentum updates per step); the re-materialised
forward of the backward pass does not move them again.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dni_jax
from dni_jax import pipeline as pl

B = 16
LR = 1e-2
BN_EPSILON, BN_MOMENTUM = 1e-5, 0.99          # Flax's BatchNorm defaults.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults.
TOL = dict(rtol=1e-5, atol=1e-6)


def config_of(method, num_layers, dni_layers=None):
  return dni_jax.FeedForwardConfig(
      input_shape=(4, 4, 1), num_classes=10, num_layers=num_layers,
      hidden_size=8, method=method, sg_hidden_layers=0, sg_hidden_size=16,
      learning_rate=LR, lr_boundaries=(), dni_layers=dni_layers)


def batch(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.uniform(k1, (B, 4, 4, 1)),
          jax.random.randint(k2, (B,), 0, 10))


# ---------------------------------------------------------------------------
# The network, the losses and Adam, written out.
# ---------------------------------------------------------------------------

def hidden_layer(params, x):
  """Linear (no bias) -> BatchNorm with this batch's statistics -> ReLU.
  Returns (h, (batch mean, batch variance))."""
  z = x.reshape(x.shape[0], -1) @ params['Dense_0']['kernel']
  mean = jnp.mean(z, 0)
  var = jnp.mean(jnp.square(z - mean[None]), 0)
  bn = params['BatchNorm_0']
  z = ((z - mean[None]) / jnp.sqrt(var[None] + BN_EPSILON) * bn['scale'][None]
       + bn['bias'][None])
  return jax.nn.relu(z), (mean, var)


def classifier(params, x):
  p = params['Dense_0']
  return x.reshape(x.shape[0], -1) @ p['kernel'] + p['bias'][None]


def cross_entropy(logits, labels):
  """Mean over the batch of -log softmax(logits)[label]."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))


def block_forward(layer_params, x):
  """Hidden layers in turn: (h, per-layer batch statistics)."""
  stats = []
  for params in layer_params:
    x, s = hidden_layer(params, x)
    stats.append(s)
  return x, stats


def running_average(batch_stats, stats):
  """BatchNorm's running averages after one training-mode batch."""
  mean, var = stats
  old = batch_stats['BatchNorm_0']
  return {'BatchNorm_0': {
      'mean': BN_MOMENTUM * old['mean'] + (1 - BN_MOMENTUM) * mean,
      'var': BN_MOMENTUM * old['var'] + (1 - BN_MOMENTUM) * var}}


def adam(module_state, grads):
  """One Adam step (bias-corrected moments) on a module's own moments."""
  adam_state, schedule_state = module_state.opt_state
  count = adam_state.count + 1
  mu = jax.tree.map(lambda m, g: ADAM_B1 * m + (1 - ADAM_B1) * g,
                    adam_state.mu, grads)
  nu = jax.tree.map(lambda v, g: ADAM_B2 * v + (1 - ADAM_B2) * g * g,
                    adam_state.nu, grads)
  t = count.astype(jnp.float32)
  params = jax.tree.map(
      lambda p, m, v: p - LR * (m / (1 - ADAM_B1 ** t))
      / (jnp.sqrt(v / (1 - ADAM_B2 ** t)) + ADAM_EPS),
      module_state.params, mu, nu)
  return module_state._replace(
      params=params, opt_state=(adam_state._replace(count=count, mu=mu, nu=nu),
                                schedule_state._replace(
                                    count=schedule_state.count + 1)))


# ---------------------------------------------------------------------------
# GPipe: jax.grad of the whole network's batch loss.
# ---------------------------------------------------------------------------

def gpipe_reference_step(ff_state, images, labels, M):
  """One step of the whole network: the loss is the mean over the M
  micro-batches (in order) of each micro-batch's mean cross-entropy, every
  micro-batch normalised by its own statistics; Adam on its gradient."""
  layers, head = ff_state.layers, ff_state.head
  images_m = images.reshape((M, B // M) + images.shape[1:])
  labels_m = labels.reshape(M, B // M)

  def loss_fn(layer_params, head_params):
    losses, stats = [], []
    for m in range(M):
      h, s = block_forward(layer_params, images_m[m])
      losses.append(cross_entropy(classifier(head_params, h), labels_m[m]))
      stats.append(s)
    return sum(losses) / M, stats

  (loss, stats), (layer_grads, head_grad) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(
          [l.params for l in layers], head.params)
  new_layers = []
  for i, layer in enumerate(layers):
    batch_stats = layer.batch_stats
    for m in range(M):
      batch_stats = running_average(batch_stats, stats[m][i])
    new_layers.append(adam(layer, layer_grads[i])._replace(
        batch_stats=batch_stats))
  return ff_state._replace(layers=tuple(new_layers), head=adam(head, head_grad),
                           step=ff_state.step + 1), loss


@pytest.mark.parametrize('boundaries,M', [((1, 2), 4), ((2,), 2), ((2,), 1)])
def test_gpipe_step_is_the_gradient_of_the_whole_batch_loss(boundaries, M):
  config = config_of('bprop', 4)
  S = len(boundaries) + 1
  bp = pl.make_backprop_pipeline(config, pl.stage_mesh(S), B, boundaries, M)
  state = bp.init(jax.random.key(0))
  expected = bp.to_feedforward(state)
  reference = jax.jit(gpipe_reference_step, static_argnums=3)
  for seed in range(2):   # The second step uses the moments of the first.
    images, labels = batch(seed)
    expected, loss = reference(expected, images, labels, M)
    state, metrics = bp.train_step(state, images, labels)
    got = bp.to_feedforward(state)
    # Parameters, both Adam moments and step counts, running statistics.
    chex.assert_trees_all_close(got, expected, **TOL)
    np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)


def test_gpipe_micro_batches_are_not_one_batch_normalisation():
  """With BatchNorm, M > 1 micro-batches is another computation than one
  batch: the first step's gradients (Adam's first moments, 0.1 g) differ."""
  config = config_of('bprop', 4)
  ff_state = dni_jax.make_feedforward(config).init(jax.random.key(0))
  images, labels = batch(0)
  step = jax.jit(gpipe_reference_step, static_argnums=3)
  one, _ = step(ff_state, images, labels, 1)
  four, _ = step(ff_state, images, labels, 4)
  mu = lambda s: s.layers[0].opt_state[0].mu['Dense_0']['kernel']
  assert not np.allclose(mu(one), mu(four), rtol=1e-2)


# ---------------------------------------------------------------------------
# The decoupled pipeline: one tick against the paper's equations.
# ---------------------------------------------------------------------------

def synthetic_gradient(sg_params, h, labels):
  """cDNI's linear model (A.1, MNIST FCN): delta_hat = [h, one_hot(y)] W + b."""
  p = sg_params['Dense_0']
  c = jax.nn.one_hot(labels, 10, dtype=jnp.float32)
  x = jnp.concatenate([h.reshape(h.shape[0], -1), c], axis=1)
  return (x @ p['kernel'] + p['bias'][None]).reshape(h.shape)


def reference_tick(layout, ff_state, state, images, labels):
  """What one tick must compute, from the paper (Eq. 1, 2; Fig. 2, 3).

  Stage s reads x_s (stage 0: the data; above: the activation its
  predecessor sent last tick, with its labels). Below the top its parameters
  follow theta <- theta - Adam(grad (1/B) sum_b <delta_hat_b, h_b(theta)>)
  with the synthetic gradient delta_hat = M_s(h, y) held constant; the top
  block follows grad of its cross-entropy. Each stage's per-example input
  gradient B dloss_s/dx_s is the target of the model below, which is
  regressed (mean over the batch of the squared error) at the activation
  it sent last tick. Returns (FeedForwardState, outputs h_s, top loss).
  """
  S = len(layout.stages)
  layers, synthetic = list(ff_state.layers), list(ff_state.synthetic)
  head, outputs, targets, top_loss = ff_state.head, [], [None] * S, None
  for s, stage in enumerate(layout.stages):
    if s == 0:
      x, y = images, labels
    else:
      x = state.inputs[s].reshape((B,) + layout.input_shapes[s])
      y = state.input_labels[s]
    layer_params = [ff_state.layers[i].params for i in stage]
    if s < S - 1:
      h, stats = block_forward(layer_params, x)
      delta_hat = jax.lax.stop_gradient(
          synthetic_gradient(ff_state.synthetic[s].params, h, y))
      def surrogate(layer_params, x, delta_hat=delta_hat):
        h, _ = block_forward(layer_params, x)
        return jnp.sum(delta_hat * h) / B
      layer_grads, grad_x = jax.grad(surrogate, argnums=(0, 1))(
          layer_params, x)
      outputs.append(h)
    else:
      def top(layer_params, head_params, x):
        h, stats = block_forward(layer_params, x)
        return cross_entropy(classifier(head_params, h), y), stats
      (top_loss, stats), (layer_grads, head_grad, grad_x) = jax.value_and_grad(
          top, argnums=(0, 1, 2), has_aux=True)(
              layer_params, ff_state.head.params, x)
      head = adam(ff_state.head, head_grad)
    for k, i in enumerate(stage):
      layers[i] = adam(ff_state.layers[i], layer_grads[k])._replace(
          batch_stats=running_average(ff_state.layers[i].batch_stats,
                                      stats[k]))
    targets[s] = B * grad_x
  for s in range(S - 1):
    h_sent = state.outputs[s].reshape((B,) + layout.output_shapes[s])
    def regression(sg_params, target=targets[s + 1]):
      diff = synthetic_gradient(sg_params, h_sent, state.output_labels[s]) \
          - target
      return jnp.mean(jnp.sum(jnp.square(diff.reshape(B, -1)), axis=1))
    synthetic[s] = adam(ff_state.synthetic[s],
                        jax.grad(regression)(ff_state.synthetic[s].params))
  new = ff_state._replace(layers=tuple(layers), head=head,
                          synthetic=tuple(synthetic), step=ff_state.step + 1)
  return new, outputs, top_loss


@pytest.mark.parametrize('num_layers,dni_layers', [(4, (1, 2)), (5, (1, 3))])
def test_pipeline_tick_follows_the_synthetic_gradient_equations(
    num_layers, dni_layers):
  config = config_of('cdni', num_layers, dni_layers)
  S = len(config.blocks)
  pipe = pl.make_pipeline(config, pl.stage_mesh(S), B)
  state = pipe.init(jax.random.key(0))
  for seed in range(S + 2):   # Fill the pipeline; every model has moved.
    state, _ = pipe.tick(state, *batch(seed))
  ff_state = pipe.to_feedforward(state)
  for sg in ff_state.synthetic:   # The synthetic gradients are not zero.
    assert float(jnp.max(jnp.abs(sg.params['Dense_0']['kernel']))) > 1e-3
  images, labels = batch(100)
  expected, outputs, loss = jax.jit(functools.partial(
      reference_tick, pipe.layout))(ff_state, state, images, labels)
  new_state, metrics = pipe.tick(state, images, labels)
  chex.assert_trees_all_close(pipe.to_feedforward(new_state), expected, **TOL)
  for s, h in enumerate(outputs):   # h goes up one stage, its labels with it.
    np.testing.assert_allclose(new_state.inputs[s + 1].reshape(B, -1)[
        :, :h.reshape(B, -1).shape[1]], h.reshape(B, -1), **TOL)
    np.testing.assert_allclose(new_state.outputs[s].reshape(B, -1)[
        :, :h.reshape(B, -1).shape[1]], h.reshape(B, -1), **TOL)
  np.testing.assert_array_equal(new_state.input_labels[1], labels)
  for s in range(1, S - 1):
    np.testing.assert_array_equal(new_state.input_labels[s + 1],
                                  state.input_labels[s])
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
