"""Where to cut a network into pipeline stages: the boundaries that minimise
the slowest stage, under a per-layer cost model."""

import itertools
import math

from dni_jax import feedforward


def balanced_interfaces(num_layers: int, num_stages: int, layer_costs,
                        interface_cost: float = 0.0) -> tuple[int, ...]:
  """Stage boundaries (1-based layers followed by an interface, as
  `dni_layers`) minimising the cost of the slowest stage. `layer_costs[i]` is
  the cost of layer i + 1 (layer `num_layers`, the classifier, is always in
  the top stage); every stage below the top also pays `interface_cost` (its
  synthetic-gradient model)."""
  if not 2 <= num_stages <= num_layers:
    raise ValueError(f'{num_stages} stages do not fit {num_layers} layers '
                     '(2 to num_layers stages)')
  best = None
  for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
    bounds = (0,) + cuts + (num_layers,)
    slowest = max(sum(layer_costs[a:b]) + (interface_cost if b < num_layers
                                           else 0.0)
                  for a, b in zip(bounds, bounds[1:]))
    if best is None or slowest < best[0]:
      best = (slowest, cuts)
  return best[1]


def fcn_costs(config: feedforward.FeedForwardConfig):
  """Multiply-adds per example of a DNI step of each FCN layer (forward,
  weight gradient, and input gradient above layer 1) and of one
  synthetic-gradient model (prediction, regression and its gradient): the
  balancing heuristic. Returns (layer_costs, interface_cost)."""
  d_in = math.prod(config.input_shape)
  h, k = config.hidden_size, config.num_classes
  sg_in = h + (k if config.method == 'cdni' else 0)
  sg_widths = ([sg_in] + [config.sg_hidden_size]
               * config.resolved_sg_hidden_layers + [h])
  sg = 3 * sum(a * b for a, b in zip(sg_widths, sg_widths[1:]))
  costs = [2 * d_in * h] + [3 * h * h] * (config.num_layers - 2) + [3 * h * k]
  return costs, sg
