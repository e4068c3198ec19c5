"""Checks of flag values every script shares: one `--name=value: why`
ValueError for the first bad one."""

import math
from typing import Any, NoReturn


def check_at_most(settings: Any, limits: dict[str, tuple[int, str]]) -> None:
  """Raises ValueError naming the first flag in `limits` ({name: (bound,
  why)}) whose value (an attribute of `settings`) is above its bound: values
  no run can mean, which would only grow memory or compile time for minutes."""
  for name, (bound, why) in limits.items():
    value = getattr(settings, name)
    if value is not None and value > bound:
      raise ValueError(f'--{name}={value}: must be at most {bound} ({why})')


def check_positive_flags(settings: Any, names: tuple[str, ...]) -> None:
  """Raises ValueError naming the first of `names` (attributes of
  `settings`, one per flag) that is set but not a positive integer."""
  for name in names:
    value = getattr(settings, name)
    if value is not None and value < 1:
      raise ValueError(f'--{name}={value}: must be a positive integer')


def refuse(settings: Any, name: str, why: str) -> NoReturn:
  """Raises ValueError `--name=value: why` for the flag `name` (an attribute
  of `settings`)."""
  raise ValueError(f'--{name}={getattr(settings, name)}: {why}')


def check_positive_finite(settings: Any, names: tuple[str, ...]) -> None:
  """Refuses the first of `names` that is set but not a positive finite
  number."""
  for name in names:
    value = getattr(settings, name)
    if value is not None and not (value > 0 and math.isfinite(value)):
      refuse(settings, name, 'must be a positive finite number')


def check_non_negative(settings: Any, names: tuple[str, ...]) -> None:
  """Refuses the first of `names` that is negative (a seed, say)."""
  for name in names:
    if getattr(settings, name) < 0:
      refuse(settings, name, 'must be >= 0')
