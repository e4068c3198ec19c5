"""One vocabulary of method names for every script and experiment.

  bprop     the true gradient: backpropagation (through the unroll for an
            RNN, through the whole block of T^2 steps for two networks);
  no_bprop  no gradient crosses an interface (a zero gradient);
  dni       a learned synthetic gradient; `cdni` conditioned on the labels,
            `dni_aux` with the auxiliary future-gradient prediction, `stale`
            a moving average of past gradients (Sec. 3.1's baseline).

The modules keep their own spellings (`recurrent.METHODS` says `bptt`,
`multinet.MODES` `backprop` and `decoupled`), which the scripts still accept
as aliases. An experiment stores the module's spelling, so config.json and
result.json record exactly what they recorded before: a workdir started
with either spelling resumes with the other.
"""

from typing import Sequence

# Old spelling -> its name in the vocabulary.
ALIASES = {'backprop': 'bprop', 'bptt': 'bprop', 'decoupled': 'no_bprop'}


def canonical(name: str) -> str:
  """`name` in the vocabulary (an alias becomes the name it stands for)."""
  return ALIASES.get(name, name)


def names(module_methods: Sequence[str]) -> tuple[str, ...]:
  """The vocabulary's names of a module's methods, in the module's order."""
  return tuple(canonical(m) for m in module_methods)


def flag_values(module_methods: Sequence[str]) -> list[str]:
  """What a script's flag accepts: the names, then the module's aliases."""
  return list(names(module_methods)) + [
      m for m in module_methods if canonical(m) != m]


def to_module(name: str, module_methods: Sequence[str], flag: str) -> str:
  """The module's spelling of `name` (a name of the vocabulary or the
  module's own spelling); ValueError naming `flag` for any other."""
  for method in module_methods:
    if name in (method, canonical(method)):
      return method
  aliases = [m for m in module_methods if canonical(m) != m]
  raise ValueError(
      f'--{flag}={name}: must be one of {", ".join(names(module_methods))}'
      + (f' (or the older {", ".join(aliases)})' if aliases else ''))
