"""Finiteness of every step's metrics, tracked on device; the first
unhealthy step named by module and quantity (`TrainingError`)."""

import jax
import jax.numpy as jnp
import numpy as np

from dni_jax.training.workdir import TrainingError

Array = jax.Array


def _health_flags(metrics: dict) -> dict[str, Array]:
  """Per-quantity finiteness of one step's metrics (True = healthy)."""
  flags = {}
  for name, value in metrics.items():
    value = jnp.asarray(value)
    flags[name] = value if name.endswith('_finite') else jnp.isfinite(value)
  return flags


@jax.jit
def _track_health(health: dict, step: Array, metrics: dict) -> dict:
  """Keeps the flags of the first unhealthy step, on device (no host sync)."""
  flags = _health_flags(metrics)
  ok = jnp.all(jnp.stack([jnp.all(f) for f in jax.tree.leaves(flags)]))
  first = (health['step'] < 0) & ~ok
  return {'step': jnp.where(first, step, health['step']),
          'flags': jax.tree.map(lambda new, old: jnp.where(first, new, old),
                                flags, health['flags'])}


# What a False flag at index i-1 means (layers and interfaces counted from the
# bottom, from 1), in causal order: a non-finite output
# of layer i spreads to everything above it and to every gradient; given
# finite outputs, a non-finite synthetic gradient can only come from the model
# on its own interface; given finite synthetic gradients, a non-finite layer
# comes from its own update; regression targets flow downwards, so the highest
# bad synthetic-gradient loss is the origin. The first found is reported.
_CAUSAL_ORDER = (
    ('activation_finite', 'output of layer {i}', min),
    ('synthetic_gradient_finite', 'synthetic gradient on interface {i}', min),
    ('layer_finite', 'parameters or gradient of layer {i}', min),
    ('sg_loss', 'synthetic-gradient loss on interface {i}', max),
)


def non_finite_error(what: str, step: int) -> TrainingError:
  return TrainingError(f'non-finite {what} at step {step}; stopped, the last '
                       'good checkpoint is kept')


def check_health(health: dict) -> None:
  """Raises TrainingError naming the first non-finite step, module, quantity."""
  health = jax.device_get(health)
  step = int(health['step'])
  if step < 0:
    return
  bad = {name: np.flatnonzero(~np.asarray(flag).reshape(-1)).tolist()
         for name, flag in health['flags'].items()}
  what = None
  for name, template, pick in _CAUSAL_ORDER:
    indices = bad.pop(name, [])
    if indices:
      what = template.format(i=pick(indices) + 1)
      break
  if what is None:
    names = [name for name, indices in bad.items() if indices]
    what = 'training loss' if 'loss' in names else ', '.join(names)
  raise non_finite_error(what, step)


class HealthTracker:
  """The finiteness of every step's metrics (those named in `names`, or all),
  kept on device (no host sync per step); `check` raises TrainingError for
  the first unhealthy step (`check_health`)."""

  def __init__(self, names: tuple[str, ...] | None = None):
    self.names = names
    self.health = None

  def track(self, step_after: int, metrics: dict) -> None:
    if self.names is not None:
      metrics = {name: metrics[name] for name in self.names}
    if self.health is None:
      self.health = {'step': jnp.asarray(-1),
                     'flags': jax.tree.map(jnp.ones_like,
                                           _health_flags(metrics))}
    self.health = _track_health(self.health, jnp.asarray(step_after), metrics)

  def check(self) -> None:
    if self.health is not None:
      check_health(self.health)
