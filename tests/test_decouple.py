"""`dni_jax.decouple` and the gradient sources against references written here.

The references use `jax.grad` of losses written in this file and optimiser
steps written out (plain SGD, theta <- theta - lr * g), never the library's
update code. Gradients crossing an interface are per example:
delta_b = B * dL/dh_b for a batch-mean loss L (`dni_jax.interface`).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dni_jax
from dni_jax import sources
from dni_jax import synthetic

B, D_IN, D = 8, 6, 5
LR = 0.1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def residual_block(p, x):
  """A module not in the paper: embedding + residual MLP, (params, x) -> h."""
  h = jnp.tanh(x @ p['w_in'])
  return h + jax.nn.relu(h @ p['w1'] + p['b1'][None]) @ p['w2']


def _params(seed):
  k = jax.random.split(jax.random.key(seed), 4)
  return {'w_in': jax.random.normal(k[0], (D_IN, D)),
          'w1': jax.random.normal(k[1], (D, D)),
          'b1': jax.random.normal(k[2], (D,)),
          'w2': jax.random.normal(k[3], (D, D))}


def _batch(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (B, D_IN)), jax.random.normal(k2, (B, D))


def _pair(seed):
  """Two [B, D] arrays: an activation h and a target gradient."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (B, D)), jax.random.normal(k2, (B, D))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                       atol=1e-6), a, b)


def downstream_loss(h, target):
  """What lies above the interface, written here: a batch-mean loss of h."""
  return jnp.mean(jnp.sum(jnp.square(jnp.sin(h) - target), axis=-1))


def test_oracle_source_gives_the_backprop_update():
  params = _params(0)
  x, t = _batch(1)
  # Oracle: the true per-example gradient of the loss above, by jax.grad.
  true_grad = lambda h, t: h.shape[0] * jax.grad(downstream_loss)(h, t)
  module = dni_jax.decouple(residual_block, sources.oracle(true_grad),
                            optax.sgd(LR))
  state = module.init(jax.random.key(0), params, x, t)
  new_state, h, grad_x, delta = module.update(state, x, t)

  whole = lambda p, x: downstream_loss(residual_block(p, x), t)
  g_params, g_x = jax.grad(whole, argnums=(0, 1))(params, x)
  _close(new_state.module.params,
         jax.tree.map(lambda p, g: p - LR * g, params, g_params))
  _close(grad_x, B * g_x)
  _close(h, residual_block(params, x))
  _close(delta, true_grad(h, t))
  assert new_state.source == ()


def _linear_m(p, h, c):
  """SyntheticGradientMLP(hidden_layers=0) written out: [h, c] W + b."""
  return (jnp.concatenate([h, c], -1) @ p['Dense_0']['kernel']
          + p['Dense_0']['bias'][None])


def test_synthetic_model_source_gradient_and_regression_step():
  m = synthetic.SyntheticGradientMLP(0, 1, D)
  source = sources.synthetic_model(m, optax.sgd(LR))
  h, target = _pair(2)
  c = jax.nn.one_hot(jnp.arange(B) % 3, 3)
  state = source.init(jax.random.key(0), h, c)
  # Non-zero parameters (A.1 initialises M to zero).
  p = jax.tree.map(lambda w: w + 0.3 * jnp.cos(jnp.arange(w.size).reshape(
      w.shape)), state.params)
  state = state._replace(params=p)
  _close(source.gradient(state, h, c), _linear_m(p, h, c))

  l2 = lambda p: jnp.mean(jnp.sum(jnp.square(_linear_m(p, h, c) - target),
                                  axis=-1))
  expected = jax.tree.map(lambda w, g: w - LR * g, p, jax.grad(l2)(p))
  new_state, metrics = source.update(state, h, c, target)
  _close(new_state.params, expected)
  _close(metrics['sg_loss'], l2(p))
  # The same update from the gradient's own forward pass (M(h) once), also
  # after crossing a jit boundary.
  delta, update_fn = jax.jit(source.gradient_and_update)(state, h, c)
  _close(delta, _linear_m(p, h, c))
  new_state, metrics = jax.jit(lambda f, t: f(t))(update_fn, target)
  _close(new_state.params, expected)
  _close(metrics['sg_loss'], l2(p))


def test_stale_source_remembers_earlier_targets_per_slot():
  decay = 0.7
  source = sources.stale(decay, B)
  h, t1 = _pair(3)
  t2 = t1[::-1] * 2.0
  state = source.init(None, h, None)
  np.testing.assert_array_equal(source.gradient(state, h, None), 0.0)
  state, m1 = source.update(state, h, None, t1)
  _close(m1['sg_loss'], jnp.mean(jnp.sum(t1 ** 2, -1)))
  state, _ = source.update(state, h, None, t2)
  expected = decay * (1 - decay) * t1 + (1 - decay) * t2
  _close(source.gradient(state, h, None), expected)
  _close(source.gradient(state, h[:3], None), expected[:3])
  delta, update_fn = source.gradient_and_update(state, h, None)
  _close(delta, expected)
  _close(update_fn(t1)[0].average, decay * expected + (1 - decay) * t1)


def test_zero_source_leaves_an_sgd_module_unchanged_and_passes_zero_down():
  params = _params(4)
  x, _ = _batch(4)
  module = dni_jax.decouple(residual_block, sources.zero(), optax.sgd(LR))
  state = module.init(jax.random.key(0), params, x)
  new_state, _, grad_x, delta = module.update(state, x, None)
  _close(new_state.module.params, params)
  np.testing.assert_array_equal(grad_x, 0.0)
  np.testing.assert_array_equal(delta, 0.0)


def _task(seed, n=512, d=16, k=4):
  """Labels of a fixed nonlinear teacher: learnable, not linearly trivial."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (n, d))
  return x, jnp.argmax(jnp.sin(x @ jax.random.normal(k2, (d, k))), -1)


def test_a_decoupled_two_module_net_learns_better_than_chance():
  x, y = _task(0)
  num_classes, width = 4, 32
  chance = float(jnp.max(jnp.bincount(y, length=num_classes))) / len(y)
  k = jax.random.split(jax.random.key(1), 4)
  init = lambda k, shape: jax.random.normal(k, shape) / shape[0] ** 0.5
  p1 = {'w_in': init(k[0], (16, width)), 'w1': init(k[1], (width, width)),
        'b1': jnp.zeros((width,)), 'w2': init(k[2], (width, width))}
  p2 = {'w': init(k[3], (width, num_classes))}
  head = lambda p, h: h @ p['w']
  tx = optax.adam(3e-3)
  m = synthetic.SyntheticGradientMLP(0, 1, width)
  lower = dni_jax.decouple(residual_block, sources.synthetic_model(m, tx), tx)
  loss_grad = lambda logits, y: (jax.nn.softmax(logits)
                                 - jax.nn.one_hot(y, num_classes))
  upper = dni_jax.decouple(head, sources.oracle(loss_grad), tx)
  onehot = jax.nn.one_hot(y, num_classes)
  s1 = lower.init(jax.random.key(2), p1, x, onehot)
  s2 = upper.init(jax.random.key(3), p2, residual_block(p1, x), y)
  accuracy = lambda: float(jnp.mean(jnp.argmax(
      head(s2.module.params, residual_block(s1.module.params, x)), -1) == y))
  before = accuracy()
  for step in range(200):
    i = (step * 64) % len(y)
    xb, yb, cb = x[i:i + 64], y[i:i + 64], onehot[i:i + 64]
    s1, h, _, _ = lower.update(s1, xb, cb)
    s2, _, target, _ = upper.update(s2, h, yb)
    s1, metrics = lower.source_update(s1, h, cb, target)
  after = accuracy()
  assert after > chance + 0.15 and after > before + 0.15, (chance, before,
                                                           after)
  assert np.isfinite(float(metrics['sg_loss']))
  # M learned something: its parameters left their zero initialisation.
  assert float(jnp.abs(s1.source.params['Dense_0']['kernel']).sum()) > 0


def test_readme_dni_for_any_module_example_runs(capsys):
  with open(os.path.join(REPO, 'README.md')) as f:
    section = f.read().split('## DNI for any module', 1)[1].split('\n## ', 1)[0]
  (block,) = re.findall(r'```python\n(.*?)```', section, re.S)
  namespace = {}
  exec(compile(block, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  y = namespace['y']
  chance = float(jnp.max(jnp.bincount(y, length=4))) / len(y)
  assert float(namespace['accuracy']) > chance + 0.1
  assert 'training accuracy' in capsys.readouterr().out
