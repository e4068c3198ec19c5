"""Every feed-forward method's whole `train_step` against a reference written
here from the paper's equations (Sec. 2, 2.1, 3.1, A.1) with `jax.grad`.

The reference uses only the Flax module definitions (`ff.modules`) and
`optax.adam`. Per step, block j (a chain of modules between interfaces) is
updated by the gradient of the surrogate loss

    L_j(theta) = mean_b < stop_grad(g_hat_b), h_b(theta) >,

where g_hat is its gradient source -- dni: M_j(h); cdni: M_j(h, one_hot(y));
no_bprop: 0; stale: the moving average of earlier targets in batch slot b --
and the top block by the batch-mean cross-entropy. Both are batch means, so
parameter gradients are those of the batch-mean loss, while what crosses an
interface is per example: the target of the model below block j is
B * dL_j/dx (bootstrapped from block j's own synthetic gradient; the true
loss gradient at the top). M_j regresses onto it, at the input h that block
j + 1 received and with the same context, with the L2 loss of weight 1:

    L_SG = mean_b || M_j(h_b, c_b) - target_b ||^2.

Every module has its own Adam state. The comparison covers every parameter,
Adam moment and count, batch statistic, stale memory and the step counter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dni_jax
from dni_jax import FeedForwardState
from dni_jax import ModuleState

B = 8
STEPS = 3


def fcn(method, **kw):
  args = dict(input_shape=(8, 8, 1), num_classes=10, num_layers=4,
              hidden_size=8, method=method, sg_hidden_layers=1,
              sg_hidden_size=16, learning_rate=1e-2, lr_boundaries=(2,),
              lr_decay=0.5, stale_decay=0.7)
  if method == 'stale':
    args['batch_size'] = B
  args.update(kw)
  return dni_jax.FeedForwardConfig(**args)


def cnn(method, **kw):
  args = dict(model='cnn', num_layers=3, hidden_size=4, sg_hidden_size=4)
  args.update(kw)
  return fcn(method, **args)


@functools.lru_cache(maxsize=None)
def make(config):
  """Unjitted: op by op, the compiled primitives are shared by every case
  (the fused jit is the same function; test_feedforward checks they agree)."""
  return dni_jax.make_feedforward(config, jit=False)


def batch(step):
  k1, k2 = jax.random.split(jax.random.key(100 + step))
  return (jax.random.uniform(k1, (B, 8, 8, 1)),
          jax.random.randint(k2, (B,), 0, 10))


def perturbed(tree, seed, scale=0.3):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def initial_state(ff):
  """`init`, with gradient sources that are nonzero from the first step: the
  synthetic-gradient models' zero-initialised final layers (A.1) perturbed,
  the stale memories filled with random gradients."""
  state = ff.init(jax.random.key(0))
  sources = []
  for j, s in enumerate(state.synthetic):
    if ff.config.method == 'stale':
      sources.append(s._replace(average=jax.random.normal(
          jax.random.key(50 + j), s.average.shape)))
    else:
      sources.append(s._replace(params=perturbed(s.params, 50 + j)))
  return state._replace(synthetic=tuple(sources))


# ---------------------------------------------------------------------------
# The reference.
# ---------------------------------------------------------------------------

def forward(model, params, stats, x, *extra):
  """Training-mode forward of a Flax module: (output, batch stats after)."""
  if not stats:
    return model.apply({'params': params}, x, *extra, train=True), stats
  out, new = model.apply({'params': params, 'batch_stats': stats}, x, *extra,
                         train=True, mutable=['batch_stats'])
  return out, new['batch_stats']


def chain_forward(models, params, stats, x):
  new_stats = []
  for model, p, s in zip(models, params, stats):
    x, s = forward(model, p, s, x)
    new_stats.append(s)
  return x, new_stats


def per_example(x):
  return x.reshape(x.shape[0], -1)


def l2_regression_loss(prediction, target):
  """Mean over the batch of the squared Euclidean distance (weight 1)."""
  diff = per_example(prediction - jax.lax.stop_gradient(target))
  return jnp.mean(jnp.sum(diff * diff, axis=-1))


def adam_step(tx, module, grads, stats):
  updates, opt_state = tx.update(grads, module.opt_state, module.params)
  return ModuleState(optax.apply_updates(module.params, updates), stats,
                     opt_state)


def layout(config):
  """Blocks of hidden-layer indices (0-based); the last also holds the head."""
  n = config.num_layers
  if config.method == 'bprop':
    cuts = ()
  elif config.dni_layers is None:
    cuts = tuple(range(1, n))
  else:
    cuts = tuple(config.dni_layers)
  edges = (0,) + cuts + (n - 1,)
  return [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:])]


def sparse_update_mask(config, step, num_blocks):
  """Fig. 5 left: which blocks keep this step's update, drawn from the seed
  and the step."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
  return jax.random.bernoulli(key, config.p_update, (num_blocks,))


def reference_step(config, defs, state, images, labels):
  """One training step of `config`'s method, from the equations above."""
  tx = optax.adam(optax.piecewise_constant_schedule(
      config.learning_rate,
      {b: config.lr_decay for b in config.lr_boundaries}))
  method = config.method
  blocks = layout(config)
  top = len(blocks) - 1
  context = (jax.nn.one_hot(labels, config.num_classes)
             if method == 'cdni' else None)

  def gradient_source(j, h):
    if method in ('dni', 'cdni'):
      sg = state.synthetic[j]
      return forward(defs.synthetic, sg.params, sg.batch_stats, h, context)[0]
    if method == 'stale':     # Slot b: the average of earlier slot-b targets.
      return state.synthetic[j].average
    return jnp.zeros_like(h)  # no_bprop

  new_layers = list(state.layers)
  block_inputs, block_outputs, input_targets = [], [], []
  x = images
  for j, block in enumerate(blocks):
    if config.synthetic_inputs and j > 0:
      si = state.inputs[j - 1]
      x = forward(defs.synthetic_input, si.params, si.batch_stats, images)[0]
    block_inputs.append(x)
    models = [defs.hidden[i] for i in block]
    modules = [state.layers[i] for i in block]
    if j == top:
      models.append(defs.head)
      modules.append(state.head)
    stats = [m.batch_stats for m in modules]

    if j == top:   # The true loss: batch-mean cross-entropy.
      def loss_fn(params, x):
        logits, new_stats = chain_forward(models, params, stats, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.mean(loss), (logits, new_stats)
    else:
      h, _ = chain_forward(models, [m.params for m in modules], stats, x)
      g_hat = jax.lax.stop_gradient(gradient_source(j, h))
      # Surrogate: d/dtheta of mean_b <g_hat_b, h_b(theta)> is Eq. (2)'s
      # update, g_hat read as the per-example gradient B * dL/dh.
      def loss_fn(params, x):
        h, new_stats = chain_forward(models, params, stats, x)
        return jnp.mean(jnp.sum(per_example(g_hat * h), -1)), (h, new_stats)

    (loss, (out, new_stats)), (grads, grad_x) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(
            [m.params for m in modules], x)
    updated = [adam_step(tx, m, g, s)
               for m, g, s in zip(modules, grads, new_stats)]
    if j == top:
      new_head, updated = updated[-1], updated[:-1]
      top_loss, logits = loss, out
    for i, m in zip(block, updated):
      new_layers[i] = m
    block_outputs.append(out)
    # Per example: the target for the gradient model below this block
    # (bootstrapped from g_hat, or the true gradient from the top block).
    input_targets.append(B * grad_x)
    x = out

  new_sources, sg_losses = [], []
  for j, source in enumerate(state.synthetic):
    # Interface j: trained where block j + 1 took its input, on its target.
    h, target = block_inputs[j + 1], input_targets[j + 1]
    if method == 'stale':
      sg_losses.append(l2_regression_loss(source.average, target))
      decay = config.stale_decay
      new_sources.append(source._replace(
          average=decay * source.average + (1 - decay) * target))
    elif method in ('dni', 'cdni'):
      def sg_loss_fn(params, h=h, target=target, source=source):
        pred, stats = forward(defs.synthetic, params, source.batch_stats, h,
                              context)
        return l2_regression_loss(pred, target), stats
      (sg_loss, stats), grads = jax.value_and_grad(sg_loss_fn, has_aux=True)(
          source.params)
      sg_losses.append(sg_loss)
      new_sources.append(adam_step(tx, source, grads, stats))

  new_inputs, si_losses = [], []
  for j, si in enumerate(state.inputs):
    # Complete unlock: I_j(data) regresses onto block j's real output.
    def si_loss_fn(params, si=si, target=block_outputs[j]):
      pred, stats = forward(defs.synthetic_input, params, si.batch_stats,
                            images)
      return l2_regression_loss(pred, target), stats
    (si_loss, stats), grads = jax.value_and_grad(si_loss_fn, has_aux=True)(
        si.params)
    si_losses.append(si_loss)
    new_inputs.append(adam_step(tx, si, grads, stats))

  mask = jnp.ones((len(blocks),), bool)
  if config.p_update < 1:
    mask = sparse_update_mask(config, state.step, len(blocks))
    keep = lambda flag, new, old: jax.tree.map(
        lambda n, o: jnp.where(flag, n, o), new, old)
    for j, block in enumerate(blocks):
      for i in block:
        new_layers[i] = keep(mask[j], new_layers[i], state.layers[i])
    new_head = keep(mask[top], new_head, state.head)
    # Interface j's model learns from block j + 1's backward pass; an input
    # model needs the block below (its target) and its own block.
    new_sources = [keep(mask[j + 1], n, o)
                   for j, (n, o) in enumerate(zip(new_sources,
                                                  state.synthetic))]
    new_inputs = [keep(mask[j] & mask[j + 1], n, o)
                  for j, (n, o) in enumerate(zip(new_inputs, state.inputs))]
  new_state = FeedForwardState(tuple(new_layers), new_head, tuple(new_sources),
                               state.step + 1, tuple(new_inputs))
  metrics = {'loss': top_loss,
             'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
             'sg_loss': jnp.asarray(sg_losses, jnp.float32).reshape(-1),
             'si_loss': jnp.asarray(si_losses, jnp.float32).reshape(-1),
             'block_updated': mask}
  return new_state, metrics


def assert_same(ours, reference, what):
  """Same tree; integer leaves exactly equal, floats to rtol 1e-5 (atol a
  1e-6 fraction of the leaf's largest magnitude, for entries that cancel)."""
  ours_leaves, ours_tree = jax.tree_util.tree_flatten_with_path(ours)
  ref_leaves, ref_tree = jax.tree_util.tree_flatten_with_path(reference)
  assert ours_tree == ref_tree, f'{what}: {ours_tree} != {ref_tree}'
  for (path, a), (_, b) in zip(ours_leaves, ref_leaves):
    name = f'{what}{jax.tree_util.keystr(path)}'
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, name
    if np.issubdtype(b.dtype, np.floating):
      scale = float(np.max(np.abs(b))) if b.size else 0.0
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale,
                                 err_msg=name)
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)


def assert_same_module(config, ours, reference, what):
  """Adam moments, count and batch statistics as `assert_same`. Parameters
  too, plus the moments' tolerance carried through Adam's step
  lr * m_hat / (sqrt(v_hat) + eps): where a gradient entry is at the
  rounding level of its leaf (BatchNorm's backward cancels), float32
  rounding alone changes that step by a visible fraction of lr."""
  assert_same(ours.opt_state, reference.opt_state, f'{what}.opt_state')
  assert_same(ours.batch_stats, reference.batch_stats, f'{what}.batch_stats')
  adam = reference.opt_state[0]
  t = int(adam.count)
  if t == 0:   # Never updated (sparse updates): still the initial values.
    assert_same(ours.params, reference.params, f'{what}.params')
    return
  lr = config.learning_rate * config.lr_decay**sum(
      t - 1 >= b for b in config.lr_boundaries)
  paths = jax.tree_util.tree_flatten_with_path(reference.params)[0]
  for (path, p_ref), p_ours, m, v in zip(
      paths, jax.tree.leaves(ours.params), jax.tree.leaves(adam.mu),
      jax.tree.leaves(adam.nu)):
    p_ref, p_ours, m, v = map(np.asarray, (p_ref, p_ours, m, v))
    m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
    slack = lr * (1e-5 * np.abs(m_hat) + 1e-6 * np.max(np.abs(m_hat))) / (
        np.sqrt(v_hat) + 1e-8)
    error = np.abs(p_ours - p_ref)
    bad = error > 1e-5 * np.abs(p_ref) + 1e-6 * np.max(np.abs(p_ref)) + slack
    assert not bad.any(), (
        f'{what}.params{jax.tree_util.keystr(path)}: {bad.sum()} entries '
        f'differ, at most by {error.max()}: {p_ours[bad]} != {p_ref[bad]}')


def assert_same_state(config, ours, reference, what):
  assert_same(ours.step, reference.step, f'{what}.step')
  modules = {'layers': ours.layers, 'head': (ours.head,),
             'synthetic': ours.synthetic, 'inputs': ours.inputs}
  references = {'layers': reference.layers, 'head': (reference.head,),
                'synthetic': reference.synthetic, 'inputs': reference.inputs}
  for group, mods in modules.items():
    assert len(mods) == len(references[group]), group
    for i, (m, r) in enumerate(zip(mods, references[group])):
      if isinstance(r, ModuleState):
        assert_same_module(config, m, r, f'{what}.{group}[{i}]')
      else:    # The stale baseline's memory.
        assert_same(m, r, f'{what}.{group}[{i}]')


def run_against_reference(config):
  """STEPS steps of `train_step`; each compared with one reference step
  from the same state."""
  ff = make(config)
  reference = functools.partial(reference_step, config, ff.modules)
  state = initial_state(ff)
  masks = []
  for step in range(STEPS):
    images, labels = batch(step)
    ref, ref_metrics = reference(state, images, labels)
    state, metrics = ff.train_step(state, images, labels)
    assert_same_state(config, state, ref, f'step {step}: state')
    for name, value in ref_metrics.items():
      assert_same(metrics[name], value, f'step {step}: metrics[{name!r}]')
    masks.append(np.asarray(ref_metrics['block_updated']))
  return np.stack(masks)


CASES = {
    'fcn-dni': fcn('dni'),
    'fcn-cdni': fcn('cdni', sg_hidden_layers=0),   # A.1: linear cDNI models.
    'fcn-stale': fcn('stale'),
    'fcn-bprop': fcn('bprop'),
    # Blocks of two modules between interfaces (Fig. 9): bootstrapping
    # through a two-layer block, a two-layer top block.
    'fcn-dni-layers': fcn('dni', num_layers=5, dni_layers=(1, 3)),
    'fcn-no_bprop-layers': fcn('no_bprop', num_layers=5, dni_layers=(1, 3)),
    'cnn-cdni': cnn('cdni'),
    'cnn-stale': cnn('stale'),
    'cnn-dni-layers': cnn('dni', num_layers=4, dni_layers=(2,)),
    'fcn-dni-unlock': fcn('dni', synthetic_inputs=True),
    'fcn-cdni-unlock': fcn('cdni', synthetic_inputs=True, num_layers=5,
                           dni_layers=(1, 3)),
}


@pytest.mark.parametrize('name', list(CASES))
def test_train_step_equals_the_reference(name):
  run_against_reference(CASES[name])


def test_cdni_context_changes_the_synthetic_gradient():
  """The cDNI cases above are sensitive to the label: with the perturbed
  models, M(h, one_hot(y)) differs from M(h, 0)."""
  for config in (CASES['fcn-cdni'], CASES['cnn-cdni']):
    ff = make(config)
    sg = initial_state(ff).synthetic[0]
    images, labels = batch(0)
    h = ff.hidden_forward(0, ff.init(jax.random.key(0)).layers[0], images)
    with_label, _ = forward(ff.modules.synthetic, sg.params, sg.batch_stats,
                            h, jax.nn.one_hot(labels, 10))
    without, _ = forward(ff.modules.synthetic, sg.params, sg.batch_stats, h,
                         jnp.zeros((B, 10)))
    assert float(jnp.max(jnp.abs(with_label - without))) > 1e-2


@pytest.mark.parametrize('config', [
    fcn('dni', p_update=0.5, seed=26),
    fcn('no_bprop', p_update=0.5, seed=26),
    fcn('cdni', p_update=0.5, seed=26, synthetic_inputs=True),
], ids=['dni', 'no_bprop', 'cdni-unlock'])
def test_sparse_updates_keep_exactly_the_skipped_modules(config):
  """p_update < 1: the reference keeps every skipped block, the model below
  it (it got no target) and the input models it feeds or is fed by, from
  the mask drawn in the reference. The draws over the steps keep and update
  every block at least once, and differ between neighbouring blocks."""
  masks = run_against_reference(config)
  assert masks.any(axis=0).all() and not masks.all(axis=0).any(), masks
  assert (masks[:, 1:] != masks[:, :-1]).any(axis=0).all(), masks


# ---------------------------------------------------------------------------
# An oracle gradient source turns a decoupled step into Bprop's step.
# ---------------------------------------------------------------------------

def network_loss(defs, state, first, h, labels):
  """Batch-mean cross-entropy of the network above hidden layer `first`
  (0-based) given its input h, in training mode."""
  for layer in state.layers[first:]:
    h, _ = forward(defs.hidden[first], layer.params, layer.batch_stats, h)
    first += 1
  logits, _ = forward(defs.head, state.head.params, state.head.batch_stats, h)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                  labels))


def true_per_example_gradients(defs, state, images, labels):
  """Each hidden layer's input and the true per-example gradient of its
  output, B * dL/dh (the whole network's loss)."""
  xs = [images]
  for i, layer in enumerate(state.layers):
    xs.append(forward(defs.hidden[i], layer.params, layer.batch_stats,
                      xs[-1])[0])
  grads = [B * jax.grad(functools.partial(network_loss, defs, state, i + 1))(
      xs[i + 1], labels) for i in range(len(state.layers))]
  return xs, grads


@pytest.mark.parametrize('make_config', [fcn, cnn], ids=['fcn', 'cnn'])
def test_oracle_through_the_block_api_equals_the_bprop_step(make_config):
  """Every hidden layer updated alone (`backprop_update`) from the true
  per-example gradient of its output, and the classifier from the loss:
  Bprop's step, and each layer hands down the true gradient of its input."""
  ff, bp = make(make_config('dni')), make(make_config('bprop'))
  state = bp.init(jax.random.key(0))
  images, labels = batch(0)
  xs, true = true_per_example_gradients(ff.modules, state, images, labels)
  expected, _ = bp.train_step(state, images, labels)
  for i, layer in enumerate(state.layers):
    new, h, grad_x, grad_h = ff.backprop_update(i, layer, xs[i], true[i])
    assert_same(h, xs[i + 1], f'layer {i} output')
    assert_same(grad_h, true[i], f'layer {i} gradient source')
    if i > 0:
      assert_same(grad_x, true[i - 1], f'layer {i} input gradient')
    assert_same_module(ff.config, new, expected.layers[i], f'layer {i}')
  head, grad_x, loss, _ = ff.head_update(state.head, xs[-1], labels)
  assert_same(grad_x, true[-1], 'classifier input gradient')
  assert_same(loss, network_loss(ff.modules, state, len(state.layers), xs[-1],
                                 labels), 'loss')
  assert_same_module(ff.config, head, expected.head, 'classifier')


@pytest.mark.parametrize('dni_layers', [None, (1, 3)], ids=['every', 'blocks'])
def test_oracle_gradient_memory_makes_the_whole_step_bprop(dni_layers):
  """A whole fused `train_step` whose gradient source holds the true
  per-example gradients (the stale memory, decay 0, filled with them) is
  Bprop's `train_step`; the memory then holds them again (its targets were
  the true gradients: bootstrapping from a true gradient gives a true one)."""
  config = fcn('stale', num_layers=5, stale_decay=0.0, dni_layers=dni_layers)
  ff, bp = make(config), make(fcn('bprop', num_layers=5))
  state = ff.init(jax.random.key(0))
  images, labels = batch(0)
  _, true = true_per_example_gradients(ff.modules, state, images, labels)
  oracle = [true[k - 1] for k in config.interfaces]
  state = state._replace(synthetic=tuple(
      s._replace(average=g) for s, g in zip(state.synthetic, oracle)))
  new, metrics = ff.train_step(state, images, labels)
  expected, expected_metrics = bp.train_step(bp.init(jax.random.key(0)),
                                             images, labels)
  for i, (ours, theirs) in enumerate(zip(new.layers, expected.layers)):
    assert_same_module(config, ours, theirs, f'layer {i}')
  assert_same_module(config, new.head, expected.head, 'classifier')
  assert_same(metrics['loss'], expected_metrics['loss'], 'loss')
  for j, (s, g) in enumerate(zip(new.synthetic, oracle)):
    assert_same(s.average, g, f'memory {j}')
