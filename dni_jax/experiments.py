"""Experiment entry points the scripts call: settings in, workdir out."""

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
import jax

from dni_jax import data
from dni_jax import feedforward
from dni_jax import training


@dataclasses.dataclass(frozen=True)
class FeedForwardExperiment:
  """Everything `scripts/train_ff.py` sets; validated on construction."""
  workdir: str
  dataset: str = 'mnist'
  data_dir: str | None = None
  data_source: str = 'files'
  model: str = 'fcn'
  num_layers: int = 4
  hidden_size: int | None = None        # None: 256 units (FCN), 64 filters (CNN).
  method: str = 'dni'
  dni_layers: tuple[int, ...] | None = None  # None: after every layer.
  p_update: float = 1.0
  synthetic_inputs: bool = False
  sg_hidden_layers: int | None = None   # None: the paper's choice (A.1).
  sg_hidden_size: int | None = None     # None: 1024 (FCN), hidden_size (CNN).
  learning_rate: float = 3e-5
  lr_boundaries: tuple[int, ...] = (300_000, 400_000)
  lr_decay: float = 0.1
  batch_size: int = 256
  num_steps: int = 500_000
  eval_every: int = 5000
  log_every: int = 500
  checkpoint_every: int = 10_000
  seed: int = 0
  overwrite: bool = False

  def __post_init__(self):
    def bad(flag, msg):
      raise ValueError(f'--{flag}={getattr(self, flag)}: {msg}')
    if self.dataset not in data.DATASETS:
      bad('dataset', f'must be one of {", ".join(data.DATASETS)}')
    if self.data_source not in ('files', 'tfds'):
      bad('data_source', 'must be files or tfds')
    if self.model not in feedforward.MODELS:
      bad('model', f'must be one of {", ".join(feedforward.MODELS)}')
    if self.method not in feedforward.METHODS:
      bad('method', f'must be one of {", ".join(feedforward.METHODS)}')
    for flag in ('num_steps', 'eval_every', 'log_every', 'checkpoint_every',
                 'batch_size', 'hidden_size', 'sg_hidden_size'):
      value = getattr(self, flag)
      if value is not None and value < 1:
        bad(flag, 'must be a positive integer')
    if self.num_layers < 2:
      bad('num_layers', 'must be >= 2 (hidden layers + the classifier)')
    if self.sg_hidden_layers is not None and not 0 <= self.sg_hidden_layers <= 2:
      bad('sg_hidden_layers', 'must be 0, 1 or 2')
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      bad('learning_rate', 'must be a positive finite number')
    if not 0 < self.lr_decay <= 1:
      bad('lr_decay', 'must be in (0, 1]')
    if (any(b <= 0 for b in self.lr_boundaries)
        or list(self.lr_boundaries) != sorted(set(self.lr_boundaries))):
      bad('lr_boundaries', 'must be positive, strictly increasing integers')
    if self.seed < 0:
      bad('seed', 'must be >= 0')
    if not 0 < self.p_update <= 1:
      bad('p_update', 'must be in (0, 1]')
    if self.p_update < 1 and self.method == 'bprop':
      raise ValueError('--p_update < 1 needs interfaces to decouple the '
                       'layers; use --method=dni, cdni or no_bprop')
    if self.synthetic_inputs and self.method not in ('dni', 'cdni'):
      raise ValueError(f'--synthetic_inputs needs --method=dni or cdni (got '
                       f'--method={self.method})')
    if self.synthetic_inputs and self.model != 'fcn':
      raise ValueError('--synthetic_inputs is implemented for --model=fcn '
                       'only')
    if self.dni_layers is not None:
      if self.method == 'bprop':
        raise ValueError('--dni_layers is set but --method=bprop has no '
                         'interfaces; use dni, cdni or no_bprop')
      if (list(self.dni_layers) != sorted(set(self.dni_layers)) or any(
          not 1 <= k < self.num_layers for k in self.dni_layers)):
        raise ValueError(
            f'--dni_layers={",".join(map(str, self.dni_layers))}: must be '
            f'strictly increasing layer numbers in 1..{self.num_layers - 1} '
            '(k puts a DNI between layers k and k+1)')
    if not self.workdir:
      bad('workdir', 'is required')

  @property
  def resolved_sg_hidden_layers(self) -> int:
    """A.1: MNIST FCN, two hidden layers for DNI and zero (linear) for cDNI;
    CNN, two hidden convolutional layers."""
    if self.sg_hidden_layers is not None:
      return self.sg_hidden_layers
    if self.synthetic_inputs:
      return 1   # A.1, complete unlock: one hidden layer for both models.
    return 0 if (self.method == 'cdni' and self.model == 'fcn') else 2

  @property
  def resolved_hidden_size(self) -> int:
    """A.1: 256 units per FCN layer, 64 filters per MNIST CNN layer."""
    if self.hidden_size is not None:
      return self.hidden_size
    return 256 if self.model == 'fcn' else 64

  @property
  def resolved_sg_hidden_size(self) -> int:
    """A.1: 1024 units (MNIST FCN); CNN: as many filters as the layers."""
    if self.sg_hidden_size is not None:
      return self.sg_hidden_size
    return 1024 if self.model == 'fcn' else self.resolved_hidden_size

  def config_record(self) -> dict[str, Any]:
    """What config.json holds: every setting, defaults resolved."""
    record = dataclasses.asdict(self)
    record['sg_hidden_layers'] = self.resolved_sg_hidden_layers
    record['hidden_size'] = self.resolved_hidden_size
    record['sg_hidden_size'] = self.resolved_sg_hidden_size
    record['lr_boundaries'] = list(self.lr_boundaries)
    if self.dni_layers is not None:
      record['dni_layers'] = list(self.dni_layers)
    del record['overwrite']  # How to treat the workdir, not part of the run.
    return record


def train_feedforward(exp: FeedForwardExperiment) -> dict:
  """Runs (or resumes) one feed-forward experiment; returns result.json's dict."""
  status = training.prepare_workdir(exp.workdir, exp.config_record(),
                                    exp.overwrite)
  if status == 'finished':
    logging.info('%s already holds a finished run; nothing to do',
                 exp.workdir)
    with open(os.path.join(exp.workdir, training.RESULT_FILE)) as f:
      return json.load(f)
  train = data.load_dataset(exp.dataset, 'train', exp.data_dir, exp.data_source)
  test = data.load_dataset(exp.dataset, 'test', exp.data_dir, exp.data_source)
  logging.info('%s: %d train, %d test examples of shape %s', exp.dataset,
               len(train.labels), len(test.labels), train.images.shape[1:])
  config = feedforward.FeedForwardConfig(
      input_shape=tuple(train.images.shape[1:]),
      num_classes=train.num_classes,
      model=exp.model,
      num_layers=exp.num_layers,
      hidden_size=exp.resolved_hidden_size,
      method=exp.method,
      sg_hidden_layers=exp.resolved_sg_hidden_layers,
      sg_hidden_size=exp.resolved_sg_hidden_size,
      learning_rate=exp.learning_rate,
      lr_boundaries=tuple(exp.lr_boundaries),
      lr_decay=exp.lr_decay,
      dni_layers=exp.dni_layers,
      p_update=exp.p_update,
      synthetic_inputs=exp.synthetic_inputs,
      seed=exp.seed)
  ff = feedforward.make_feedforward(config)
  diagnostics = None
  if config.interfaces:
    # Fig. 10, on a fixed batch of test examples at every evaluation.
    probe = (test.images[:exp.batch_size], test.labels[:exp.batch_size])
    diagnostics = lambda state: ff.diagnostics(state, *probe)
  loop = training.LoopConfig(
      num_steps=exp.num_steps, eval_every=exp.eval_every,
      log_every=exp.log_every, checkpoint_every=exp.checkpoint_every,
      batch_size=exp.batch_size, seed=exp.seed)
  return training.fit(
      workdir=exp.workdir, loop=loop,
      init_state=ff.init(jax.random.key(exp.seed)),
      train_step=ff.train_step, eval_batch=ff.eval_batch,
      train_data=(train.images, train.labels),
      test_data=(test.images, test.labels),
      diagnostics=diagnostics,
      extra_result={'method': exp.method, 'num_layers': exp.num_layers,
                    'dataset': exp.dataset,
                    'device': jax.devices()[0].device_kind})
