"""The multi-network system (Sec. 3.3, Fig. 8, A.4) against references written
here from the paper, not from dni_jax's chains: A's and B's parameters and
Adam moments, and M's targets, after two blocks of T^2 steps.

The model, written out below: A reads a digit per step through a two-layer
FCN (linear, BN, ReLU) into a BN-LSTM (Cooijmans et al.); at the last step of
each window of T steps a linear classifier answers A's task and a linear layer
with BN emits the message m_k; B reads m_k into its own BN-LSTM at tick k and
answers with a linear classifier. L_A, L_B: batch means of the cross-entropy
summed over the answers.

  backprop:  one Adam step of A and of B on jax.grad of the joint loss
             L_A + L_B over the block (T windows, T ticks);
  dni:       per window k, A steps on jax.grad of
             L_A,k + <stop_grad(10 M(m_k)), m_k> / B (A.4's factor 10, the
             per-example gradient convention), M being B's current model;
             after the T windows B steps on jax.grad of L_B over its T ticks
             plus M's loss mean_k mean_b ||M(m_k) - g_k||^2, where the target
             g_k = B dL_B/dm_k is B's gradient w.r.t. the message of tick k;
  decoupled: as dni with a zero gradient on A's message (no M).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest

from dni_jax import multinet
from dni_jax import multinet_experiments

B, T, D, F, H, M, S = 4, 2, 6, 7, 5, 4, 3   # batch, tick, image, FCN, LSTM,
                                            # message, M's hidden layer.
LR = 1e-2          # Large enough that each update changes the next window.
SG_SCALE = 10.0    # A.4: the synthetic gradient is multiplied by 10 into A.
EPS = 1e-5         # BatchNorm's epsilon.


def _config(mode):
  return multinet.MultinetConfig(
      mode=mode, tick=T, image_size=D, fcn_size=F, hidden_size=H,
      message_size=M, sg_hidden_size=S, learning_rate=LR)


# ---------------------------------------------------------------------------
# The model, written out.
# ---------------------------------------------------------------------------

def _bn(x_BxD, gamma, beta=None):
  """Training-mode BatchNorm of one time step: statistics over the batch."""
  mean = jnp.mean(x_BxD, axis=0, keepdims=True)
  var = jnp.mean(jnp.square(x_BxD - mean), axis=0, keepdims=True)
  y = (x_BxD - mean) / jnp.sqrt(var + EPS) * gamma[None]
  return y if beta is None else y + beta[None]


def _bn_lstm(p, state, x):
  """Cooijmans et al. (2016), Eq. (6)-(8)."""
  h, c = state
  z = (_bn(x @ p['w_x'], p['gamma_x']) + _bn(h @ p['w_h'], p['gamma_h'])
       + p['b'][None])
  i, f, g, o = jnp.split(z, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(_bn(c, p['gamma_c'], p['beta_c']))
  return (h, c)


def _bn_linear(p, x):
  return _bn(x @ p['w'], p['gamma'], p['beta'])


def _a_window(pa, state, images_BxTxD):
  """A over one window of T digits: (state, logits and message at its last
  step)."""
  for t in range(T):
    x = jax.nn.relu(_bn_linear(pa['fcn1'], images_BxTxD[:, t]))
    x = jax.nn.relu(_bn_linear(pa['fcn2'], x))
    state = _bn_lstm(pa['core'], state, x)
  h = state[0]
  logits = h @ pa['readout']['w'] + pa['readout']['b'][None]
  return state, logits, _bn_linear(pa['message'], h)


def _b_tick(pb, state, message):
  state = _bn_lstm(pb['core'], state, message)
  return state, state[0] @ pb['readout']['w'] + pb['readout']['b'][None]


def _sg_model(p, message):
  hidden = jax.nn.relu(message @ p['w1'] + p['b1'][None])
  return hidden @ p['w2'] + p['b2'][None]


def _cross_entropy(logits, labels):
  """Batch mean of one answer's cross-entropy."""
  return -jnp.sum(jax.nn.log_softmax(logits)
                  * jax.nn.one_hot(labels, logits.shape[-1])) / B


def _window(block, k):
  return block.images[:, k * T:(k + 1) * T]


# ---------------------------------------------------------------------------
# The references.
# ---------------------------------------------------------------------------

def _joint_loss(pa, pb, carry_a, carry_b, block):
  """L_A + L_B of the joint graph over one block (backprop)."""
  loss = 0.0
  for k in range(T):
    carry_a, logits_a, message = _a_window(pa, carry_a, _window(block, k))
    carry_b, logits_b = _b_tick(pb, carry_b, message)
    loss += (_cross_entropy(logits_a, block.a_targets[:, k])
             + _cross_entropy(logits_b, block.b_targets[:, k]))
  return loss, (carry_a, carry_b)


def _a_objective(pa, carry_a, images, target, sg_params):
  """Eq. (1) for A's window: L_A,k + <stop_grad(10 M(m_k)), m_k> / B."""
  carry_a, logits, message = _a_window(pa, carry_a, images)
  if sg_params is None:   # decoupled: no gradient reaches the message.
    grad = jnp.zeros_like(message)
  else:
    grad = SG_SCALE * _sg_model(sg_params, message)
  grad = jax.lax.stop_gradient(grad)
  return (_cross_entropy(logits, target) + jnp.sum(grad * message) / B,
          (carry_a, message))


def _b_loss(pb, carry_b, messages, targets_BxT):
  """L_B over B's T ticks, reading the T messages."""
  loss = 0.0
  for k in range(T):
    carry_b, logits = _b_tick(pb, carry_b, messages[k])
    loss += _cross_entropy(logits, targets_BxT[:, k])
  return loss, carry_b


def _m_loss(sg_params, messages, targets):
  """M at each message regressed to B's gradient w.r.t. it, mean over ticks."""
  return jnp.mean(jnp.stack([
      jnp.mean(jnp.sum(jnp.square(_sg_model(sg_params, m) - g), axis=-1))
      for m, g in zip(messages, targets)]))


def _adam(params, opt_state, grads):
  updates, opt_state = optax.adam(LR).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


@functools.partial(jax.jit, static_argnums=0)
def _reference_block(mode, a, b, block):
  """a, b: (params, opt_state, carry) of A and B after one block."""
  (pa, oa, carry_a), (pb, ob, carry_b) = a, b
  if mode == 'backprop':
    (ga, gb), (carry_a, carry_b) = jax.grad(
        _joint_loss, argnums=(0, 1), has_aux=True)(pa, pb, carry_a, carry_b,
                                                   block)
    return (*_adam(pa, oa, ga), carry_a), (*_adam(pb, ob, gb), carry_b), None
  messages = []
  for k in range(T):   # A: one update per window, on M's current output.
    ga, (carry_a, message) = jax.grad(_a_objective, has_aux=True)(
        pa, carry_a, _window(block, k), block.a_targets[:, k],
        pb['sg'] if mode == 'dni' else None)
    pa, oa = _adam(pa, oa, ga)
    messages.append(message)
  # B: per tick, its gradient w.r.t. the message it read, per example (L_A
  # does not read the messages: this is the joint loss's gradient too).
  grad_messages, _ = jax.grad(_b_loss, argnums=2, has_aux=True)(
      pb, carry_b, messages, block.b_targets)
  targets = [B * g for g in grad_messages]

  def b_objective(pb):
    loss, carry = _b_loss(pb, carry_b, messages, block.b_targets)
    if mode == 'dni':
      loss += _m_loss(pb['sg'], messages, targets)
    return loss, carry

  gb, carry_b = jax.grad(b_objective, has_aux=True)(pb)
  return ((pa, oa, carry_a), (*_adam(pb, ob, gb), carry_b),
          (jnp.stack(messages, axis=1), jnp.stack(targets, axis=1),
           _m_loss(pb['sg'], messages, targets) if mode == 'dni' else None))


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------

def _blocks(count=2):
  rng = np.random.default_rng(0)
  return [multinet.Block(
      jnp.asarray(rng.normal(size=(B, T * T, D)).astype(np.float32)),
      jnp.asarray(rng.integers(0, T + 1, (B, T)).astype(np.int32)),
      jnp.asarray(rng.integers(0, T * T + 1, (B, T)).astype(np.int32)))
          for _ in range(count)]


def _initial_states(config):
  """Library-initialised networks with random carried states and, in dni,
  a random M (its zero-initialised last layer would emit nothing)."""
  state_a, state_b = multinet.make_multinet(config).init(jax.random.key(0), B)
  keys = jax.random.split(jax.random.key(1), 5)
  carry = lambda k1, k2: (jnp.tanh(jax.random.normal(k1, (B, H))),
                          jax.random.normal(k2, (B, H)))
  state_a = state_a._replace(carry=carry(keys[0], keys[1]))
  state_b = state_b._replace(carry=carry(keys[2], keys[3]))
  if config.mode == 'dni':
    sg = state_b.params['sg']
    leaves, treedef = jax.tree.flatten(sg)
    sg = jax.tree.unflatten(treedef, [
        0.3 * jax.random.normal(k, x.shape) for k, x in
        zip(jax.random.split(keys[4], len(leaves)), leaves)])
    params = {**state_b.params, 'sg': sg}
    state_b = state_b._replace(params=params, opt_state={
        name: optax.adam(LR).init(p) for name, p in params.items()})
  return state_a, state_b


def _float64(tree):
  """Runs in float64 (inside `jax.enable_x64`): with batch statistics over a
  batch of 4, float32 gradients of this system agree with float64 to only
  ~1e-2 relative in places, in the library and the reference alike; float64
  makes the rtol 1e-5 comparison sharp."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


_copy = conftest.copy_tree
_assert_close = conftest.assert_tree_close
_one_adam = conftest.one_adam_state


def _without_message_beta(tree):
  """A's message BN shift: B's input BN removes any shift of the message
  over the batch, so its true gradient is zero and what backprop computes
  is rounding noise (compared separately)."""
  return {**tree, 'message': {**tree['message'], 'beta': None}}


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('mode', multinet.MODES)
def test_two_blocks_equal_the_reference(mode):
  """A's and B's parameters, Adam moments and carried states after two
  blocks of `train_block` equal the reference schedule's."""
  config = _config(mode)
  net = multinet.make_multinet(config)
  with jax.enable_x64(True):
    state_a, state_b = _float64(_initial_states(config))
    a = (state_a.params, _one_adam(state_a.opt_state), state_a.carry)
    b = (state_b.params, _one_adam(state_b.opt_state), state_b.carry)
    state_a, state_b = _copy((state_a, state_b))
    for block in _float64(_blocks()):
      a, b, _ = _reference_block(mode, a, b, block)
      state_a, state_b, _ = net.train_block(state_a, state_b, block)
  assert state_a.params['core']['w_x'].dtype == jnp.float64
  (pa, oa, carry_a), (pb, ob, carry_b) = a, b
  assert int(state_a.updates) == (1 if mode == 'backprop' else T) * 2
  assert int(state_b.updates) == 2
  _assert_close(state_b.params, pb)
  _assert_close(_one_adam(state_b.opt_state), ob)
  _assert_close(state_b.carry, carry_b)
  _assert_close(state_a.carry, carry_a)
  if mode == 'backprop':
    mu, nu = (_one_adam(state_a.opt_state)[0].mu,
              _one_adam(state_a.opt_state)[0].nu)
    _assert_close(_without_message_beta(state_a.params),
                  _without_message_beta(pa))
    _assert_close(_without_message_beta(mu), _without_message_beta(oa[0].mu))
    _assert_close(_without_message_beta(nu), _without_message_beta(oa[0].nu))
    # The shift's gradient is noise next to the message's scale gradient.
    for tree in (mu, oa[0].mu):
      assert (np.max(np.abs(tree['message']['beta']))
              < 1e-4 * np.max(np.abs(tree['message']['gamma'])))
  else:
    _assert_close(state_a.params, pa)
    _assert_close(_one_adam(state_a.opt_state), oa)


def test_m_targets_are_bs_gradients_wrt_each_message():
  """B's update returns, per tick, B times the gradient of L_B w.r.t. the
  message read at that tick: M's regression target, and M's loss is the
  mean over ticks of the L2 distance to it."""
  config = _config('dni')
  net = multinet.make_multinet(config)
  with jax.enable_x64(True):
    state_a, state_b = _float64(_initial_states(config))
    block = _float64(_blocks(1))[0]
    a = (state_a.params, _one_adam(state_a.opt_state), state_a.carry)
    b = (state_b.params, _one_adam(state_b.opt_state), state_b.carry)
    _, (pb, _, _), (messages, targets, m_loss) = _reference_block(
        'dni', a, b, block)
    new_b, true_grad, metrics = net.b_step(_copy(state_b), messages,
                                           block.b_targets)
  assert true_grad.shape == (B, T, M)
  _assert_close(true_grad, targets)
  np.testing.assert_allclose(metrics['sg_loss'], m_loss, rtol=1e-5)
  _assert_close(new_b.params, pb)
  # The targets differ from tick to tick (a mix-up would show).
  assert not np.allclose(targets[:, 0], targets[:, 1], rtol=0.1)


def test_a4_defaults():
  """A.4: 256 units in both FCN layers, both LSTMs, the message and M's
  hidden layer; Adam, learning rate 1e-5; the synthetic gradient multiplied
  by 10 into A; M's last layer zero-initialised (A.1)."""
  config = multinet.MultinetConfig()
  assert (config.image_size, config.fcn_size, config.hidden_size,
          config.message_size, config.sg_hidden_size) == (784, 256, 256, 256,
                                                          256)
  assert config.learning_rate == 1e-5
  assert config.sg_scale == 10.0
  sg = multinet.init_sg_model(config, jax.random.key(0))
  assert sg['w1'].shape == (256, 256) and sg['w2'].shape == (256, 256)
  np.testing.assert_array_equal(sg['w2'], 0.0)
  np.testing.assert_array_equal(sg['b2'], 0.0)
  params = {'w': jnp.linspace(-1.0, 1.0, 6)}
  grads = {'w': jnp.linspace(0.5, -0.5, 6)}
  ours = multinet.make_optimizer(config)
  adam = optax.adam(1e-5)
  updates, _ = ours.update(grads, ours.init(params), params)
  expected, _ = adam.update(grads, adam.init(params), params)
  np.testing.assert_array_equal(updates['w'], expected['w'])
  # The experiment behind scripts/train_multinet.py defaults to the same.
  exp = multinet_experiments.MultinetExperiment(workdir='w', data_dir='d')
  assert exp.model_config() == config
